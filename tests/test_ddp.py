"""A patched model wrapped in DistributedDataParallel (gloo, 2 CPU processes) trains identically
to the unpatched one."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 12),
                         nn.GELU(), nn.Linear(12, 3))


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the torch backend keeps the 2-process run fast; the kernels are covered elsewhere
    os.environ["TILEFUSE_BACKEND"] = "torch"
    import tilefuse
    from tilefuse import train

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in ("eager", "patched"):
            model = _model()
            if name == "patched":
                model = tilefuse.patch(model)
                assert len(tilefuse.patch_report(model).replaced) >= 1
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
            for _ in range(STEPS):
                x = torch.randn(8, 6, generator=g)
                train.step(ddp, (x, torch.randint(0, 3, (8,), generator=g)), opt)
            results[name] = [p.detach().clone() for p in model.parameters()]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_patched_equals_unpatched(tmp_path):
    # spawn, not fork: forking after other tests started torch's thread pools can deadlock
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0["eager"], r0["patched"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(r0["patched"], r1["patched"]):  # DDP kept the replicas in sync
        torch.testing.assert_close(a, b)
    assert not torch.equal(r0["eager"][0], _model()[0].weight)  # it did train
