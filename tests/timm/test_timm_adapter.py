"""timm adapter: creation, the timm protocol (and timm's feature model), conversion, bad input, compile."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch import nn

from dismax_plugin import DisMaxHead, DisMaxLoss, IsoMaxHead, IsoMaxPlusHead, PrototypeHead
from dismax_plugin.adapters import timm as dtimm

HEAD_TYPES = {"dismax": DisMaxHead, "isomaxplus": IsoMaxPlusHead, "isomax": IsoMaxHead, "linear": nn.Linear}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- creation
@pytest.mark.parametrize("kind", ["dismax", "isomaxplus", "isomax", "linear"])
def test_create_model_heads(kind, x):
    model = dtimm.create_model("test_convnext", head=kind, num_classes=4)
    head = model.get_classifier()
    assert type(head) is HEAD_TYPES[kind] and model.head.fc is head
    assert isinstance(model, timm.models.ConvNeXt) and model.num_classes == 4
    assert dtimm.head_kind(model) == kind
    assert dtimm.get_head(model) is (None if kind == "linear" else head)
    expected_arch = "test_convnext" if kind == "linear" else f"test_convnext_{kind}"
    assert model.pretrained_cfg["architecture"] == expected_arch and model.default_cfg is model.pretrained_cfg
    assert model(x).shape == (2, 4)


def test_linear_is_the_stock_model():
    torch.manual_seed(0)
    stock = timm.create_model("test_resnet", num_classes=3)
    torch.manual_seed(0)
    twin = dtimm.create_model("test_resnet", head="linear", num_classes=3)
    assert type(twin) is type(stock)
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), twin.state_dict().values()))


def test_timm_kwargs_pass_through():
    vit = dtimm.create_model("test_vit", head="isomaxplus", num_classes=3, img_size=48, in_chans=1, drop_rate=0.25)
    assert vit(torch.randn(2, 1, 48, 48)).shape == (2, 3)
    assert vit.patch_embed.img_size == (48, 48) and vit.head_drop.p == 0.25
    assert isinstance(vit.head, IsoMaxPlusHead) and vit.head.in_features == vit.num_features


def test_protocol_after_conversion(x):
    torch.manual_seed(0)
    stock = timm.create_model("test_convnext", num_classes=4).eval()
    model = dtimm.convert_timm_model(copy.deepcopy(stock), head="dismax").eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(features, stock.forward_features(x))
        pooled = model.forward_head(features, pre_logits=True)
        assert torch.equal(pooled, stock.forward_head(features, pre_logits=True))
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(model.get_classifier()(pooled), model(x))


def test_reset_classifier_keeps_the_kind(x):
    model = dtimm.create_model("test_resnet", head="isomaxplus", num_classes=4)
    old = model.fc
    model.get_classifier().calibrate_scores(torch.randn(5, 4))
    model.reset_classifier(7)
    assert isinstance(model.fc, IsoMaxPlusHead) and model.fc is not old
    assert model.num_classes == 7 and model.fc.num_classes == 7 and model.fc.calibration_size == 0
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)  # timm: no classifier, features out
    assert isinstance(model.fc, nn.Identity) and model(x).shape == (2, model.num_features)
    assert dtimm.head_kind(model) == "isomaxplus"
    model.reset_classifier(3, global_pool="max")
    assert isinstance(model.fc, IsoMaxPlusHead) and model.global_pool.pool_type == "max"
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        model.reset_classifier(1)
    assert model.num_classes == 3 and model.fc.num_classes == 3  # unchanged


@pytest.mark.parametrize("kind", ["dismax", "isomax"])
def test_num_classes_zero_is_timms_feature_model(kind, x):
    stock = timm.create_model("test_resnet", num_classes=0).eval()
    model = dtimm.create_model("test_resnet", head=kind, num_classes=0).eval()
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == stock(x).shape == (2, model.num_features)
    assert dtimm.head_kind(model) == kind and dtimm.get_head(model) is None
    assert model.pretrained_cfg["architecture"] == f"test_resnet_{kind}"
    model.reset_classifier(4)  # the head of the model's kind comes back
    assert type(model.fc) is HEAD_TYPES[kind] and model(x).shape == (2, 4)
    unpooled = dtimm.create_model("test_resnet", head=kind, num_classes=0, global_pool="").eval()
    assert unpooled(x).shape == stock.forward_features(x).shape
    features = dtimm.create_model("test_resnet", head=kind, features_only=True).eval()
    reference = timm.create_model("test_resnet", features_only=True).eval()
    assert [f.shape for f in features(x)] == [f.shape for f in reference(x)]


def test_convert_timm_model_kinds(x):
    model = timm.create_model("test_resnet", num_classes=3)
    assert dtimm.convert_timm_model(model, "isomaxplus") is model
    prototypes = model.fc.weight
    dtimm.convert_timm_model(model, "isomaxplus")  # same kind: no-op
    assert model.fc.weight is prototypes
    dtimm.convert_timm_model(model, "dismax")  # another kind: fresh head
    assert type(model.fc) is DisMaxHead and model.fc.num_classes == 3
    dtimm.convert_timm_model(model, "linear")
    assert type(model) is timm.models.ResNet and type(model.fc) is nn.Linear
    assert model.pretrained_cfg["architecture"] == "test_resnet" and dtimm.head_kind(model) == "linear"
    assert model(x).shape == (2, 3)


def test_convert_follows_device_and_dtype():
    model = timm.create_model("test_resnet", num_classes=3).to(torch.float64)
    dtimm.convert_timm_model(model, "dismax")
    assert model.fc.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    meta = dtimm.create_model("resnet18", head="isomax", num_classes=3, device="meta")
    assert meta.fc.weight.is_meta


def test_conv2d_head_matches_the_flat_head():
    conv = dtimm.Conv2dDisMaxHead(8, 3)
    flat = DisMaxHead(8, 3)
    flat.load_state_dict(conv.state_dict())
    features = torch.randn(4, 8)
    out = conv(features[:, :, None, None])
    assert out.shape == (4, 3, 1, 1) and torch.allclose(out[:, :, 0, 0], flat(features))
    spatial = torch.randn(2, 8, 2, 3)
    per_position = flat(spatial.permute(0, 2, 3, 1).reshape(-1, 8)).reshape(2, 2, 3, 3).permute(0, 3, 1, 2)
    assert torch.allclose(conv(spatial), per_position)
    assert conv(spatial, pre_logits=True) is spatial
    assert isinstance(conv, PrototypeHead) and conv.kind == "dismax"


def test_multi_classifier_models_get_every_head():
    model = dtimm.create_model("deit_tiny_distilled_patch16_224", head="dismax", num_classes=3, img_size=32)
    assert isinstance(model.head, DisMaxHead) and isinstance(model.head_dist, DisMaxHead)
    assert dtimm.get_head(model) is model.head
    model.reset_classifier(4)
    assert isinstance(model.head_dist, DisMaxHead) and model.head_dist.num_classes == 4


def test_deepcopy_pickle_and_ema_keep_the_conversion(x):
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    model.fc.set_temperature(2.0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert isinstance(clone, timm.models.ResNet) and clone.fc is not model.fc
        assert torch.equal(clone(x), model(x)) and dtimm.head_kind(clone) == "dismax"
        clone.reset_classifier(5)
        assert isinstance(clone.fc, DisMaxHead) and model.fc.num_classes == 3
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    ema.update(model, step=1)
    assert isinstance(ema.module.fc, DisMaxHead)


def test_timm_training_utilities_accept_the_head():
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.fc.weight) in decayed and id(model.fc.distance_scale) not in decayed


# --------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown timm architecture 'resnet_18'.*resnet18"):
        dtimm.create_model("resnet_18")
    with pytest.raises(ValueError, match=r"Unknown head 'softmax', expected one of \['dismax', 'isomax'"):
        dtimm.create_model("test_resnet", head="softmax")
    for bad in (1, -3):
        with pytest.raises(ValueError, match="num_classes must be >= 2"):
            dtimm.create_model("test_resnet", num_classes=bad)
    for bad in (2.5, True, "10"):
        with pytest.raises(TypeError, match="num_classes must be an integer"):
            dtimm.create_model("test_resnet", num_classes=bad)
    with pytest.raises(FileNotFoundError, match="checkpoint_path '.*missing.pth' does not exist"):
        dtimm.create_model("test_resnet", num_classes=3, checkpoint_path=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="file '.*missing.safetensors' does not exist"):
        dtimm.create_model(
            "test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.safetensors"))
        )
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint_path '.*garbage.pth' could not be read"):
        dtimm.create_model("test_resnet", num_classes=3, checkpoint_path=tmp_path / "garbage.pth")
    with pytest.raises(ValueError, match=r"create_model\('test_resnet', head='isomax'\)"):
        dtimm.create_model("test_resnet_isomax")
    with pytest.raises(ValueError, match="Invalid pretrained tag"):
        dtimm.create_model("test_resnet.no_such_tag")
    with pytest.raises(ValueError, match=r"'local-dir:' names are not supported here; use load_model\(\)"):
        dtimm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    with pytest.raises(TypeError, match="model_name must be"):
        dtimm.create_model(None)


def test_convert_bad_input():
    with pytest.raises(TypeError, match="not a timm model"):
        dtimm.convert_timm_model(nn.Sequential(nn.Linear(4, 3)), "dismax")
    with pytest.raises(TypeError, match="must be a timm model"):
        dtimm.convert_timm_model("resnet18", "dismax")
    with pytest.raises(ValueError, match="Unknown head"):
        dtimm.convert_timm_model(timm.create_model("test_resnet"), "cosine")
    with pytest.raises(ValueError, match=r"num_classes=0\); create it with num_classes >= 2"):
        dtimm.convert_timm_model(timm.create_model("test_resnet", num_classes=0), "dismax")
    with pytest.raises(ValueError, match="needs num_classes >= 2"):
        dtimm.convert_timm_model(timm.create_model("test_resnet", num_classes=1), "dismax")
    model = timm.create_model("test_resnet", num_classes=3)
    model.fc = nn.Sequential(nn.Linear(model.num_features, 3))
    with pytest.raises(TypeError, match="expected an nn.Linear or a 1x1 nn.Conv2d"):
        dtimm.convert_timm_model(model, "dismax")


# --------------------------------------------------------------------------- compile / trace / export
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize(("arch", "kwargs"), [("test_resnet", {}), ("test_vit", {"img_size": 32}), ("resnetv2_18", {})])
def test_trace_and_export(arch, kwargs, x):
    model = dtimm.create_model(arch, head="dismax", num_classes=3, **kwargs).eval()
    model.get_classifier().set_temperature(2.0)
    expected = model(x)
    traced = torch.jit.trace(model, x)
    assert torch.allclose(traced(x), expected, atol=1e-5)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), expected, atol=1e-5)


def test_compiled_training_step_matches_eager(x):
    """Dynamo traces the converted model, head and loss as one graph; loss and gradients equal eager's."""
    torch.manual_seed(0)
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    model.fc.set_temperature(0.5)
    twin = copy.deepcopy(model)
    targets = torch.tensor([0, 2])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = DisMaxLoss()(compiled(x), targets)
    loss.backward()
    eager = DisMaxLoss()(twin(x), targets)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6)
    for (name, param), reference in zip(model.named_parameters(), twin.parameters()):
        assert param.grad is not None and reference.grad is not None, name
        scale = reference.grad.abs().max()
        assert torch.allclose(param.grad, reference.grad, rtol=1e-3, atol=1e-4 * scale), name
    assert model.fc.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_compile_inductor_cpu(x):
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    compiled = torch.compile(model)
    out = compiled(x)
    F.cross_entropy(10 * out, torch.tensor([0, 2])).backward()
    assert model.fc.weight.grad.abs().sum() > 0
    model.eval()
    assert torch.allclose(compiled(x), model(x), atol=1e-4)
