"""The op registry: one declaration per public op of :mod:`tilefuse.ops`.

Everything that used to be a hand-kept list derives from :data:`OPS` (and :data:`FAMILIES`):

* :mod:`tilefuse.ops` exports exactly the registered names (imported from ``module``);
* ``tools/aot_check.py --families`` and ``tilefuse bench kernels --only`` take :data:`FAMILIES`;
* the autocast policy of each op is declared here (``autocast``) and checked against the op's
  behaviour by ``tests/test_registry.py`` (same output dtype as the torch call it replaces);
* ``bench/gpu_check.sh`` selects GPU tests with ``-m cuda`` (no file lists).

``tests/test_registry.py`` is the guard: it fails when a ``tilefuse::`` custom op exists that no
entry claims, when an entry points at a compile-check scenario, bench case, host-cost case,
fuzzer or tuning space that does not exist, or when a declared autocast policy is not what the
op does. ``docs/adding_an_op.md`` walks through adding one.

This module imports nothing from tilefuse (entries are names), so any layer may read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# kernel family -> what it covers. The unit of `aot_check --families`, `bench kernels --only`,
# `autotune` spaces and the GPU check's benchmark list.
FAMILIES: Dict[str, str] = {
    "matmul": "fp16/bf16/fp32 GEMM with the fused bias/activation/residual epilogue",
    "norm": "LayerNorm, RMSNorm, GroupNorm, BatchNorm (+ activation, + residual)",
    "int8": "int8 GEMM, per-row quantization, W8A8 / weight-only linear",
    "fp8": "fp8 GEMM, per-row fp8 quantization, fp8 linear",
    "conv": "dense / grouped conv2d as implicit GEMM",
    "depthwise": "depthwise conv2d",
    "dropout": "dropout family, DropConnect, mixup, fused cross-entropy",
    "optim": "fused optimizer steps and gradient-norm tools (tilefuse.optim; not an op)",
}

AUTOCAST_POLICIES = ("lower", "fp32", "norm_fp32", "none")


@dataclass(frozen=True)
class OpSpec:
    """One public op. Every field is checked by ``tests/test_registry.py``."""
    name: str           # tilefuse.ops.<name>
    module: str         # where it is defined (the fused layer): tilefuse.fused.<x>
    family: str         # a key of FAMILIES
    torch_equivalent: str  # the eager torch computation it replaces (the tests' fp64 reference)
    autocast: str       # one of AUTOCAST_POLICIES (tilefuse._autocast): what it does under autocast
    custom_ops: Tuple[str, ...]  # the tilefuse:: custom ops it is made of (torch.compile path)
    aot: str            # regex matching its scenarios in tools/aot_scenarios.py (of `family`)
    bench: str          # tilefuse/bench/kernels_<bench>.py benchmarks it
    host: str           # the HostCase.op of its `tilefuse bench host` rows
    fuzz: str           # "tests/<file>.py::<test>": its differential (hypothesis) fuzzer
    tuning: Optional[str] = None  # autotune space name, or None: launch heuristics only


def _op(name, module, family, torch_equivalent, autocast, custom_ops, fuzz, aot=None, bench=None,
        host=None, tuning=None) -> OpSpec:
    return OpSpec(name, module, family, torch_equivalent, autocast, tuple(custom_ops),
                  aot or rf"^{name} ", bench or family, host or name, fuzz, tuning)


_F = "tests/test_fuzz_ops.py::"
_G = "tests/test_fuzz_ops_more.py::"
OPS: Tuple[OpSpec, ...] = (
    _op("matmul", "tilefuse.fused.matmul", "matmul", "act(a @ b + bias) + residual", "lower",
        ["matmul", "activation_backward"], _F + "test_fuzz_matmul", aot=r"^linear ",
        tuning="matmul"),
    _op("linear", "tilefuse.fused.linear", "matmul", "act(F.linear(x, w, bias)) + residual",
        "lower", ["matmul", "activation_backward"], _F + "test_fuzz_linear", tuning="matmul"),
    _op("layer_norm_act", "tilefuse.fused.norm", "norm",
        "act(F.layer_norm(x + residual, ...))", "norm_fp32",
        ["norm_act_fwd", "norm_act_prenorm_fwd", "norm_act_bwd"], _F + "test_fuzz_row_norm",
        tuning="layer_norm"),
    _op("rms_norm_act", "tilefuse.fused.norm", "norm", "act(F.rms_norm(x + residual, ...))",
        "norm_fp32", ["norm_act_fwd", "norm_act_prenorm_fwd", "norm_act_bwd"], _F + "test_fuzz_row_norm",
        tuning="layer_norm"),
    _op("group_norm_act", "tilefuse.fused.norm_group", "norm", "act(F.group_norm(x, G, ...))",
        "norm_fp32", ["group_norm_act_fwd", "group_norm_act_bwd"],
        _F + "test_fuzz_group_norm"),
    _op("batch_norm_act", "tilefuse.fused.norm_bn", "norm",
        "act(F.batch_norm(x, ...) + residual)", "none",
        ["batch_norm_act_fwd", "batch_norm_act_bwd", "batch_norm_running"], _F + "test_fuzz_batch_norm"),
    _op("conv2d", "tilefuse.fused.conv", "conv", "act(F.conv2d(x, w, b, ...) + residual)",
        "lower", ["conv2d", "conv2d_backward"], _G + "test_fuzz_conv2d",
        aot=r"^conv ", tuning="conv2d"),
    _op("depthwise_conv2d", "tilefuse.fused.depthwise", "depthwise",
        "act(F.conv2d(x, w, b, groups=C) + residual)", "lower",
        ["depthwise_conv2d", "depthwise_conv2d_backward"], _F + "test_fuzz_depthwise",
        aot=r"^dwconv "),
    _op("dropout", "tilefuse.fused.dropout", "dropout", "F.dropout(x, p)", "none", ["dropout"],
        _F + "test_fuzz_dropout"),
    _op("dropout_add", "tilefuse.fused.dropout", "dropout", "residual + F.dropout(x, p)", "none",
        ["dropout"], _F + "test_fuzz_dropout"),
    _op("dropout2d", "tilefuse.fused.dropout", "dropout", "F.dropout2d(x, p)", "none",
        ["dropout"], _F + "test_fuzz_dropout"),
    _op("dropconnect_linear", "tilefuse.fused.dropout", "dropout",
        "act(F.linear(x, F.dropout(w, p), bias))", "lower", ["dropconnect_linear"],
        "tests/test_fuzz_dropstats.py::test_fuzz_dropconnect_statistics"),
    _op("cross_entropy", "tilefuse.fused.cross_entropy", "dropout",
        "F.cross_entropy(logits, target, weight, ..., label_smoothing)", "fp32",
        ["cross_entropy", "cross_entropy_bwd"], _F + "test_fuzz_cross_entropy",
        bench="cross_entropy"),
    _op("int8_matmul", "tilefuse.fused.int8", "int8",
        "act((a.int() @ b.int()) * a_scale * b_scale + bias) + residual", "none",
        ["int8_matmul"], _F + "test_fuzz_int8_matmul", aot=r"^int8", tuning="int8_matmul"),
    _op("quantize_per_row", "tilefuse.fused.int8", "int8",
        "round(x / (absmax(x, row) / 127)) as int8, scale", "none", ["quantize_per_row"],
        _F + "test_fuzz_quantize_per_row"),
    _op("dequantize_per_row", "tilefuse.fused.int8", "int8", "q.float() * scale", "none",
        ["dequantize"], _G + "test_fuzz_w8a8_linear", aot=r"^dequantize_per_row "),
    _op("w8a8_linear", "tilefuse.fused.int8", "int8",
        "act(F.linear(x, q * scale, bias)) + residual, x quantized per row", "lower",
        ["quantize_per_row", "int8_matmul"], _G + "test_fuzz_w8a8_linear",
        tuning="int8_matmul"),
    _op("weight_only_int8_linear", "tilefuse.fused.int8", "int8",
        "act(F.linear(x, q * scale, bias)) + residual", "lower", ["int8_matmul", "matmul"],
        _F + "test_fuzz_weight_only_int8_linear", tuning="int8_matmul"),
    _op("fp8_matmul", "tilefuse.fused.fp8", "fp8",
        "act((a.float() @ b.float()) * a_scale * b_scale + bias) + residual", "none",
        ["fp8_matmul"], _G + "test_fuzz_fp8_ops", tuning="fp8_matmul"),
    _op("quantize_fp8_per_row", "tilefuse.fused.fp8", "fp8",
        "(x / (absmax(x, row) / fp8_max)).to(fp8), scale", "none", ["quantize_fp8_per_row"],
        _G + "test_fuzz_fp8_ops"),
    _op("dequantize_fp8", "tilefuse.fused.fp8", "fp8", "q.float() * scale", "none",
        ["dequantize"], _G + "test_fuzz_fp8_ops", aot=r"^dequantize_fp8 "),
    _op("fp8_linear", "tilefuse.fused.fp8", "fp8",
        "act(F.linear(x, q * scale, bias)) + residual, x quantized per row to fp8", "lower",
        ["quantize_fp8_per_row", "fp8_matmul"], _G + "test_fuzz_fp8_ops",
        tuning="fp8_matmul"),
)

# tilefuse:: custom ops that are not part of a tilefuse.ops entry, and who uses them
INTERNAL_CUSTOM_OPS: Dict[str, str] = {
    "mixup": "tilefuse.regularize.mixup",
    "int8_conv2d": "tilefuse.nn.int8_conv",
    "instance_norm_running": "tilefuse.nn.InstanceNormAct1d/2d (running statistics)",
}

BY_NAME: Dict[str, OpSpec] = {op.name: op for op in OPS}


def names() -> Tuple[str, ...]:
    """The public op names, in registry order."""
    return tuple(op.name for op in OPS)


def families() -> Tuple[str, ...]:
    return tuple(FAMILIES)


def ops_of(family: str) -> Tuple[OpSpec, ...]:
    return tuple(op for op in OPS if op.family == family)
