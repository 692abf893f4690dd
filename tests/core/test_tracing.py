"""The heads' forward under torch.fx, TorchScript (script and trace) and torch.export, with eager checks kept."""

import warnings

import pytest
import torch
from torch import nn

from dismax_plugin import DisMaxHead, IsoMaxHead, IsoMaxPlusHead

HEAD_CLASSES = [IsoMaxHead, IsoMaxPlusHead, DisMaxHead]


def make(cls):
    torch.manual_seed(0)
    head = cls(8, 5)
    if cls is IsoMaxHead:
        nn.init.normal_(head.weight)  # zeros would make every logit equal
    head.set_temperature(0.5)
    return head.eval()


def features(seed=1, batch=3):
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def model_of(head):
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), head).eval()


def inputs(seed=2, batch=3):
    return torch.randn(batch, 6, generator=torch.Generator().manual_seed(seed))


def check_same(traced, eager, x):
    with torch.no_grad():
        torch.testing.assert_close(traced(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_fx_symbolic_trace(cls):
    head = make(cls)
    traced = torch.fx.symbolic_trace(head, concrete_args={"pre_logits": False})
    check_same(traced, head, features())
    check_same(traced, head, features(seed=3, batch=7))  # not specialised to the batch size
    model = model_of(head)
    check_same(torch.fx.symbolic_trace(model), model, inputs())


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_torchscript_script(cls):
    head = make(cls)
    scripted = torch.jit.script(head)
    check_same(scripted, head, features())
    with torch.no_grad():
        torch.testing.assert_close(scripted(features(), True), features())  # pre_logits
    model = model_of(head)
    check_same(torch.jit.script(model), model, inputs())


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_torchscript_trace(cls):
    model = model_of(make(cls))
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no data-dependent Python branch recorded
        traced = torch.jit.trace(model, (inputs(),))
    check_same(traced, model, inputs(seed=4, batch=9))


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_torch_export(cls):
    model = model_of(make(cls))
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model, (inputs(),), dynamic_shapes=({0: batch},))
    check_same(exported.module(), model, inputs(seed=5, batch=6))


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_traced_models_train(cls):
    # the traced graphs stay differentiable (gradients reach the prototypes)
    head = make(cls).train()
    traced = torch.fx.symbolic_trace(head, concrete_args={"pre_logits": False})
    traced(features()).sum().backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_eager_mode_still_checks_the_features(cls):
    head = make(cls)
    with pytest.raises(ValueError, match=r"features must have shape \[B, 8\]"):
        head(torch.zeros(3, 7))
    with pytest.raises(TypeError, match=r"features must be a torch.Tensor \[B, 8\]"):
        head([[0.0] * 8])
