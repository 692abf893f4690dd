"""What timm's train.py does with the isotropic variants, with timm's public pieces (train.py itself is not in
the timm wheel; docs/notes/timm.md runs the real one): ``--model-kwargs`` parsed by timm's ``ParseKwargs``,
timm's three stock losses equal to the isotropic loss in value and gradients, one optimizer step equal to the
isotropic loss's step, eval-mode outputs. The register module (``--device-modules``) is tested in a fresh
process in test_timm_weights.py."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn

import dismax_plugin as dp
from dismax_plugin.adapters import timm as dtimm

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("dismax", "isomaxplus", "isomax")
CLASSES = 4

def _models(kind: str, **options):
    """The same model made both ways: ``timm.create_model("<arch>_<kind>")`` and ``dtimm.create_model``, then
    the prototypes moved to one random point (IsoMax starts them at zero, where every distance is ``|f|``, the
    backbone's gradient is rounding noise and the first step decides ReLU masks by its sign)."""
    dtimm.register_timm_models(["test_resnet"])
    torch.manual_seed(0)
    registered = timm.create_model(f"test_resnet_{kind}", num_classes=CLASSES, **options)
    torch.manual_seed(0)
    direct = dtimm.create_model("test_resnet", head=kind, num_classes=CLASSES, **options)
    assert all(torch.equal(a, b) for a, b in zip(registered.state_dict().values(), direct.state_dict().values()))
    prototypes = torch.randn(registered.fc.weight.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for model in (registered, direct):
            model.fc.weight.copy_(prototypes)
    return {"registered": registered, "create_model": direct}


def _isotropic_loss(model, inputs, targets, kind: str, smoothing: float = 0.0):
    """The loss ``dismax train`` trains with (no FPR): the core's loss of E times the T = 1 logits."""
    features = model.forward_head(model.forward_features(inputs), pre_logits=True)
    scaled = model.fc.entropic_scale * model.fc.distance_logits(features)
    if kind == "dismax":
        return dp.dismax_loss(scaled, targets, label_smoothing=smoothing)
    return dp.isomax_loss(scaled, targets, label_smoothing=smoothing)


def _value_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _batch():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 32, 32, generator=generator)
    y = torch.randint(0, CLASSES, (8,), generator=generator)
    np.random.seed(0)  # timm's Mixup draws with numpy
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=CLASSES)
    mixed, soft = mixup(x.clone(), y.clone())
    assert soft.shape == (8, CLASSES) and not torch.equal(mixed, x)
    return x, y, mixed, soft


@pytest.mark.parametrize("kind", KINDS)
def test_timm_stock_losses_train_the_isotropic_loss(kind):
    """nn.CrossEntropyLoss, LabelSmoothingCrossEntropy and SoftTargetCrossEntropy (Mixup/CutMix targets) on the
    training-mode output equal the isotropic loss on the same batch, value and every gradient. In float64: the
    head's fused training path and the reference round differently in float32 (relative 5e-6 on the first
    convolution's gradient), in float64 they agree to about 1e-14, so a tolerance of 1e-10 still catches a wrong
    scale or loss."""
    x, y, mixed, soft = (t.double() if t.is_floating_point() else t for t in _batch())
    cases = [
        (nn.CrossEntropyLoss(), x, y, 0.0),
        (LabelSmoothingCrossEntropy(smoothing=0.1), x, y, 0.1),
        (SoftTargetCrossEntropy(), mixed, soft, 0.0),
    ]
    for how, model in _models(kind).items():
        model.double().train()
        reference = copy.deepcopy(model)
        for criterion, inputs, targets, smoothing in cases:
            loss, grads = _value_and_grads(model, lambda m, c=criterion, i=inputs, t=targets: c(m(i), t))
            expected, expected_grads = _value_and_grads(
                reference, lambda m, i=inputs, t=targets, s=smoothing: _isotropic_loss(m, i, t, kind, s)
            )
            what = f"{how} {type(criterion).__name__}"
            assert torch.allclose(loss, expected, rtol=1e-12, atol=0), what
            assert loss > 0.1, what  # not a degenerate batch
            for name, grad in grads.items():
                assert torch.allclose(grad, expected_grads[name], rtol=1e-10, atol=1e-12), (what, name)
        assert model.fc.weight.grad.abs().sum() > 0


def test_entropic_scale_from_model_kwargs_is_the_loss_scale():
    """``--model-kwargs entropic_scale=5``: cross-entropy of the training output is the loss of 5 z, not of 10 z."""
    x, y, _, _ = _batch()
    for model in _models("isomaxplus", entropic_scale=5).values():
        model.train()
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        z = model.fc.distance_logits(features)
        loss = nn.CrossEntropyLoss()(model.fc(features), y)
        assert torch.allclose(loss, dp.isomax_loss(5 * z, y), rtol=1e-6)
        assert not torch.allclose(loss, dp.isomax_loss(10 * z, y), rtol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_one_optimizer_step_equals_the_isotropic_loss_step(kind):
    """Two SGD-momentum steps of timm's create_optimizer_v2 (weight decay as train.py sets it): with
    LabelSmoothingCrossEntropy on the model output, and with the isotropic loss, the weights end equal
    (in float64, as above)."""
    x, y, _, _ = _batch()
    x = x.double()
    model = _models(kind)["registered"].double().train()
    other = copy.deepcopy(model)
    optimizers = [create_optimizer_v2(m, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4) for m in (model, other)]
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    for _ in range(2):
        for m, optimizer, loss_fn in zip((model, other), optimizers,
                                         (lambda m: criterion(m(x), y), lambda m: _isotropic_loss(m, x, y, kind, 0.1))):
            optimizer.zero_grad()
            loss_fn(m).backward()
            optimizer.step()
    state, expected = model.state_dict(), other.state_dict()
    initial = _models(kind)["registered"].double().state_dict()
    assert not torch.equal(state["fc.weight"], initial["fc.weight"])  # the step moved the prototypes
    for name, value in state.items():
        assert torch.allclose(value, expected[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_returns_the_calibrated_logits(kind):
    x, _, _, _ = _batch()
    for model in _models(kind).values():
        model.eval()
        model.fc.set_temperature(2.0)
        with torch.no_grad():
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            assert torch.allclose(model(x), model.fc.distance_logits(features) / 2.0, rtol=1e-6, atol=1e-6)
            model.train()
            assert torch.allclose(model.fc(features), model.fc.entropic_scale * model.fc.distance_logits(features))


def test_train_py_model_kwargs_parse_like_timm():
    """timm's ParseKwargs (train.py's --model-kwargs) gives numbers, so check_head_options accepts them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs)
    kwargs = parser.parse_args(["--model-kwargs", "entropic_scale=2.5"]).model_kwargs
    assert kwargs == {"entropic_scale": 2.5}
    assert dtimm.create_model("test_resnet", num_classes=3, **kwargs).fc.entropic_scale == 2.5
    with pytest.raises(ValueError, match="entropic_scale"):
        dtimm.create_model("test_resnet", num_classes=3, entropic_scale=-1)
