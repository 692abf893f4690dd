"""``<classifier>.weight`` is the head's prototype matrix: what timm's pretrained loading, parameter-group code
and checkpoints written with the earlier name ``prototypes`` do with it."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import load_pretrained
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from dismax_plugin import DisMaxHead
from dismax_plugin.adapters import timm as dtimm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def registered():
    dtimm.register_timm_models(["test_resnet"])


@pytest.mark.parametrize("num_classes", [5, 7])  # the stock file's class count, and another one
@pytest.mark.parametrize("how", ["registered", "create_model"])
def test_stock_linear_weights_never_become_prototypes(ce_weights, same_backbone, num_classes, how):
    """A stock checkpoint (fc.weight + fc.bias of an nn.Linear) as pretrained weights: the backbone is loaded,
    the head starts afresh whether or not the class count is the file's."""
    directory, state = ce_weights
    overlay = dict(file=str(directory / "ce.pth"))
    torch.manual_seed(11)
    if how == "registered":
        model = timm.create_model("test_resnet_dismax", pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay)  # fmt: skip
    else:
        model = dtimm.create_model("test_resnet", pretrained=True, num_classes=num_classes,
                                   pretrained_cfg_overlay=overlay)  # fmt: skip
    assert same_backbone(model, state) and isinstance(model.fc, DisMaxHead)
    assert model.fc.weight.shape == (num_classes, state["fc.weight"].shape[1])
    if num_classes == 5:
        assert not torch.equal(model.fc.weight, state["fc.weight"])
    assert "fc.bias" not in model.state_dict()


def test_timm_load_pretrained_into_a_converted_model(ce_weights, same_backbone):
    """timm's own load_pretrained on a converted model: a classifier of another size is dropped (the head keeps
    its prototypes), as for stock models; one of the same size does not fit the head and fails loudly."""
    directory, state = ce_weights
    model = timm.create_model("test_resnet_dismax", num_classes=7)
    before = model.fc.weight.detach().clone()
    cfg = dict(model.pretrained_cfg, file=str(directory / "ce.pth"), num_classes=5)
    load_pretrained(model, pretrained_cfg=cfg, num_classes=7)
    assert same_backbone(model, state) and torch.equal(model.fc.weight, before)
    same = timm.create_model("test_resnet_dismax", num_classes=5)
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_pretrained(same, pretrained_cfg=dict(cfg), num_classes=5)


def test_converted_checkpoint_for_another_class_count_keeps_the_backbone(tmp_path, same_backbone):
    """pretrained weights of a converted model: whole for the same class count; for another one (or train.py's
    --pretrained-path, which passes num_classes=-1 to force a new head) the backbone only."""
    trained = dtimm.create_model("test_resnet", head="dismax", num_classes=4)
    trained.fc.set_temperature(3.0)
    trained.fc.calibrate_scores(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    torch.save(trained.state_dict(), tmp_path / "dismax.pth")
    state = trained.state_dict()
    file = str(tmp_path / "dismax.pth")
    whole = timm.create_model("test_resnet_dismax", pretrained=True, num_classes=4,
                              pretrained_cfg_overlay=dict(file=file))  # fmt: skip
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in state.items())
    for num_classes, overlay in ((6, dict(file=file)), (4, dict(file=file, num_classes=-1))):
        model = timm.create_model("test_resnet_dismax", pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay)  # fmt: skip
        assert same_backbone(model, state) and model.fc.num_classes == num_classes
        assert float(model.fc.temperature) == 1.0 and model.fc.calibration_size == 0
        assert not torch.equal(model.fc.weight[:4], state["fc.weight"])


def _groups_of(model, groups) -> dict[str, tuple[float, float]]:
    """``{parameter name: (weight_decay, lr_scale)}`` of timm's parameter groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g.get("lr_scale", 1.0)) for g in groups for p in g["params"]}


def test_parameter_groups_see_the_head_weight():
    """timm's weight-decay and layer-decay grouping treat fc.weight as the stock classifier's weight; the scalar
    distance_scale gets no weight decay; name lists that match 'fc.weight' apply to the prototypes."""
    stock = timm.create_model("test_resnet", num_classes=5)
    model = timm.create_model("test_resnet_isomaxplus", num_classes=5)
    for build in (
        lambda m: param_groups_weight_decay(m, 0.05),
        lambda m: param_groups_layer_decay(m, 0.05, layer_decay=0.7),
    ):
        expected, groups = _groups_of(stock, build(stock)), _groups_of(model, build(model))
        assert groups["fc.weight"] == expected["fc.weight"] and groups["fc.weight"][0] == 0.05
        assert groups["fc.distance_scale"][0] == 0.0
        assert all(groups[n] == v for n, v in expected.items() if n != "fc.bias")
    layered = _groups_of(model, param_groups_layer_decay(model, 0.05, layer_decay=0.7))
    assert layered["fc.weight"][1] == 1.0 > layered["conv1.0.weight"][1]  # the head is the last layer
    excluded = _groups_of(model, param_groups_weight_decay(model, 0.05, no_weight_decay_list=["fc.weight"]))
    assert excluded["fc.weight"][0] == 0.0
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    assert any(p is model.fc.weight for g in optimizer.param_groups for p in g["params"] if g["weight_decay"] > 0)


def test_checkpoints_with_prototypes_still_load(tmp_path, x):
    """A train.py-style checkpoint and a plain state dict written when the matrix was called ``prototypes``
    load with timm's create_model(checkpoint_path=) and with dtimm.create_model."""
    model = dtimm.create_model("test_resnet", head="isomaxplus", num_classes=3).eval()
    model.fc.set_temperature(0.8)
    old = {("fc.prototypes" if k == "fc.weight" else k): v for k, v in model.state_dict().items()}
    assert "fc.weight" not in old
    torch.save({"state_dict": old, "epoch": 2, "arch": "test_resnet_isomaxplus"}, tmp_path / "last.pth.tar")
    torch.save(old, tmp_path / "old.pth")
    expected = model(x)
    for path in (tmp_path / "last.pth.tar", tmp_path / "old.pth"):
        for loaded in (
            timm.create_model("test_resnet_isomaxplus", num_classes=3, checkpoint_path=str(path)),
            dtimm.create_model("test_resnet", head="isomaxplus", num_classes=3, checkpoint_path=path),
        ):
            assert torch.equal(loaded.eval()(x), expected) and float(loaded.fc.temperature) == pytest.approx(0.8)
