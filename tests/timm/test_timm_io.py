"""The saved model: a timm model directory (config.json + model.safetensors) written atomically, read back by
load_model and by timm's ``local-dir:``, with the training preprocessing; the first format still loads;
loading never unpickles."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from dismax_plugin import DisMaxHead, DisMaxLoss, IsoMaxHead, IsoMaxPlusHead
from dismax_plugin.adapters import timm as dtimm

HEAD_TYPES = {"dismax": DisMaxHead, "isomaxplus": IsoMaxPlusHead, "isomax": IsoMaxHead, "linear": nn.Linear}
PREP = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "crop_pct": 1.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_data_config(prep=PREP):
    return {
        "input_size": tuple(prep["input_size"]),
        "interpolation": prep["interpolation"],
        "mean": tuple(prep["mean"]),
        "std": tuple(prep["std"]),
        "crop_pct": prep["crop_pct"],
        "crop_mode": "center",
    }


def _data_config(model):
    config = timm.data.resolve_data_config(model=model)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@pytest.mark.parametrize("kind", ["dismax", "isomax", "linear"])
def test_save_load_round_trip(kind, tmp_path, x):
    model = dtimm.create_model("test_vit", head=kind, num_classes=4, img_size=32).eval()
    if kind != "linear":
        model.head.set_temperature(0.8)
        model.head.calibrate_scores(torch.randn(9, 4, generator=torch.Generator().manual_seed(0)))
        model.head.set_score("es")
    assert _data_config(model) != _expected_data_config()  # timm's defaults differ from the training ones
    metadata = {"preprocessing": PREP, "class_names": list("abcd"), "score": "mds"}
    directory = dtimm.save_model(model, tmp_path / "new" / "dir", metadata=metadata)
    assert sorted(p.name for p in directory.iterdir()) == [dtimm.CONFIG_NAME, dtimm.WEIGHTS_NAME]
    config = json.loads((directory / dtimm.CONFIG_NAME).read_text())
    assert config["architecture"] == ("test_vit" if kind == "linear" else f"test_vit_{kind}")
    assert config["num_classes"] == 4 and config["label_names"] == list("abcd")
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["std"] == [0.25] * 3
    assert config["dismax"]["head"] == kind and config["dismax"]["metadata"] == metadata
    info = dtimm.read_metadata(directory)
    assert info["metadata"] == metadata and info["head"] == kind and info["num_classes"] == 4
    assert info["architecture"] == "test_vit" and info["model_args"]["img_size"] == [32, 32]
    if kind != "linear":
        assert info["temperature"] == pytest.approx(0.8) and info["score"] == "es"
        assert info["calibration_size"] == 9 and info["head_options"] == {"entropic_scale": 10.0}

    loaded = dtimm.load_model(directory, device=torch.device("cpu"))
    assert not loaded.training and loaded.dismax_metadata == info
    assert dtimm.head_kind(loaded) == kind and type(loaded.head) is HEAD_TYPES[kind]
    assert torch.equal(loaded(x), model(x))
    assert _data_config(loaded) == _expected_data_config()
    if kind != "linear":
        assert torch.equal(loaded.head.calibration_scores, model.head.calibration_scores)
        assert float(loaded.head.temperature) == pytest.approx(0.8) and loaded.head.score == "es"
    assert dtimm.read_metadata(directory / dtimm.CONFIG_NAME) == info  # the file itself is accepted too


_FRESH_SCRIPT = textwrap.dedent(
    """
    import pickle, sys
    import safetensors.torch, torch
    import dismax_plugin
    assert "timm" not in sys.modules, "the core must not import timm"
    import timm
    from dismax_plugin.adapters import timm as dtimm

    def refuse(*args, **kwargs):
        raise AssertionError("loading a saved model must not unpickle anything")

    class Refused:
        def __init__(self, *args, **kwargs):
            refuse()

    pickle.load = pickle.loads = torch.load = refuse
    pickle.Unpickler = Refused
    data = safetensors.torch.load_file(sys.argv[2])
    model = dtimm.load_model(sys.argv[1])
    assert torch.allclose(model(data["x"]), data["logits"], atol=1e-6)
    dtimm.register_timm_models(["test_resnet"])
    again = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    assert torch.allclose(again(data["x"]), data["logits"], atol=1e-6)
    assert float(again.fc.temperature) == float(model.fc.temperature) == 1.5
    config = timm.data.resolve_data_config(model=again)
    print("RESULT=" + repr((list(config["input_size"]), config["interpolation"], list(config["std"]))))
    """
)


def test_fresh_process_loads_with_load_model_and_timm_local_dir_without_pickle(tmp_path, x):
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    model.fc.set_temperature(1.5)
    dtimm.save_model(model, tmp_path / "m", metadata={"preprocessing": PREP})
    with torch.no_grad():
        safetensors.torch.save_file({"x": x, "logits": model(x)}, str(tmp_path / "io.safetensors"))
    command = [sys.executable, "-c", _FRESH_SCRIPT, str(tmp_path / "m"), str(tmp_path / "io.safetensors")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("RESULT=")[1].strip() == "([3, 32, 32], 'bilinear', [0.25, 0.25, 0.25])"


def test_first_format_folders_still_load(tmp_path, x):
    """A folder as the first release wrote it (dismax_model.json, no config.json) loads as before."""
    model = dtimm.create_model("test_resnet", head="isomaxplus", num_classes=3).eval()
    model.fc.set_temperature(0.7)
    folder = tmp_path / "old"
    folder.mkdir()
    old_state = {("fc.prototypes" if k == "fc.weight" else k): v for k, v in model.state_dict().items()
                 if k not in ("fc.calibration_scores", "fc.score_index")}  # fmt: skip
    old_state.update({"fc.thresholds": torch.tensor([-0.4], dtype=torch.float64),
                      "fc.threshold_tprs": torch.tensor([0.95], dtype=torch.float64),
                      "fc.threshold_score": torch.tensor(0)})  # fmt: skip
    safetensors.torch.save_file(old_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    legacy = {
        "format": "dismax-plugin/timm",
        "format_version": 1,
        "architecture": "test_resnet",
        "model_args": {},
        "head": "isomaxplus",
        "num_classes": 3,
        "temperature": 0.7,
        "threshold_score": "mps",
        "thresholds": {"0.95": -0.4},
        "data_config": {"input_size": [3, 160, 160]},
        "versions": {"dismax_plugin": "0.1.0"},
        "metadata": {"preprocessing": PREP, "class_names": ["a", "b", "c"]},
    }
    (folder / "dismax_model.json").write_text(json.dumps(legacy))
    assert dtimm.read_metadata(folder) == legacy
    with pytest.warns(UserWarning, match="calibrate the model again"):  # its thresholds: the earlier format
        loaded = dtimm.load_model(folder)
    assert torch.equal(loaded(x), model(x)) and loaded.dismax_metadata["metadata"] == legacy["metadata"]
    assert loaded.fc.calibration_size == 0 and float(loaded.fc.temperature) == pytest.approx(0.7)
    dtimm.save_model(loaded, folder, metadata=legacy["metadata"])  # re-saved in place: the new format wins
    assert dtimm.read_metadata(folder)["format_version"] == 2
    assert torch.equal(dtimm.load_model(folder)(x), model(x))


def test_save_is_atomic(tmp_path, x):
    """A save that fails leaves the previous files as they were and no temporary file behind."""
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    directory = dtimm.save_model(model, tmp_path / "m", metadata={"preprocessing": PREP})
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    model.fc.set_temperature(3.0)
    with pytest.raises(ValueError, match="1 input channels"):
        dtimm.save_model(model, directory, metadata={"preprocessing": dict(PREP, input_size=[1, 32, 32])})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    dtimm.save_model(model, directory, metadata={"preprocessing": PREP})
    assert sorted(p.name for p in directory.iterdir()) == sorted(before)
    assert float(dtimm.load_model(directory).fc.temperature) == 3.0


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
    with pytest.raises(TypeError, match=r"metadata\['preprocessing'\] must be a dict"):
        dtimm.save_model(model, tmp_path / "a", metadata={"preprocessing": [3, 32, 32]})
    with pytest.raises(TypeError, match="not a timm model"):
        dtimm.save_model(nn.Linear(3, 2), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory"):
        dtimm.save_model(model, tmp_path / "file")
    model.reset_classifier(0)
    with pytest.raises(ValueError, match="num_classes=0"):
        dtimm.save_model(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.fixture
def saved(tmp_path):
    dtimm.save_model(dtimm.create_model("test_resnet", head="dismax", num_classes=3), tmp_path / "m")
    return tmp_path / "m"


def _edit_config(directory, top=None, **changes):
    config = json.loads((directory / dtimm.CONFIG_NAME).read_text())
    config["dismax"].update(changes)
    config.update(top or {})
    (directory / dtimm.CONFIG_NAME).write_text(json.dumps(config))


def test_load_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dtimm.load_model(tmp_path / "nowhere")
    (saved / dtimm.WEIGHTS_NAME).rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors' is missing"):
        dtimm.load_model(saved)
    (saved / dtimm.CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
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
    (saved / dtimm.CONFIG_NAME).write_text('{"architecture": "resnet18", "dismax": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        dtimm.load_model(saved)
    (saved / dtimm.CONFIG_NAME).write_text('{"architecture": "resnet18"}')  # a plain timm export
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
    _edit_config(saved, architecture="test_resnet", top={"num_classes": 1})
    with pytest.raises(ValueError, match="num_classes .* must be an integer >= 2"):
        dtimm.load_model(saved)
