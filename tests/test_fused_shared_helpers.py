"""Helpers the fused op modules share: ``optional_float_tensors`` (argument checks),
``lazy_module`` (kernel modules imported on the first launch) and ``use_torch_path``."""
import sys

import pytest
import torch

from tilefuse._validate import optional_float_tensors
from tilefuse.fused._fast import lazy_module, use_torch_path


def test_optional_float_tensors_skips_none_and_names_the_first_bad_argument():
    optional_float_tensors(weight=None, bias=torch.ones(2),
                           residual=torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias"):
        optional_float_tensors(weight=torch.ones(2), bias=torch.ones(2, dtype=torch.int32),
                               residual=[1.0])
    with pytest.raises(TypeError, match="residual"):
        optional_float_tensors(weight=None, residual=[1.0])


def test_lazy_module_imports_once_on_first_call():
    get = lazy_module("tilefuse._backend")
    assert get() is sys.modules["tilefuse._backend"]
    assert get() is get()


def test_use_torch_path():
    assert use_torch_path(torch.ones(2, dtype=torch.float64))
    assert use_torch_path(torch.ones(0))
