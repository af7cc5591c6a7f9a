"""tilefuse.optim with FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded DTensor params on a
2-process gloo CPU group (localhost only) follow torch's AdamW trajectory under FSDP2 bit for bit.

DTensor params (and any other tensor subclass) take torch's own step, which dispatches through the
subclass: the fused kernel addresses raw storage, which a DTensor wrapper does not have (before
this was routed, the launch failed with "Attempted to access the data pointer on an invalid
python storage").
"""
import os
import socket

import pytest
import torch

import tilefuse.optim

WORLD, STEPS, TIMEOUT_S = 2, 3, 120


def _worker(rank, port, queue):
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (WORLD,))
        result = {}
        for kind in ("torch", "tilefuse"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 4))
            fully_shard(model, mesh=mesh)
            assert all(isinstance(p, DTensor) for p in model.parameters())
            cls = torch.optim.AdamW if kind == "torch" else tilefuse.optim.AdamW
            opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1)
            torch.manual_seed(1 + rank)
            for _ in range(STEPS):
                model(torch.randn(4, 8)).square().mean().backward()
                opt.step()
                opt.zero_grad()
            state = [opt.state[p]["exp_avg_sq"].full_tensor() for p in model.parameters()]
            result[kind] = [p.full_tensor() for p in model.parameters()] + state
        same = all(torch.equal(a, b) for a, b in zip(result["torch"], result["tilefuse"]))
        queue.put((rank, same, None))
    except Exception as e:  # reported to the parent, not lost in the child's stderr
        queue.put((rank, False, repr(e)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s: two spawned interpreters importing torch.distributed and tilefuse
def test_adamw_fsdp2_matches_torch():
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(_free_port(), queue), nprocs=WORLD, join=False,
                               start_method="spawn")
    try:
        results = sorted(queue.get(timeout=TIMEOUT_S) for _ in range(WORLD))
    finally:
        for p in procs.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, same, err in results:
        assert err is None, f"rank {rank}: {err}"
        assert same, f"rank {rank}: trajectory differs from torch.optim.AdamW under FSDP2"


class _Sub(torch.Tensor):
    """A trivial tensor subclass (stands in for DTensor in the fast lane)."""


def test_tensor_subclass_params_take_torch_step():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    p = torch.nn.Parameter(w.clone().as_subclass(_Sub))
    ref = torch.nn.Parameter(w.clone())
    opt = tilefuse.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    topt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for i in range(2):
        g = torch.randn(5, 3)
        p.grad = g.clone().as_subclass(_Sub)
        ref.grad = g.clone()
        assert opt._needs_reference([p])
        opt.step()
        topt.step()
    assert torch.equal(p.detach().as_subclass(torch.Tensor), ref.detach())
