"""InstanceNorm running statistics updated in a kernel (issue 17) from the forward's saved
per-instance mean/rstd (``tilefuse::instance_norm_running``), not by torch ops re-reading x."""
import pytest
import torch

import tilefuse
import tilefuse.nn as tnn
from tilefuse.bench.traffic import count_traffic, nbytes


@pytest.mark.parametrize("cls,shape,cl", [(tnn.InstanceNormAct2d, (3, 5, 6, 7), False),
                                          (tnn.InstanceNormAct2d, (2, 4, 5, 5), True),
                                          (tnn.InstanceNormAct1d, (4, 6, 9), False)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_in_kernel(cls, shape, cl, momentum):
    torch.manual_seed(0)
    C = shape[1]
    ref = getattr(torch.nn, cls.__name__.replace("Act", ""))(C, momentum=momentum, affine=True,
                                                               track_running_stats=True)
    ours = cls(C, momentum=momentum, affine=True, track_running_stats=True, activation="relu")
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(*shape) * (1 + step) + 2
        if cl:
            x = x.to(memory_format=torch.channels_last)
        with count_traffic() as t:
            y = ours(x)
        assert t.torch_ops == [], t.torch_ops   # no reduction re-reading x, no buffer math
        assert t.launches <= 4, t.kernels       # GroupNorm forward (2-3) + the update
        with count_traffic() as gn:             # the same GroupNorm without running stats
            tilefuse.ops.group_norm_act(x, C, ours.weight, ours.bias, ours.eps,
                                        activation="relu")
        # beyond GroupNorm's own traffic: the (N, C) fp32 statistics read back and the running
        # stats read and written, not x (the former torch update re-read x)
        stats = x.shape[0] * C * 8
        assert t.distinct_bytes <= gn.distinct_bytes + stats + 2 * nbytes(ours.running_mean,
                                                                          ours.running_var)
        torch.testing.assert_close(y, torch.relu(ref(x)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-6, rtol=1e-5)
    ours.eval(), ref.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), torch.relu(ref(x)), atol=1e-5, rtol=1e-5)


def test_float64_running_stats():
    ref = torch.nn.InstanceNorm2d(3, track_running_stats=True).double()
    ours = tnn.InstanceNormAct2d(3, track_running_stats=True).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3 + 1
    ours(x), ref(x)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_instance_norm_and_prenorm():
    """The mutating custom op traces (fullgraph); so does the pre-norm op's (y, h) pair."""
    m = tnn.InstanceNormAct2d(3, track_running_stats=True, activation="silu")
    ln = tnn.LayerNormAct(8)
    x = torch.randn(2, 3, 4, 4)
    torch.compile(m, fullgraph=True)(x)
    ref = torch.nn.InstanceNorm2d(3, track_running_stats=True)
    ref(x)
    torch.testing.assert_close(m.running_var, ref.running_var, atol=1e-6, rtol=1e-5)

    def block(a, r):
        y, h = ln(a, residual=r, prenorm=True)
        return y * 2 + h

    a, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    out = torch.compile(block, fullgraph=True)(a, r)
    torch.testing.assert_close(out, block(a, r))
    out.sum().backward()
    assert a.grad is not None and torch.equal(a.grad, r.grad)
