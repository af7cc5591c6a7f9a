"""tilefuse: hand-written Triton kernels for PyTorch, usable in one line."""
from tilefuse import _backend  # noqa: F401  (snapshots TRITON_INTERPRET first)
from tilefuse import nn, ops  # noqa: F401
from tilefuse._backend import backend_for, backend_for_device  # noqa: F401

__version__ = "0.1.0"
from tilefuse.quantize import quantize  # noqa: F401,E402
from tilefuse.prune import prune  # noqa: F401,E402
from tilefuse import regularize  # noqa: F401
from tilefuse.patch import patch, patch_report, unpatch  # noqa: F401,E402
from tilefuse.export import export_onnx  # noqa: F401,E402
from tilefuse import models, train  # noqa: F401,E402
from tilefuse import optim  # noqa: F401,E402
