"""Drop-in modules: same constructor arguments, ``state_dict`` keys and semantics as torch's."""
from tilefuse.nn.conv import DepthwiseConv2d, DepthwiseSeparableConv2d  # noqa: F401
from tilefuse.nn.conv2d import Conv2d  # noqa: F401
from tilefuse.nn.dropout import DropBlock2d, Dropout, Dropout2d  # noqa: F401
from tilefuse.nn.fold import fold_batchnorm, fuse_conv_bn_eval  # noqa: F401
from tilefuse.nn.fp8 import Fp8Linear, fp8_convert  # noqa: F401
from tilefuse.nn.int8 import Int8Conv1x1, Int8Linear  # noqa: F401
from tilefuse.nn.int8_conv import Int8Conv2d  # noqa: F401
from tilefuse.nn.linear import Linear  # noqa: F401
from tilefuse.nn.quantized_embedding import QuantizedEmbedding  # noqa: F401
from tilefuse.nn.norm import (BatchNormAct1d, BatchNormAct2d, GroupNormAct,  # noqa: F401
                              InstanceNormAct1d, InstanceNormAct2d, LayerNormAct, RMSNormAct)
