"""tilefuse::dequantize (tilefuse.ops.dequantize_per_row / dequantize_fp8): the Triton kernel
against the torch expression it replaces, ``(q.float() * scale.float()).to(dtype)``, bit for bit
(NaN where torch has NaN): every int8 / e4m3fn / e5m2 code, fp32/fp16/bf16 scales (subnormals
included) and outputs, awkward shapes and layouts; the torch fallbacks; the compiled graph."""
import pytest
import torch

import tilefuse
from fast_path_utils import (assert_compiles_to_custom_op, assert_fast_equals_custom_op,
                             record_launches)
from tilefuse.kernels import quant

ops = tilefuse.ops
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
OPS = {torch.int8: ops.dequantize_per_row, E4: ops.dequantize_fp8, E5: ops.dequantize_fp8}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def ref(q, s, dtype):
    return (q.float() * s.float()).to(dtype)


def assert_same(out, expected):
    """Bit for bit where not NaN, NaN where torch has NaN (payloads are not compared)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.is_contiguous()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan], expected[~nan])


@pytest.fixture
def launches(monkeypatch):
    """The dequantize kernel's launches (the real launch still runs)."""
    calls = []
    record_launches(monkeypatch, lambda kernel, args, kwargs: calls.append(kwargs["grid"])
                    if kernel is quant.dequantize_kernel else None)
    return calls


def _codes(dtype, device):
    return torch.arange(256, dtype=torch.uint8, device=device).view(dtype).reshape(16, 16)


@pytest.mark.parametrize("qdtype", [torch.int8, E4, E5])
def test_every_code_every_scale_and_output_dtype(device, qdtype, launches):
    q = _codes(qdtype, device)
    scales = [torch.rand(16, 1) * 3, torch.tensor(0.37), torch.rand(16) * 1e-3,
              torch.rand(16, 16) * 1e4, torch.tensor([3e38]), torch.tensor([2.0 ** -130]),
              torch.tensor([float("inf")]), torch.tensor([float("nan")])]
    n = 0
    for s in scales:
        for sdt in FLOATS:
            for odt in FLOATS:
                s_ = s.to(device=device, dtype=sdt)
                assert_same(OPS[qdtype](q, s_, odt), ref(q, s_, odt))
                n += 1
    assert len(launches) == n  # every call ran the kernel


SHAPES = [((1, 7), (1, 1)), ((13, 17), (13, 1)), ((13, 17), (17,)), ((13, 17), (13, 17)),
          ((3, 5, 7), (3, 5, 1)), ((3, 5, 7), (3, 1, 1)), ((3, 5, 7), ()), ((5,), (3, 1)),
          ((31,), (1,)), ((), ()), ((2, 1, 7), (1, 5, 1))]


@pytest.mark.parametrize("shape,sshape", SHAPES)
def test_broadcast_shapes(device, shape, sshape, launches):
    q = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    s = torch.rand(sshape, device=device)
    f8 = torch.randn(shape, device=device).mul(8).to(E4)
    for odt in FLOATS:
        assert_same(ops.dequantize_per_row(q, s, odt), ref(q, s, odt))
        assert_same(ops.dequantize_fp8(f8, s, odt), ref(f8, s, odt))
    assert len(launches) == 2 * len(FLOATS)


def test_non_contiguous_layouts(device, launches):
    q = torch.randint(-127, 128, (20, 30), dtype=torch.int8, device=device).t()  # (30, 20)
    cases = [(q, torch.rand(20, device=device)),                      # per-column, transposed q
             (q, torch.rand(30, 2, device=device)[:, :1]),            # strided per-row scale
             (q[::2, 1:], torch.rand(15, 1, device=device)),          # sliced q
             (q.reshape(3, 10, 20).permute(1, 0, 2),                  # no common 2-D view:
              torch.rand(10, 1, 1, device=device)),                   # contiguous copies
             (torch.randint(-127, 128, (6, 4, 8), dtype=torch.int8, device=device)
              .permute(1, 0, 2), torch.rand(4, 1, device=device).expand(4, 6).unsqueeze(-1))]
    for q_, s in cases:
        for odt in FLOATS:
            assert_same(ops.dequantize_per_row(q_, s, odt), ref(q_, s, odt))
    assert len(launches) == len(cases) * len(FLOATS)


def test_layout_rule():
    q = torch.zeros(3, 5, 7, dtype=torch.int8)
    assert quant.dequant_layout((3, 5, 7), q, torch.zeros(3, 5, 1)) == (15, 7, 7, 1, 1, 0)
    assert quant.dequant_layout((3, 5, 7), q, torch.zeros(())) == (15, 7, 7, 1, 0, 0)
    assert quant.dequant_layout((3, 5, 7), q, torch.zeros(7)) == (15, 7, 7, 1, 0, 1)
    # per-image scale: rows cannot merge (3, 5) -> the split after dim 0
    assert quant.dequant_layout((3, 5, 7), q, torch.zeros(3, 1, 1)) == (3, 35, 35, 1, 1, 0)
    qp = torch.zeros(5, 3, 7, dtype=torch.int8).permute(1, 0, 2)
    assert quant.dequant_layout((3, 5, 7), qp, torch.zeros(3, 1, 1)) is None


def test_empty_and_torch_fallbacks(device, launches):
    q = torch.randint(-127, 128, (6, 9), dtype=torch.int8, device=device)
    s = torch.rand(6, 1, device=device)
    for q_, s_, odt in ((q[:0], s[:0], torch.float32), (q[:, :0], s, torch.bfloat16),
                        (q, s, torch.float64), (q, s, torch.int32), (q, s, E4)):
        assert_same(ops.dequantize_per_row(q_, s_, odt), ref(q_, s_, odt))
    f8 = q.to(E5)
    assert_same(ops.dequantize_fp8(f8, s.double(), torch.float32), ref(f8, s.double(),
                                                                        torch.float32))
    assert launches == []  # empty, fp64 / int / fp8 outputs, an fp64 scale: the torch expression


def test_scale_gradient_flows_through_the_torch_expression(device, launches):
    q = torch.randint(-127, 128, (4, 8), dtype=torch.int8, device=device)
    s = torch.rand(4, 1, device=device, requires_grad=True)
    ops.dequantize_per_row(q, s.detach())  # a plan for this signature exists
    y = ops.dequantize_per_row(q, s)
    assert y.requires_grad
    y.sum().backward()
    assert torch.equal(s.grad, q.float().sum(1, keepdim=True))
    assert len(launches) == 1


def test_validation():
    q = torch.zeros(3, 4, dtype=torch.int8)
    s = torch.ones(3, 1)
    for _ in range(2):  # also once a plan exists for the valid signature
        ops.dequantize_per_row(q, s)
        with pytest.raises(TypeError, match="q must have dtype"):
            ops.dequantize_per_row(q.to(E4), s)
        with pytest.raises(TypeError, match="q must have dtype"):
            ops.dequantize_fp8(q, s)
        with pytest.raises(TypeError, match="scale must have dtype"):
            ops.dequantize_per_row(q, s.double())
        with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
            ops.dequantize_per_row(q, s, "float32")
        with pytest.raises(RuntimeError):
            ops.dequantize_per_row(q, torch.ones(2, 1))


def test_fast_path_and_compile():
    q, f8 = torch.randint(-127, 128, (5, 12), dtype=torch.int8), torch.randn(5, 12).to(E4)
    s = torch.rand(5, 1)
    assert_fast_equals_custom_op(lambda s: ops.dequantize_per_row(q, s, torch.bfloat16), [s],
                                 grad=False)
    assert_compiles_to_custom_op(lambda q, s: ops.dequantize_per_row(q, s, torch.float16),
                                 [q, s], "dequantize")
    assert_compiles_to_custom_op(lambda q, s: ops.dequantize_fp8(q, s), [f8, s], "dequantize")


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tilefuse.fused.dequant import dequantize_op

    with FakeTensorMode():
        q = torch.empty(5, 1, 7, dtype=torch.int8)
        out = dequantize_op.op(q, torch.empty(3, 1), torch.bfloat16)
    assert out.shape == (5, 3, 7) and out.dtype == torch.bfloat16
