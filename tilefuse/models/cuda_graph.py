"""Inference preparation: fold Conv->BN for ``eval()`` and, optionally, capture the forward in a
CUDA graph (``prepare_inference(model, example_inputs, cuda_graph=True)``).

At batch 1 a model's eager forward tends to be launch-bound: many small kernels, and the CPU
issuing them one by one is the bottleneck. A CUDA graph records every launch of one forward once
and replays them all with one call. The price is static shapes: the
graph reads its inputs from fixed buffers and writes its outputs to fixed buffers, so each call
copies the new inputs in, replays and (by default) clones the outputs out.

Capture follows the PyTorch recipe: a few warm-up forwards on a side stream (Triton compiles and
loads its kernels, autotuning and cuDNN choose their configurations, the caching allocator
settles: none of that may happen during capture), then ``torch.cuda.graph`` under
``torch.no_grad()`` (never inference mode: see :func:`_grad_off`). Speed on a GPU: unmeasured.
"""
from __future__ import annotations

import contextlib
from typing import Any, List, Tuple

import torch
import torch.utils._pytree as pytree

__all__ = ["CUDAGraphInference", "cuda_graph_inference", "prepare_inference"]

_RECAPTURE = "capture another graph for it (tilefuse.models.cuda_graph_inference)"


@contextlib.contextmanager
def _grad_off():
    """``no_grad`` and *not* inference mode, whatever the caller's mode: the buffers and cloned
    outputs are ordinary tensors, so a graph captured inside ``torch.inference_mode()`` can be
    called outside it (and the other way round)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _split(example_inputs) -> Tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``: a tensor is one positional input, a tuple/list
    the positional inputs, a dict the keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("example_inputs: a dict of keyword inputs needs string keys")
        return (), dict(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple/list of positional inputs or a dict "
                    f"of keyword inputs, got {type(example_inputs).__name__}")


def _flatten(args: tuple, kwargs: dict) -> Tuple[List[str], List[Any], Any]:
    """Leaves of ``(args, kwargs)`` with readable names (``args[0]``, ``kwargs['mask']``) and the
    tree spec. Keyword order does not matter."""
    pairs, spec = pytree.tree_flatten_with_path((args, dict(sorted(kwargs.items()))))
    names = [("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
             for path, _ in pairs]
    return names, [leaf for _, leaf in pairs], spec


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _check_capturable(model, names: List[str], leaves: List[Any]) -> torch.device:
    """Clear errors for what cannot be captured; returns the one CUDA device of the inputs."""
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got "
                        f"{type(model).__name__}")
    if isinstance(model, torch.nn.Module):
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.device.type != "cuda":
                raise ValueError(f"CUDA graphs need CUDA: the model's {pname!r} is on {p.device}; "
                                 "move the model to a GPU (model.cuda()) or run it eagerly")
        if model.training:
            raise ValueError("model is in training mode: call model.eval() (or use "
                             "tilefuse.models.prepare_inference) before capturing inference")
    tensors = [(n, t) for n, t in zip(names, leaves) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ValueError("example_inputs holds no tensor: a CUDA graph needs tensor inputs to copy "
                         "each call's values into")
    for n, t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA: input {n} is on {t.device}; move the "
                             "inputs to the model's GPU or run the model eagerly")
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        raise ValueError(f"example_inputs are on several devices {sorted(map(str, devices))}; a "
                         "CUDA graph runs on one")
    if not torch.cuda.is_available():  # pragma: no cover - CUDA tensors imply CUDA
        raise RuntimeError("CUDA graphs need CUDA: torch.cuda.is_available() is False")
    return devices.pop()


def _match_inputs(names: List[str], static: List[Any], spec, args: tuple, kwargs: dict) -> list:
    """Leaves of a call's ``(args, kwargs)``, checked against the captured ones: same structure,
    every tensor with the captured shape, dtype and device, every non-tensor equal (it is baked
    into the graph). ``ValueError`` naming the first input that differs."""
    leaves, got_spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
    if got_spec != spec:
        got_names = _flatten(args, kwargs)[0]
        raise ValueError(f"the inputs ({', '.join(got_names) or 'none'}) differ in structure from "
                         f"the captured ones ({', '.join(names)}); {_RECAPTURE}")
    for name, s, new in zip(names, static, leaves):
        if isinstance(s, torch.Tensor):
            if not isinstance(new, torch.Tensor):
                raise ValueError(f"input {name}: expected a tensor ({_describe(s)}), got "
                                 f"{type(new).__name__}")
            if new.shape != s.shape or new.dtype != s.dtype or new.device != s.device:
                raise ValueError(f"input {name}: got {_describe(new)}, the CUDA graph was captured "
                                 f"for {_describe(s)}; a graph replays static shapes: {_RECAPTURE}")
        else:
            try:
                same = new is s or bool(new == s)
            except Exception:  # noqa: BLE001 - objects without a usable ==
                same = False
            if not same:
                raise ValueError(f"input {name} is {new!r} but the graph was captured with {s!r}: "
                                 f"non-tensor inputs are baked into the graph; {_RECAPTURE}")
    return leaves


class CUDAGraphInference:
    """A model's forward captured in a CUDA graph for one input signature.

    ``graphed(*args, **kwargs)`` checks the inputs against the captured ones (``ValueError``
    naming the input on a shape, dtype, device or structure change), copies them into the static
    input buffers (no copy for a buffer passed back as itself), replays the graph and returns the
    output with the model's structure (tensor, tuple, dict: any pytree).

    With ``clone_outputs=True`` (the default) the returned tensors are fresh copies. With
    ``False`` they *are* the graph's static output buffers: no copy kernel, but the next call
    overwrites them in place, so read them (or clone) before calling again.

    The graph reads the model's parameters where they were at capture: in-place updates
    (``load_state_dict``, ``param.copy_``) are seen by later replays; ``model.to(...)``,
    re-patching or replacing modules are not (capture again). The object keeps the model alive.
    """

    def __init__(self, model, example_inputs, *, warmup: int = 3, clone_outputs: bool = True,
                 pool=None):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (forwards run before capture so that "
                             f"kernels compile outside it), got {warmup!r}")
        args, kwargs = _split(example_inputs)
        names, leaves, spec = _flatten(args, kwargs)
        self.device = _check_capturable(model, names, leaves)
        self.model = model
        self.clone_outputs = bool(clone_outputs)
        self._names, self._spec = names, spec
        with torch.cuda.device(self.device), _grad_off():
            # own buffers (clone keeps the layout, e.g. channels_last), so the caller's tensors
            # are never written by a later call
            self._static = [t.detach().clone() if isinstance(t, torch.Tensor) else t
                            for t in leaves]
            a, k = pytree.tree_unflatten(self._static, spec)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # the model's own errors surface here, unwrapped
                for _ in range(warmup):
                    model(*a, **k)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, pool=pool):
                    out = model(*a, **k)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise RuntimeError(
                    f"CUDA graph capture of {type(model).__name__} failed ({type(e).__name__}: "
                    f"{first}). Host syncs (.item(), .cpu(), printing a tensor), CPU tensors and "
                    "data-dependent shapes inside forward cannot be captured: run the model "
                    "eagerly") from e
        self._out, self._out_spec = pytree.tree_flatten(out)

    @property
    def static_inputs(self) -> Tuple[tuple, dict]:
        """The graph's input buffers as ``(args, kwargs)``: writing them in place and calling
        with them skips the input copy."""
        return pytree.tree_unflatten(self._static, self._spec)

    def __call__(self, *args, **kwargs):
        leaves = _match_inputs(self._names, self._static, self._spec, args, kwargs)
        with torch.cuda.device(self.device), _grad_off():
            for s, new in zip(self._static, leaves):
                if isinstance(s, torch.Tensor) and new is not s:
                    if new.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
                        new = new.clone()  # a view of the buffer itself (e.g. transposed)
                    s.copy_(new)
            self.graph.replay()
            out = [o.clone() if self.clone_outputs and isinstance(o, torch.Tensor) else o
                   for o in self._out]
        return pytree.tree_unflatten(out, self._out_spec)

    def __repr__(self) -> str:
        return (f"CUDAGraphInference({type(self.model).__name__}, inputs=[{', '.join(self._names)}]"
                f", device={self.device}, clone_outputs={self.clone_outputs})")


def cuda_graph_inference(model, example_inputs, *, warmup: int = 3, clone_outputs: bool = True,
                         pool=None) -> CUDAGraphInference:
    """Warm up, capture and return a :class:`CUDAGraphInference` of ``model`` (an ``eval()``
    model on a GPU) for ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs, on the same GPU). ``pool`` shares a memory pool between graphs
    (``torch.cuda.graph_pool_handle()``, e.g. one graph per batch size)."""
    return CUDAGraphInference(model, example_inputs, warmup=warmup, clone_outputs=clone_outputs,
                              pool=pool)


def prepare_inference(model: torch.nn.Module, example_inputs=None, *, cuda_graph: bool = False,
                      warmup: int = 3, clone_outputs: bool = True, pool=None):
    """Unpatch, switch to ``eval()`` and re-patch, so Conv->BN pairs are folded for inference.

    With ``cuda_graph=True`` the prepared model's forward is then captured for
    ``example_inputs`` and a :class:`CUDAGraphInference` is returned (see
    :func:`cuda_graph_inference`); the model is checked (on CUDA, inputs given) before patching.
    """
    from tilefuse.patch import patch, unpatch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if cuda_graph:
        if example_inputs is None:
            raise ValueError("prepare_inference(cuda_graph=True) needs example_inputs: a CUDA "
                             "graph replays the shapes it was captured with")
        args, kwargs = _split(example_inputs)
        names, leaves, _ = _flatten(args, kwargs)
        _check_capturable(model.eval(), names, leaves)
    model = patch(unpatch(model).eval(), inplace=True)
    if not cuda_graph:
        return model
    return cuda_graph_inference(model, example_inputs, warmup=warmup,
                                clone_outputs=clone_outputs, pool=pool)
