"""Random modules and models shared by the module-level fuzzers (test_fuzz_modules.py,
test_fuzz_extra.py): torch activation factories paired with tilefuse's activation specs, random
parameter/buffer values, and random small MLPs / CNNs drawn by hypothesis that exercise every
``tilefuse.patch`` rule (and the Linear / 1x1-conv layers ``tilefuse.quantize`` replaces)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from fuzz_utils import randn

# (tilefuse spec, torch module factory)
ACTS = [
    (None, nn.Identity), ("relu", nn.ReLU), ("relu6", nn.ReLU6),
    (("leaky_relu", 0.2), lambda: nn.LeakyReLU(0.2)), ("leaky_relu", nn.LeakyReLU),
    ("gelu", nn.GELU), ("gelu_tanh", lambda: nn.GELU(approximate="tanh")), ("silu", nn.SiLU),
    ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh),
]


def randomize(module, g):
    """Random values for every float parameter / buffer (running_var kept positive)."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t is None or not t.is_floating_point():
                continue
            v = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                v = v.abs() + 0.5
            elif name.endswith("weight") and t.dim() >= 2:
                v = v / math.sqrt(max(1, t[0].numel()))
            t.copy_(v.to(t.dtype))
    return module


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, post: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.post = post if post is not None else nn.Identity()

    def forward(self, x):
        return self.post(self.body(x) + x)


class _FuncAct(nn.Module):
    """Activation as a functional call (cannot be removed as a module)."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return F.gelu(self.bn(self.conv(x))) + F.relu(x)


def _act(data, label):
    return data.draw(st.sampled_from([nn.ReLU, nn.GELU, nn.ReLU6, nn.SiLU, nn.Tanh,
                                      lambda: nn.LeakyReLU(0.1)]), label=label)()


def _random_mlp(data, D):
    layers = []
    for i in range(data.draw(st.integers(1, 3), label="n_blocks")):
        kind = data.draw(st.sampled_from(["lin_act", "lin", "ln_act", "bn1d_act", "drop",
                                          "res", "res_ln", "rms_act", "drop_add"]),
                         label=f"block{i}")
        if kind == "rms_act":
            layers += [nn.RMSNorm(D, eps=1e-5), _act(data, f"act{i}")]
        elif kind == "drop_add":
            layers.append(_Residual(nn.Sequential(nn.Linear(D, D), nn.Dropout(0.0))))
        elif kind == "lin_act":
            layers += [nn.Linear(D, D), _act(data, f"act{i}")]
        elif kind == "lin":
            layers.append(nn.Linear(D, D, bias=data.draw(st.booleans(), label=f"bias{i}")))
        elif kind == "ln_act":
            layers += [nn.LayerNorm(D), _act(data, f"act{i}")]
        elif kind == "bn1d_act":
            layers += [nn.BatchNorm1d(D), _act(data, f"act{i}")]
        elif kind == "drop":
            layers.append(nn.Dropout(0.0))
        elif kind == "res":
            layers.append(_Residual(nn.Sequential(nn.Linear(D, D), _act(data, f"act{i}"),
                                                  nn.Linear(D, D))))
        else:
            layers.append(_Residual(nn.Linear(D, D), nn.LayerNorm(D)))
    return nn.Sequential(*layers, nn.Linear(D, 3))


def _random_cnn(data, C):
    layers = [nn.Conv2d(2, C, 3, padding=1, bias=data.draw(st.booleans(), label="bias0"))]
    for i in range(data.draw(st.integers(1, 2), label="n_blocks")):
        kind = data.draw(st.sampled_from(["bn_act", "dw_bn_act", "conv_bn", "bn", "res",
                                          "drop2d", "odd_bn", "gn_act", "dw_mult", "func_act"]),
                         label=f"block{i}")
        if kind == "bn_act":
            layers += [nn.BatchNorm2d(C), _act(data, f"act{i}")]
        elif kind == "odd_bn":   # BN variants the fold / fused BN must honour or decline
            bn = nn.BatchNorm2d(C, affine=data.draw(st.booleans(), label=f"affine{i}"),
                                track_running_stats=data.draw(st.booleans(), label=f"trs{i}"),
                                momentum=data.draw(st.sampled_from([None, 0.1, 1.0]),
                                                   label=f"mom{i}"),
                                eps=data.draw(st.sampled_from([1e-5, 0.1]), label=f"eps{i}"))
            layers += [nn.Conv2d(C, C, 1, bias=False), bn, _act(data, f"act{i}")]
        elif kind == "gn_act":
            layers += [nn.GroupNorm(data.draw(st.sampled_from([1, C]), label=f"G{i}"), C),
                       _act(data, f"act{i}")]
        elif kind == "dw_mult":   # depthwise with a channel multiplier, then back to C
            layers += [nn.Conv2d(C, 2 * C, 3, padding=1, groups=C), nn.BatchNorm2d(2 * C),
                       _act(data, f"act{i}"), nn.Conv2d(2 * C, C, 1)]
        elif kind == "func_act":
            layers.append(_FuncAct(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)))
        elif kind == "dw_bn_act":
            layers += [nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), nn.BatchNorm2d(C),
                       _act(data, f"act{i}")]
        elif kind == "conv_bn":
            layers += [nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)]
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(C))
        elif kind == "res":
            layers.append(_Residual(nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(C)), nn.ReLU()))
        else:
            layers.append(nn.Dropout2d(0.0))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(C * 16, 3))


def random_model(data, g):
    if data.draw(st.booleans(), label="cnn"):
        C = data.draw(st.sampled_from([2, 4]), label="C")
        model, x = _random_cnn(data, C), randn(g, (3, 2, 4, 4))
    else:
        D = data.draw(st.sampled_from([4, 8]), label="D")
        model, x = _random_mlp(data, D), randn(g, (3, D))
    randomize(model, g)
    # BN stats: a few training forwards so running stats are not trivial
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(randn(g, x.shape))
    return model, x

