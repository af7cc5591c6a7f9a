"""``make demo``: (1) a fused Linear+GELU MLP through every backend available here, checked
against eager torch, with timings; (2) a small CNN patched with ``tilefuse.patch`` and trained for
a few hundred steps on synthetic images with ``tilefuse.train``, showing the loss falling under a
progress bar. Part 2 uses the torch backend on CPU (the Triton interpreter is far too slow for a
training run) and the compiled Triton kernels on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

_CHILD = "TILEFUSE_DEMO_CHILD"
_TRAIN = "__train__"


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
    fused(x).sum().backward()  # warm-up: first-call costs (op registration, JIT) are not timed
    fused.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
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


def _synthetic_batch(g, n, size=12, classes=4):
    """Images whose class is the orientation of a noisy stripe pattern (0, 45, 90, 135 deg)."""
    y = torch.randint(0, classes, (n,), generator=g)
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    waves = torch.stack([ii, ii + jj, jj, ii - jj]).float()  # (classes, H, W)
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    img = torch.sin(waves[y] * 1.2 + phase)
    x = img[:, None].expand(n, 3, size, size) + 2.5 * torch.randn(n, 3, size, size, generator=g)
    return x.contiguous(), y


def _train_demo(steps: int = 300) -> None:
    import torch.nn as nn

    import tilefuse
    from tilefuse import train

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(16, 32), nn.GELU(),
        nn.Linear(32, 4)).to(device)
    model = tilefuse.patch(cnn)
    report = tilefuse.patch_report(model)
    print(f"  tilefuse.patch: {len(report.replaced)} modules replaced, "
          f"{len(report.left_alone)} left alone; backend={tilefuse.backend_for_device(device)}")
    for path, what in report.replaced:
        print(f"    {path:>4}: {what}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = ((x.to(device), y.to(device)) for x, y in
               (_synthetic_batch(g, 32) for _ in range(steps)))
    t0 = time.perf_counter()
    losses = train.fit(model, batches, opt, total=steps, desc="  training", grad_clip=5.0)
    dt = time.perf_counter() - t0
    model.eval()
    x, y = _synthetic_batch(torch.Generator().manual_seed(123), 512)
    with torch.no_grad():
        acc = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    status = "OK " if last < 0.5 * first else "BAD"
    print(f"  [{status}] loss {first:.3f} (first 20 steps) -> {last:.3f} (last 20), held-out "
          f"accuracy {acc:.1%} (chance 25%), {steps} steps in {dt:.1f} s")
    if status == "BAD":
        sys.exit(1)


def _run_child(label: str, env_updates: dict) -> None:
    env = dict(os.environ, **env_updates, **{_CHILD: label})
    subprocess.run([sys.executable, "-m", "tilefuse.demo"], env=env, check=True)


def main() -> None:
    if os.environ.get(_CHILD) == _TRAIN:
        _train_demo()
        return
    if os.environ.get(_CHILD):
        _mlp_check(os.environ[_CHILD])
        return
    print("tilefuse demo 1/2: fused Linear+GELU MLP (64 -> 128 -> 10), forward + backward",
          flush=True)
    _run_child("torch reference path (CPU)", {"TRITON_INTERPRET": "0", "TILEFUSE_BACKEND": "torch"})
    _run_child("Triton kernels, interpreter (CPU)", {"TRITON_INTERPRET": "1", "TILEFUSE_BACKEND": ""})
    if torch.cuda.is_available():
        _run_child("Triton kernels, compiled (CUDA)", {"TRITON_INTERPRET": "0", "TILEFUSE_BACKEND": ""})
    else:
        print("  [--] Triton kernels, compiled (CUDA): no GPU here")
    print("tilefuse demo 2/2: patch a small CNN and train it on synthetic stripes (300 steps)",
          flush=True)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        print("  (CPU: the patched modules run their torch reference path here; the Triton "
              "interpreter is for tests, far too slow to train)", flush=True)
    _run_child(_TRAIN, {"TRITON_INTERPRET": "0",
                        "TILEFUSE_BACKEND": "" if on_gpu else "torch"})


if __name__ == "__main__":
    main()
