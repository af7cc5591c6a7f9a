"""The op registry's guard (tilefuse/registry.py, docs/adding_an_op.md): every ``tilefuse::``
custom op belongs to a registered public op (or is declared internal), and every registered op
has what the registry says: its definition, kernel family, compile-check scenarios, benchmark,
host-cost case, differential fuzzer, tuning space, and the autocast policy it declares is what
it does. Adding an op without these entries fails here.

The checks are functions of a list of specs (``problems(specs, ...)``) so that the walk-through
in docs/adding_an_op.md is tested with a toy op (tests/test_adding_an_op.py)."""
from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import tilefuse
import tilefuse.autotune
from tilefuse import registry
from tilefuse.bench.host_cases import CASES
from tilefuse.fused import _fast

ROOT = Path(__file__).resolve().parents[1]


def _custom_ops_created() -> set:
    """Every tilefuse:: custom op the package defines: ``fast_op("<name>", ...)`` and
    ``torch.library.custom_op("tilefuse::<name>", ...)`` calls."""
    names = set()
    for path in (ROOT / "tilefuse").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                continue
            if getattr(node.func, "id", None) == "fast_op":
                names.add(node.args[0].value)
            elif (getattr(node.func, "attr", None) == "custom_op"
                  and node.args[0].value.startswith("tilefuse::")):  # torch.library.custom_op
                names.add(node.args[0].value.split("::", 1)[1])
    return names


def _aot_scenarios(family: str) -> list:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        scen = importlib.import_module("aot_scenarios")
    finally:
        sys.path.pop(0)
    return ([name for name, _ in scen.DRIVERS[family](torch, tilefuse)]
            + [name for name, _ in scen._host_scenarios(family)])


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    f = ROOT / path
    return f.is_file() and re.search(rf"^def {re.escape(name)}\(", f.read_text(), re.M) is not None


def problems(specs, custom_ops=None, internal=None, scenarios=None) -> list:
    """What is missing or wrong for ``specs`` (a list of registry.OpSpec); [] when all is there.
    ``custom_ops``: the tilefuse:: custom ops that exist (default: every ``fast_op`` in the
    package); ``scenarios``: family -> scenario names (default: tools/aot_scenarios.py)."""
    out = []
    custom_ops = _custom_ops_created() if custom_ops is None else custom_ops
    internal = registry.INTERNAL_CUSTOM_OPS if internal is None else internal
    claimed = {c for s in specs for c in s.custom_ops} | set(internal)
    for c in sorted(custom_ops - claimed):
        out.append(f"custom op tilefuse::{c} is not part of any registry entry (add it to the "
                   f"op's custom_ops, or to INTERNAL_CUSTOM_OPS with its user)")
    spaces = set(tilefuse.autotune.registered_spaces())
    host_ops = {c.op for c in CASES}
    scen_cache = dict(scenarios or {})
    for s in specs:
        where = f"{s.name}:"
        try:
            fn = getattr(importlib.import_module(s.module), s.name)
            if not callable(fn):
                out.append(f"{where} {s.module}.{s.name} is not callable")
        except (ImportError, AttributeError) as e:
            out.append(f"{where} {s.module}.{s.name} cannot be imported ({e})")
        if s.family not in registry.FAMILIES:
            out.append(f"{where} family {s.family!r} is not in registry.FAMILIES")
            continue
        if s.autocast not in registry.AUTOCAST_POLICIES:
            out.append(f"{where} autocast {s.autocast!r} not in {registry.AUTOCAST_POLICIES}")
        for c in s.custom_ops:
            if c not in custom_ops:
                out.append(f"{where} custom op tilefuse::{c} does not exist")
        if s.family not in scen_cache:
            scen_cache[s.family] = _aot_scenarios(s.family)
        if not any(re.search(s.aot, n) for n in scen_cache[s.family]):
            out.append(f"{where} no compile-check scenario of family {s.family!r} matches "
                       f"{s.aot!r} (tools/aot_scenarios.py)")
        bench = ROOT / "tilefuse" / "bench" / f"kernels_{s.bench}.py"
        if not bench.is_file():
            out.append(f"{where} no benchmark module {bench.relative_to(ROOT)}")
        elif not re.search(rf"\b{s.name}\b", bench.read_text()):
            out.append(f"{where} {bench.relative_to(ROOT)} never calls {s.name}")
        if s.host not in host_ops:
            out.append(f"{where} no `tilefuse bench host` case with op {s.host!r} "
                       f"(tilefuse/bench/host_cases.py)")
        if not _test_exists(s.fuzz):
            out.append(f"{where} fuzzer {s.fuzz} does not exist")
        elif not re.search(rf"\b{s.name}\b", (ROOT / s.fuzz.split('::')[0]).read_text()):
            out.append(f"{where} fuzzer file {s.fuzz.split('::')[0]} never calls {s.name}")
        if s.tuning is not None and s.tuning not in spaces:
            out.append(f"{where} tuning space {s.tuning!r} is not registered "
                       f"(tilefuse.autotune.registered_spaces())")
    return out


def test_every_op_is_registered_and_complete():
    assert problems(registry.OPS) == []


def test_ops_package_is_the_registry():
    assert sorted(tilefuse.ops.__all__) == sorted(registry.names())
    assert len(set(registry.names())) == len(registry.OPS)
    for s in registry.OPS:
        assert getattr(tilefuse.ops, s.name) is getattr(importlib.import_module(s.module), s.name)


def test_families_drive_the_tools():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        scen = importlib.import_module("aot_scenarios")
    finally:
        sys.path.pop(0)
    assert tuple(scen.FAMILIES) == registry.families()
    assert set(scen.DRIVERS) == set(registry.FAMILIES)
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "-m cuda" in text and "tests/test_" not in text  # no hand-kept test file lists


def test_guard_flags_an_unregistered_custom_op():
    fake = _custom_ops_created() | {"my_new_op"}
    msgs = problems(registry.OPS, custom_ops=fake)
    assert [m for m in msgs if "my_new_op" in m] == msgs[:1] and "tilefuse::my_new_op" in msgs[0]


def test_guard_flags_missing_entries():
    import dataclasses

    s = registry.BY_NAME["dropout"]
    bad = dataclasses.replace(s, family="nope")
    assert any("family 'nope'" in m for m in problems([bad], custom_ops=set(s.custom_ops)))
    bad = dataclasses.replace(s, aot=r"^no such scenario", fuzz="tests/test_x.py::test_y",
                              host="nothing", tuning="nope", bench="nope")
    msgs = problems([bad], custom_ops=set(s.custom_ops))
    for what in ("compile-check scenario", "fuzzer", "bench host", "tuning space",
                 "benchmark module"):
        assert any(what in m for m in msgs), (what, msgs)


_CAST_DTYPE = torch.bfloat16


def _dtypes(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.dtype for o in outs if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize("case", [c for c in CASES if c.op in registry.BY_NAME and not c.grad],
                         ids=lambda c: c.name)
def test_declared_autocast_policy_matches_the_op_and_torch(case):
    """Under CPU autocast (bf16) the op's outputs have the dtypes its declared policy implies
    (``lower``: the autocast dtype; the others: what they are without autocast, fp32 inputs), and
    the same dtype as the torch call it replaces."""
    spec = registry.BY_NAME[case.op]
    ours, theirs, _ = case.build("cpu")
    with torch.no_grad():
        plain = _dtypes(ours())
        with torch.autocast("cpu", dtype=_CAST_DTYPE):
            got, want = _dtypes(ours()), _dtypes(theirs())
    if spec.autocast == "lower":
        assert got[:1] == [_CAST_DTYPE], (spec.name, got)
    else:  # fp32, norm_fp32 (no cast on CPU, where torch's autocast falls through), none
        assert got == plain, (spec.name, got, plain)
    if case.op not in ("quantize_per_row", "quantize_fp8_per_row", "fp8_matmul",
                       "int8_matmul", "w8a8_linear"):
        # (the torch calls of those are emulations with dtypes of their own)
        assert got[:1] == want[:1], (spec.name, got, want)


def test_fast_ops_registry_is_consistent():
    # every FastOp the package made is one of the names fast_op was called with
    made = {v.op._qualname.split("::")[1] for m in list(sys.modules.values())
            if getattr(m, "__name__", "").startswith("tilefuse.")
            for v in vars(m).values() if isinstance(v, _fast.FastOp)}
    assert made <= _custom_ops_created()
