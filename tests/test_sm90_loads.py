"""sm_90 load widths of the streaming kernels (issue 18): the static share of 128-bit
``ld.global`` instructions in the PTX that tools/aot_check.py compiles without a GPU (a subprocess,
as in test_aot_compile.py). Each test compiles a few specializations only (seconds)."""
import pytest

from test_aot_compile import _has_ptxas, _run  # noqa: I100

pytestmark = pytest.mark.skipif(not _has_ptxas(), reason="triton wheel without NVIDIA ptxas")


def _share(report, kernel):
    rows = [r for r in report["results"] if r["kernel"] == kernel]
    assert rows, [r["kernel"] for r in report["results"]]
    return rows, sum(r["ld_global_128"] for r in rows), sum(r["ld_global"] for r in rows)


def test_dropout_kernel_loads_are_all_128_bit(tmp_path):
    """Contiguous (dropout_add, odd size), strided and Dropout2d channels_last: every global
    load of dropout_kernel is 128-bit, the seed included (one v2.b64 load of draw_seed's pair;
    a 0-d seed read by tl.load(seed_ptr) was the one scalar load per specialization)."""
    proc, report = _run(tmp_path, "--families", "dropout", "--only",
                        r"dropout_add torch.float16 \(1000|dropout2d channels_last torch.float16"
                        r"|dropout strided torch.float32", "--jobs", "1", timeout=300)
    assert report is not None and proc.returncode == 0, proc.stdout + proc.stderr
    rows, n128, n = _share(report, "dropout_kernel")
    assert len(rows) == 3 and n128 == n, [(r["spec"], r["ld_global_128"], r["ld_global"])
                                          for r in rows]
    assert all(not r["spill_stores"] for r in rows)


def test_adamw_kernel_registers_and_128_bit_loads(tmp_path):
    """AdamW (fp32; bf16 params with fp32 master weights): <= 128 registers, no spills and at
    least half of the static ld.global instructions 128-bit (the tail chunk's whole-group loads
    and the scalar row read as float64 pairs; before: 8/57 and 7/57)."""
    proc, report = _run(tmp_path, "--families", "optim", "--only",
                        r"^AdamW (torch.float32 \{'lr': 0.001, 'weight_decay'|master_weights "
                        r"torch.bfloat16)", "--jobs", "1", timeout=300)
    assert report is not None and proc.returncode == 0, proc.stdout + proc.stderr
    rows, n128, n = _share(report, "adam_kernel")
    assert len(rows) == 2, [r["scenario"] for r in rows]
    for r in rows:
        assert r["regs"] <= 128 and not r["spill_stores"], r["spec"]
        assert 2 * r["ld_global_128"] >= r["ld_global"], (r["spec"], r["ld_global_128"],
                                                          r["ld_global"])


def test_depthwise_nchw_rows_are_128_bit(tmp_path):
    """NCHW 3x3 stride-1 depthwise at the MobileNet width 56 (fp32 and fp16), forward, grad_input
    and grad_weight: the aligned-row paths make at least half of each kernel's static ld.global
    128-bit (the windows; the weight(+bias) tile is the rest). Before: 0/56, 0/72, 0/40 (fp32)."""
    proc, report = _run(tmp_path, "--families", "depthwise", "--only",
                        r"dwconv torch.float(32|16) 2x32x56x56 k3 s1 d1 m1 NCHW", "--jobs", "1",
                        timeout=300)
    assert report is not None and proc.returncode == 0, proc.stdout + proc.stderr
    for kernel in ("dw_conv_fwd_kernel", "dw_conv_bwd_input_kernel",
                   "dw_conv_bwd_weight_kernel"):
        rows, n128, n = _share(report, kernel)
        for r in rows:
            assert 2 * r["ld_global_128"] >= r["ld_global"], (kernel, r["spec"])
            assert not r["spill_stores"] and "ROW_VEC=1 " not in r["spec"] + " ", r["spec"]


def test_depthwise_nchw_stride2_grad_input_is_128_bit(tmp_path):
    """MobileNetV2's stride-2 layers in NCHW (28x28 5x5 and 112x112 3x3, fp32 and bf16):
    grad_input reads dz through 128-bit loads (dz row bands for 28x28, strided dz row windows
    for 112x112; before: 0/85 and 0/51, all scalar), at least half of its load bytes, and
    grad_weight too, within 128 registers and without spills."""
    proc, report = _run(tmp_path, "--families", "depthwise", "--only",
                        r"dwconv torch\.(float32|bfloat16) 2x\d+x(28x28 k5|112x112 k3) s2 d1 m1 "
                        r"NCHW", "--full", "--jobs", "1", timeout=300)
    assert report is not None and proc.returncode == 0, proc.stdout + proc.stderr
    for kernel in ("dw_conv_bwd_input_kernel", "dw_conv_bwd_weight_kernel"):
        rows, n128, n = _share(report, kernel)
        assert len(rows) == 4, [r["scenario"] for r in rows]
        for r in rows:
            assert r["ld_global_128"] >= 2 and 2 * r["ld_bytes_128"] >= r["ld_bytes"], (
                kernel, r["spec"], r["ld_global_128"], r["ld_global"])
            assert r["regs"] <= 128 and not r["spill_stores"], (kernel, r["spec"], r["regs"])
