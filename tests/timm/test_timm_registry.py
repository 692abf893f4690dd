"""Registration: nothing at import (tested in a fresh process in test_timm_weights.py), explicit
``register_timm_models``, timm's ``save_for_hf``/``local-dir:`` round trip, and the one architecture check."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch

from dismax_plugin import DisMaxHead, IsoMaxHead, IsoMaxPlusHead
from dismax_plugin.adapters import timm as dtimm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry(x, ce_weights, same_backbone):
    names = {"test_resnet_dismax", "test_resnet_isomaxplus", "test_resnet_isomax"}
    if not names <= set(timm.list_models("test_resnet*")):  # another test of this process may have asked
        assert sorted(dtimm.register_timm_models(["test_resnet"])) == sorted(names)
    assert names <= set(timm.list_models("test_resnet*"))
    assert dtimm.register_timm_models(["test_resnet", "resnet10t.c3_in1k"], ["dismax"]) in ([], ["resnet10t_dismax"])
    model = timm.create_model("test_resnet_isomaxplus", num_classes=3)
    assert isinstance(model.fc, IsoMaxPlusHead) and model(x).shape == (2, 3)
    assert dtimm.registered_name("test_resnet", "DisMax") == "test_resnet_dismax"
    directory, state = ce_weights
    overlay = dict(file=str(directory / "ce.pth"))
    loaded = timm.create_model("test_resnet_dismax", pretrained=True, num_classes=7, pretrained_cfg_overlay=overlay)
    assert same_backbone(loaded, state) and loaded.fc.num_classes == 7
    tagged = timm.create_model("resnet10t_dismax.c3_in1k", num_classes=3)
    assert tagged.pretrained_cfg["tag"] == "c3_in1k" and isinstance(tagged.fc, DisMaxHead)
    assert "dismax_plugin.adapters.timm_isotropic" in sys.modules
    assert not any(n.endswith("_dismax") for n in dtimm.__all__)


def test_register_later_architectures(x):
    @timm.models.register_model
    def dismax_test_custom_net(pretrained=False, **kwargs):
        cfg = kwargs.pop("pretrained_cfg", None) or dict(classifier="fc", num_classes=10)
        return timm.models.build_model_with_cfg(
            timm.models.ResNet,
            "dismax_test_custom_net",
            pretrained,
            pretrained_cfg=cfg,
            block=timm.models.resnet.BasicBlock,
            layers=(1, 1, 1, 1),
            **kwargs,
        )

    assert not timm.is_model("dismax_test_custom_net_isomax")
    assert dtimm.register_timm_models(["dismax_test_custom_net"], ["isomax"]) == ["dismax_test_custom_net_isomax"]
    assert dtimm.register_timm_models(["dismax_test_custom_net"], ["isomax"]) == []  # idempotent
    model = timm.create_model("dismax_test_custom_net_isomax", num_classes=3)
    assert isinstance(model.fc, IsoMaxHead) and model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="Unknown timm architecture"):
        dtimm.register_timm_models(["no_such_net"])


def test_timm_save_for_hf_and_local_dir(tmp_path, x):
    dtimm.register_timm_models(["test_resnet"])
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    model.fc.set_temperature(1.7)
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architecture"] == "test_resnet_dismax"
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert torch.equal(again(x), model(x)) and float(again.fc.temperature) == pytest.approx(1.7)


def test_check_architecture():
    assert dtimm.check_architecture("resnet18") == "resnet18"
    assert dtimm.check_architecture("resnet18.a1_in1k") == "resnet18.a1_in1k"
    with pytest.raises(ValueError, match=r"Unknown timm architecture 'resnet_18'.*'resnet18'"):
        dtimm.check_architecture("resnet_18")
    with pytest.raises(ValueError, match=r"create_model\('resnet18', head='isomaxplus'\)"):
        dtimm.check_architecture("resnet18_isomaxplus")  # whether registered or not
    with pytest.raises(TypeError, match="model_name must be a timm architecture name"):
        dtimm.check_architecture(18)
    with pytest.raises(ValueError, match="Unknown head"):
        dtimm.register_timm_models(["resnet18"], ["cosface"])
