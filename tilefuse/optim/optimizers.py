"""Drop-in fused optimizers: ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Lion``.

The five torch-named classes subclass torch's own class: constructor, defaults, validation
messages, param groups and ``state_dict`` format are torch's (a torch state loads into ours and
back). Only ``step`` differs: the multi-tensor Triton update of :mod:`tilefuse.optim._multi`.
Extra keyword ``master_weights=True`` keeps an fp32 copy (``state['master_param']``) and fp32
optimizer state for fp16/bf16 params; the update runs on the copy and the param gets its rounding.

Each ``__init__`` spells out torch 2.13's signature (names, order, defaults, keyword-only markers,
annotations) plus the trailing keyword-only ``master_weights``, so ``inspect.signature``, IDEs and
``help()`` show the real arguments. Only the keywords the *running* torch's class accepts are
forwarded; a newer keyword left at its default is dropped on an older torch, and a non-default
value for it raises ``ValueError`` naming it. ``foreach``/``fused`` only pick torch's own step on
the reference path; ``differentiable=True`` and ``capturable=True`` (at construction) run torch's
own step, which honours them.

(No ``from __future__ import annotations`` here: the annotations must be real objects so that the
signatures compare equal to torch's.)
"""
import functools
import inspect

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from tilefuse.optim._multi import FusedStepMixin


def _f(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _torch_step(base):
    """``base.step`` without the hook wrapper torch may have patched onto it."""
    fn = base.step
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


@functools.lru_cache(maxsize=None)
def _init_params(cls) -> dict:
    """``{name: default}`` of ``cls.__init__`` (without self and params)."""
    ps = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return {p.name: p.default for p in ps if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


class _TorchNamed(FusedStepMixin):
    _torch_base: type = torch.optim.Optimizer

    def _init(self, cls, params, master_weights: bool, kwargs: dict) -> None:
        """torch's ``__init__`` with the keywords of ``kwargs`` that the running torch's class
        accepts (``cls``: the tilefuse class whose signature ``kwargs`` follows)."""
        accepted = _init_params(self._torch_base)
        ours = _init_params(cls)
        for name in [n for n in kwargs if n not in accepted]:
            value = kwargs.pop(name)
            default = ours[name]
            if not (value is default
                    or (isinstance(value, (bool, int, float)) and value == default)):
                raise ValueError(
                    f"{cls.__name__}: {name}={value!r} is not supported by the installed torch "
                    f"{torch.__version__} (torch.optim.{self._torch_base.__name__} has no "
                    f"'{name}' argument); leave it at its default {default!r}")
        super().__init__(params, **kwargs)
        if self.defaults.get("capturable", False) and any(
                p.device.type != "cpu" for g in self.param_groups for p in g["params"]):
            # capturable steps run torch's own capturable step (see _multi._use_reference),
            # which reads found_inf on the host when handed GradScaler's tensors: let GradScaler
            # unscale on its own instead, as it does for torch's capturable optimizers
            self._step_supports_amp_scaling = False
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

    def _prepare(self, group, p, grad, state):
        dt = self._state_dtype(group, p)
        m = self._state_tensor(state, "exp_avg", p, dt)
        v = self._state_tensor(state, "exp_avg_sq", p, dt)
        vmax = self._state_tensor(state, "max_exp_avg_sq", p, dt) if group["amsgrad"] else None
        return [p, grad, m, v, vmax, self._master(group, p, state)], None

    def _scalars(self, group, kind):
        # the bias corrections are computed in the kernel from the device step counter
        lr, wd, eps = _f(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = _f(group["betas"][0]), _f(group["betas"][1])
        return (lr, wd, 1 - beta1, beta1, beta2, 1 - beta2, eps, 1 - lr * wd)


class Adam(_AdamFamily, torch.optim.Adam):
    """torch.optim.Adam with a fused multi-tensor step (``decoupled_weight_decay`` honoured)."""
    _torch_base = torch.optim.Adam

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 master_weights: bool = False) -> None:
        self._init(Adam, params, master_weights, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay))


class AdamW(_AdamFamily, torch.optim.AdamW):
    """torch.optim.AdamW with a fused multi-tensor step."""
    _torch_base = torch.optim.AdamW

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False) -> None:
        self._init(AdamW, params, master_weights, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused))


class SGD(_TorchNamed, torch.optim.SGD):
    """torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize), fused."""
    _torch_base = torch.optim.SGD
    _kernel = "sgd_kernel"
    _uses_step = False

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | Tensor = 0, nesterov: bool = False,
                 *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False) -> None:
        self._init(SGD, params, master_weights, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach,
            differentiable=differentiable, fused=fused))

    def _must_sync_on_inf(self) -> bool:
        # a skipped first step would leave a zero buffer where torch clones the next grad: only
        # visible with dampening, so only then read found_inf on the host
        return any(g["momentum"] != 0 and g["dampening"] != 0 for g in self.param_groups)

    def _flags(self, group):
        return dict(MOMENTUM=group["momentum"] != 0, NESTEROV=bool(group["nesterov"]),
                    MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state):
        buf, kind = None, None
        if group["momentum"] != 0:
            kind = "first" if state.get("momentum_buffer") is None else "steady"
            buf = self._state_tensor(state, "momentum_buffer", p, self._state_dtype(group, p))
        return [p, grad, buf, self._master(group, p, state)], kind

    def _scalars(self, group, kind):
        lr, wd = _f(group["lr"]), float(group["weight_decay"])
        momentum = float(group["momentum"])
        if kind == "steady":  # buf = momentum * buf + (1 - dampening) * g
            return (lr, wd, momentum, 1.0 - float(group["dampening"]), momentum)
        return (lr, wd, 0.0, 1.0, momentum)  # no buffer, or its first step: buf = g


class RMSprop(_TorchNamed, torch.optim.RMSprop):
    """torch.optim.RMSprop (alpha, centered, momentum, weight_decay, maximize), fused."""
    _torch_base = torch.optim.RMSprop
    _kernel = "rmsprop_kernel"

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0, momentum: float = 0,
                 centered: bool = False, capturable: bool = False, foreach: bool | None = None,
                 maximize: bool = False, differentiable: bool = False, *,
                 master_weights: bool = False) -> None:
        self._init(RMSprop, params, master_weights, dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
            differentiable=differentiable))

    def _flags(self, group):
        return dict(CENTERED=bool(group["centered"]), MOMENTUM=group["momentum"] > 0,
                    MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state):
        dt = self._state_dtype(group, p)
        sq = self._state_tensor(state, "square_avg", p, dt)
        buf = self._state_tensor(state, "momentum_buffer", p, dt) if group["momentum"] > 0 else None
        gavg = self._state_tensor(state, "grad_avg", p, dt) if group["centered"] else None
        return [p, grad, sq, gavg, buf, self._master(group, p, state)], None

    def _scalars(self, group, kind):
        alpha = float(group["alpha"])
        return (_f(group["lr"]), float(group["weight_decay"]), alpha, 1 - alpha,
                float(group["eps"]), float(group["momentum"]))


class Adagrad(_TorchNamed, torch.optim.Adagrad):
    """torch.optim.Adagrad (lr_decay, initial_accumulator_value, weight_decay, maximize), fused."""
    _torch_base = torch.optim.Adagrad
    _kernel = "adagrad_kernel"

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0,
                 eps: float = 1e-10, foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False) -> None:
        self._init(Adagrad, params, master_weights, dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused))

    def _flags(self, group):
        return dict(MAXIMIZE=bool(group["maximize"]))

    def _prepare(self, group, p, grad, state):
        s = self._state_tensor(state, "sum", p, self._state_dtype(group, p),
                               fill=float(group["initial_accumulator_value"]))
        return [p, grad, s, self._master(group, p, state)], None

    def _scalars(self, group, kind):
        # the decayed lr (lr / (1 + (step - 1) * lr_decay)) is computed in the kernel
        return (_f(group["lr"]), float(group["weight_decay"]), float(group["eps"]),
                float(group["lr_decay"]))


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

    def _prepare(self, group, p, grad, state):
        m = self._state_tensor(state, "exp_avg", p, self._state_dtype(group, p))
        return [p, grad, m, self._master(group, p, state)], None

    def _scalars(self, group, kind):
        lr = _f(group["lr"])
        return (lr, 1 - lr * float(group["weight_decay"]), _f(group["betas"][0]),
                _f(group["betas"][1]))

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
