"""Issue 20's compile properties for the new conv launches (tools/aot_check.py, sm_90, the
installed triton): the int8 implicit-GEMM conv (W8A8 3x3 channels_last at the ResNet-50 layer1
shape, per-image, per-input-pixel and static scales; weight-only) and the fused-backward grad-input /
grad-weight kernels (activation gradient in the operand loads, dbias in grad-weight) compile to
``wgmma`` with no register spills. One subprocess (the tool must run without TRITON_INTERPRET)."""
import pytest

from test_aot_compile import _has_ptxas, scenario_report

pytestmark = pytest.mark.skipif(not _has_ptxas(), reason="triton wheel without NVIDIA ptxas")

SCENARIOS = {
    "conv int8 resnet50 3x3 64ch NHWC W8A8 per-image -> bf16": ("conv2d_fwd_kernel", 1),
    "conv int8 resnet50 3x3 64ch NHWC W8A8 per-pixel -> bf16": ("conv2d_fwd_kernel", 2),
    "conv int8 3x3 64ch NHWC weight-only bf16": ("conv2d_fwd_kernel", 3),
    "conv int8 resnet50 3x3 64ch NHWC W8A8 static -> bf16": ("conv2d_fwd_kernel", 4),
    "conv torch.bfloat16 resnet50 3x3 64ch NHWC silu+res+relu fwd+bwd": (
        "conv2d_dgrad_kernel|conv2d_wgrad_kernel", None),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return scenario_report(tmp_path_factory.mktemp("aot"), "conv", SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_new_conv_launches_use_wgmma_without_spills(report, scenario):
    kernels, quant = SCENARIOS[scenario]
    rows = [r for r in report["results"]
            if r["scenario"] == scenario and r["kernel"] in kernels.split("|")]
    assert {r["kernel"] for r in rows} == set(kernels.split("|")), \
        [(r["scenario"], r["kernel"]) for r in report["results"]]
    for r in rows:
        assert r["status"] == "OK", r.get("error") or r["ptxas"]
        assert r["wgmma"], r["kernel"]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        if quant is not None:
            assert r["constexprs"]["QUANT"] == repr(quant)
        else:
            assert r["constexprs"]["ACTIVATION"] == repr(6)  # silu' fused into the loads
            if r["kernel"] == "conv2d_wgrad_kernel":
                assert r["constexprs"]["HAS_DBIAS"] == repr(True)
