"""torch.library custom ops and autograd wiring around the Triton kernels.

Every op is a ``torch.library.custom_op`` with a fake (meta) implementation and registered
autograd, so ``torch.compile(fullgraph=True)`` traces models that use them without graph breaks.
Each op's implementation dispatches by backend (:mod:`tilefuse._backend`): Triton kernel (CUDA or
interpreter) or the plain torch reference path.
"""
