"""The cheat sheet's training loop as one call: ``tilefuse.train.step(model, batch, optimizer)``.

One step = (optional) AMP autocast forward + loss, ``GradScaler``-scaled backward, unscale, grad
norm (monitor) and optional clipping, optimizer step through the scaler (skipped on inf/nan grads),
scaler update, ``zero_grad``. Works with any optimizer (``tilefuse.optim.AdamW``/``SGD`` when
available, torch's otherwise) and any model; the clip uses ``tilefuse.optim.clip_grad_norm_``
when it exists, else :func:`torch.nn.utils.clip_grad_norm_`.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tilefuse import _progress


@dataclass
class StepResult:
    loss: float
    grad_norm: float          # total L2 norm of the (unscaled) gradients, before clipping
    skipped: bool             # True when the scaler skipped the step (inf/nan gradients)
    scale: float              # the loss scale used for this step (1.0 without a scaler)


def _clip_fn():
    try:
        from tilefuse.optim import clip_grad_norm_  # type: ignore[attr-defined]
        return clip_grad_norm_
    except Exception:
        return torch.nn.utils.clip_grad_norm_


def _split(batch):
    if isinstance(batch, dict):
        batch = dict(batch)
        target = batch.pop("labels", None)
        return (), batch, target
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError("batch must be (inputs..., target) or a dict with 'labels'")
        return tuple(batch[:-1]), {}, batch[-1]
    raise TypeError(f"batch must be a tuple/list (inputs..., target) or a dict, got "
                    f"{type(batch).__name__}")


def _set_checkpointing(model: nn.Module, on: bool) -> bool:
    """Turn on per-stage checkpointing where the model supports it; False if it does not."""
    found = False
    for m in model.modules():
        if hasattr(type(m), "gradient_checkpointing"):
            m.gradient_checkpointing = on
            found = True
    return found


def step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, *,
         loss_fn: Optional[Callable] = None, scaler: Optional["torch.amp.GradScaler"] = None,
         amp_dtype: Optional[torch.dtype] = None, grad_clip: Optional[float] = None,
         checkpoint: Optional[bool] = None, monitor=None) -> StepResult:
    """One training step; returns a :class:`StepResult`.

    Args:
        batch: ``(inputs..., target)`` or a dict of model kwargs plus ``"labels"``.
        loss_fn: ``loss_fn(output, target)``; default cross-entropy.
        scaler: a ``torch.amp.GradScaler`` (fp16 AMP); ``None`` for fp32/bf16.
        amp_dtype: ``torch.float16``/``torch.bfloat16`` to run the forward under autocast on the
            inputs' device; ``None`` disables autocast.
        grad_clip: max total grad norm (clipping happens after unscaling, as it must).
        checkpoint: gradient checkpointing: per stage for tilefuse models
            (``gradient_checkpointing``), else the whole forward is recomputed in backward;
            ``False`` turns the models' flag off; ``None`` leaves it as it is.
        monitor: optional callable (e.g. a ``tilefuse.optim.GradNormMonitor``) called with
            ``grad_norm``; objects with an ``update`` method get ``update(grad_norm)``.

    >>> import torch, tilefuse
    >>> m = torch.nn.Linear(4, 3); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> r = tilefuse.train.step(m, (torch.randn(8, 4), torch.randint(0, 3, (8,))), opt)
    >>> r.skipped
    False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if amp_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got "
                         f"{amp_dtype}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be a positive float, got {grad_clip}")
    args, kwargs, target = _split(batch)
    first = next((t for t in list(args) + list(kwargs.values()) if torch.is_tensor(t)), None)
    device_type = first.device.type if first is not None else "cpu"
    loss_fn = loss_fn or F.cross_entropy
    model.train()
    whole = bool(checkpoint) and not _set_checkpointing(model, True)
    if checkpoint is False:
        _set_checkpointing(model, False)
    autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        if whole:
            out = torch.utils.checkpoint.checkpoint(lambda *a: model(*a, **kwargs), *args,
                                                    use_reentrant=False)
        else:
            out = model(*args, **kwargs)
        loss = loss_fn(out, target)
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_clip is not None:
        norm = _clip_fn()(params, grad_clip)
    else:
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in params]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    norm = float(norm)
    if monitor is not None:
        (monitor.update if hasattr(monitor, "update") else monitor)(norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.is_enabled() and scaler.get_scale() < scale
    else:
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(float(loss.detach()), norm, bool(skipped), float(scale))


def _tqdm_bar(total: Optional[int], desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)
    except Exception:
        return None


def fit(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, *,
        progress: bool = True, desc: str = "train", total: Optional[int] = None,
        **step_kwargs) -> Sequence[float]:
    """Run :func:`step` over ``batches``; returns the list of losses.

    Progress (``progress=True``) goes to stderr: a tqdm bar on a terminal; elsewhere (a log file,
    a pipe, CI) plain lines ``desc: step i/total loss ... gnorm ...``, the first step, then at
    most one every ``tilefuse._progress.PLAIN_INTERVAL_S`` seconds, and the last."""
    losses = []
    bar = _tqdm_bar(total, desc) if progress and _progress.is_terminal() else None
    plain = progress and bar is None
    t0 = time.monotonic()
    last_t, last_i = None, 0
    of = f"/{total}" if total else ""

    def line(i: int, r: StepResult) -> None:
        print(f"{desc}: step {i}{of} loss {r.loss:.4f} gnorm {r.grad_norm:.2f} "
              f"({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)

    r = None
    for i, batch in enumerate(batches, 1):
        r = step(model, batch, optimizer, **step_kwargs)
        losses.append(r.loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}", gnorm=f"{r.grad_norm:.2f}")
        elif plain and (last_t is None or time.monotonic() - last_t >= _progress.PLAIN_INTERVAL_S):
            line(i, r)
            last_t, last_i = time.monotonic(), i
    if bar is not None:
        bar.close()
    elif plain and r is not None and last_i != len(losses):
        line(len(losses), r)
    return losses
