"""@triton.jit kernels, one file per kernel family, plus their launchers.

Importing this package imports triton; the rest of tilefuse imports kernels lazily so the torch
backend works where triton is not installed.
"""
