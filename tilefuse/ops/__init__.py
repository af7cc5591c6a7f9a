"""Functional fused ops. Each name dispatches CUDA -> Triton, CPU+interpreter -> Triton,
CPU -> torch (see :mod:`tilefuse._backend`). Each op family appends its own import line below."""
from tilefuse.fused.matmul import linear, matmul  # noqa: F401
