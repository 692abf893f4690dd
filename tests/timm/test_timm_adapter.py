"""timm adapter: creation, the timm protocol, local weights, registry, save/load, compile/trace/export."""

from __future__ import annotations

import copy
import io
import json
import socket
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch import nn

from dismax_plugin import DisMaxHead, DisMaxLoss, IsoMaxHead, IsoMaxPlusHead, PrototypeHead
from dismax_plugin.adapters import timm as dtimm

HEAD_TYPES = {"dismax": DisMaxHead, "isomaxplus": IsoMaxPlusHead, "isomax": IsoMaxHead, "linear": nn.Linear}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ce_weights(tmp_path_factory):
    """A stock (cross-entropy) test_resnet with 5 classes, saved as .safetensors and .pth."""
    directory = tmp_path_factory.mktemp("ce")
    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=5).state_dict()
    safetensors.torch.save_file(state, str(directory / "ce.safetensors"))
    torch.save(state, directory / "ce.pth")
    return directory, state


def _same_backbone(model, state):
    current = model.state_dict()
    return all(torch.equal(current[k], v) for k, v in state.items() if not k.startswith("fc."))


class _NoNetwork:
    """Records (and refuses) every outgoing socket connection while active."""

    def __init__(self, monkeypatch):
        self.attempts = []

        def refuse(sock, address, *args):
            self.attempts.append(address)
            raise OSError(f"network access attempted: {address}")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)
        monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))


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
    model.get_classifier().set_thresholds({0.95: -1.0})
    model.reset_classifier(7)
    assert isinstance(model.fc, IsoMaxPlusHead) and model.fc is not old
    assert model.num_classes == 7 and model.fc.num_classes == 7 and model.fc.stored_score is None
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)  # timm: no classifier, features out
    assert isinstance(model.fc, nn.Identity) and model(x).shape == (2, model.num_features)
    assert dtimm.head_kind(model) == "isomaxplus"
    model.reset_classifier(3, global_pool="max")
    assert isinstance(model.fc, IsoMaxPlusHead) and model.global_pool.pool_type == "max"
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        model.reset_classifier(1)
    assert model.num_classes == 3 and model.fc.num_classes == 3  # unchanged


def test_convert_timm_model_kinds(x):
    model = timm.create_model("test_resnet", num_classes=3)
    assert dtimm.convert_timm_model(model, "isomaxplus") is model
    prototypes = model.fc.prototypes
    dtimm.convert_timm_model(model, "isomaxplus")  # same kind: no-op
    assert model.fc.prototypes is prototypes
    dtimm.convert_timm_model(model, "dismax")  # another kind: fresh head
    assert type(model.fc) is DisMaxHead and model.fc.num_classes == 3
    dtimm.convert_timm_model(model, "linear")
    assert type(model) is timm.models.ResNet and type(model.fc) is nn.Linear
    assert model.pretrained_cfg["architecture"] == "test_resnet" and dtimm.head_kind(model) == "linear"
    assert model(x).shape == (2, 3)


def test_convert_follows_device_and_dtype():
    model = timm.create_model("test_resnet", num_classes=3).to(torch.float64)
    dtimm.convert_timm_model(model, "dismax")
    assert model.fc.prototypes.dtype == torch.float64
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    meta = dtimm.create_model("resnet18", head="isomax", num_classes=3, device="meta")
    assert meta.fc.prototypes.is_meta


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
    assert id(model.fc.prototypes) in decayed and id(model.fc.distance_scale) not in decayed


# --------------------------------------------------------------------------- local weights, no network
@pytest.mark.parametrize("file", ["ce.safetensors", "ce.pth"])
@pytest.mark.parametrize("num_classes", [10, 5, 1000])
def test_pretrained_local_file(ce_weights, file, num_classes):
    directory, state = ce_weights
    model = dtimm.create_model(
        "test_resnet",
        head="dismax",
        num_classes=num_classes,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(directory / file)),
    )
    assert _same_backbone(model, state)
    assert isinstance(model.fc, DisMaxHead) and model.fc.num_classes == num_classes
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept alive


def test_checkpoint_path_stock_and_converted(ce_weights, tmp_path, x):
    directory, state = ce_weights
    model = dtimm.create_model("test_resnet", head="isomax", num_classes=10, checkpoint_path=directory / "ce.pth")
    assert _same_backbone(model, state) and model.fc.num_classes == 10
    linear = dtimm.create_model("test_resnet", head="linear", num_classes=5, checkpoint_path=directory / "ce.pth")
    assert torch.equal(linear.fc.weight, state["fc.weight"])  # the stock classifier fits: kept

    trained = dtimm.create_model("test_resnet", head="dismax", num_classes=5)
    trained.fc.set_thresholds({0.95: -0.5})
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "trained.pth.tar")
    for kwargs in (
        dict(checkpoint_path=tmp_path / "trained.pth.tar"),
        dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "trained.pth.tar"))),
    ):
        resumed = dtimm.create_model("test_resnet", head="dismax", num_classes=5, **kwargs).eval()
        assert torch.equal(resumed(x), trained.eval()(x))
        assert resumed.fc.stored_thresholds == {0.95: -0.5}
    with pytest.raises(ValueError, match="do not fit"):
        dtimm.create_model("test_resnet", head="isomax", num_classes=5, checkpoint_path=tmp_path / "trained.pth.tar")


def test_checkpoint_of_another_architecture_is_rejected(ce_weights):
    directory, _ = ce_weights
    with pytest.raises(ValueError, match="do not fit 'test_convnext'"):
        dtimm.create_model("test_convnext", num_classes=3, checkpoint_path=directory / "ce.pth")


def test_no_network(monkeypatch, ce_weights):
    guard = _NoNetwork(monkeypatch)
    dtimm.create_model("resnet18", head="dismax", num_classes=3)
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file="):
        dtimm.create_model("resnet18", head="dismax", num_classes=3, pretrained=True)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        timm.create_model("resnet18_dismax", pretrained=True)
    with pytest.raises(ValueError, match="sources are not supported"):
        dtimm.create_model("hf-hub:timm/resnet18.a1_in1k", pretrained=True)
    directory, _ = ce_weights
    dtimm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(directory / "ce.pth")))
    assert guard.attempts == []


# --------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown timm architecture 'resnet_18'.*resnet18"):
        dtimm.create_model("resnet_18")
    with pytest.raises(ValueError, match=r"Unknown head 'softmax', expected one of \['dismax', 'isomax'"):
        dtimm.create_model("test_resnet", head="softmax")
    for bad in (1, 0, -3):
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
    with pytest.raises(ValueError, match="features_only"):
        dtimm.create_model("test_resnet", features_only=True)
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


# --------------------------------------------------------------------------- registry
def test_registry(x, ce_weights):
    names = {"test_resnet_dismax", "test_resnet_isomaxplus", "test_resnet_isomax"}
    assert names <= set(timm.list_models("test_resnet*"))
    model = timm.create_model("test_resnet_isomaxplus", num_classes=3)
    assert isinstance(model.fc, IsoMaxPlusHead) and model(x).shape == (2, 3)
    assert dtimm.registered_name("test_resnet", "DisMax") == "test_resnet_dismax"
    directory, state = ce_weights
    overlay = dict(file=str(directory / "ce.pth"))
    loaded = timm.create_model("test_resnet_dismax", pretrained=True, num_classes=7, pretrained_cfg_overlay=overlay)
    assert _same_backbone(loaded, state) and loaded.fc.num_classes == 7
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
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    model.fc.set_temperature(1.7)
    timm.models.save_for_hf(model, tmp_path / "hf", safe_serialization=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architecture"] == "test_resnet_dismax"
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert torch.equal(again(x), model(x)) and float(again.fc.temperature) == pytest.approx(1.7)


def test_import_cost_and_load_without_training_code(tmp_path, x):
    """In a fresh interpreter: the core does not import timm, the adapter adds little to ``import timm``,
    and load_model rebuilds a saved model with one call."""
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    dtimm.save_model(model, tmp_path / "m")
    torch.save({"x": x, "logits": model(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        import dismax_plugin
        assert "timm" not in sys.modules, "the core must not import timm"
        import timm
        start = time.perf_counter()
        from dismax_plugin.adapters import timm as dtimm
        print(f"ADAPTER_IMPORT_S={{time.perf_counter() - start:.3f}}")
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = dtimm.load_model({str(tmp_path / "m")!r}, device="cpu")
        assert torch.allclose(model(io["x"]), io["logits"], atol=1e-6)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seconds = float(result.stdout.split("ADAPTER_IMPORT_S=")[1].split()[0])
    assert seconds < 1.5, seconds  # measured ~0.03 s (timm itself: ~3 s)


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["dismax", "isomax", "linear"])
def test_save_load_round_trip(kind, tmp_path, x):
    model = dtimm.create_model("test_vit", head=kind, num_classes=4, img_size=32).eval()
    if kind != "linear":
        model.head.set_temperature(0.8)
        model.head.set_thresholds({0.95: -1.5, 0.99: -2.5, 0.9: -1.0})
    metadata = {"preprocessing": {"input_size": [3, 32, 32], "mean": [0.5] * 3}, "class_names": list("abcd")}
    directory = dtimm.save_model(model, tmp_path / "new" / "dir", metadata=metadata)
    assert sorted(p.name for p in directory.iterdir()) == [dtimm.CONFIG_NAME, dtimm.WEIGHTS_NAME]
    info = dtimm.read_metadata(directory)
    assert info["metadata"] == metadata and info["head"] == kind and info["num_classes"] == 4
    assert info["architecture"] == "test_vit" and info["model_args"]["img_size"] == [32, 32]
    if kind != "linear":
        assert info["temperature"] == pytest.approx(0.8) and info["threshold_score"] == model.head.default_score
        assert info["thresholds"] == {"0.95": -1.5, "0.99": -2.5, "0.9": -1.0}

    loaded = dtimm.load_model(directory, device=torch.device("cpu"))
    assert not loaded.training and loaded.dismax_metadata == info
    assert dtimm.head_kind(loaded) == kind and type(loaded.head) is HEAD_TYPES[kind]
    assert torch.equal(loaded(x), model(x))
    if kind != "linear":
        assert loaded.head.stored_thresholds == model.head.stored_thresholds
        assert float(loaded.head.temperature) == pytest.approx(0.8)
    assert dtimm.read_metadata(directory / dtimm.CONFIG_NAME) == info  # the file itself is accepted too


def test_save_trained_compiled_wrapper(tmp_path, x):
    model = dtimm.create_model("test_resnet", head="isomaxplus", num_classes=3)
    loss = DisMaxLoss()(model(x), torch.tensor([0, 1]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    compiled = torch.compile(model)  # not run: only the wrapper is saved
    dtimm.save_model(compiled, tmp_path / "m")
    assert torch.equal(dtimm.load_model(tmp_path / "m")(x), model.eval()(x))


def test_save_bad_input(tmp_path):
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    with pytest.raises(ValueError, match="metadata must be JSON-serializable"):
        dtimm.save_model(model, tmp_path / "a", metadata={"x": torch.ones(1)})
    with pytest.raises(ValueError, match="metadata must be JSON-serializable"):
        dtimm.save_model(model, tmp_path / "a", metadata={"x": float("nan")})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        dtimm.save_model(model, tmp_path / "a", metadata=[1, 2])
    with pytest.raises(TypeError, match="not a timm model"):
        dtimm.save_model(nn.Linear(3, 2), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory"):
        dtimm.save_model(model, tmp_path / "file")
    model.reset_classifier(0)
    with pytest.raises(ValueError, match="num_classes=0"):
        dtimm.save_model(model, tmp_path / "b")


@pytest.fixture
def saved(tmp_path):
    dtimm.save_model(dtimm.create_model("test_resnet", head="dismax", num_classes=3), tmp_path / "m")
    return tmp_path / "m"


def _edit_config(directory, **changes):
    config = json.loads((directory / dtimm.CONFIG_NAME).read_text())
    config.update(changes)
    (directory / dtimm.CONFIG_NAME).write_text(json.dumps(config))


def test_load_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dtimm.load_model(tmp_path / "nowhere")
    (saved / dtimm.WEIGHTS_NAME).rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors' is missing"):
        dtimm.load_model(saved)
    (saved / dtimm.CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="dismax_model.json' is missing"):
        dtimm.read_metadata(saved)
    with pytest.raises(ValueError, match="is a file"):
        dtimm.load_model(tmp_path / "weights")


def test_load_corrupt_files(saved):
    weights = saved / dtimm.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dtimm.load_model(saved)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dtimm.load_model(saved)
    (saved / dtimm.CONFIG_NAME).write_text('{"format": "dismax-plugin/timm", "head": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        dtimm.load_model(saved)
    (saved / dtimm.CONFIG_NAME).write_text('{"architecture": "resnet18"}')
    with pytest.raises(ValueError, match="not written by"):
        dtimm.load_model(saved)


def test_load_bad_metadata(saved):
    _edit_config(saved, head="cosface")
    with pytest.raises(ValueError, match=r"Unknown head 'cosface'.*expected one of"):
        dtimm.load_model(saved)
    _edit_config(saved, head="isomax")  # the weights hold a DisMax head (distance_scale)
    with pytest.raises(ValueError, match="do not fit test_resnet with a isomax head"):
        dtimm.load_model(saved)
    _edit_config(saved, head="dismax", architecture="no_such_net")
    with pytest.raises(ValueError, match="'no_such_net'.*not a timm"):
        dtimm.load_model(saved)
    _edit_config(saved, architecture="test_resnet", num_classes=1)
    with pytest.raises(ValueError, match="num_classes .* must be an integer >= 2"):
        dtimm.load_model(saved)


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


def test_compile_training_step_full_graph(x):
    """Dynamo traces the converted model, head and loss as one graph (forward and backward)."""
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = DisMaxLoss()(compiled(x), torch.tensor([0, 2]))
    loss.backward()
    assert model.fc.prototypes.grad is not None and model.fc.prototypes.grad.abs().sum() > 0


@pytest.mark.slow
def test_compile_inductor_cpu(x):
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    compiled = torch.compile(model)
    out = compiled(x)
    F.cross_entropy(10 * out, torch.tensor([0, 2])).backward()
    assert model.fc.prototypes.grad.abs().sum() > 0
    model.eval()
    assert torch.allclose(compiled(x), model(x), atol=1e-4)
