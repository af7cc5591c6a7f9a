"""Where ``tilefuse autotune`` gets its problems: a shapes file, a model, or the space defaults.

* ``--shapes FILE``: JSON (a list of objects such as ``{"kernel": "matmul", "M": 128, "N": 768,
  "K": 768, "dtype": "fp16", "activation": "gelu", "bias": true}``) or text, one problem per line:
  ``[kernel] MxNxK [dtype]`` (``#`` starts a comment; the kernel defaults to the first one of
  ``--kernels``).
* ``--shapes model:NAME``: the shapes a model's forward uses (recorded at batch 1, rows also scaled to
  batch 32), harvested by
  :func:`record_shapes` (forward pre-hooks on every ``nn.Linear``, ``tilefuse.nn.Linear``
  included) from ``models.NAME()`` (``textcls`` = ``text_classifier``), else a small
  built-in list for ``resnet50`` / ``textcls``. ``models`` is passed in by the caller (the
  ``tilefuse autotune`` command passes ``tilefuse.models``): the tuning package never imports the
  model zoo, whose kernels import it.
"""
from __future__ import annotations

import json
import math
from typing import List, Tuple

import torch

# Built-in stand-ins when no model zoo is passed in: the Linear (matmul) problems of the model's
# forward at batch 1 and 32. resnet50: the classifier head. textcls: a BERT-base-like encoder,
# sequence 128, plus its pooler and 2-way classifier.
BUILTIN_MODELS = {
    "resnet50": [dict(M=m, N=1000, K=2048, bias=True, layout="nt") for m in (1, 32)],
    "textcls": [dict(M=m * 128, N=n, K=k, bias=True, activation=act, layout="nt")
                for m in (1, 32)
                for n, k, act in ((2304, 768, "none"), (768, 768, "none"), (3072, 768, "gelu"),
                                  (768, 3072, "none"))]
               + [dict(M=m, N=768, K=768, bias=True, activation="tanh", layout="nt")
                  for m in (1, 32)]
               + [dict(M=m, N=2, K=768, bias=True, layout="nt") for m in (1, 32)],
}

Problem = Tuple[str, dict]  # (kernel name, raw spec)


def record_shapes(model: torch.nn.Module, *inputs, **kwargs) -> List[dict]:
    """Run one forward (under ``no_grad``) with hooks on every ``nn.Linear``; return one spec
    ``{M, N, K, dtype, activation, bias}`` per distinct problem, in first-use order."""
    from tilefuse.activations import ACTIVATIONS

    seen, specs, handles = set(), [], []

    def hook(module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        act = getattr(module, "activation", "none")
        spec = dict(M=int(math.prod(x.shape[:-1])), N=int(module.out_features),
                    K=int(module.in_features), dtype=str(x.dtype).replace("torch.", ""),
                    activation=int(ACTIVATIONS.get(act, (0, 0.0))[0]),
                    bias=module.bias is not None, layout="nt")
        ident = tuple(sorted(spec.items()))
        if spec["M"] > 0 and ident not in seen:
            seen.add(ident)
            specs.append(spec)

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return specs


_MODEL_ALIASES = {"textcls": "text_classifier", "text": "text_classifier"}
RECORD_BATCHES = (1, 32)


def _example_inputs(model: torch.nn.Module, batch: int, device: str):
    emb = getattr(model, "tok", None)
    if isinstance(emb, torch.nn.Embedding):  # token model: (batch, max_len) ids
        pos = getattr(model, "pos", None)
        length = pos.num_embeddings if isinstance(pos, torch.nn.Embedding) else 128
        return (torch.randint(0, emb.num_embeddings, (batch, length), device=device),)
    return (torch.randn(batch, 3, 224, 224, device=device),)


def _record_model(build, device: str) -> List[dict]:
    """Build with tilefuse modules and record on the torch backend (shapes only, fast anywhere,
    and no tuning triggered by the recording forward itself)."""
    import os

    model = build().to(device).eval()
    old = os.environ.get("TILEFUSE_BACKEND")
    os.environ["TILEFUSE_BACKEND"] = "torch"
    try:
        specs, seen = [], set()
        recorded = record_shapes(model, *_example_inputs(model, 1, device))
        for batch in RECORD_BATCHES:  # Linear rows (M) scale with the batch
            for spec in recorded:
                spec = dict(spec, M=spec["M"] * batch)
                spec.pop("dtype")  # tuned in the dtypes asked for (--dtype)
                ident = tuple(sorted(spec.items()))
                if ident not in seen:
                    seen.add(ident)
                    specs.append(spec)
    finally:
        if old is None:
            os.environ.pop("TILEFUSE_BACKEND", None)
        else:
            os.environ["TILEFUSE_BACKEND"] = old
    return specs


def _model_specs(name: str, device: str = "cpu", models=None) -> Tuple[List[dict], str]:
    """(specs, where they came from) for ``model:NAME``: recorded from ``models.NAME`` (``models``:
    a namespace of model constructors such as ``tilefuse.models``) at batch 1 (M scaled to batch 32
    as well) when that constructor exists, else the built-in list."""
    build = getattr(models, _MODEL_ALIASES.get(name, name), None) if models is not None else None
    if callable(build):
        where = getattr(models, "__name__", "the given models")
        return _record_model(build, device), f"recorded from {where} ({name})"
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown model {name!r}; built-in shape lists: "
                         f"{', '.join(sorted(BUILTIN_MODELS))}")
    return [dict(s) for s in BUILTIN_MODELS[name]], f"built-in shape list for {name}"


def _parse_text(text: str, kernels: List[str]) -> List[Problem]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        kernel = kernels[0]
        if parts and not parts[0][0].isdigit():
            kernel, parts = parts[0], parts[1:]
        if not parts or len(parts) > 2:
            raise ValueError(f"shapes line {n}: expected '[kernel] MxNxK [dtype]', got {line!r}")
        spec = {"shape": parts[0]}
        if len(parts) == 2:
            spec["dtype"] = parts[1]
        out.append((kernel, spec))
    return out


def load_shapes(arg: str | None, kernels: List[str], device: str,
                models=None) -> Tuple[List[Problem], str]:
    """Problems ``(kernel, spec)`` for ``--shapes ARG`` and a description of their origin;
    ``models`` (e.g. ``tilefuse.models``) supplies the constructors ``model:NAME`` records."""
    from tilefuse.autotune.space import get_space

    if not arg:
        out = []
        for k in kernels:
            space = get_space(k)
            out += [(k, s) for s in (space.default_shapes(device) if space else [])]
        return out, "default shapes"
    if arg.startswith("model:"):
        specs, origin = _model_specs(arg[len("model:"):], device, models)
        return [("matmul", s) for s in specs if "matmul" in kernels], origin
    try:
        with open(arg, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--shapes: cannot read {arg!r} ({e.strerror or e})") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--shapes: {arg} is not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = data.get("shapes", [])
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ValueError(f"--shapes: {arg} must hold a list of objects")
        return [(d.get("kernel", kernels[0]), d) for d in data], arg
    return _parse_text(text, kernels), arg
