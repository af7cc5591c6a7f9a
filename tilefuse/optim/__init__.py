"""Fused multi-tensor optimizers, grad clipping, grad-norm monitoring and LR schedules.

See docs/optim.md."""
from tilefuse.optim.optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop  # noqa: F401
from tilefuse.optim.clip import GradNormMonitor, GradNormReport, clip_grad_norm_  # noqa: F401
from tilefuse.optim.schedules import (  # noqa: F401
    inverse_sqrt_warmup, inverse_sqrt_warmup_lambda, one_cycle, one_cycle_lambda, step_decay,
    step_decay_lambda, warmup_cosine, warmup_cosine_lambda)
