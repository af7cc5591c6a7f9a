"""The one GEMM shape parser the matmul, int8 and fp8 tuning spaces share
(:func:`tilefuse.autotune.space.parse_gemm_shape`)."""
import pytest

from tilefuse.autotune.space import parse_gemm_shape


def test_string_and_dict_give_the_same_key():
    assert parse_gemm_shape("matmul", "4x8,16")[0] == {"M": 4, "N": 8, "K": 16}
    assert parse_gemm_shape("matmul", {"M": "4", "N": 8, "K": 16})[0] == {"M": 4, "N": 8, "K": 16}


def test_trailing_word_goes_to_its_slot():
    key, spec = parse_gemm_shape("fp8_matmul", "4x8x16 BF16", word="dtype")
    assert key == {"M": 4, "N": 8, "K": 16} and spec["dtype"] == "bf16"
    _, spec = parse_gemm_shape("int8_matmul", "4x8x16 w8a16", word="mode",
                               word_key=lambda w: "mode" if w.startswith("w8") else "dtype")
    assert spec["mode"] == "w8a16" and "dtype" not in spec


@pytest.mark.parametrize("spec, word, msg", [
    ("4x8x16 bf16", None, "expected 'MxNxK'"),
    ("4x8x16 a b", "dtype", "expected 'MxNxK \\[dtype\\]'"),
    ("4x8", "mode", "expected 'MxNxK \\[mode\\]'"),
    ({"M": 4, "N": 8}, None, "needs integer M, N and K"),
    ("0x8x16", None, "M, N and K must be positive"),
])
def test_bad_shapes_name_the_op(spec, word, msg):
    with pytest.raises(ValueError, match=f"^op shape .*{msg}"):
        parse_gemm_shape("op", spec, word=word)
