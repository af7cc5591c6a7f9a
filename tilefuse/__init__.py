"""tilefuse: hand-written Triton kernels for PyTorch, usable in one line."""
from tilefuse import _backend  # noqa: F401  (snapshots TRITON_INTERPRET first)
from tilefuse import nn, ops  # noqa: F401
from tilefuse._backend import backend_for, backend_for_device  # noqa: F401

__version__ = "0.1.0"
