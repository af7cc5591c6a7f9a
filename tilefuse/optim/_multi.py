"""The multi-tensor step driver shared by every tilefuse optimizer.

``FusedStepMixin.step`` gathers every parameter with a dense gradient, lets the optimizer family
create its state (torch's keys, dtypes and layouts) and compute each tensor's runtime scalars, then
groups the tensors into buckets -- same device, same dtype per role, same algorithm flags, across
param groups -- and updates each bucket with ONE kernel launch (tilefuse.kernels.optim).

Paths:
* Triton (CUDA, or CPU under TRITON_INTERPRET=1): the fused kernels.
* torch (plain CPU), sparse gradients, complex params, ``differentiable=True``, ``capturable=True``
  (given at construction, params on an accelerator): the family's torch reference step (torch's
  own ``step`` for the torch-named optimizers), so behaviour matches torch.

AMP: ``_step_supports_amp_scaling = True``; GradScaler then sets ``self.grad_scale`` (or None when
the user already unscaled) and ``self.found_inf`` (device tensors). The gradient is unscaled inside
the kernel and, for optimizers without a step counter (SGD, Lion), stores are switched off on
device when ``found_inf`` is set: no host sync. Optimizers whose state has a ``step`` counter
(Adam, AdamW, RMSprop, Adagrad) read ``found_inf`` once on the host (the same sync GradScaler does
for any other optimizer), so that the counter matches torch.
"""
from __future__ import annotations

import torch

from tilefuse._backend import backend_for, backend_for_device

LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any dim order): its storage range holds exactly its elements."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(p: torch.Tensor, roles) -> bool:
    """Every role tensor has the param's element order, so one flat index addresses all."""
    n = p.numel()
    if p.is_contiguous() and all(t is None or (t.is_contiguous() and t.numel() == n)
                                 for t in roles):
        return True
    return is_dense(p) and all(t is None or (t.stride() == p.stride() and t.shape == p.shape)
                               for t in roles)


def total_grad_norm(grads, norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all ``grads`` together (fp32 device scalar; fp64 if all are fp64), no host sync.

    One fused reduction launch per (device, dtype) bucket on the Triton path."""
    from tilefuse.kernels.optim_norm import launch_norm_partials

    norm_code = {2.0: 2, 1.0: 1, float("inf"): 0}[float(norm_type)]
    buckets: dict = {}
    for g in grads:
        if g.numel():
            buckets.setdefault((g.device, g.dtype), []).append(
                g if is_dense(g) else g.contiguous())
    acc = torch.float64 if grads and all(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device
    parts = []
    for (dev, _), ts in buckets.items():
        if backend_for(ts[0]) == "torch":
            v = torch.stack([torch.linalg.vector_norm(t.to(acc), norm_type) for t in ts])
            part = v.max() if norm_code == 0 else (v.pow(2).sum() if norm_code == 2 else v.sum())
        else:
            out, _ = launch_norm_partials(ts, norm_code)
            part = out.max() if norm_code == 0 else out.sum()
        parts.append(part.to(device=device, dtype=acc))
    if not parts:
        return torch.zeros((), device=device, dtype=acc)
    tot = torch.stack(parts)
    if norm_code == 0:
        return tot.max()
    return tot.sum().sqrt() if norm_code == 2 else tot.sum()


def scale_grads_(grads, coef: torch.Tensor) -> None:
    """grads *= coef (device scalar), one launch per (device, dtype) bucket."""
    from tilefuse.kernels.optim_norm import launch_scale

    buckets: dict = {}
    for g in grads:
        if g.numel():
            buckets.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), ts in buckets.items():
        c = coef.to(dev)
        dense = [t for t in ts if is_dense(t)]
        if dense and backend_for(dense[0]) == "triton":
            launch_scale(dense, c.float() if dense[0].dtype != torch.float64 else c.double())
        else:
            dense = []
        for t in ts:
            if not any(t is d for d in dense):
                t.mul_(c.to(t.dtype))


class _Item:
    """One parameter's tensors (per role), runtime scalars and copies to write back."""
    __slots__ = ("roles", "scalars", "writeback")

    def __init__(self, roles, scalars, writeback):
        self.roles, self.scalars, self.writeback = roles, scalars, writeback


class FusedStepMixin:
    """Mixed into each optimizer. A family defines:

    * ``_kernel``: its update's key in tilefuse.kernels.optim.UPDATES (the kernel and the
      constexprs selecting its algorithm; imported at the first step);
    * ``_uses_step``: whether its state has a ``step`` counter (AMP then reads found_inf);
    * ``_flags(group)``: the kernel's constexpr flags for a param group;
    * ``_prepare(group, p, grad, state, step)`` -> (roles, scalars): creates the state lazily
      (``step``: the already advanced counter, or None without ``_uses_step``), returns the
      per-role tensors (param first, grad second, master last) and the runtime scalars;
    * ``_reference_step()``: the torch path."""

    _step_supports_amp_scaling = True
    _uses_step = True
    _kernel = ""

    def _master_for(self, group, p) -> bool:
        return bool(group.get("master_weights", False)) and p.dtype in LOW_PRECISION

    def _state_dtype(self, group, p):
        return torch.float32 if self._master_for(group, p) else p.dtype

    def _state_tensor(self, state, key, p, dtype, fill=0.0):
        """state[key], created as torch does (zeros_like, preserve_format) or upcast if needed."""
        t = state.get(key)
        if t is None:
            t = torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)
            state[key] = t
        elif t.dtype != dtype:  # e.g. fp32 master-weight state cast down by load_state_dict
            t = t.to(dtype=dtype)
            state[key] = t
        return t

    def _master(self, group, p, state):
        if not self._master_for(group, p):
            return None
        m = state.get("master_param")
        if m is None or m.dtype != torch.float32:
            m = (m if m is not None else p.detach()).to(torch.float32).clone(
                memory_format=torch.preserve_format)
            state["master_param"] = m
        return m

    @staticmethod
    def _advance_steps(states) -> list:
        """state['step'] += 1 for every state (created as torch does: a CPU scalar tensor), in one
        foreach call; returns the new values as floats (CPU tensors: no device sync)."""
        from torch.optim.optimizer import _get_scalar_dtype

        steps = []
        for state in states:
            s = state.get("step")
            if s is None:
                s = torch.tensor(0.0, dtype=_get_scalar_dtype())
            elif not isinstance(s, torch.Tensor):
                s = torch.tensor(float(s), dtype=torch.float32)
            elif s.device.type != "cpu":  # e.g. loaded from a fused/capturable torch state
                s = s.cpu()
            state["step"] = s
            steps.append(s)
        torch._foreach_add_(steps, 1.0)
        return torch.stack(steps).tolist() if steps else []

    # ------------------------------------------------------------------ step
    def _needs_reference(self, params_with_grad) -> bool:
        if any(g.get("differentiable", False) for g in self.param_groups):
            return True
        # capturable=True at construction: on an accelerator, torch's own (CUDA-graph capturable)
        # step honours it (the fused step builds its tables on the host). On the CPU torch has no
        # capturable mode (its step raises); the interpreter lane keeps the fused step. Read from
        # ``defaults``, not the groups, so that loading a capturable torch state into a default
        # optimizer keeps the fused step.
        capturable = bool(self.defaults.get("capturable", False))
        devices = set()
        for p in params_with_grad:
            g = p.grad
            if g.is_sparse or p.is_complex():
                return True
            devices.add(p.device)
            devices.add(g.device)
        if capturable and any(d.type != "cpu" for d in devices):
            return True
        return any(backend_for_device(d) == "torch" for d in devices)

    def _run_reference(self, closure_loss, with_grad, max_grad_norm):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            return closure_loss
        had = {k: getattr(self, k) for k in ("grad_scale", "found_inf") if hasattr(self, k)}
        for k in had:
            delattr(self, k)
        try:
            if grad_scale is not None:
                inv = grad_scale.double().reciprocal().float()
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(inv.to(p.grad.device))
            if max_grad_norm is not None:
                from tilefuse.optim.clip import clip_grad_norm_

                self.last_grad_norm = clip_grad_norm_(with_grad, max_grad_norm)
            swapped = self._swap_in_masters()
            try:
                self._reference_step()
            finally:
                for p, data, grad in swapped:  # param <- its updated master, rounded
                    self.state[p]["master_param"] = master = p.data
                    data.copy_(master)
                    p.data, p.grad = data, grad
        finally:
            for k, v in had.items():
                setattr(self, k, v)
        return closure_loss

    def _swap_in_masters(self):
        """master_weights on the torch path: step the fp32 masters in place of the params."""
        swapped = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.grad.is_sparse or not self._master_for(group, p):
                    continue
                state = self.state[p]
                master = self._master(group, p, state)
                if len(state) == 1:  # only the master: let torch create its state as usual
                    del state["master_param"]
                swapped.append((p, p.data, p.grad))
                p.data, p.grad = master, p.grad.float()
        return swapped

    @torch.no_grad()
    def step(self, closure=None, *, max_grad_norm: float | None = None):
        """One update of every parameter with a gradient. ``max_grad_norm`` clips the total grad
        L2 norm first (fused with the update; the norm is kept in ``self.last_grad_norm``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None]
        if not todo:
            return loss
        with_grad = [p for _, p in todo]
        if max_grad_norm is not None and max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        if self._needs_reference(with_grad):
            return self._run_reference(loss, with_grad, max_grad_norm)

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        device = with_grad[0].device
        gmul = None
        if grad_scale is not None:
            gmul = grad_scale.to(device).double().reciprocal().float()
        if max_grad_norm is not None:
            norm = total_grad_norm([p.grad for p in with_grad])
            if gmul is not None:
                norm = norm * gmul.to(norm.dtype)
            self.last_grad_norm = norm
            coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0).float()
            gmul = coef if gmul is None else gmul * coef
        if found_inf is not None:
            if self._must_sync_on_inf():
                if found_inf.item():
                    return loss
                found_inf = None

        states = []
        for _, p in todo:
            state = self.state.get(p)  # a fresh dict is registered only if it gets content
            states.append({} if state is None else state)
        steps = self._advance_steps(states) if self._uses_step else [None] * len(todo)
        buckets: dict = {}
        group_flags: dict = {}
        for (group, p), state, step in zip(todo, states, steps):
            roles, scalars = self._prepare(group, p, p.grad, state, step)
            if state and p not in self.state:  # torch keeps no entry for state-less params
                self.state[p] = state
            if p.numel() == 0:
                continue
            writeback = None
            if not same_layout(p, roles):
                # documented copy: layouts that differ from the param's are updated on
                # contiguous copies, written back after the launch
                copies = [None if t is None else t.contiguous() for t in roles]
                writeback = [(t, c) for i, (t, c) in enumerate(zip(roles, copies))
                             if i != 1 and t is not None and c is not t]
                roles = copies
            has_master = roles[-1] is not None  # the master copy is always the last role
            fk = (id(group), has_master)
            if fk not in group_flags:
                flags = dict(self._flags(group), HAS_MASTER=has_master)
                group_flags[fk] = (flags, tuple(sorted(flags.items())))
            flags, fkey = group_flags[fk]
            key = (fkey, p.device) + tuple(None if t is None else t.dtype for t in roles)
            buckets.setdefault(key, (flags, []))[1].append(_Item(roles, scalars, writeback))

        from tilefuse.kernels import optim as kernels

        kernel, algo = kernels.UPDATES[self._kernel]
        for flags, items in buckets.values():
            roles = [list(r) for r in zip(*(it.roles for it in items))]
            dev = roles[0][0].device  # buckets are per device: scalars follow (foreach-style)
            kernels.launch_update(kernel, roles, [it.scalars for it in items], {**algo, **flags},
                                  gmul=None if gmul is None else gmul.to(dev),
                                  found_inf=None if found_inf is None else found_inf.to(dev))
            for it in items:
                for dst, src in it.writeback or ():
                    dst.copy_(src)
        return loss

    def _must_sync_on_inf(self) -> bool:
        return self._uses_step
