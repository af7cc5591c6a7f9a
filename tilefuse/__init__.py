"""tilefuse: hand-written Triton kernels for PyTorch, usable in one line.

``tilefuse.ops`` (functional fused ops), ``tilefuse.nn`` (drop-in modules), ``tilefuse.optim``
(fused optimizers), ``tilefuse.patch`` / ``unpatch`` / ``patch_report`` (rewrite a model into
fused modules), ``tilefuse.quantize`` / ``prune`` (deployment), ``tilefuse.models``,
``tilefuse.train``, ``tilefuse.export_onnx``, ``tilefuse.regularize``. Note that
``tilefuse.patch``, ``tilefuse.quantize`` and ``tilefuse.prune`` are the functions; import their
modules' other names with ``from tilefuse.prune import SemiStructured24`` etc.
"""
from tilefuse import _backend  # noqa: F401  (first: snapshots TRITON_INTERPRET)
from tilefuse import _compat

if _backend.interpreter_enabled():
    _compat.apply()  # triton 3.6's interpreter under numpy >= 2.4 (see tilefuse/_compat.py)

from tilefuse import nn, ops, optim, regularize  # noqa: F401,E402
from tilefuse._backend import backend_for, backend_for_device  # noqa: F401
from tilefuse.export import export_onnx  # noqa: F401
from tilefuse.patch import patch, patch_report, unpatch  # noqa: F401
from tilefuse.prune import prune  # noqa: F401
from tilefuse.quantize import quantize  # noqa: F401
from tilefuse import models, train  # noqa: F401,E402  (after patch/quantize: models use them)

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (setuptools dynamic attr)

__all__ = ["ops", "nn", "optim", "regularize", "models", "train", "patch", "unpatch",
           "patch_report", "quantize", "prune", "export_onnx", "backend_for",
           "backend_for_device", "__version__"]
