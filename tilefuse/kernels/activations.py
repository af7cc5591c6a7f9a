"""Triton activation helpers shared by every kernel's epilogue (one copy, no per-kernel variants).

``ACTIVATION`` codes are those of :data:`tilefuse.activations.ACTIVATIONS`:
0 none, 1 relu, 2 relu6, 3 leaky_relu(ACT_PARAM), 4 gelu (erf), 5 gelu (tanh), 6 silu, 7 sigmoid,
8 tanh. Inputs are fp32 tiles. Only ops the interpreter supports are used (``tl.erf``,
``tl.sigmoid``, ``tl.exp``; tanh is written with ``tl.exp`` and a short series, since ``libdevice``
is not available in the interpreter).
"""
import torch
import triton
import triton.language as tl


# Horner forms of tanh(x) / x as a series in x^2 (coefficients 2^2n (2^2n - 1) B_2n / (2n)!),
# with enough terms for |x| < 0.55: truncation error < 0.1 ulp in fp32 (10 terms), fp64 (19 terms)
@triton.jit
def _tanh_series32(a2):
    r = a2 * -0.00023912911424355248
    r = a2 * (0.000590027440945586 + r)
    r = a2 * (-0.0014558343870513183 + r)
    r = a2 * (0.003592128036572481 + r)
    r = a2 * (-0.008863235529902197 + r)
    r = a2 * (0.021869488536155203 + r)
    r = a2 * (-0.05396825396825397 + r)
    r = a2 * (0.13333333333333333 + r)
    r = a2 * (-0.3333333333333333 + r)
    return 1.0 + r


@triton.jit
def _tanh_series64(a2):
    # the fp32 series plus its terms in a2^10 .. a2^18
    r = a2 * 7.054636946400968e-08
    r = a2 * (-1.7406618963571648e-07 + r)
    r = a2 * (4.294911078273806e-07 + r)
    r = a2 * (-1.0597268320104654e-06 + r)
    r = a2 * (2.6147711512907546e-06 + r)
    r = a2 * (-6.451689215655431e-06 + r)
    r = a2 * (1.5918905069328964e-05 + r)
    r = a2 * (-3.927832388331683e-05 + r)
    p2 = a2 * a2
    p4 = p2 * p2
    return _tanh_series32(a2) + p4 * p4 * p2 * (9.691537956929451e-05 + r)  # a2^10 * (...)


@triton.jit
def _tanh(x):
    # tanh(|x|) = 1 - 2e / (1 + e) with e = exp(-2|x|): no overflow, one rounding near 1 (so
    # 1 - tanh^2 in the gradients stays accurate), sign restored after. It cancels for small |x|
    # (as 2 * sigmoid(2x) - 1 did: tanh(1e-6) came out 7% off), so below 0.55 the series is used.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = 1.0 - 2.0 * e / (1.0 + e)  # = (1 - e) / (1 + e), rounded once near 1
    if x.dtype == tl.float64:
        small = a * _tanh_series64(a * a)
    else:
        small = a * _tanh_series32(a * a)
    t = tl.where(a < 0.55, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """act(x) for an fp32 tile."""
    if ACTIVATION == 1:
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif ACTIVATION == 3:
        x = tl.where(x > 0, x, x * ACT_PARAM)
    elif ACTIVATION == 4:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 5:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = 0.5 * x * (1.0 + _tanh(inner))
    elif ACTIVATION == 6:
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 7:
        x = tl.sigmoid(x)
    elif ACTIVATION == 8:
        x = _tanh(x)
    return x


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """d act(z)/dz for an fp32 tile of pre-activations ``z`` (torch's conventions at kinks)."""
    if ACTIVATION == 0:
        g = tl.full(z.shape, 1.0, z.dtype)
    elif ACTIVATION == 1:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == 2:
        g = tl.where((z > 0) & (z < 6.0), 1.0, 0.0)
    elif ACTIVATION == 3:
        # the slope as z * 0 + slope keeps it in z's dtype (a bare constant is fp32: fp64
        # gradients would use float32(slope))
        g = tl.where(z > 0, 1.0, z * 0.0 + ACT_PARAM)
    elif ACTIVATION == 4:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        g = cdf + z * pdf
    elif ACTIVATION == 5:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(inner)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 0.134145 * z * z)
    elif ACTIVATION == 6:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 7:
        s = tl.sigmoid(z)
        g = s * (1.0 - s)
    else:
        t = _tanh(z)
        g = 1.0 - t * t
    return g


@triton.jit
def activation_backward_kernel(dy_ptr, z_ptr, dz_ptr, n_elements,
                               ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                               COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """dz = dy * act'(z) over flat contiguous buffers (one pass, fp32 math; fp64 for fp64)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    dz = dy * activation_grad(z, ACTIVATION, ACT_PARAM)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def launch_activation_backward(dy, z, dz, activation: int, act_param: float):
    """Launcher for :func:`activation_backward_kernel` (all three contiguous, same numel)."""
    n = z.numel()
    if n == 0:
        return dz
    block = 4096 if not z.is_cuda else 1024
    activation_backward_kernel[(triton.cdiv(n, block),)](
        dy, z, dz, n, ACTIVATION=activation, ACT_PARAM=float(act_param),
        COMPUTE=tl.float64 if z.dtype == torch.float64 else tl.float32, BLOCK=block)
    return dz
