"""Activation registry shared by every fused kernel and by the torch reference path.

Kernels receive an integer ``ACTIVATION`` code and a float ``ACT_PARAM`` as ``tl.constexpr``; the
Triton implementations live in :mod:`tilefuse.kernels.activations`. This module parses the user's
``activation=`` argument and holds the torch implementations (forward and derivative) that the
torch backend and the tests use.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple, Union

import torch
import torch.nn.functional as F

# code, default parameter
ACTIVATIONS = {
    "none": (0, 0.0),
    "relu": (1, 0.0),
    "relu6": (2, 0.0),
    "leaky_relu": (3, 0.01),
    "gelu": (4, 0.0),        # exact (erf) GELU, torch's default
    "gelu_tanh": (5, 0.0),   # tanh approximation, F.gelu(approximate='tanh')
    "silu": (6, 0.0),
    "sigmoid": (7, 0.0),
    "tanh": (8, 0.0),
}
NAMES = {code: name for name, (code, _) in ACTIVATIONS.items()}

ActivationSpec = Union[None, str, Tuple[str, float]]

_MODULE_NAMES = {
    torch.nn.ReLU: "relu", torch.nn.ReLU6: "relu6", torch.nn.LeakyReLU: "leaky_relu",
    torch.nn.SiLU: "silu", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh",
}

# Hugging Face ``transformers.activations`` classes, matched by class name (transformers is not a
# dependency and is never imported). Only classes whose forward is *mathematically* one of ours:
# GELUActivation = F.gelu (erf; its python variant is the same erf formula); NewGELUActivation =
# 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) = the tanh approximation; FastGELUActivation =
# 0.5x(1 + tanh(0.7978845608 x (1 + 0.044715x^2))), the same polynomial factored;
# GELUTanh / PytorchGELUTanh = F.gelu(approximate="tanh"); SiLUActivation = x * sigmoid(x).
# Not mapped: QuickGELU (x * sigmoid(1.702x)), ClippedGELU (clamped), GELU10, ReLUSquared...
HF_ACTIVATIONS = {
    "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "SiLUActivation": "silu",
}


# accepted spellings besides the names above; a name is looked up lower-cased with "-" read as "_"
# (so "GELU", "Leaky-ReLU" and "Swish" are accepted). docs/norm.md lists them (tested).
ALIASES = {"identity": "none", "swish": "silu", "gelu_erf": "gelu"}
# the activations that take a parameter: name -> what it is
PARAMETERS = {"leaky_relu": "negative_slope"}


def _canonical_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; expected one of "
                         f"{sorted(ACTIVATIONS)} or an alias {sorted(ALIASES)} (case-insensitive, "
                         f"'-' = '_')")
    return key


def _check_param(activation, key: str, param) -> float:
    if param is None:
        return ACTIVATIONS[key][1]
    if isinstance(param, bool) or not isinstance(param, numbers.Real):
        raise TypeError(f"activation parameter must be a float, got {activation!r}")
    param = float(param)
    if key in PARAMETERS:
        if not math.isfinite(param):
            raise ValueError(f"activation {key!r} needs a finite {PARAMETERS[key]}, got "
                             f"{activation!r}")
        return param
    if param != 0.0:  # 0.0 is the "no parameter" that parse_activation returns
        raise ValueError(f"activation {key!r} takes no parameter, got {activation!r}; only "
                         f"{sorted(PARAMETERS)} take one")
    return 0.0


def parse_activation(activation: ActivationSpec) -> Tuple[str, float]:
    """Normalise ``activation`` to ``(name, param)``.

    Accepts ``None``, a name (``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ... or an alias of
    :data:`ALIASES`; case-insensitive, ``-`` read as ``_``), a ``(name, param)`` tuple
    (``("leaky_relu", 0.2)``; a parameter-free activation accepts only ``None`` or ``0.0`` there,
    the form this function returns) or one of torch's activation modules (``nn.GELU()``...).
    """
    if activation is None:
        return "none", 0.0
    if isinstance(activation, torch.nn.Module):
        return activation_from_module(activation)
    param = None
    name = activation
    if isinstance(activation, tuple):
        if len(activation) != 2:
            raise ValueError(f"activation tuple must be (name, param), got {activation!r}")
        name, param = activation
    if not isinstance(name, str):
        raise TypeError(f"activation must be None, a name or a (name, param) tuple, got "
                        f"{type(activation).__name__}")
    key = _canonical_name(name)
    return key, _check_param(activation, key, param)


def activation_from_module(module: torch.nn.Module) -> Tuple[str, float]:
    """Map a torch activation module to ``(name, param)``; ``ValueError`` if it has no kernel.

    Also maps Hugging Face's activation classes by class name (:data:`HF_ACTIVATIONS`), without
    importing ``transformers``."""
    if isinstance(module, torch.nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if isinstance(module, torch.nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, torch.nn.Identity):
        return "none", 0.0
    for cls, name in _MODULE_NAMES.items():
        if type(module) is cls:
            return name, 0.0
    name = HF_ACTIVATIONS.get(type(module).__name__)
    if name is not None and type(module).__module__.startswith("transformers."):
        return name, 0.0  # Hugging Face's classes, by name (see HF_ACTIVATIONS)
    raise ValueError(f"no fused activation for module {type(module).__name__}")


def activation_code(activation: ActivationSpec) -> Tuple[int, float]:
    name, param = parse_activation(activation)
    return ACTIVATIONS[name][0], param


def activation_module(name: str, param: float = 0.0) -> torch.nn.Module:
    """The torch module equivalent of ``(name, param)`` (used by unpatch and ONNX export)."""
    return {
        "none": lambda: torch.nn.Identity(), "relu": lambda: torch.nn.ReLU(),
        "relu6": lambda: torch.nn.ReLU6(), "leaky_relu": lambda: torch.nn.LeakyReLU(param),
        "gelu": lambda: torch.nn.GELU(), "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
        "silu": lambda: torch.nn.SiLU(), "sigmoid": lambda: torch.nn.Sigmoid(),
        "tanh": lambda: torch.nn.Tanh(),
    }[name]()


def torch_activation(z: torch.Tensor, name: str, param: float = 0.0) -> torch.Tensor:
    """Reference forward in torch (same semantics as the kernels)."""
    if name == "none":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "relu6":
        return F.relu6(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, param)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {name!r}")


def torch_activation_grad(z: torch.Tensor, name: str, param: float = 0.0) -> torch.Tensor:
    """d act(z) / dz in torch, matching torch's own backward conventions at kinks."""
    if name == "none":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, param))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if name == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (z + 0.044715 * z * z * z)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s)
    if name == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    raise ValueError(f"unknown activation {name!r}")
