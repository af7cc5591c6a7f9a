"""Drop-in fused optimizers: ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Lion``.

The five torch-named classes subclass torch's own class: constructor, defaults, validation
messages, param groups and ``state_dict`` format are torch's (a torch state loads into ours and
back). Only ``step`` differs: the multi-tensor Triton update of :mod:`tilefuse.optim._multi`.
Extra keyword ``master_weights=True`` keeps an fp32 copy (``state['master_param']``) and fp32
optimizer state for fp16/bf16 params; the update runs on the copy and the param gets its rounding.
"""
from __future__ import annotations

import torch

from tilefuse.optim._multi import FusedStepMixin


def _f(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _torch_step(base):
    """``base.step`` without the hook wrapper torch may have patched onto it."""
    fn = base.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


class _TorchNamed(FusedStepMixin):
    _torch_base: type = torch.optim.Optimizer

    def __init__(self, params, *args, master_weights: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        if master_weights:
            self.defaults["master_weights"] = True
            for group in self.param_groups:
                group.setdefault("master_weights", True)

    def _reference_step(self):
        _torch_step(self._torch_base)(self)


class _AdamFamily(_TorchNamed):
    _kernel = "adam_kernel"

    def _flags(self, group):
        decoupled = group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))
        return dict(AMSGRAD=bool(group["amsgrad"]), DECOUPLED=bool(decoupled),
                    MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state, step):
        dt = self._state_dtype(group, p)
        m = self._state_tensor(state, "exp_avg", p, dt)
        v = self._state_tensor(state, "exp_avg_sq", p, dt)
        vmax = self._state_tensor(state, "max_exp_avg_sq", p, dt) if group["amsgrad"] else None
        lr, wd, eps = _f(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = _f(group["betas"][0]), _f(group["betas"][1])
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        scalars = (lr, wd, 1 - beta1, beta2, 1 - beta2, eps, lr / bc1, bc2 ** 0.5, 1 - lr * wd)
        return [p, grad, m, v, vmax, self._master(group, p, state)], scalars


class Adam(_AdamFamily, torch.optim.Adam):
    """torch.optim.Adam with a fused multi-tensor step (``decoupled_weight_decay`` honoured)."""
    _torch_base = torch.optim.Adam


class AdamW(_AdamFamily, torch.optim.AdamW):
    """torch.optim.AdamW with a fused multi-tensor step."""
    _torch_base = torch.optim.AdamW


class SGD(_TorchNamed, torch.optim.SGD):
    """torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize), fused."""
    _torch_base = torch.optim.SGD
    _kernel = "sgd_kernel"
    _uses_step = False

    def _must_sync_on_inf(self) -> bool:
        # a skipped first step would leave a zero buffer where torch clones the next grad: only
        # visible with dampening, so only then read found_inf on the host
        return any(g["momentum"] != 0 and g["dampening"] != 0 for g in self.param_groups)

    def _flags(self, group):
        return dict(MOMENTUM=group["momentum"] != 0, NESTEROV=bool(group["nesterov"]),
                    MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state, step):
        lr, wd = _f(group["lr"]), float(group["weight_decay"])
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        buf = None
        scalars = (lr, wd, 0.0, 1.0, momentum)
        if momentum != 0:
            new = state.get("momentum_buffer") is None
            buf = self._state_tensor(state, "momentum_buffer", p, self._state_dtype(group, p))
            if not new:
                scalars = (lr, wd, momentum, 1.0 - dampening, momentum)
        return [p, grad, buf, self._master(group, p, state)], scalars


class RMSprop(_TorchNamed, torch.optim.RMSprop):
    """torch.optim.RMSprop (alpha, centered, momentum, weight_decay, maximize), fused."""
    _torch_base = torch.optim.RMSprop
    _kernel = "rmsprop_kernel"

    def _flags(self, group):
        return dict(CENTERED=bool(group["centered"]), MOMENTUM=group["momentum"] > 0,
                    MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state, step):
        dt = self._state_dtype(group, p)
        sq = self._state_tensor(state, "square_avg", p, dt)
        buf = self._state_tensor(state, "momentum_buffer", p, dt) if group["momentum"] > 0 else None
        gavg = self._state_tensor(state, "grad_avg", p, dt) if group["centered"] else None
        alpha = float(group["alpha"])
        scalars = (_f(group["lr"]), float(group["weight_decay"]), alpha, 1 - alpha,
                   float(group["eps"]), float(group["momentum"]))
        return [p, grad, sq, gavg, buf, self._master(group, p, state)], scalars


class Adagrad(_TorchNamed, torch.optim.Adagrad):
    """torch.optim.Adagrad (lr_decay, initial_accumulator_value, weight_decay, maximize), fused."""
    _torch_base = torch.optim.Adagrad
    _kernel = "adagrad_kernel"

    def _flags(self, group):
        return dict(MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state, step):
        s = self._state_tensor(state, "sum", p, self._state_dtype(group, p),
                               fill=float(group["initial_accumulator_value"]))
        lr = _f(group["lr"])
        clr = lr / (1 + (step - 1) * float(group["lr_decay"]))
        scalars = (clr, float(group["weight_decay"]), float(group["eps"]))
        return [p, grad, s, self._master(group, p, state)], scalars


class Lion(FusedStepMixin, torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    ``p <- p * (1 - lr*wd) - lr * sign(beta1*m + (1-beta1)*g);  m <- beta2*m + (1-beta2)*g``.
    State: ``exp_avg`` (as in lucidrains/lion-pytorch)."""
    _kernel = "lion_kernel"
    _uses_step = False

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 *, maximize: bool = False, master_weights: bool = False):
        if not 0.0 <= _f(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= _f(betas[0]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= _f(betas[1]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        if master_weights:
            defaults["master_weights"] = True
        super().__init__(params, defaults)

    def _flags(self, group):
        return dict(MAXIMIZE=bool(group.get("maximize", False)))

    def _prepare(self, group, p, grad, state, step):
        m = self._state_tensor(state, "exp_avg", p, self._state_dtype(group, p))
        lr = _f(group["lr"])
        scalars = (lr, 1 - lr * float(group["weight_decay"]), _f(group["betas"][0]),
                   _f(group["betas"][1]))
        return [p, grad, m, self._master(group, p, state)], scalars

    def _reference_step(self):
        for group in self.param_groups:
            lr, wd = _f(group["lr"]), float(group["weight_decay"])
            beta1, beta2 = _f(group["betas"][0]), _f(group["betas"][1])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                g = -p.grad if group.get("maximize", False) else p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                p.mul_(1 - lr * wd)
                update = m.mul(beta1).add_(g, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
