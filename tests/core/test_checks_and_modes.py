"""The core's shared helpers: the one integer check and eval_mode's save/restore of training flags."""

import numpy as np
import pytest
import torch
from torch import nn

from dismax_plugin import eval_mode
from dismax_plugin._checks import check_int, check_positive


@pytest.mark.parametrize("value, minimum, want", [(3, None, 3), (np.int64(4), 2, 4), (0, 0, 0)])
def test_check_int_accepts_integers(value, minimum, want):
    got = check_int("n", value, minimum)
    assert got == want and type(got) is int


@pytest.mark.parametrize("value, minimum, error, match", [
    (True, None, TypeError, "n must be an integer"),
    (4.0, None, TypeError, "n must be an integer"),
    ("4", None, TypeError, "n must be an integer"),
    (1, 2, ValueError, r"n must be >= 2"),
])
def test_check_int_rejects(value, minimum, error, match):
    with pytest.raises(error, match=match):
        check_int("n", value, minimum)
    if minimum is not None:  # check_positive(integer=True) is the same check
        with pytest.raises(error, match=match):
            check_positive("n", value, integer=True, minimum=minimum)


def test_eval_mode_restores_each_submodule_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training and model[2].training
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        raise RuntimeError("inside")
    assert model.training and not model[1].training


def test_eval_mode_rejects_non_modules():
    with pytest.raises(TypeError, match="eval_mode takes torch.nn.Module"), eval_mode(torch.zeros(2)):
        pass
