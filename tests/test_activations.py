"""``activation=`` parsing (tilefuse.activations.parse_activation): every accepted name and alias
is the documented one (docs/norm.md table), case rules, and parameters only where one exists."""
import math
import pathlib
import re

import pytest
import torch

import tilefuse
from tilefuse.activations import ACTIVATIONS, ALIASES, PARAMETERS, parse_activation

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "norm.md"


def _doc_table():
    """{name: [aliases]} from the activation table of docs/norm.md."""
    rows = re.findall(r"^\| `(\w+)` \|[^|]+\|([^|]*)\|[^|]+\|$", DOC.read_text(), flags=re.M)
    return {name: re.findall(r"`(\w+)`", aliases) for name, aliases in rows}


def test_docs_table_lists_every_name_and_alias():
    table = _doc_table()
    assert set(table) == set(ACTIVATIONS)
    assert {a: n for n, aliases in table.items() for a in aliases} == ALIASES


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_names_case_insensitive_dash_is_underscore(name):
    want = (name, ACTIVATIONS[name][1])
    for spelling in (name, name.upper(), name.title(), name.replace("_", "-")):
        assert parse_activation(spelling) == want, spelling
    assert parse_activation((name, None)) == want
    assert parse_activation((name, 0.0)) == (name, 0.0)  # the normalised form round-trips


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases(alias):
    assert parse_activation(alias) == (ALIASES[alias], 0.0)
    assert parse_activation(alias.upper()) == (ALIASES[alias], 0.0)


@pytest.mark.parametrize("bad", ["hardswish", "gelu_new", "relu_6", "", "quick_gelu"])
def test_unknown_names_rejected(bad):
    with pytest.raises(ValueError, match="activation"):
        parse_activation(bad)


@pytest.mark.parametrize("name", sorted(set(ACTIVATIONS) - set(PARAMETERS)))
def test_parameter_free_activation_rejects_a_parameter(name):
    with pytest.raises(ValueError, match="activation.*takes no parameter"):
        parse_activation((name, 5.0))
    with pytest.raises(ValueError, match="activation"):
        parse_activation((name.upper(), -1))


def test_parameter_rejected_through_the_public_api():
    with pytest.raises(ValueError, match="activation"):
        tilefuse.nn.Linear(4, 3, activation=("relu", 5.0))
    with pytest.raises(ValueError, match="activation"):
        tilefuse.ops.matmul(torch.randn(2, 3), torch.randn(3, 4), activation=("gelu", 1.0))
    with pytest.raises(ValueError, match="activation"):
        tilefuse.nn.BatchNormAct2d(4, activation=("swish", 0.5))


def test_leaky_relu_parameter():
    assert parse_activation(("leaky_relu", 0.2)) == ("leaky_relu", 0.2)
    assert parse_activation(("Leaky-ReLU", 1)) == ("leaky_relu", 1.0)
    assert parse_activation("leaky_relu") == ("leaky_relu", 0.01)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="activation.*negative_slope"):
            parse_activation(("leaky_relu", bad))
    for bad in ("0.2", True, torch.tensor(0.2)):
        with pytest.raises(TypeError, match="activation"):
            parse_activation(("leaky_relu", bad))


def test_malformed_specs():
    with pytest.raises(ValueError, match="activation"):
        parse_activation(("relu",))
    with pytest.raises(TypeError, match="activation"):
        parse_activation(1)
    with pytest.raises(TypeError, match="activation"):
        parse_activation(["relu", 0.0])
