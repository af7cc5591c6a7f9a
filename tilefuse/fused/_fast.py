"""The eager fast path around the ``torch.library`` custom ops.

Every public op is a ``torch.library.custom_op`` (+ fake + autograd registrations), which is what
``torch.compile(fullgraph=True)`` traces. Calling a custom op eagerly, though, goes through the
dispatcher, the generated autograd wrapper, a redispatch and the dynamo-disable wrapper: tens of
microseconds of host time per call, more than the torch op it replaces. :class:`FastOp` keeps the
custom op for tracing and skips that machinery in eager mode:

=========================================  ================================================
situation                                  what runs
=========================================  ================================================
``torch.compiler.is_compiling()`` or a     the custom op (traced as one opaque node)
``torch.jit`` trace
grad enabled and an input requires grad    an ``autograd.Function`` built from the *same*
                                           implementation, ``setup_context`` and backward
                                           that the custom op registers
otherwise                                  the implementation function itself
=========================================  ================================================

The three run the same Python implementation and kernels, so results and gradients are the same
bit for bit; :func:`custom_op_path` forces the custom op in eager mode (tests compare the two).
"""
from __future__ import annotations

import contextlib
import importlib
import warnings

import torch
from torch._C import _any_requires_grad, is_grad_enabled
from torch.autograd import forward_ad as _fwad

from tilefuse import _graph_node
from tilefuse._backend import backend_of

_is_compiling = torch.compiler.is_compiling
_jit_tracing = torch._C._get_tracing_state  # torch.jit.trace / the TorchScript ONNX exporter
_functorch_active = torch._C._are_functorch_transforms_active
_c_apply = torch._C._FunctionBase.__dict__["apply"]
_FORCE_CUSTOM_OP = [False]


@contextlib.contextmanager
def custom_op_path(enabled: bool = True):
    """Route every :class:`FastOp` through its ``torch.library`` custom op (the traced path) in
    eager mode too, e.g. to compare it with the fast path."""
    old = _FORCE_CUSTOM_OP[0]
    _FORCE_CUSTOM_OP[0] = enabled
    try:
        yield
    finally:
        _FORCE_CUSTOM_OP[0] = old


def _make_function(name: str, impl, setup_context, backward):
    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    def _backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(_backward)})


class FastOp:
    """``FastOp(op, impl, setup_context, backward)``: call ``op`` (a custom op) when tracing,
    else ``impl`` directly, wrapped in an equivalent ``autograd.Function`` when a gradient is
    needed. Without ``backward`` an input that requires grad falls back to the custom op (which
    then raises torch's "no autograd formula" error on backward, as before)."""

    __slots__ = ("op", "impl", "fn", "_apply", "__name__")

    def __init__(self, op, impl, setup_context=None, backward=None):
        self.op = op
        self.impl = impl
        name = getattr(impl, "__name__", "op")
        self.__name__ = name
        self.fn = self._apply = None
        if backward is not None:
            cls = _make_function(f"Fast_{name}", impl, setup_context, backward)
            self.fn = cls.apply
            # Function.apply's Python preamble (default-argument binding for setup_context
            # style, functorch's dead-wrapper unwrapping) does nothing for these functions
            # outside functorch transforms: call the C apply directly there
            self._apply = _c_apply.__get__(None, cls)

    def __call__(self, *args):
        if _FORCE_CUSTOM_OP[0] or _is_compiling() or _jit_tracing():
            return self.op(*args)
        if is_grad_enabled() and _any_requires_grad(*args):
            if self.fn is None:
                return self.op(*args)
            if _functorch_active():
                return self.fn(*args)
            return self._apply(*args)
        return self.impl(*args)


def fast_op(name: str, impl, *, fake, setup_context=None, backward=None) -> FastOp:
    """Register ``impl`` as the custom op ``tilefuse::name`` (``fake`` as its fake kernel,
    ``backward``/``setup_context`` as its autograd) and return the :class:`FastOp` around it."""
    op = torch.library.custom_op(f"tilefuse::{name}", mutates_args=())(impl)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return FastOp(op, impl, setup_context, backward)


_ACT_CODES: dict = {}


def act_code(activation):
    """:func:`tilefuse.activations.activation_code`, memoised for names, tuples and None (the
    parse is pure for those; modules are parsed on every call, their parameters may change)."""
    try:
        return _ACT_CODES[activation]
    except (KeyError, TypeError):
        pass
    from tilefuse.activations import activation_code

    code = activation_code(activation)
    if activation is None or type(activation) in (str, tuple):
        _ACT_CODES[activation] = code
    return code


_any_autocast_enabled = torch._C._is_any_autocast_enabled


def needs_grad(*tensors) -> bool:
    """Grad mode is on and one of ``tensors`` (None allowed) requires grad. A single C call in
    eager mode; the traceable spelling under ``torch.compile``."""
    if not is_grad_enabled():
        return False
    if _is_compiling():
        return any(t is not None and t.requires_grad for t in tensors)
    return _any_requires_grad(*tensors)


def autocast_maybe_on() -> bool:
    """False only when no autocast is enabled for any device (eager: one C call); always True
    under ``torch.compile``, where the callers' full autocast checks trace."""
    return _is_compiling() or _any_autocast_enabled()


def use_torch_path(x) -> bool:
    """Whether an op over ``x`` runs its torch reference path: the torch backend, fp64 (no fp64
    kernels) or an empty tensor (nothing to launch)."""
    return backend_of(x) == "torch" or x.dtype == torch.float64 or x.numel() == 0


def lazy_module(name: str):
    """A getter of the module ``name``, imported on its first call: the kernel modules (Triton
    is optional) are imported on the first launch, not with the op module."""
    module = None

    def get():
        nonlocal module
        if module is None:
            module = importlib.import_module(name)
        return module

    return get


# --------------------------------------------------------------------------------------------
# per-signature plans: the eager hot path of an op that was already called with the same shapes
# --------------------------------------------------------------------------------------------
def plans_allowed() -> bool:
    """Whether a per-signature plan may serve this call: eager (not compiling, not a jit trace,
    not :func:`custom_op_path`), no autocast enabled and no functorch transform active (its
    wrapped tensors are not what a plan launches on). Callers also check grad themselves."""
    return not (_FORCE_CUSTOM_OP[0] or _is_compiling() or _jit_tracing()
                or _any_autocast_enabled() or _functorch_active())


def _saved_hooks_probe():
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        top(False)
    except TypeError:  # pragma: no cover - a torch whose function takes no argument
        return lambda: top() is not None
    return lambda: top(False) is not None


#: ``saving_hooked()``: whether saved-tensor hooks are active (``torch.utils.checkpoint``,
#: activation offloading): they see what an autograd function saves, and checkpoint compares
#: the count and metadata of those tensors between a forward and its recomputation, so a plan
#: then saves exactly the tensors the op's full path saves (views included). One C call.
saving_hooked = _saved_hooks_probe()


def node_plan(function_plan, forward, backward, state):
    """A plan with grad that records its autograd node in C++ (:mod:`tilefuse._graph_node`,
    about 3 us of host time less than an ``autograd.Function``): ``plan(*inputs)`` runs
    ``forward(*inputs) -> (out, saved)`` (allocate and launch, as the Function's forward does)
    and attaches ``backward(state, saved, needs, grad_out)`` (one gradient per input, in
    ``inputs`` order) to ``out``. Under saved-tensor hooks (checkpoint compares what the two
    paths save, and the Function saves exactly the full path's tensors) and forward-mode AD
    (the Function raises as the full path does), and where the extension is not built,
    ``function_plan(*inputs)``, the op's ``autograd.Function`` plan, runs instead."""
    attach = _graph_node.attach_fn()
    if attach is None:
        return function_plan

    def plan(*inputs):
        if saving_hooked() or _fwad._current_level >= 0:
            return function_plan(*inputs)
        out, saved = forward(*inputs)
        return attach(out, backward, state, inputs, saved)
    return plan


def tkey(t):
    """The part of a plan key that one tensor argument (or None) contributes: shape, strides,
    dtype and device (``t.device``: ``get_device()`` is -1 for CPU and meta alike). Two calls
    with equal keys validate, normalise and launch alike."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device)


def allocator(x, y):
    """``alloc(x)``: the cheapest allocation with ``y``'s shape, strides and dtype for inputs
    laid out like ``x`` (``y``: the full path's output for ``x``), for a plan to call per call.
    ``torch.empty_like(x)`` or ``x.new_empty(*sizes)`` (~0.85 us) where they give ``y``'s
    strides exactly, else ``torch.empty_strided``."""
    shape, stride = tuple(y.shape), y.stride()
    if y.dtype == x.dtype:
        if x.shape == y.shape and torch.empty_like(x).stride() == stride:
            return torch.empty_like
        if x.new_empty(shape).stride() == stride:
            return lambda x: x.new_empty(*shape)  # (sizes as ints: cheaper than a tuple)
    dtype = y.dtype
    return lambda x: torch.empty_strided(shape, stride, dtype=dtype, device=x.device)


def plan_cache() -> dict:
    """A dict of per-signature plans (key: the op's arguments through :func:`tkey`, the
    ``TILEFUSE_BACKEND`` setting and the op's scalar arguments; value: a closure that allocates
    and launches). Emptied with the launch caches whenever the tuning DB changes."""
    from tilefuse.kernels import launch_cache  # (the package itself does not import triton)

    return launch_cache()


PLAN_CACHE_MAX = 1024  # signatures per op: dynamic shapes must not grow a cache without bound


def tensor_guard(*tensors):
    """``check(*tensors) -> bool``, one C call: whether the tensors of a later call have these
    tensors' exact Python types, dtypes, devices, dispatch keys (with the thread's dispatch
    modes: autocast, functorch), ``requires_grad``, sizes and strides, and are distinct objects
    (torch's own dynamo tensor guard). A plan's single-entry fast check (the GEMM ops' hot
    slot, :class:`tilefuse.fused.matmul_plan.OpPlans`);
    None where this torch lacks the guard or it fails its self-test (callers then keep to the
    keyed lookup)."""
    if not _guards_work():
        return None
    try:
        check = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
        return check if check(*tensors) else None
    except Exception:  # pragma: no cover - a torch whose guard API changed
        return None


try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - torch without dynamo
    _TensorGuards = None
_GUARDS_OK: list = []


def _guards_work() -> bool:
    """Whether torch's tensor guard tells apart what a plan key does (type, dtype, device,
    sizes, strides, requires_grad) and also fails under autocast, a functorch transform and a
    jit trace, which the plans' hot slots rely on instead of checking those modes themselves.
    Probed once, on plain CPU tensors (a failure under a dispatch mode is not cached)."""
    if not _GUARDS_OK:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                ok = _probe_guards()
        except Exception:  # pragma: no cover - a torch whose guard API changed
            ok = False
        if ok or not torch._C._len_torch_dispatch_stack():
            _GUARDS_OK.append(ok)
        return ok
    return _GUARDS_OK[0]


def _probe_guards() -> bool:
    if _TensorGuards is None:  # pragma: no cover
        return False
    x = torch.zeros(2, 3, device="cpu", dtype=torch.float32)
    check = _TensorGuards(x, dynamic_dims_sizes=None, dynamic_dims_strides=None).check
    if not (check(x) and check(torch.ones(2, 3, device="cpu")) and not check(x.t())
            and not check(torch.zeros(3, 2, device="cpu")) and not check(x.double())
            and not check(torch.zeros(4, 3, device="cpu")[::2]) and not check(x.to("meta"))
            and not check(x.clone().requires_grad_())):
        return False
    with torch.autocast("cpu"):
        if check(x):
            return False
    seen = []
    torch.func.vmap(lambda z: seen.append(check(x)) or z)(torch.zeros(2, device="cpu"))
    try:
        with warnings.catch_warnings():  # (jit.trace is deprecated; it still traces)
            warnings.simplefilter("ignore")
            torch.jit.trace(lambda z: seen.append(check(x)) or z * 2,
                            (torch.zeros(1, device="cpu"),), check_trace=False)
    except Exception:  # pragma: no cover - a torch without jit tracing: nothing to detect
        seen.append(False)
    return seen == [False, False]


def remember(cache: dict, key, plan):
    """Store ``plan`` under ``key`` (emptying ``cache`` first when it is full); return it."""
    if len(cache) >= PLAN_CACHE_MAX:
        cache.clear()
    cache[key] = plan
    return plan
