"""Functional fused ops. Each name dispatches CUDA -> Triton, CPU+interpreter -> Triton,
CPU -> torch (see :mod:`tilefuse._backend`)."""
from tilefuse.fused.conv import conv2d  # noqa: F401
from tilefuse.fused.cross_entropy import cross_entropy  # noqa: F401
from tilefuse.fused.depthwise import depthwise_conv2d  # noqa: F401
from tilefuse.fused.dropout import dropconnect_linear, dropout, dropout2d, dropout_add  # noqa: F401
from tilefuse.fused.fp8 import (dequantize_fp8, fp8_linear, fp8_matmul,  # noqa: F401
                                quantize_fp8_per_row)
from tilefuse.fused.int8 import (dequantize_per_row, int8_matmul, quantize_per_row,  # noqa: F401
                                 w8a8_linear, weight_only_int8_linear)
from tilefuse.fused.matmul import linear, matmul  # noqa: F401
from tilefuse.fused.norm import layer_norm_act, rms_norm_act  # noqa: F401
from tilefuse.fused.norm_bn import batch_norm_act  # noqa: F401
from tilefuse.fused.norm_group import group_norm_act  # noqa: F401
