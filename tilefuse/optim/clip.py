"""Gradient clipping and gradient-norm monitoring with fused multi-tensor reductions.

``clip_grad_norm_`` = torch.nn.utils.clip_grad_norm_: one fused reduction launch per (device,
dtype) over all gradients (per-chunk partials, summed on device), then one fused scale launch.
Nothing is read back to the host unless ``error_if_nonfinite=True`` (torch syncs there too).

``GradNormMonitor`` reuses the same partials: a segment sum (``index_add_`` by the chunk -> tensor
map) turns them into one norm per parameter, so all per-layer norms come from one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tilefuse._backend import backend_for
from tilefuse.optim._multi import is_dense, scale_grads_, total_grad_norm

_FUSED_NORMS = (1.0, 2.0, math.inf)


def _norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type must be a number or 'inf', got {type(norm_type).__name__}")
    return float(norm_type)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place so that their total norm is at most
    ``max_norm``; returns the total norm before clipping (a device tensor, as torch does).

    Same signature and result as :func:`torch.nn.utils.clip_grad_norm_` (``foreach`` is accepted
    and ignored). Norm types 1, 2 and inf are fused; others defer to torch."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, torch.Tensor)):
        raise TypeError(f"max_norm must be a number, got {type(max_norm).__name__}")
    norm_type = _norm_type(norm_type)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if norm_type not in _FUSED_NORMS or any(g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite, foreach)
    total = total_grad_norm(grads, norm_type)
    if error_if_nonfinite and not torch.isfinite(total).item():
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            f"so it cannot be clipped. To disable this error and scale the gradients by the "
            f"non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    scale_grads_(grads, coef)
    dtypes = {g.dtype for g in grads}
    return total.to(dtypes.pop()) if len(dtypes) == 1 else total


def per_tensor_norms(tensors) -> torch.Tensor:
    """L2 norm of each tensor (fp32 on the first tensor's device), one fused pass per bucket."""
    from tilefuse.kernels.optim_norm import launch_norm_partials

    device = tensors[0].device
    out = torch.zeros(len(tensors), device=device, dtype=torch.float32)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():
            buckets.setdefault((t.device, t.dtype), []).append(i)
    for (dev, _), idx in buckets.items():
        ts = [tensors[i] for i in idx]
        if backend_for(ts[0]) == "torch" or any(t.is_sparse for t in ts):
            sq = torch.stack([torch.linalg.vector_norm(
                (t.coalesce().values() if t.is_sparse else t).float()) ** 2 for t in ts])
        else:
            ts = [t if is_dense(t) else t.contiguous() for t in ts]
            partial, ctab = launch_norm_partials(ts, 2)
            sq = torch.zeros(len(ts), device=dev, dtype=partial.dtype).index_add_(
                0, ctab.long(), partial)
        out[torch.tensor(idx, device=device)] = sq.float().to(device)
    return out.sqrt()


@dataclass
class GradNormReport:
    """Per-parameter gradient norms of one step, with the flagged layers."""
    norms: dict
    total: float
    vanishing: list = field(default_factory=list)
    exploding: list = field(default_factory=list)
    no_grad: list = field(default_factory=list)

    def as_dict(self, prefix: str = "grad_norm/") -> dict:
        """Flat ``{name: value}`` for a logger (TensorBoard, wandb...)."""
        d = {prefix + k: v for k, v in self.norms.items()}
        d[prefix + "total"] = self.total
        return d

    def __str__(self) -> str:
        width = max([len(n) for n in self.norms] + [9])
        lines = [f"{'parameter':<{width}}  grad norm   flag"]
        for name, v in self.norms.items():
            flag = "VANISHING" if name in self.vanishing else (
                "EXPLODING" if name in self.exploding else "")
            lines.append(f"{name:<{width}}  {v:10.3e}  {flag}")
        lines.append(f"{'total':<{width}}  {self.total:10.3e}")
        if self.no_grad:
            lines.append(f"no grad: {', '.join(self.no_grad)}")
        return "\n".join(lines)


class GradNormMonitor:
    """Per-parameter gradient norms of ``model`` in one fused pass, flagging vanishing
    (``< vanish_threshold``) and exploding (``> explode_threshold``) layers.

    >>> import torch
    >>> from tilefuse.optim import GradNormMonitor
    >>> model = torch.nn.Linear(4, 2)
    >>> monitor = GradNormMonitor(model)
    >>> model(torch.randn(3, 4)).sum().backward()
    >>> report = monitor()  # print(report): a table; logger.log(report.as_dict()): one scalar each
    >>> sorted(report.as_dict()), report.vanishing, report.exploding
    (['grad_norm/bias', 'grad_norm/total', 'grad_norm/weight'], [], [])
    """

    def __init__(self, model, explode_threshold: float = 1e3, vanish_threshold: float = 1e-7):
        if isinstance(model, torch.nn.Module):
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        else:
            named = [(f"param{i}", p) for i, p in enumerate(model)]
        if not all(isinstance(p, torch.Tensor) for _, p in named):
            raise TypeError("model must be an nn.Module or an iterable of tensors")
        for name, v in (("explode_threshold", explode_threshold),
                        ("vanish_threshold", vanish_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if vanish_threshold >= explode_threshold:
            raise ValueError("vanish_threshold must be smaller than explode_threshold")
        self.named = named
        self.explode_threshold = float(explode_threshold)
        self.vanish_threshold = float(vanish_threshold)

    def norms(self):
        """(names, fp32 device tensor of norms) for parameters with a gradient; no host sync."""
        with_grad = [(n, p.grad) for n, p in self.named if p.grad is not None]
        if not with_grad:
            return [], torch.zeros(0)
        names, grads = zip(*with_grad)
        return list(names), per_tensor_norms(list(grads))

    def __call__(self) -> GradNormReport:
        """Compute the norms and read them back (one host sync)."""
        names, norms = self.norms()
        values = norms.tolist()
        report = GradNormReport(norms=dict(zip(names, values)),
                                total=math.sqrt(sum(v * v for v in values)),
                                no_grad=[n for n, p in self.named if p.grad is None])
        for name, v in report.norms.items():
            if v < self.vanish_threshold:
                report.vanishing.append(name)
            elif not v <= self.explode_threshold:  # also catches inf / nan
                report.exploding.append(name)
        return report

    report = __call__
