"""Weights: timm's pretrained loading (an offline Hugging Face cache written here, local files), checkpoints,
no unpickling, and no side effect of importing the adapter on timm's model list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from dismax_plugin import DisMaxHead
from dismax_plugin.adapters import timm as dtimm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("file", ["ce.safetensors", "ce.pth"])
@pytest.mark.parametrize("num_classes", [10, 5, 1000])
def test_pretrained_local_file(ce_weights, file, num_classes, same_backbone):
    directory, state = ce_weights
    model = dtimm.create_model(
        "test_resnet",
        head="dismax",
        num_classes=num_classes,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(directory / file)),
    )
    assert same_backbone(model, state)
    assert isinstance(model.fc, DisMaxHead) and model.fc.num_classes == num_classes
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept alive


def test_checkpoint_path_stock_and_converted(ce_weights, tmp_path, x, same_backbone):
    directory, state = ce_weights
    model = dtimm.create_model("test_resnet", head="isomax", num_classes=10, checkpoint_path=directory / "ce.pth")
    assert same_backbone(model, state) and model.fc.num_classes == 10
    linear = dtimm.create_model("test_resnet", head="linear", num_classes=5, checkpoint_path=directory / "ce.pth")
    assert torch.equal(linear.fc.weight, state["fc.weight"])  # the stock classifier fits: kept

    trained = dtimm.create_model("test_resnet", head="dismax", num_classes=5)
    trained.fc.calibrate_scores(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "trained.pth.tar")
    for kwargs in (
        dict(checkpoint_path=tmp_path / "trained.pth.tar"),
        dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "trained.pth.tar"))),
    ):
        resumed = dtimm.create_model("test_resnet", head="dismax", num_classes=5, **kwargs).eval()
        assert torch.equal(resumed(x), trained.eval()(x))
        assert torch.equal(resumed.fc.calibration_scores, trained.fc.calibration_scores)
    with pytest.raises(ValueError, match="do not fit"):
        dtimm.create_model("test_resnet", head="isomax", num_classes=5, checkpoint_path=tmp_path / "trained.pth.tar")


def test_checkpoint_of_another_architecture_is_rejected(ce_weights):
    directory, _ = ce_weights
    with pytest.raises(ValueError, match="do not fit 'test_convnext'"):
        dtimm.create_model("test_convnext", num_classes=3, checkpoint_path=directory / "ce.pth")


class _Payload:
    """Unpickling this object would run code: a .pth holding it must be refused, not executed."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_are_never_unpickled(tmp_path):
    torch.save({"state_dict": {}, "payload": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could not be read as a checkpoint"):
        dtimm.create_model("test_resnet", num_classes=3, checkpoint_path=tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could not be read as a checkpoint"):
        dtimm.create_model(
            "test_resnet", num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "evil.pth"))
        )


def _hub_cache(root, repo: str, model) -> str:
    """A huggingface_hub cache holding ``model`` as ``model.safetensors`` + ``config.json`` (timm's own
    export) of ``repo`` (blobs, snapshot links, refs/main), as ``hf_hub_download`` leaves it; returns the
    weights file."""
    folder = root / ("models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    timm.models.save_for_hf(model, root / "export", safe_serialization=True)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for index, name in enumerate(("model.safetensors", "config.json")):
        blob = folder / "blobs" / f"{index:040x}"
        blob.write_bytes((root / "export" / name).read_bytes())
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return str(snapshot / "model.safetensors")


_HUB_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    import safetensors.torch, timm, torch

    count = len(timm.list_models())
    from dismax_plugin.adapters import timm as dtimm
    dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    out = {"unchanged_by_import": len(timm.list_models()) == count, "stock": count}
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(str(address))
        raise OSError(f"network access attempted: {address}")

    socket.socket.connect = socket.socket.connect_ex = refuse
    file = safetensors.torch.load_file(sys.argv[1])

    def backbone_equal(model):
        state = model.state_dict()
        return all(torch.equal(state[k], v) for k, v in file.items() if not k.startswith("fc."))

    model = dtimm.create_model("test_resnet", head="dismax", num_classes=5, pretrained=True)
    out["hub_backbone"] = backbone_equal(model)
    out["hub_head"] = [type(model.fc).__name__, model.fc.num_classes]
    named = dtimm.create_model("hf-hub:" + sys.argv[2], head="isomaxplus", num_classes=4, pretrained=True)
    out["hub_name"] = [backbone_equal(named), type(named.fc).__name__, named.fc.num_classes]
    out["registered"] = dtimm.register_timm_models(["test_resnet"])
    out["listed_after_register"] = len(timm.list_models()) - count
    variant = timm.create_model("test_resnet_isomax", pretrained=True, num_classes=4)
    out["variant"] = [backbone_equal(variant), type(variant.fc).__name__, variant.fc.num_classes]
    try:
        dtimm.create_model("resnet10t", head="dismax", num_classes=3, pretrained=True)
    except RuntimeError as error:
        out["missing"] = str(error)
    out["attempts"] = attempts

    # train.py's --device-modules: importing the register module registers every variant (the rest of them)
    before = len(timm.list_models())
    import dismax_plugin.adapters.timm.register as register
    out["register_module"] = [len(timm.list_models()) - before, len(register.REGISTERED), len(timm.list_models())]
    import argparse, tempfile
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser()  # train.py's --model-kwargs (literal_eval'd values)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
    kwargs = parser.parse_args(["--model-kwargs", "entropic_scale=5"]).model_kwargs
    model = timm.create_model("resnet10t_dismax", num_classes=3, **kwargs)
    out["model_kwargs_head"] = [type(model.fc).__name__, model.fc.entropic_scale]
    folder = tempfile.mkdtemp()
    dtimm.save_model(model, folder)
    out["reloaded_scale"] = [dtimm.load_model(folder).fc.entropic_scale,
                             timm.create_model("local-dir:" + folder, pretrained=True).fc.entropic_scale]
    print("RESULT=" + json.dumps(out))
    """
)


def test_pretrained_from_an_offline_hub_cache_and_no_registration_at_import(tmp_path):
    """A fresh process, HF_HUB_OFFLINE=1 and HF_HUB_CACHE written here: timm's hub loading gives the cached
    backbone, a missing model is a clear error, nothing reaches the network, importing the adapter leaves
    timm.list_models() as it is and registering adds exactly the names asked for; importing
    ``dismax_plugin.adapters.timm.register`` (train.py's ``--device-modules``) then adds the variants of every
    architecture, and train.py's ``--model-kwargs entropic_scale=5`` reaches the head and survives save/load."""
    torch.manual_seed(5)
    repo = timm.get_pretrained_cfg("test_resnet").hf_hub_id
    weights = _hub_cache(tmp_path / "hub", repo, timm.create_model("test_resnet"))  # 1000 classes, as published
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    env.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, weights, repo], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.split("RESULT=")[1])
    assert out["unchanged_by_import"]
    assert out["hub_backbone"] and out["hub_head"] == ["DisMaxHead", 5]
    assert out["hub_name"] == [True, "IsoMaxPlusHead", 4]
    assert sorted(out["registered"]) == ["test_resnet_dismax", "test_resnet_isomax", "test_resnet_isomaxplus"]
    assert out["listed_after_register"] == 3
    assert out["variant"] == [True, "IsoMaxHead", 4]
    message = out.get("missing", "")
    assert "timm/resnet10t" in message and "HF_HUB_OFFLINE" in message, message
    assert "pretrained_cfg_overlay=dict(file=" in message and "HF_HUB_CACHE" in message
    assert out["attempts"] == []
    stock = out["stock"]  # timm's architectures in a fresh process
    added, registered, total = out["register_module"]
    assert added == registered == 3 * stock - 3 and total == 4 * stock  # test_resnet's three came before
    assert out["model_kwargs_head"] == ["DisMaxHead", 5.0]
    assert out["reloaded_scale"] == [5.0, 5.0]
