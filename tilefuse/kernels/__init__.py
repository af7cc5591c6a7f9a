"""@triton.jit kernels, one file per kernel family, plus their launchers.

Importing this package imports triton; the rest of tilefuse imports kernels lazily so the torch
backend works where triton is not installed.
"""


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (1 for ``x <= 1``): block sizes for ``tl.arange``.
    Shared by every launcher and by the autotune spaces' shape buckets."""
    x = int(x)
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


_LAUNCH_CACHES: list = []


def launch_cache() -> dict:
    """A dict for a launcher's per-signature launch parameters (config, grid...). Every such
    cache is emptied by :func:`clear_launch_caches`, which the tuning DB calls whenever a stored
    config may have changed, so a cached entry never outlives the config it was built from."""
    cache: dict = {}
    _LAUNCH_CACHES.append(cache)
    return cache


def clear_launch_caches() -> None:
    for cache in _LAUNCH_CACHES:
        cache.clear()


def split_constexprs(kernel, n_runtime: int, kwargs: dict) -> tuple[tuple, dict]:
    """Split a launch's keyword arguments into the kernel parameters that follow its first
    ``n_runtime`` ones, as a positional tuple in declaration order (stopping at the first one
    not given), and the rest (``num_warps``, ``num_stages``, later defaults) as keywords.
    Launchers cache the pair per signature: a positional tuple is cheaper to pass on every
    launch than a dict of a dozen constexprs, and binds to the same parameters."""
    kwargs = dict(kwargs)
    consts = []
    for name in kernel.arg_names[n_runtime:]:
        if name not in kwargs:
            break
        consts.append(kwargs.pop(name))
    return tuple(consts), kwargs


_SM_COUNTS: dict = {}


INTERPRETER_SMS = 4  # the CPU lane's pseudo-device: launch rules sized by SMs run as on a GPU


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached: the property query costs
    microseconds, and launchers size persistent grids with it on every call); a small fixed
    count for CPU tensors (the interpreter), so the same grid rules apply there."""
    try:
        return _SM_COUNTS[device]
    except KeyError:
        import torch

        dev = torch.device(device)
        n = (torch.cuda.get_device_properties(dev).multi_processor_count
             if dev.type == "cuda" else INTERPRETER_SMS)
        _SM_COUNTS[device] = n
        return n
