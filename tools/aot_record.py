"""Launch interception for tools/aot_check.py: record every ``kernel[grid](...)`` that tilefuse's
ops make (bound and specialized with Triton's own binder, nothing launched), then compile each
distinct specialization for a real NVIDIA target and read registers / spills / shared memory.

Imports only the standard library at module level: triton and tilefuse are imported lazily, after
``aot_check._prepare_env`` has set up the environment.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time


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
        # the GPU's launch rules: SM-count-sized grids for the H100 profile, and on sm_90 the
        # persistent TMA path for operands it takes (tilefuse.kernels.gemm_common.gemm_path)
        import tilefuse.kernels as K
        import tilefuse.kernels.gemm_common as GC

        saved_sms, saved_tma = K.INTERPRETER_SMS, GC.TMA_ON_CPU
        K.INTERPRETER_SMS = GC.H100_SMS
        K._SM_COUNTS.clear()
        K.clear_launch_caches()
        GC.TMA_ON_CPU = self.target.arch == 90
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
            K.INTERPRETER_SMS, GC.TMA_ON_CPU = saved_sms, saved_tma
            K._SM_COUNTS.clear()
            K.clear_launch_caches()
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


def first_lines(text: str, n: int = 6) -> str:
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n])


def _short_error(e: BaseException) -> str:
    msg = str(e)
    # ptxas failures embed the whole PTX: keep the ptxas stderr part only
    if "`ptxas` stderr:" in msg:
        msg = msg.split("`ptxas` stderr:", 1)[1].split("Repro command:", 1)[0]
        return "ptxas: " + first_lines(msg, 4)
    return f"{type(e).__name__}: {first_lines(msg, 8)}"


_RE_LD = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global((?:\.[\w:]+)*)\s", re.M)
_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}


def global_loads(ptx: str) -> tuple[int, int, int, int]:
    """Static count of the ``ld.global`` instructions in a PTX text: (loads, 128-bit loads,
    bytes per thread over all loads, bytes per thread of the 128-bit ones). A load's width is
    its vector count times its element type's bits (``.v4.b32`` and ``.v2.b64`` are 128-bit).
    Static: a load inside a loop counts once, which is what "share of 128-bit loads" of a
    kernel's code means; cp.async/TMA copies are not ``ld.global`` and are not counted."""
    n = n128 = nbytes = nbytes128 = 0
    for m in _RE_LD.finditer(ptx):
        parts = m.group(1).split(".")
        vec = 1
        bits = 32
        for q in parts:
            if q in ("v2", "v4", "v8"):
                vec = int(q[1:])
            elif q[:1] in "bfsu" and q[1:] in _BITS:
                bits = _BITS[q[1:]]
        width = vec * bits
        n += 1
        nbytes += width // 8
        if width >= 128:
            n128 += 1
            nbytes128 += width // 8
    return n, n128, nbytes, nbytes128


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
    ptx = k.asm.get("ptx", "") if hasattr(k, "asm") else ""
    # TMA copies (loads: cp.async.bulk.tensor ... global -> shared; stores: shared -> global)
    # and Hopper warp-group MMAs, read from the PTX
    res["tma"] = "cp.async.bulk.tensor" in ptx
    res["tma_store"] = "cp.async.bulk.tensor" in ptx and ".global.shared" in ptx
    res["wgmma"] = "wgmma.mma_async" in ptx
    (res["ld_global"], res["ld_global_128"], res["ld_bytes"],
     res["ld_bytes_128"]) = global_loads(ptx)
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
