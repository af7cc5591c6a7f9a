"""The multi-tensor step driver shared by every tilefuse optimizer.

``FusedStepMixin.step`` runs the optimizer's cached :class:`~tilefuse.optim._plan.Plan`: the
tensors are grouped into buckets -- same device, same dtype per role, same algorithm flags, across
param groups -- and each bucket is updated with ONE kernel launch (tilefuse.kernels.optim) from a
table built once and rebuilt only when the param set, dtypes or state change (see _plan). The
optimizer family creates its state (torch's keys, dtypes and layouts) and gives each param group's
runtime scalars.

Paths:
* Triton (CUDA, or CPU under TRITON_INTERPRET=1): the fused kernels.
* torch (plain CPU), sparse gradients, complex params, ``differentiable=True``, ``capturable=True``
  (given at construction, params on an accelerator): the family's torch reference step (torch's
  own ``step`` for the torch-named optimizers), so behaviour matches torch.

Step counters (``state['step']``) live on the params' device and are advanced by the kernel.

AMP: ``_step_supports_amp_scaling = True``; GradScaler then sets ``self.grad_scale`` (or None when
the user already unscaled) and ``self.found_inf`` (device tensors). The gradient is unscaled inside
the kernel and, when ``found_inf`` is set, every load and store is switched off on the device and
the step counters do not advance: no host sync. The one exception is SGD with momentum and
``dampening != 0`` (see ``SGD._must_sync_on_inf``).
"""
from __future__ import annotations

import torch

from tilefuse._backend import backend_for, backend_for_device
from tilefuse.optim._plan import Plan, is_dense, same_layout  # noqa: F401

_PLAIN = (torch.Tensor, torch.nn.Parameter)

LOW_PRECISION = (torch.float16, torch.bfloat16)


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


class FusedStepMixin:
    """Mixed into each optimizer. A family defines:

    * ``_kernel``: its update's key in tilefuse.kernels.optim.UPDATES (the kernel and the
      constexprs selecting its algorithm; imported at the first step);
    * ``_uses_step``: whether its state has a ``step`` counter (advanced by the kernel);
    * ``_flags(group)``: the kernel's constexpr flags for a param group;
    * ``_prepare(group, p, grad, state)`` -> (roles, kind): creates the state lazily and returns
      the per-role tensors (param first, grad second, master last) and the kind of the param's
      scalar row (hashable; ``"first"`` marks a row valid for this step only);
    * ``_scalars(group, kind)`` -> the runtime scalars (floats, same width for every kind);
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
    def _step_tensor(state, p) -> torch.Tensor:
        """state['step'] as the kernel advances it: a float scalar tensor on the param's device
        (created as torch does: 0, ``_get_scalar_dtype()``; a CPU tensor on the CPU)."""
        s = state.get("step")
        if (isinstance(s, torch.Tensor) and s.device == p.device and s.is_floating_point()
                and s.dim() == 0):
            return s
        from torch.optim.optimizer import _get_scalar_dtype

        if s is None:
            s = torch.tensor(0.0, dtype=_get_scalar_dtype(), device=p.device)
        elif not isinstance(s, torch.Tensor):
            s = torch.tensor(float(s), dtype=_get_scalar_dtype(), device=p.device)
        else:  # e.g. a CPU step loaded for a CUDA param: moved once
            dtype = s.dtype if s.is_floating_point() else _get_scalar_dtype()
            s = s.detach().to(device=p.device, dtype=dtype).reshape(()).clone()
        state["step"] = s
        return s

    def _group_sig(self, group) -> tuple:
        """What a param group's plan depends on besides its tensors: the kernel flags (sorted
        items), master weights and differentiable (torch path)."""
        return (tuple(sorted(self._flags(group).items())),
                bool(group.get("master_weights", False)),
                bool(group.get("differentiable", False)))

    # ------------------------------------------------------------------ step
    def _needs_reference(self, params_with_grad) -> bool:
        if any(g.get("differentiable", False) for g in self.param_groups):
            return True
        # capturable=True at construction: on an accelerator, torch's own (CUDA-graph capturable)
        # step honours it (the fused step refreshes its tables from the host at every step, which
        # a captured graph would not replay). On the CPU torch has no
        # capturable mode (its step raises); the interpreter lane keeps the fused step. Read from
        # ``defaults``, not the groups, so that loading a capturable torch state into a default
        # optimizer keeps the fused step.
        capturable = bool(self.defaults.get("capturable", False))
        devices = set()
        for p in params_with_grad:
            g = p.grad
            if g.is_sparse or p.is_complex() or type(p) not in _PLAIN or type(g) not in _PLAIN:
                # tensor subclasses (FSDP2's sharded DTensor params, ...): torch's own step,
                # which dispatches through the subclass (the fused kernel addresses raw storage)
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
        if max_grad_norm is not None and max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and self._must_sync_on_inf():
            if found_inf.item():
                return loss
            found_inf = None
        plan = self.__dict__.get("_tf_plan")
        if plan is None or not plan.refresh(self):
            self._tf_plan = None
            with_grad = [p for group in self.param_groups for p in group["params"]
                         if p.grad is not None]
            if not with_grad:
                return loss
            if self._needs_reference(with_grad):
                return self._run_reference(loss, with_grad, max_grad_norm)
            plan = self._tf_plan = Plan(self)

        grad_scale = getattr(self, "grad_scale", None)
        gmul, gmul_inv = grad_scale, grad_scale is not None
        if max_grad_norm is not None:
            norm = total_grad_norm(plan.grads())
            if grad_scale is not None:
                gmul = grad_scale.to(norm.device).double().reciprocal().float()
                norm = norm * gmul.to(norm.dtype)
            self.last_grad_norm = norm
            coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0).float()
            gmul, gmul_inv = (coef if grad_scale is None else gmul * coef), False
        plan.launch(self, gmul, gmul_inv, found_inf)
        if plan.once:
            self._tf_plan = None
        return loss

    def _must_sync_on_inf(self) -> bool:
        """Whether GradScaler's found_inf must be read on the host before the step."""
        return False
