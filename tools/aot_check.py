#!/usr/bin/env python
"""Ahead-of-time compile check: compile every Triton kernel launch that tilefuse's public ops make
for a real NVIDIA target (default sm_90, Hopper) on a machine WITHOUT a GPU.

How it works (see docs/aot_check.md):

1. Runs with ``TRITON_INTERPRET`` unset, so ``@triton.jit`` yields real ``JITFunction`` objects.
2. ``tilefuse._backend.backend_for_device`` is patched to answer ``"triton"`` for CPU tensors and
   (by default) ``torch.Tensor.is_cuda`` answers True, so the launchers pick their *GPU* block
   configs (``interpreter_enabled()`` is already False). The autotune DB lookup is disabled so the
   heuristic configs are what get compiled.
3. ``JITFunction.run`` is replaced: each ``kernel[grid](*args, **kw)`` is bound and specialized
   with Triton's own binder (the same code path the GPU runtime uses: dtypes, ``== 1`` and
   ``% 16`` specializations, constexprs, num_warps/num_stages) and recorded instead of launched.
   Op outputs are therefore uninitialized memory, which is fine: only the launches matter.
4. Each distinct specialization is compiled with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))`` down to a cubin with the ptxas bundled in the wheel;
   registers / spills come from the ptxas ``-v`` log, shared memory from the kernel metadata.

Usage::

    python tools/aot_check.py [--families matmul,depthwise,...] [--arch 90] [--json out.json]

Exit status: 0 when every specialization compiles and fits (shared memory <= the target's
opt-in limit), 1 otherwise (2 for usage errors).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import traceback

FAMILIES = ("matmul", "depthwise", "int8", "norm", "dropout", "optim")
# max dynamic shared memory per block (opt-in), bytes
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _prepare_env(cache_dir: str | None) -> None:
    """Must run before triton / tilefuse are imported."""
    if "triton" in sys.modules or "tilefuse" in sys.modules:
        interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
        if interp:
            raise SystemExit("aot_check: TRITON_INTERPRET was set when triton was imported; run "
                             "tools/aot_check.py in a fresh process without TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton <= 3.9 default; no warning
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="tilefuse_aot_")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    for k in ("TILEFUSE_BACKEND",):
        os.environ.pop(k, None)


# ------------------------------------------------------------------------------------------------
# recording launches
# ------------------------------------------------------------------------------------------------
class Launch:
    __slots__ = ("fn", "signature", "constexprs", "attrs", "options", "family", "scenario", "key",
                 "count")

    def __init__(self, fn, signature, constexprs, attrs, options, family, scenario, key):
        self.fn, self.signature, self.constexprs, self.attrs = fn, signature, constexprs, attrs
        self.options, self.family, self.scenario, self.key = options, family, scenario, key
        self.count = 1

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def where(self) -> str:
        import inspect

        try:
            src = inspect.getsourcefile(self.fn.fn)
            line = inspect.getsourcelines(self.fn.fn)[1]
            return f"{os.path.relpath(src)}:{line}"
        except Exception:
            return self.fn.module

    def spec(self) -> str:
        """Short description: pointer dtypes, user constexprs, warps/stages."""
        names = self.fn.arg_names
        ptrs = []
        for name in names:
            t = self.signature.get(name)
            if isinstance(t, str) and t.startswith("*") and t[1:] not in ptrs:
                ptrs.append(t[1:])
        consts = []
        for (idx,), v in sorted(self.constexprs.items()):
            p = self.fn.params[idx]
            if not p.is_constexpr:
                continue  # a runtime int specialized to 1: implied by the shapes
            if hasattr(v, "name") and not isinstance(v, (int, float, str, bool)):
                v = getattr(v, "name", v)
            consts.append(f"{names[idx]}={v}")
        ints64 = sum(1 for t in self.signature.values() if t == "i64")
        o = self.options
        parts = ["/".join(ptrs)] + consts + [f"w{o.num_warps}", f"s{o.num_stages}"]
        if ints64:
            parts.append(f"i64x{ints64}")
        return " ".join(parts)


class Recorder:
    def __init__(self, arch: int, promote_i64: bool = False, full: bool = False):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders: dict = {}
        self.launches: dict = {}
        self.order: list = []
        self.family = "?"
        self.scenario = "?"
        self.n_calls = 0
        self.promote_i64 = promote_i64
        self.full = full

    def record(self, fn, args, kwargs):
        from triton import knobs
        from triton.runtime import jit as tjit

        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = tjit.create_function_from_signature(
                fn.signature, fn.params, self.backend)
        bound, specialization, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                              specialization, opts)
        self.n_calls += 1
        self._add(fn, signature, constexprs, attrs, options)
        if self.promote_i64:  # the same launch on tensors with > 2**31 elements
            sig64 = {k: ("i64" if v == "i32" else v) for k, v in signature.items()}
            if sig64 != signature:
                self._add(fn, sig64, constexprs, attrs, options)

    def _add(self, fn, signature, constexprs, attrs, options):
        if self.full:  # every distinct specialization (incl. ==1 / %16 int specializations)
            key = (fn.module, fn.__name__, repr(sorted(signature.items())),
                   repr(sorted((k, repr(v)) for k, v in constexprs.items())),
                   repr(sorted(attrs.items())), options.hash())
        else:  # one per config: argument dtypes + declared constexprs + launch options
            key = (fn.module, fn.__name__,
                   repr([v for k, v in signature.items() if v != "constexpr"
                         and (v.startswith("*") or v in ("i64", "fp64"))]),
                   repr(sorted((k, repr(v)) for k, v in constexprs.items()
                               if fn.params[k[0]].is_constexpr)), options.hash())
        hit = self.launches.get(key)
        if hit is not None:
            hit.count += 1
            return
        launch = Launch(fn, signature, constexprs, attrs, options, self.family, self.scenario, key)
        self.launches[key] = launch
        self.order.append(launch)

    @contextlib.contextmanager
    def patched(self, cuda_heuristics: bool = True):
        import torch
        from triton.runtime import jit as tjit

        import tilefuse._backend as B

        saved_run = tjit.JITFunction.run
        saved_bfd = B.backend_for_device
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            rec.record(fn, args, kwargs)
            return None

        def backend_for_device(device):
            device = torch.device(device)
            return "triton" if device.type in ("cpu", "cuda") else saved_bfd(device)

        tjit.JITFunction.run = run
        B.backend_for_device = backend_for_device
        # modules that imported the name directly (``from tilefuse._backend import ...``)
        rebound = [m for name, m in list(sys.modules.items())
                   if name.startswith("tilefuse") and m is not None and m is not B
                   and getattr(m, "backend_for_device", None) is saved_bfd]
        for m in rebound:
            m.backend_for_device = backend_for_device
        saved_lookup = None
        try:
            import tilefuse.autotune as A

            saved_lookup = A.lookup
            A.lookup = lambda kernel, key, default: default
        except Exception:  # pragma: no cover
            A = None
        had_is_cuda = "is_cuda" in torch.Tensor.__dict__
        saved_is_cuda = torch.Tensor.__dict__.get("is_cuda")
        if cuda_heuristics:
            torch.Tensor.is_cuda = property(lambda self: True)
        try:
            yield self
        finally:
            if cuda_heuristics:
                if had_is_cuda:
                    torch.Tensor.is_cuda = saved_is_cuda
                else:
                    del torch.Tensor.is_cuda
            if A is not None and saved_lookup is not None:
                A.lookup = saved_lookup
            for m in rebound:
                m.backend_for_device = saved_bfd
            B.backend_for_device = saved_bfd
            tjit.JITFunction.run = saved_run


# ------------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------------
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _entry_section(log: str, name: str) -> str:
    """The part of a ``ptxas -v`` log about entry function ``name`` (the log also lists
    non-inlined device functions, whose numbers must not be taken for the kernel's)."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        return log
    rest = log[start:]
    nxt = rest.find("Compiling entry function", 10)
    rest = rest if nxt < 0 else rest[:nxt]
    props = rest.find(f"Function properties for {name}\n")
    out = []
    if props >= 0:  # the stack/spill line follows the entry's own "Function properties" line
        out.append(rest[props:].split("\n", 2)[1])
    out += [ln for ln in rest.splitlines() if "Used " in ln and "registers" in ln][:1]
    return "\n".join(out)


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n])


def _short_error(e: BaseException) -> str:
    msg = str(e)
    # ptxas failures embed the whole PTX: keep the ptxas stderr part only
    if "`ptxas` stderr:" in msg:
        msg = msg.split("`ptxas` stderr:", 1)[1].split("Repro command:", 1)[0]
        return "ptxas: " + _first_lines(msg, 4)
    return f"{type(e).__name__}: {_first_lines(msg, 8)}"


def compile_launch(launch: Launch, target, smem_limit: int) -> dict:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    res = dict(family=launch.family, scenario=launch.scenario, kernel=launch.kernel,
               where=launch.where(), spec=launch.spec(), launches=launch.count,
               signature=launch.signature,
               constexprs={launch.fn.arg_names[k[0]]: repr(v)
                           for k, v in launch.constexprs.items()},
               num_warps=launch.options.num_warps, num_stages=launch.options.num_stages)
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    buf = io.StringIO()
    t0 = time.perf_counter()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=launch.options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compile error is a finding
        res.update(status="FAIL", error=_short_error(e), seconds=time.perf_counter() - t0)
        return res
    finally:
        knobs.nvidia.dump_ptxas_log = old
    res["seconds"] = time.perf_counter() - t0
    log = buf.getvalue()
    entry = _entry_section(log, k.metadata.name)
    m = _RE_REGS.search(entry)
    s = _RE_SPILL.search(entry)
    res["shared"] = int(k.metadata.shared)
    res["regs"] = int(m.group(1)) if m else None
    res["stack"] = int(s.group(1)) if s else None
    res["spill_stores"] = int(s.group(2)) if s else None
    res["spill_loads"] = int(s.group(3)) if s else None
    res["cached"] = not log.strip()
    res["ptxas"] = [ln.strip() for ln in log.splitlines() if "ptxas" in ln or "bytes" in ln]
    if res["shared"] > smem_limit:
        res.update(status="FAIL", error=f"OutOfResources: shared memory {res['shared']} B > "
                   f"{smem_limit} B available per block on this target")
    elif res["spill_stores"]:
        res["status"] = "SPILL"
    else:
        res["status"] = "OK"
    return res


def _features(launch: Launch) -> dict:
    """name -> value for what distinguishes a specialization: pointer dtypes, declared
    constexprs, launch options."""
    f = {"dtypes": tuple(v for v in launch.signature.values()
                         if v.startswith("*") or v in ("i64", "fp64")),
         "num_warps": launch.options.num_warps, "num_stages": launch.options.num_stages}
    for (idx,), v in launch.constexprs.items():
        p = launch.fn.params[idx]
        if p.is_constexpr:
            f[p.name] = repr(v)
    return f


def pairwise_cover(launches):
    """Greedy subset in which every pair of feature values that occurs together in some
    specialization of a kernel occurs together in a chosen one (all-pairs coverage), plus the
    heaviest tile of each kernel being kept by construction of the order."""
    by_kernel: dict = {}
    for ln in launches:
        by_kernel.setdefault((ln.fn.module, ln.kernel), []).append(ln)
    chosen = set()
    for group in by_kernel.values():
        feats = []
        for ln in group:
            items = sorted(_features(ln).items())
            pairs = {(a, b) for i, a in enumerate(items) for b in items[i:]}
            feats.append(pairs)
        todo = set().union(*feats)
        while todo:
            best = max(range(len(group)), key=lambda i: len(feats[i] & todo))
            chosen.add(id(group[best]))
            todo -= feats[best]
    return [ln for ln in launches if id(ln) in chosen]


_POOL_STATE: dict = {}


def _compile_index(i: int) -> dict:
    st = _POOL_STATE
    return compile_launch(st["launches"][i], st["target"], st["smem"])


def compile_all(launches, target, smem_limit: int, jobs: int):
    """Yields results in order; ``jobs`` > 1 compiles in forked worker processes."""
    if jobs <= 1 or len(launches) <= 1:
        for ln in launches:
            yield compile_launch(ln, target, smem_limit)
        return
    import multiprocessing as mp

    _POOL_STATE.update(launches=launches, target=target, smem=smem_limit)
    with mp.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_compile_index, range(len(launches)))


# ------------------------------------------------------------------------------------------------
# drivers: exercise the public API so every kernel family / constexpr combination is launched
# ------------------------------------------------------------------------------------------------
ACTS = ("relu", "relu6", ("leaky_relu", 0.2), "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


def _scenarios_matmul(torch, tf):
    ops = tf.ops
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for M in (8, 48, 256):  # the three heuristic tile classes
            a = torch.randn(M, 96, dtype=dt)
            w = torch.randn(128, 96, dtype=dt)
            yield f"linear {dt} M={M}", lambda a=a, w=w: ops.linear(a, w)
        a = torch.randn(256, 96, dtype=dt, requires_grad=True)
        w = torch.randn(128, 96, dtype=dt, requires_grad=True)
        bias = torch.randn(128, dtype=dt, requires_grad=True)
        res = torch.randn(256, 128, dtype=dt)
        for act in ACTS:
            def fwd_bwd(act=act, a=a, w=w, bias=bias, res=res):
                y = ops.linear(a, w, bias=bias, activation=act, residual=res)
                y.backward(torch.ones_like(y))
            yield f"linear {dt} act={act} bias+res fwd+bwd", fwd_bwd
        # batched matmul, broadcast residual, odd sizes
        yield f"matmul {dt} batched", lambda dt=dt: ops.matmul(
            torch.randn(3, 70, 33, dtype=dt), torch.randn(3, 33, 65, dtype=dt),
            residual=torch.randn(65, dtype=dt))
        yield f"matmul {dt} out fp32", lambda dt=dt: ops.matmul(
            torch.randn(64, 32, dtype=dt), torch.randn(32, 64, dtype=dt), out_dtype=torch.float32)

    def tf32():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ops.matmul(torch.randn(256, 64), torch.randn(64, 128))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    yield "matmul fp32 tf32", tf32
    yield "matmul fp64", lambda: ops.matmul(torch.randn(128, 64, dtype=torch.float64),
                                            torch.randn(64, 128, dtype=torch.float64))


def _scenarios_depthwise(torch, tf):
    ops = tf.ops
    shapes = [  # (N, C, H, W, k, stride, pad, dil, mult)
        (2, 32, 56, 56, 3, 1, 1, 1, 1),
        (2, 64, 7, 7, 3, 1, 1, 1, 1),
        (2, 16, 28, 28, 5, 2, 2, 1, 1),
        (1, 8, 15, 17, 3, 1, 2, 2, 2),
        (1, 24, 14, 14, 7, 1, 3, 1, 1),
    ]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for (N, C, H, W, k, s, p, d, m) in shapes:
            for cl in (False, True):
                def run(N=N, C=C, H=H, W=W, k=k, s=s, p=p, d=d, m=m, cl=cl, dt=dt):
                    x = torch.randn(N, C, H, W, dtype=dt)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    w = torch.randn(C * m, 1, k, k, dtype=dt, requires_grad=True)
                    b = torch.randn(C * m, dtype=dt, requires_grad=True)
                    y = ops.depthwise_conv2d(x, w, b, stride=s, padding=p, dilation=d,
                                             activation="relu6")
                    y.backward(torch.ones_like(y))
                yield (f"dwconv {dt} {N}x{C}x{H}x{W} k{k} s{s} d{d} m{m} "
                       f"{'NHWC' if cl else 'NCHW'} fwd+bwd"), run
        x = torch.randn(2, 32, 14, 14, dtype=dt)
        w = torch.randn(32, 1, 3, 3, dtype=dt)
        for act in ACTS:
            yield f"dwconv {dt} act={act} residual", lambda x=x, w=w, act=act: \
                ops.depthwise_conv2d(x, w, padding=1, activation=act, residual=x)


def _scenarios_int8(torch, tf):
    ops = tf.ops
    for M in (8, 48, 256):
        a = torch.randint(-127, 127, (M, 256), dtype=torch.int8)
        b = torch.randint(-127, 127, (256, 128), dtype=torch.int8)
        yield f"int8_matmul raw M={M}", lambda a=a, b=b: ops.int8_matmul(a, b)
        for odt in (torch.float16, torch.bfloat16, torch.float32):
            yield f"int8_matmul scaled M={M} -> {odt}", lambda a=a, b=b, odt=odt: ops.int8_matmul(
                a, b, torch.rand(a.shape[0]), torch.rand(128), bias=torch.randn(128, dtype=odt),
                activation="gelu", residual=torch.randn(a.shape[0], 128, dtype=odt),
                out_dtype=odt)
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(M, 256, dtype=dt)
            q, s = ops.quantize_per_row(torch.randn(128, 256))
            yield f"weight_only_int8_linear {dt} M={M}", lambda x=x, q=q, s=s, dt=dt: \
                ops.weight_only_int8_linear(x, q, s, bias=torch.randn(128, dtype=dt),
                                            activation="silu")
            yield f"w8a8_linear {dt} M={M}", lambda x=x, q=q, s=s, dt=dt: ops.w8a8_linear(
                x, q, s, bias=torch.randn(128, dtype=dt), residual=torch.randn(
                    x.shape[0], 128, dtype=dt))
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for (M, N) in ((4, 64), (300, 1000), (64, 4096), (8, 20000)):
            yield f"quantize_per_row {dt} {M}x{N}", lambda M=M, N=N, dt=dt: \
                ops.quantize_per_row(torch.randn(M, N, dtype=dt))


def _scenarios_norm(torch, tf):
    ops = tf.ops
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for N in (64, 1000, 4096, 20000):  # one block ... multi-block rows
            for rms in (False, True):
                for act, use_res, affine in ((None, False, True), ("gelu", True, True),
                                             ("silu", False, False)):
                    def run(N=N, rms=rms, act=act, use_res=use_res, affine=affine, dt=dt):
                        x = torch.randn(8, N, dtype=dt, requires_grad=True)
                        w = torch.randn(N, dtype=dt, requires_grad=True) if affine else None
                        b = torch.randn(N, dtype=dt, requires_grad=True) if affine else None
                        r = torch.randn(8, N, dtype=dt, requires_grad=True) if use_res else None
                        if rms:
                            y = ops.rms_norm_act(x, (N,), w, activation=act, residual=r)
                        else:
                            y = ops.layer_norm_act(x, (N,), w, b, activation=act, residual=r)
                        y.backward(torch.ones_like(y))
                    yield (f"{'rms' if rms else 'layer'}_norm_act {dt} N={N} act={act} "
                           f"res={use_res} affine={affine} fwd+bwd"), run
        for (shape, groups) in (((4, 32, 16, 16), 8), ((2, 64, 7, 7), 32), ((2, 256, 32, 32), 4),
                                ((2, 12, 100), 3)):
            for cl in (False, True):
                if cl and len(shape) != 4:
                    continue
                def run(shape=shape, groups=groups, cl=cl, dt=dt):
                    x = torch.randn(*shape, dtype=dt)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    C = shape[1]
                    w = torch.randn(C, dtype=dt, requires_grad=True)
                    b = torch.randn(C, dtype=dt, requires_grad=True)
                    y = ops.group_norm_act(x, groups, w, b, activation="silu")
                    y.backward(torch.ones_like(y))
                yield f"group_norm_act {dt} {shape} G={groups} cl={cl} fwd+bwd", run
        for shape in ((8, 64, 14, 14), (32, 128), (4, 256, 7, 7), (2, 16, 100)):
            for training in (True, False):
                for cl in (False, True):
                    if cl and len(shape) != 4:
                        continue
                    def run(shape=shape, training=training, cl=cl, dt=dt):
                        x = torch.randn(*shape, dtype=dt)
                        if cl:
                            x = x.to(memory_format=torch.channels_last)
                        x.requires_grad_(True)
                        C = shape[1]
                        rm, rv = torch.zeros(C), torch.ones(C)
                        w = torch.randn(C, requires_grad=True)
                        b = torch.randn(C, requires_grad=True)
                        y = ops.batch_norm_act(x, rm, rv, w, b, training=training,
                                               activation="relu", residual=x.detach())
                        y.backward(torch.ones_like(y))
                    yield f"batch_norm_act {dt} {shape} train={training} cl={cl} fwd+bwd", run


def _scenarios_dropout(torch, tf):
    ops = tf.ops
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((1000,), (64, 4096), (4, 16, 33, 9)):
            def run(shape=shape, dt=dt):
                x = torch.randn(*shape, dtype=dt, requires_grad=True)
                y = ops.dropout(x, 0.1)
                y.backward(torch.ones_like(y))
            yield f"dropout {dt} {shape} fwd+bwd", run
            yield f"dropout_add {dt} {shape}", lambda shape=shape, dt=dt: ops.dropout_add(
                torch.randn(*shape, dtype=dt), torch.randn(*shape, dtype=dt), 0.2)
        yield f"dropout strided {dt}", lambda dt=dt: ops.dropout(
            torch.randn(64, 128, dtype=dt).t(), 0.3)
        yield f"dropout_add broadcast residual {dt}", lambda dt=dt: ops.dropout_add(
            torch.randn(8, 64, dtype=dt), torch.randn(64, dtype=dt).expand(8, 64), 0.3)
        yield f"dropout2d {dt}", lambda dt=dt: ops.dropout2d(
            torch.randn(4, 16, 14, 14, dtype=dt), 0.2)
        yield f"dropout2d channels_last {dt}", lambda dt=dt: ops.dropout2d(
            torch.randn(4, 16, 14, 14, dtype=dt).to(memory_format=torch.channels_last), 0.2)
        for V in (10, 1000, 32000, 50257):
            def ce(V=V, dt=dt):
                logits = torch.randn(16, V, dtype=dt, requires_grad=True)
                target = torch.randint(0, V, (16,))
                loss = ops.cross_entropy(logits, target, label_smoothing=0.1)
                loss.backward()
                with torch.no_grad():
                    ops.cross_entropy(logits, target)
            yield f"cross_entropy {dt} V={V} fwd+bwd", ce

        def dc(dt=dt):
            x = torch.randn(32, 64, dtype=dt, requires_grad=True)
            w = torch.randn(128, 64, dtype=dt, requires_grad=True)
            y = ops.dropconnect_linear(x, w, torch.randn(128, dtype=dt), p=0.3,
                                       activation="relu")
            y.backward(torch.ones_like(y))
        yield f"dropconnect_linear {dt} fwd+bwd", dc
        try:
            import tilefuse.regularize as R
        except ImportError:  # pragma: no cover
            continue
        yield f"mixup {dt}", lambda dt=dt: R.mixup(torch.randn(8, 3, 16, 16, dtype=dt),
                                                   torch.randint(0, 10, (8,)), 0.4,
                                                   num_classes=10)


def _scenarios_optim(torch, tf):
    from tilefuse import optim as O

    def make(dt):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s, dtype=dt)) for s in ((300, 17), (5000,), (3,))]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    cases = [("AdamW", dict(lr=1e-3, weight_decay=0.01)), ("AdamW", dict(lr=1e-3, amsgrad=True)),
             ("Adam", dict(lr=1e-3)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
             ("SGD", dict(lr=0.1)), ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
             ("Adagrad", dict(lr=1e-2)), ("Lion", dict(lr=1e-4, weight_decay=0.1))]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for name, kw in cases:
            def step(name=name, kw=kw, dt=dt):
                cls = getattr(O, name)
                try:
                    opt = cls(make(dt), **kw)
                except TypeError:  # option not supported by this optimizer
                    kw2 = {k: v for k, v in kw.items() if k in ("lr", "momentum", "weight_decay")}
                    opt = cls(make(dt), **kw2)
                opt.step()
                opt.step()
            yield f"{name} {dt} {kw}", step
        yield f"AdamW master_weights {dt}", lambda dt=dt: _opt_master(O, make, dt)
        yield f"AdamW step(max_grad_norm) {dt}", lambda dt=dt: O.AdamW(make(dt), lr=1e-3).step(
            max_grad_norm=1.0)
        for nt in (2.0, 1.0, float("inf")):
            yield f"clip_grad_norm_ {dt} norm={nt}", lambda dt=dt, nt=nt: O.clip_grad_norm_(
                make(dt), 1.0, norm_type=nt)
        yield f"GradNormMonitor {dt}", lambda dt=dt: _monitor(O, make, dt)


def _opt_master(O, make, dt):
    try:
        opt = O.AdamW(make(dt), lr=1e-3, master_weights=True)
    except TypeError:
        return
    opt.step()


def _monitor(O, make, dt):
    import torch

    ps = make(dt)
    model = torch.nn.Module()
    for i, p in enumerate(ps):
        model.register_parameter(f"p{i}", p)
    try:
        mon = O.GradNormMonitor(model)
    except TypeError:
        mon = O.GradNormMonitor(ps)
    mon.norms() if callable(getattr(mon, "norms", None)) else None


DRIVERS = {"matmul": _scenarios_matmul, "depthwise": _scenarios_depthwise, "int8": _scenarios_int8,
           "norm": _scenarios_norm, "dropout": _scenarios_dropout, "optim": _scenarios_optim}


def drive(families, rec: Recorder, cuda_heuristics: bool, only: str | None, verbose: bool):
    """Run the scenarios of ``families`` under the recorder; returns driver errors."""
    import torch

    import tilefuse as tf

    errors = []
    with rec.patched(cuda_heuristics=cuda_heuristics):
        for fam in families:
            rec.family = fam
            for name, fn in DRIVERS[fam](torch, tf):
                if only and not re.search(only, name):
                    continue
                rec.scenario = name
                before = rec.n_calls
                try:
                    fn()
                    if rec.n_calls == before:
                        errors.append(dict(family=fam, scenario=name, where="-", level="note",
                                           error="no Triton launch recorded (op took a "
                                                 "non-Triton path)"))
                except Exception as e:  # noqa: BLE001
                    tb = traceback.extract_tb(e.__traceback__)
                    where = next((f"{os.path.relpath(f.filename)}:{f.lineno}" for f in reversed(tb)
                                  if "tilefuse" in f.filename), "?")
                    errors.append(dict(family=fam, scenario=name, where=where,
                                       error=f"{type(e).__name__}: {_first_lines(str(e), 3)}"))
                if verbose:
                    print(f"  [{fam}] {name}: {rec.n_calls - before} launches", file=sys.stderr)
    return errors


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _fmt_row(r) -> str:
    regs = r.get("regs")
    sp = r.get("spill_stores")
    shared = r.get("shared")
    cols = [r["status"], r["kernel"][:26].ljust(26), f"{r['seconds']:6.2f}s",
            (f"{shared / 1024:6.1f}K" if shared is not None else "      -"),
            (f"{regs:4d}r" if regs is not None else "    -"),
            (f"sp{sp}" if sp else "    "), r["spec"]]
    return "  ".join(c if i else c.ljust(5) for i, c in enumerate(cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    ap.add_argument("--only", default=None, help="regex: run only scenarios whose name matches")
    ap.add_argument("--no-cuda-heuristics", action="store_true",
                    help="do not fake Tensor.is_cuda (compile the configs launchers pick for "
                         "non-CUDA tensors instead of the GPU ones)")
    ap.add_argument("--i64", action="store_true",
                    help="also compile every launch with its int arguments as i64 (what tensors "
                         "with >= 2**31 elements/strides give)")
    ap.add_argument("--full", action="store_true",
                    help="compile every recorded specialization (default: a greedy subset in "
                         "which every pair of (dtype, constexpr value, num_warps, num_stages) "
                         "seen together for a kernel is compiled together at least once)")
    ap.add_argument("--all-specializations", action="store_true",
                    help="compile every distinct specialization (also those differing only in "
                         "which int arguments are 1 or multiples of 16); default: one per "
                         "(kernel, dtypes, constexprs, num_warps, num_stages)")
    ap.add_argument("-j", "--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                    help="parallel compile processes (default: CPU count, at most 8)")
    ap.add_argument("--limit", type=int, default=0, help="compile at most N specializations")
    ap.add_argument("--cache-dir", default=None,
                    help="TRITON_CACHE_DIR to use (default: a fresh temp dir, so every "
                         "specialization is really compiled and its ptxas log read)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--list", action="store_true", help="only list the recorded specializations")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {','.join(FAMILIES)}")

    _prepare_env(args.cache_dir)
    import warnings

    warnings.filterwarnings("ignore")
    import triton

    rec = Recorder(args.arch, promote_i64=args.i64, full=args.all_specializations)
    t0 = time.perf_counter()
    drv_errors = drive(families, rec, not args.no_cuda_heuristics, args.only, args.verbose)
    t_drive = time.perf_counter() - t0
    launches = rec.order if args.full else pairwise_cover(rec.order)
    if args.limit:
        launches = launches[:args.limit]
    print(f"# aot_check: triton {triton.__version__}, target sm_{args.arch}, families "
          f"{','.join(families)}; {rec.n_calls} launches -> {len(rec.order)} distinct "
          f"specializations (recorded in {t_drive:.1f}s); compiling "
          f"{'all' if args.full else 'an all-pairs cover: ' + str(len(launches))}")
    if args.list:
        for ln in launches:
            print(f"{ln.family:9s} {ln.kernel:28s} {ln.spec()}")
        for e in drv_errors:
            print(f"# {e.get('level', 'DRIVER ERROR')}: [{e['family']}] {e['scenario']}: "
                  f"{e['error']} ({e['where']})")
        return 0

    smem_limit = SMEM_LIMIT.get(args.arch, 232448)
    results = []
    t1 = time.perf_counter()
    print("status kernel                      time    shared   regs  spill spec")
    for r in compile_all(launches, rec.target, smem_limit, args.jobs):
        results.append(r)
        print(_fmt_row(r), flush=True)
        if r["status"] == "FAIL":
            print("       at " + r["where"] + " (" + r["scenario"] + ")")
            print("       " + r["error"].replace("\n", "\n       "))
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_spill = sum(r["status"] == "SPILL" for r in results)
    real_drv = [e for e in drv_errors if e.get("level") != "note"]
    print(f"\n# summary: {len(results)} specializations of "
          f"{len({(r['kernel'], r['where']) for r in results})} kernels: "
          f"{len(results) - n_fail} compiled, {n_fail} failed, {n_spill} spill registers; "
          f"compile {time.perf_counter() - t1:.0f}s wall ({args.jobs} jobs); "
          f"{len(real_drv)} driver errors")
    for e in drv_errors:
        tag = "note" if e.get("level") == "note" else "DRIVER ERROR"
        print(f"# {tag}: [{e['family']}] {e['scenario']}: {e['error']} ({e['where']})")
    ok = [r for r in results if r.get("regs") is not None]
    if ok:
        heavy = sorted(ok, key=lambda r: (r["shared"], r["regs"]), reverse=True)[:5]
        print("# heaviest (shared memory): " + "; ".join(
            f"{r['kernel']} {r['spec']} {r['shared']}B {r['regs']}r" for r in heavy))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, results=results,
                           driver_errors=drv_errors), f, indent=1, default=str)
    return 1 if (n_fail or real_drv) else 0


if __name__ == "__main__":
    sys.exit(main())
