"""convert(): swap the final nn.Linear of torchvision models and plain MLPs for an isotropic head."""

import pytest
import torch
import torchvision  # a declared dependency: a broken install must fail here, not skip
from torch import nn

from dismax_plugin import HEADS, DisMaxHead, convert, dismax_loss, find_classifier, heads_of


def mlp(dtype=None, device=None):
    dd = {"dtype": dtype, "device": device}
    return nn.Sequential(nn.Linear(6, 16, **dd), nn.ReLU(), nn.Linear(16, 12, **dd), nn.ReLU(),
                         nn.Linear(12, 5, **dd))


def test_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    assert convert(model, head="dismax") is model
    assert type(model.fc) is DisMaxHead
    assert (model.fc.in_features, model.fc.num_classes) == (512, 10)
    model.eval()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert [name for name, _ in heads_of(model)] == ["fc"]


@pytest.mark.parametrize("classifier", [None, "classifier.3"])
def test_mobilenet_v3_small_last_classifier_layer(classifier):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=7)
    old_first = model.classifier[0]
    convert(model, head="isomaxplus", classifier=classifier)
    assert model.classifier[0] is old_first and isinstance(model.classifier[0], nn.Linear)
    head = model.classifier[3]
    assert type(head).__name__ == "IsoMaxPlusHead" and (head.in_features, head.num_classes) == (1024, 7)
    if classifier is None:
        model.eval()
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_explicit_classifier_path_replaces_that_layer():
    model = mlp()
    convert(model, head="isomax", classifier="2")
    assert type(model[2]).__name__ == "IsoMaxHead" and (model[2].in_features, model[2].num_classes) == (16, 12)
    assert isinstance(model[4], nn.Linear)
    assert model(torch.randn(3, 6)).shape == (3, 5)


@pytest.mark.parametrize("head", list(HEADS))
def test_mlp_keeps_sizes_dtype_and_trains(head):
    model = mlp(dtype=torch.float64)
    convert(model, head=head)
    new = model[4]
    assert type(new) is HEADS[head] and (new.in_features, new.num_classes) == (12, 5)
    assert new.weight.dtype == torch.float64
    logits = model(torch.randn(4, 6, dtype=torch.float64))
    assert logits.dtype == torch.float64 and logits.shape == (4, 5)
    dismax_loss(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert model[0].weight.grad is not None and new.weight.grad is not None


def test_device_is_kept():
    model = mlp(device="meta")
    convert(model)
    assert all(t.device.type == "meta" for t in [*model[4].parameters(), *model[4].buffers()])


def test_a_bare_linear_becomes_a_head():
    linear = nn.Linear(8, 3, dtype=torch.float64)
    head = convert(linear, head="dismax")
    assert isinstance(head, DisMaxHead) and head.weight.dtype == torch.float64
    assert (head.in_features, head.num_classes) == (8, 3)


def test_default_is_dismax_and_find_classifier_reports_the_path():
    model = mlp()
    path, linear = find_classifier(model)
    assert path == "4" and linear is model[4]
    convert(model)
    assert isinstance(model[4], DisMaxHead)
    assert heads_of(model) == [("4", model[4])]


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, error, argument", [
    (lambda: convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), ValueError, "model .* has no nn.Linear"),
    (lambda: convert(mlp(), head="softmax"), ValueError, "head"),
    (lambda: convert(mlp(), classifier="9"), ValueError, "classifier='9' is not a submodule"),
    (lambda: convert(mlp(), classifier="1"), TypeError, "classifier='1' must name an nn.Linear"),
    (lambda: convert(mlp(), classifier=4), TypeError, "classifier must be a dotted attribute path"),
    (lambda: convert("resnet18"), TypeError, "model must be a torch.nn.Module"),
])
def test_bad_convert_arguments(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


def test_unknown_head_lists_the_choices():
    with pytest.raises(ValueError) as info:
        convert(mlp(), head="softmax")
    assert all(name in str(info.value) for name in HEADS)
