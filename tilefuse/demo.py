"""``make demo``: a fused Linear+GELU MLP through every backend available here, checked against
eager torch, with timings. Later sections (training, models) are added as they land."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

_CHILD = "TILEFUSE_DEMO_CHILD"


def _mlp_check(label: str) -> None:
    import tilefuse

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    fused = torch.nn.Sequential(tilefuse.nn.Linear(64, 128, activation="gelu"),
                                tilefuse.nn.Linear(128, 10))
    fused[0].load_state_dict(ref[0].state_dict())
    fused[1].load_state_dict(ref[2].state_dict())
    ref, fused = ref.to(device), fused.to(device)
    x = torch.randn(32, 64, device=device)
    backend = tilefuse.backend_for(x)
    t0 = time.perf_counter()
    y = fused(x)
    y.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) * 1e3
    y_ref = ref(x)
    y_ref.sum().backward()
    err = (y - y_ref).abs().max().item()
    gerr = (fused[0].weight.grad - ref[0].weight.grad).abs().max().item()
    status = "OK " if err < 1e-4 and gerr < 1e-4 else "BAD"
    print(f"  [{status}] {label:<34} backend={backend:<6} fwd+bwd {dt:8.1f} ms   "
          f"max|y-torch|={err:.1e}  max|dW-torch|={gerr:.1e}")
    if status == "BAD":
        sys.exit(1)


def _run_child(label: str, env_updates: dict) -> None:
    env = dict(os.environ, **env_updates, **{_CHILD: label})
    subprocess.run([sys.executable, "-m", "tilefuse.demo"], env=env, check=True)


def main() -> None:
    if os.environ.get(_CHILD):
        _mlp_check(os.environ[_CHILD])
        return
    print("tilefuse demo 1/1: fused Linear+GELU MLP (64 -> 128 -> 10), forward + backward",
          flush=True)
    _run_child("torch reference path (CPU)", {"TRITON_INTERPRET": "0", "TILEFUSE_BACKEND": "torch"})
    _run_child("Triton kernels, interpreter (CPU)", {"TRITON_INTERPRET": "1", "TILEFUSE_BACKEND": ""})
    if torch.cuda.is_available():
        _run_child("Triton kernels, compiled (CUDA)", {"TRITON_INTERPRET": "0", "TILEFUSE_BACKEND": ""})
    else:
        print("  [--] Triton kernels, compiled (CUDA): no GPU here")


if __name__ == "__main__":
    main()
