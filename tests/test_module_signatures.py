"""Every public ``tilefuse.nn`` module's ``forward`` has its torch counterpart's signature
(parameter names, kinds, defaults), so ``m(input=x)`` works exactly as on the torch module; extra
tilefuse parameters (``residual``) come after torch's and have defaults."""
import importlib
import inspect
import pkgutil

import pytest
import torch
from torch import nn

import tilefuse
import tilefuse.regularize as R
from tilefuse import nn as tnn


def _public_module_classes():
    """Public nn.Module classes defined in tilefuse.nn.* (exported or not), tilefuse.regularize."""
    mods = [importlib.import_module(f"tilefuse.nn.{m.name}")
            for m in pkgutil.iter_modules(tnn.__path__) if not m.name.startswith("_")]
    found = {}
    for mod in mods + [R]:
        for name, obj in vars(mod).items():
            if (isinstance(obj, type) and issubclass(obj, nn.Module) and not name.startswith("_")
                    and obj.__module__ == mod.__name__):
                found[name] = obj
    return found


CLASSES = _public_module_classes()


def _hf_conv1d_forward(self, x):
    """transformers.pytorch_utils.Conv1D.forward's signature (transformers is not imported)."""


# classes whose torch base is plain nn.Module: the forward of the module they stand in for
STANDS_IN_FOR = {
    "Int8Linear": nn.Linear.forward,         # tilefuse.quantize puts it in place of nn.Linear
    "Int8Conv1x1": nn.Conv2d.forward,        # ... and of a 1x1 nn.Conv1d/Conv2d
    "DepthwiseSeparableConv2d": nn.Conv2d.forward,
    "DropBlock2d": nn.Dropout2d.forward,     # torchvision.ops.DropBlock2d.forward(self, input)
    "Conv1DLinear": _hf_conv1d_forward,      # Hugging Face's Conv1D
    "Fp8Linear": nn.Linear.forward,          # tilefuse.quantize(mode="fp8") replaces nn.Linear
    "Int8Conv2d": nn.Conv2d.forward,         # tilefuse.quantize replaces nn.Conv2d
    "QuantizedEmbedding": nn.Embedding.forward,  # tilefuse.quantize(mode="fp8")
}


def _reference_forward(cls):
    for base in cls.__mro__:
        if base.__module__.startswith("torch.nn") and base is not nn.Module:
            return base.forward
    return STANDS_IN_FOR[cls.__name__]


def _params(fn):
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_every_public_class_is_covered():
    assert {"Linear", "Dropout", "BatchNormAct2d", "LayerNormAct", "RMSNormAct",
            "DepthwiseConv2d", "ScheduledDropout"} <= set(CLASSES)
    for cls in CLASSES.values():
        _reference_forward(cls)  # KeyError: a new nn.Module-based class needs a STANDS_IN_FOR row


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_forward_signature_matches_torch(name):
    cls = CLASSES[name]
    ref = _reference_forward(cls)
    ours, theirs = _params(cls.forward), _params(ref)
    key = [(p.name, p.kind, p.default) for p in theirs]
    assert [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == key, \
        f"{name}.forward{inspect.signature(cls.forward)} vs {ref.__qualname__}" \
        f"{inspect.signature(ref)}"
    for p in ours[len(theirs):]:
        assert p.default is not inspect.Parameter.empty, f"{name}.forward: {p.name} needs a default"
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), (name, p.name)


def _conv1x1():
    return tnn.Int8Conv1x1.from_float(nn.Conv2d(4, 3, 1), mode="weight_only")


# (module factory, input) for every public class: called with the torch keyword
CALLS = {
    "Linear": (lambda: tnn.Linear(4, 3), (2, 4)),
    "Dropout": (lambda: tnn.Dropout(0.5), (2, 4)),
    "Dropout2d": (lambda: tnn.Dropout2d(0.5), (2, 4, 3, 3)),
    "ScheduledDropout": (lambda: R.ScheduledDropout(0.5, warmup_steps=2), (2, 4)),
    "DropBlock2d": (lambda: tnn.DropBlock2d(0.2, 3), (2, 4, 6, 6)),
    "DepthwiseConv2d": (lambda: tnn.DepthwiseConv2d(4, 4, 3, padding=1), (2, 4, 5, 5)),
    "DepthwiseSeparableConv2d": (lambda: tnn.DepthwiseSeparableConv2d(4, 6).eval(), (2, 4, 5, 5)),
    "LayerNormAct": (lambda: tnn.LayerNormAct(4), (2, 4)),
    "RMSNormAct": (lambda: tnn.RMSNormAct(4), (2, 4)),
    "GroupNormAct": (lambda: tnn.GroupNormAct(2, 4), (2, 4, 3)),
    "BatchNormAct1d": (lambda: tnn.BatchNormAct1d(4), (3, 4)),
    "BatchNormAct2d": (lambda: tnn.BatchNormAct2d(4), (2, 4, 3, 3)),
    "InstanceNormAct1d": (lambda: tnn.InstanceNormAct1d(4), (2, 4, 5)),
    "InstanceNormAct2d": (lambda: tnn.InstanceNormAct2d(4), (2, 4, 3, 3)),
    "Int8Linear": (lambda: tnn.Int8Linear.from_float(nn.Linear(4, 3), mode="weight_only"),
                   (2, 4)),
    "Int8Conv1x1": (_conv1x1, (2, 4, 3, 3)),
    "Conv1DLinear": (lambda: CLASSES["Conv1DLinear"](3, 4), (2, 4)),
    "Fp8Linear": (lambda: tnn.Fp8Linear.from_float(nn.Linear(4, 3)), (2, 4)),
    "Conv2d": (lambda: tnn.Conv2d(4, 3, 3, padding=1), (2, 4, 5, 5)),
    "Int8Conv2d": (lambda: tnn.Int8Conv2d.from_float(nn.Conv2d(4, 3, 3, padding=1),
                                                     mode="weight_only"), (2, 4, 5, 5)),
    "QuantizedEmbedding": (lambda: tnn.QuantizedEmbedding.from_float(nn.Embedding(10, 4)),
                           lambda: torch.randint(0, 10, (2, 3))),
}


def test_calls_table_covers_every_class():
    assert set(CLASSES) <= set(CALLS)


@pytest.mark.parametrize("name", sorted(set(CALLS) & set(CLASSES)))
def test_called_with_the_torch_keyword(name):
    make, shape = CALLS[name]
    m = make()
    kw = _params(_reference_forward(type(m)))[0].name  # "input" (RMSNorm, HF Conv1D: "x")
    x = shape() if callable(shape) else torch.randn(*shape)  # a callable: integer input
    torch.manual_seed(1)
    want = m(x)
    torch.manual_seed(1)
    got = m(**{kw: x})
    torch.testing.assert_close(got, want)


def test_linear_input_keyword_issue_example():
    x = torch.randn(2, 4)
    m = tilefuse.nn.Linear(4, 3)
    torch.testing.assert_close(m(input=x), nn.functional.linear(x, m.weight, m.bias))


def test_residual_by_keyword_after_input():
    m = tnn.BatchNormAct2d(4, activation="relu").eval()
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(input=x, residual=r), m(x, r))
    ln, y, r2 = tnn.LayerNormAct(4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(ln(input=y, residual=r2), ln(y, r2))
