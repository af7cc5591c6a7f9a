"""Per-signature plans of the int8 / fp8 GEMM ops (:mod:`tilefuse.fused.int8`,
:mod:`tilefuse.fused.fp8`): what an eager call with the shapes, strides, dtypes and scalar
arguments of an earlier, validated call runs instead of the checks and the op.

A plan holds no tensor: it allocates the outputs as the op does and calls the kernels' ``run_*``
functions with the launches their ``bind_*`` functions bound on the first call (grid,
constexprs, strides), so the plan and the op launch the same kernels with the same arguments
and give the same results bit for bit.

The public ops normalise their arguments (``a`` folded to 2-D, a per-tensor scale expanded, a
residual broadcast, the weight transposed); a plan gets the arguments as the caller passed them.
Where the normalised tensor is a view that starts at the caller's tensor's first element (the
usual case), the pointer-only launches (the classic GEMM kernels, the quantizer) take the
caller's tensor with the bound strides; launches that read shapes (the TMA kernel, the split-K
reduction) get the same view, rebuilt with ``as_strided``. A normalisation that copies makes the
signature unplannable (every call then takes the op).
"""
from __future__ import annotations

import math

import torch

from tilefuse._backend import backend_of
from tilefuse.fused._fast import remember


def same_start(raw, norm) -> bool:
    """``norm`` is ``raw`` or a view of it with the same first element (or both are None)."""
    if norm is None or norm is raw:
        return True
    return (raw is not None and norm.data_ptr() == raw.data_ptr()
            and norm.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr())


def view_specs(raws, norms):
    """Per argument: None (pass it as is) or the ``(size, stride)`` that ``as_strided`` needs
    to rebuild the normalised view from the caller's tensor."""
    return tuple(None if n is None or n is r else (tuple(n.shape), n.stride())
                 for r, n in zip(raws, norms))


def _as_view(t, spec):
    return t if spec is None else t.as_strided(*spec)


def gemm_plan(gemm, raws, norms, shape2, out_dtype, out_shape):
    """``plan(a, b, a_scale, b_scale, bias, residual)`` (the caller's tensors, in the kernel's
    argument order) -> the output, or None when the kernel path bound at the first call no
    longer applies. ``gemm = (launch, views, guard)``: the kernel's bound launch function,
    whether it reads shapes (then it gets the normalised views) and None or ``guard(a, b)``
    (False: path changed); ``shape2``: the 2-D output, viewed as ``out_shape`` (None: kept 2-D).

    (Sizes go to ``new_empty`` as separate ints: a tuple costs ~0.5 us more to parse.)"""
    launch, views, guard = gemm
    m, n = shape2
    # Tensor.new_empty(ints) without keywords on a held element of the output's dtype and
    # device (the key holds the device): ~0.2 us cheaper than new_empty(..., dtype=)
    proto = norms[0].new_empty(1, dtype=out_dtype)
    if views:
        specs = view_specs(raws, norms)

        def plan(a, b, a_scale, b_scale, bias, residual):
            if guard is not None and not guard(a, b):
                return None
            c = proto.new_empty(m, n)
            launch(*map(_as_view, (a, b), specs[:2]), c,
                   *map(_as_view, (a_scale, b_scale, bias, residual), specs[2:]))
            return c if out_shape is None else c.view(out_shape)
    else:
        def plan(a, b, a_scale, b_scale, bias, residual):
            if guard is not None and not guard(a, b):
                return None
            c = proto.new_empty(m, n)
            launch(a, b, c, a_scale, b_scale, bias, residual)
            return c if out_shape is None else c.view(out_shape)
    return plan


def linear_plan(qlaunch, qdtype, gemm, raws, norms, shape2, out_dtype, out_shape):
    """``plan(x, qweight, scale, bias, residual)`` of a dynamic quantized linear: quantize ``x``
    per row into fresh ``q`` (M, K) ``qdtype`` and ``s`` (M,) fp32 (``qlaunch(x, q, s)``), then
    the GEMM ``gemm`` (as for :func:`gemm_plan`) on ``q``, ``qweight``, ``s``, ``scale``,
    ``bias``, ``residual``. ``raws``/``norms``: the GEMM's six arguments at bind time, the fresh
    ``q``/``s`` standing for themselves. Returns the output or None (``guard``)."""
    launch, views, guard = gemm
    specs = view_specs(raws, norms) if views else (None,) * 6
    m, n = shape2
    k = norms[0].shape[1]
    f32 = torch.float32

    def plan(x, qweight, scale, bias, residual):
        q = x.new_empty(m, k, dtype=qdtype)
        if guard is not None and not guard(q, qweight):
            return None
        s = x.new_empty(m, dtype=f32)
        qlaunch(x, q, s)
        c = x.new_empty(m, n, dtype=out_dtype)
        if views:
            launch(*map(_as_view, (q, qweight), specs[:2]), c,
                   *map(_as_view, (s, scale, bias, residual), specs[2:]))
        else:
            launch(q, qweight, c, s, scale, bias, residual)
        return c if out_shape is None else c.view(out_shape)
    return plan


# --------------------------------------------------------------------------------------------
# building the plans of validated calls
# --------------------------------------------------------------------------------------------
def plannable_activation(activation) -> bool:
    """Activations a plan key may hold: names and (name, param) tuples, whose parse is pure (a
    module is parsed on every call: its parameters may change)."""
    return activation is None or type(activation) in (str, tuple)


def int8_gemm(raws, norms, act, act_param, out_dtype):
    """``(launch, views, guard)`` of the int8 GEMM of a validated call (see :func:`gemm_plan`):
    ``raws``/``norms`` are the six kernel arguments as passed / as normalised. None: not
    plannable (torch backend, a copy)."""
    from tilefuse.kernels import int8_matmul as k

    a2, b = norms[0], norms[1]
    if backend_of(a2) == "torch" or not all(map(same_start, raws, norms)):
        return None
    c = torch.empty(a2.shape[0], b.shape[1], device=a2.device, dtype=out_dtype)
    bound = k.bind_int8_matmul(a2, b, c, *norms[2:], act, act_param)
    return k.launcher(bound), k.needs_views(bound), k.plan_guard(a2, b)


def quant_linear_plan(x, qweight, scale, bias, residual, activation, qdtype, gemm):
    """The plan of a validated dynamic quantized linear call (``x`` float, ``qweight`` (N, K)):
    the per-row quantization of ``x`` into ``qdtype`` and the GEMM ``gemm(raws, norms, act,
    act_param, out_dtype)`` (:func:`int8_gemm` or :func:`fp8_gemm`), bound on tensors laid out
    as ``quantize_per_row`` and ``int8_matmul`` / ``fp8_matmul`` lay them out. None: not
    plannable."""
    from tilefuse.fused.int8 import _epilogue_args, _per_col_scale, _per_row_scale
    from tilefuse.kernels import quant as kq

    if backend_of(x) == "torch":
        return None
    N, K = qweight.shape
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    out_shape = lead + (N,)
    x2 = x if x.dim() == 2 else x.reshape(M, K)
    if not same_start(x, x2):
        return None
    q = torch.empty((M, K), device=x.device, dtype=qdtype)
    s = torch.empty(M, device=x.device, dtype=torch.float32)
    qbound = kq.bind_quantize_rows(x2, q, s)
    sa = _per_row_scale("a_scale", s.view(M, 1) if x.dim() == 2 else s.reshape(lead + (1,)),
                        lead, M)
    sb = _per_col_scale("b_scale", scale, N)
    r2, act, act_param = _epilogue_args(N, out_shape, bias, residual, activation)
    raws, norms = (q, qweight, s, scale, bias, residual), (q, qweight.t(), sa, sb, bias, r2)
    g = gemm(raws, norms, act, act_param, x.dtype)
    if g is None:
        return None
    return linear_plan(kq.rows_launcher(qbound), qdtype, g, raws, norms, (M, N), x.dtype,
                       None if x.dim() == 2 else out_shape)


def remember_gemm(plans, key, activation, gemm, raws, norms, act, act_param, out_dtype,
                  shape2, out_shape):
    """Store the :func:`gemm_plan` of a validated call under ``key`` when it is plannable."""
    if plannable_activation(activation):
        g = gemm(raws, norms, act, act_param, out_dtype)
        if g is not None:
            remember(plans, key, gemm_plan(g, raws, norms, shape2, out_dtype, out_shape))


def fp8_gemm(raws, norms, act, act_param, out_dtype, fast_accum):
    """``(launch, views, guard)`` of the fp8 GEMM of a validated call (see
    :func:`int8_gemm`); None: not plannable."""
    from tilefuse.kernels import fp8_matmul as k

    a2, b = norms[0], norms[1]
    if backend_of(a2) == "torch" or not all(map(same_start, raws, norms)):
        return None
    c = torch.empty(a2.shape[0], b.shape[1], device=a2.device, dtype=out_dtype)
    return k.launcher(k.bind_fp8_matmul(a2, b, c, *norms[2:], act, act_param, fast_accum)), \
        False, None
