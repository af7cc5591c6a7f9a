"""``tilefuse bench models``: end-to-end latency / throughput / memory / size of the model zoo,
eager vs ``tilefuse.patch`` vs ``torch.compile`` vs patched + compile, and the training-step table.

Everything it needs from the rest of the library is looked up lazily (:func:`_resolve`): the model
zoo (``tilefuse.models``), ``tilefuse.patch``, an int8 converter and a fused optimizer. What is
missing is reported as "unavailable" in the report's ``errors``; nothing else fails.

Latency: ``runs`` (>= 200 on GPU) timed runs after ``warmup``, one CUDA event pair per run (wall
clock on CPU), P50/P95/P99; throughput = batch / P50. On CUDA the batch-1 rows of the variants
without ``torch.compile`` are CUDA-graph replays (``cuda_graph`` column; eager if capture fails). Peak memory: ``max_memory_allocated`` over
the timed runs (CUDA only). Size: the serialized ``state_dict`` in MB (and the ONNX file with
``onnx=True``). ``time_budget_s`` bounds the whole run: configurations left when it is spent are
reported as skipped, so a GPU check never dies half-written.
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from tilefuse.bench import report as rpt
from tilefuse.bench import timing
from tilefuse.bench.kernels import _short_error

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "textcls")
VARIANTS = ("eager", "patched", "compile", "patched+compile")
TRAIN_CONFIGS = ("fp32", "amp", "fp32+cudnn_benchmark", "fp32+checkpoint", "fp32+fused",
                 "fp32+fused+fused_optim", "amp+fused", "fp32+compile")
PROXY_INPUTS = {"resnet50": ("3x640x640", "3x512x1024")}  # detection / segmentation proxies
CUDA_GRAPH_BATCHES = (1,)  # latency rows timed as CUDA-graph replays on CUDA (``timed_call``)
_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Unavailable(RuntimeError):
    """A piece of the library the benchmark needs is not there (yet)."""


def _resolve(*dotted: str):
    """The first importable, non-module ``module.attr`` among ``dotted``; else
    :class:`Unavailable`."""
    import types

    for name in dotted:
        mod, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(mod), attr, None)
        except Exception:  # noqa: BLE001
            obj = None
        if obj is not None and not isinstance(obj, types.ModuleType):
            return obj
    raise Unavailable(f"unavailable: none of {', '.join(dotted)}")


_CTORS = {"textcls": "text_classifier"}
# extra models by name: (constructor taking ``fused=``, input spec); used by tests and by users
# who want their own model in the tables (see :func:`register_model`)
EXTRA_MODELS: Dict[str, Tuple[Callable[..., torch.nn.Module], str]] = {}


def register_model(name: str, ctor: Callable[..., torch.nn.Module], input_spec: str) -> None:
    """Make ``name`` benchmarkable: ``ctor(fused=False)`` builds it, ``input_spec`` is
    ``"CxHxW"`` (images) or ``"seqN"`` (token ids)."""
    EXTRA_MODELS[name] = (ctor, input_spec)


def build_model(name: str) -> torch.nn.Module:
    """The plain-torch model ``name`` from the zoo (``fused=False``: eager torch modules)."""
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name][0](fused=False)
    try:
        models = importlib.import_module("tilefuse.models")
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"tilefuse.models unavailable ({_short_error(e)})") from None
    if callable(getattr(models, "get", None)):
        return models.get(name, fused=False)
    ctor = getattr(models, _CTORS.get(name, name), None)
    if not callable(ctor):
        raise Unavailable(f"tilefuse.models has no {name!r}")
    return ctor(fused=False)


def example_input(name: str, model: torch.nn.Module, batch: int, inp: str, device, dtype):
    """A random batch: token ids ``(batch, seq)`` for ``seqN`` inputs (vocabulary from the model's
    ``vocab_size`` or first ``nn.Embedding``), else images ``(batch, C, H, W)`` for ``CxHxW``."""
    if inp.startswith("seq"):
        vocab = getattr(model, "vocab_size", None)
        if vocab is None:
            emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
            vocab = emb.num_embeddings if emb is not None else 1000
        return torch.randint(0, int(vocab), (batch, int(inp[3:])), device=device)
    c, h, w = (int(v) for v in inp.split("x"))
    return torch.randn(batch, c, h, w, device=device, dtype=dtype)


def default_input(name: str, size: str) -> str:
    if name in EXTRA_MODELS:
        return EXTRA_MODELS[name][1]
    if name == "textcls":
        return "seq128" if size == "full" else "seq16"
    return "3x224x224" if size == "full" else "3x64x64"


def _patch(model):
    """``tilefuse.patch`` (on an ``eval()`` model it folds Conv->BN for inference)."""
    patch = _resolve("tilefuse.patch")
    out = patch(model, inplace=True)
    return model if out is None else out


def _to_int8(model):
    """W8A8 int8 via ``tilefuse.quantize`` (returns ``(model, report)``)."""
    quantize = _resolve("tilefuse.quantize")
    out = quantize(model, mode="w8a8")
    return out[0] if isinstance(out, tuple) else out


def state_dict_mb(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


def onnx_mb(model: torch.nn.Module, x) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        torch.onnx.export(model, (x,), path, dynamo=False)
        return os.path.getsize(path) / 1e6


def _variant_model(base, variant: str, compile_mode: Optional[str]):
    m = copy.deepcopy(base)
    if "patched" in variant:
        m = _patch(m)
    if "compile" in variant:
        m = torch.compile(m, mode=compile_mode)
    return m


def _eager_call(model, x) -> Callable[[], Any]:
    return lambda: model(x)


def timed_call(rep, key: str, model, x, device: str, batch: int, variant: str,
               cuda_graph: bool = True) -> Tuple[Callable[[], Any], bool]:
    """``(fn, graphed)``: the call a latency row times. On CUDA at the batches in
    ``CUDA_GRAPH_BATCHES`` (the launch-bound rows) and for the variants without ``torch.compile``
    (``reduce-overhead`` is its own CUDA-graph path) it is a CUDA-graph replay of the model
    (``tilefuse.models.cuda_graph_inference``: input copied in, output not cloned), else the
    eager call. A capture that fails is timed eagerly, its reason in the report's ``errors``."""
    if not (cuda_graph and str(device).startswith("cuda") and batch in CUDA_GRAPH_BATCHES
            and "compile" not in variant):
        return _eager_call(model, x), False
    try:
        graphed = _resolve("tilefuse.models.cuda_graph_inference")(model, x, clone_outputs=False)
    except Exception as e:  # noqa: BLE001
        rep["errors"].append({"where": f"{key}/cuda_graph",
                              "error": f"timed without a CUDA graph: {_short_error(e)}"})
        return _eager_call(model, x), False
    return (lambda: graphed(x)), True


def bench_inference(rep, name, inp, dtype_name, batches, variants, device, runs, warmup,
                    budget: timing.Budget, onnx: bool, compile_mode, size, partial_path=None,
                    cuda_graph: bool = True) -> None:
    where = f"model/{name}/{inp}/{dtype_name}"
    try:
        base = build_model(name).eval().to(device)
        dtype = _DT.get(dtype_name, torch.float32)  # int8: fp32 activations, int8 weights
        base = _to_int8(base) if dtype_name == "int8" else base.to(dtype=dtype)
    except Exception as e:  # noqa: BLE001
        rep["errors"].append({"where": where, "error": _short_error(e)})
        return
    size_mb = state_dict_mb(base)
    onnx_size = None
    built: Dict[str, Any] = {}  # variant -> model, shared by the batch sizes
    for batch in batches:
        for variant in variants:
            key = f"{where}/bs{batch}/{variant}"
            if budget.skip(rep, key):
                continue
            try:
                x = example_input(name, base, batch, inp, device, dtype)
                if onnx and onnx_size is None and variant == "eager":
                    try:
                        onnx_size = onnx_mb(base, x)
                    except Exception as e:  # noqa: BLE001
                        onnx_size = float("nan")
                        rep["errors"].append({"where": where + "/onnx", "error": _short_error(e)})
                if variant not in built:
                    built[variant] = _variant_model(base, variant, compile_mode)
                with torch.inference_mode():
                    fn, graphed = timed_call(rep, key, built[variant], x, device, batch, variant,
                                             cuda_graph)
                    timing.reset_peak_memory(device)
                    samples = timing.latency_samples(fn, device, runs, warmup)
                    peak = timing.peak_memory_mb(device)
                del fn  # frees a graph's memory pool before the next row
            except Exception as e:  # noqa: BLE001
                rep["errors"].append({"where": key, "error": _short_error(e)})
                continue
            stats = timing.latency_stats(samples)
            rep["entries"].append({
                "key": key, "group": f"{where}/bs{batch}", "impl": variant, "kind": "model",
                "model": name, "input": inp, "dtype": dtype_name, "batch": batch,
                "device": device, "cuda_graph": graphed, "time_ms": stats["p50_ms"], **stats,
                "throughput": batch * 1e3 / stats["p50_ms"] if stats["p50_ms"] > 0 else None,
                "peak_mem_mb": peak, "size_mb": size_mb,
                "onnx_mb": None if onnx_size != onnx_size else onnx_size,
                "runs": runs, "samples_ms": [round(s, 5) for s in samples]})
            _save_partial(rep, partial_path)
    del base, built
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# training step table
# --------------------------------------------------------------------------------------------
class _Checkpointed(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False)


def _checkpoint_children(model):
    """Recompute each top-level child with parameters (except the last, the head) in backward."""
    names = [n for n, c in model.named_children() if any(True for _ in c.parameters())]
    for n in names[:-1]:
        setattr(model, n, _Checkpointed(getattr(model, n)))
    return model


def _loss(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 2:
        target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        return F.cross_entropy(out.float(), target)
    return out.float().pow(2).mean()


def train_step_fn(model, x, config: str, device: str) -> Callable[[], None]:
    if "fused_optim" in config:
        opt_cls = _resolve("tilefuse.optim.AdamW", "tilefuse.optim.FusedAdamW")
        opt = opt_cls(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = config.startswith("amp")
    cuda = device.startswith("cuda")
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if amp and cuda else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=amp_dtype, enabled=amp):
            loss = _loss(model(x))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return step


def bench_training(rep, name, batch, configs, device, steps, warmup, budget, size,
                   partial_path=None) -> None:
    base_time = None
    for config in configs:
        key = f"train/{name}/{config}"
        if budget.skip(rep, key):
            continue
        old_bench = torch.backends.cudnn.benchmark
        try:
            model = build_model(name).to(device).train()
            if "fused" in config.split("+"):
                model = _patch(model)
            if "checkpoint" in config:
                if hasattr(model, "gradient_checkpointing"):  # the zoo's CheckpointMixin
                    model.gradient_checkpointing = True
                else:
                    model = _checkpoint_children(model)
            if "compile" in config:
                model = torch.compile(model)
            torch.backends.cudnn.benchmark = "cudnn_benchmark" in config
            x = example_input(name, model, batch, default_input(name, size), device,
                              torch.float32)
            step = train_step_fn(model, x, config, device)
            timing.reset_peak_memory(device)
            samples = timing.latency_samples(step, device, steps, warmup)
            peak = timing.peak_memory_mb(device)
        except Exception as e:  # noqa: BLE001
            rep["errors"].append({"where": key, "error": _short_error(e)})
            continue
        finally:
            torch.backends.cudnn.benchmark = old_bench
        t = timing.percentile(samples, 50)
        if config == "fp32":
            base_time = t
        rep["entries"].append({
            "key": key, "group": f"train/{name}", "impl": config, "kind": "train",
            "model": name, "batch": batch, "device": device, "time_ms": t,
            "peak_mem_mb": peak, "steps": steps,
            "speedup_vs_fp32": base_time / t if base_time and t > 0 else None})
        _save_partial(rep, partial_path)
        del model


def run(device: str = "cpu", models: Sequence[str] = MODELS, batches: Sequence[int] = (1,),
        dtypes: Sequence[str] = ("fp32",), variants: Sequence[str] = VARIANTS,
        runs: Optional[int] = None, warmup: Optional[int] = None, size: Optional[str] = None,
        inference: bool = True, train: bool = True, train_model: Optional[str] = None, train_batch: Optional[int] = None,
        train_configs: Sequence[str] = TRAIN_CONFIGS, proxies: Optional[bool] = None,
        onnx: bool = False, compile_mode: Optional[str] = None,
        time_budget_s: Optional[float] = None, show_progress: bool = True,
        partial_path=None, cuda_graph: bool = True) -> Dict[str, Any]:
    """Run the model benchmarks; return a report dict with its targets table filled in.

    ``cuda_graph``: on CUDA, time the batch-1 rows of the non-compiled variants as CUDA-graph
    replays (each entry's ``cuda_graph`` says whether it was; see :func:`timed_call`).

    With ``partial_path`` the report so far is saved there after every configuration, so a run
    killed from outside still leaves its measurements."""
    from tilefuse.bench.targets import evaluate

    cuda = device.startswith("cuda")
    size = size or ("full" if cuda else "tiny")
    runs = runs or (200 if cuda else 10)
    warmup = warmup or (20 if cuda else 2)
    proxies = cuda if proxies is None else proxies
    env = rpt.environment(device)
    env.update(size=size)
    rep = rpt.new_report("models", env)
    budget = timing.Budget(time_budget_s)
    # every model at its default input first, then the proxies (batch 1), so a time budget that
    # runs out cuts the proxies, not whole models
    jobs = [(name, default_input(name, size), dt, list(batches))
            for name in (models if inference else ()) for dt in dtypes]
    jobs += [(name, inp, dt, [1]) for name in (models if inference and proxies else ())
             for inp in PROXY_INPUTS.get(name, ()) for dt in dtypes]
    with timing.torch_backend_on_cpu(device):
        for name, inp, dt, bs in timing.progress(jobs, "models", enable=show_progress):
            bench_inference(rep, name, inp, dt, bs, variants, device, runs, warmup, budget, onnx,
                            compile_mode, size, partial_path, cuda_graph)
        if train:
            tm = train_model or ("resnet50" if "resnet50" in models else models[0])
            tb = train_batch or (32 if cuda else 2)
            bench_training(rep, tm, tb, train_configs, device, steps=max(5, runs // 10),
                           warmup=max(1, warmup // 4), budget=budget, size=size,
                           partial_path=partial_path)
    rep["targets"] = evaluate(rep)
    return rep


def _save_partial(rep, path) -> None:
    if path is not None:
        from tilefuse.bench.targets import evaluate

        rep["targets"] = evaluate(rep)
        rpt.save(rep, path)
