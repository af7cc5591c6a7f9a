"""Issue 19's compile properties, with the installed triton (3.9 in CI; 3.6 under `make aot36`
or on the GPU machines): the 4096^3 bf16 ``linear`` and int8 W8A8 launches compile for sm_90 to
TMA copies (``cp.async.bulk.tensor``) feeding ``wgmma``, with no register spills, and so does
the persistent kernel with the ``WARP_SPEC`` tuning option (tools/aot_check.py, docs/gemm.md).
One subprocess for all of them (the tool must run without TRITON_INTERPRET)."""
import pytest

from test_aot_compile import _has_ptxas, scenario_report

pytestmark = pytest.mark.skipif(not _has_ptxas(), reason="triton wheel without NVIDIA ptxas")

SCENARIOS = {
    "linear 4096^3 torch.bfloat16": 8,
    "int8 W8A8 4096^3 raw": 8,
    "int8 W8A8 4096^3 scaled -> bf16": 8,
    "linear 4096^3 torch.bfloat16 128x256 warp-specialized": 4,
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return scenario_report(tmp_path_factory.mktemp("aot"), "matmul,int8", SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_4096_gemms_use_tma_and_wgmma_without_spills(report, scenario):
    rows = [r for r in report["results"]
            if r["scenario"] == scenario and r["kernel"] == "gemm_tma_kernel"]
    assert len(rows) == 1, [(r["scenario"], r["kernel"]) for r in report["results"]]
    r = rows[0]
    assert r["status"] == "OK", r.get("error") or r["ptxas"]
    assert r["tma"] and r["wgmma"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0
    assert r["shared"] <= 232448
    assert r["num_warps"] == SCENARIOS[scenario]
    assert r["constexprs"]["WARP_SPEC"] == repr(SCENARIOS[scenario] == 4)
