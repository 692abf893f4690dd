"""``dismax import``: checkpoints written the way timm's train.py writes them (timm's ``CheckpointSaver``, with and
without EMA weights from ``ModelEmaV3``, an ``args.yaml`` of train.py's options) become calibrated model folders
that ``dismax evaluate`` reads; bad input exits with code 2 and one line."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3

from dismax_plugin.adapters import timm as dtimm
from dismax_plugin.adapters.engine.cli import main
from dismax_plugin.adapters.engine.data import build_data

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 3
SIDE = 16


def _images(folder, count: int, seed: int, value=None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3)) if value is None else np.full((SIDE, SIDE, 3), value)
        noisy = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny image folder: 3 classes (flat grey levels) in train/, val/, test/; near and far OOD sets."""
    root = tmp_path_factory.mktemp("data") / "folder"
    for split, count in (("train", 12), ("val", 5), ("test", 5)):
        for c in range(CLASSES):
            _images(root / split / str(c), count, seed=hash((split, c)) % 1000, value=40 + 80 * c)
    _images(root / "ood" / "near" / "grey", 6, seed=7, value=100)
    _images(root / "ood" / "far" / "noise", 6, seed=8)
    return root


def _train_py_args(model: str, **extra) -> argparse.Namespace:
    """The train.py options that matter here, as train.py's parser leaves them (unset ones are None)."""
    return argparse.Namespace(model=model, num_classes=CLASSES, input_size=[3, SIDE, SIDE], img_size=None, mean=None,
                              std=None, interpolation="bilinear", crop_pct=1.0, crop_mode=None, in_chans=None, gp=None,
                              bn_eps=None, epochs=1, batch_size=4, lr=0.1, opt="sgd", smoothing=0.1,
                              train_split="train", val_split="val", **extra)  # fmt: skip


def _train_like_train_py(directory, name: str, ema: bool, args_yaml: bool, **model_kwargs):
    """Three train-mode steps with timm's pieces, then CheckpointSaver.save_checkpoint as train.py calls it."""
    dtimm.register_timm_models(["test_resnet"])
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=CLASSES, **model_kwargs).train()
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    model_ema = ModelEmaV3(model, decay=0.5) if ema else None
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(4, 3, SIDE, SIDE, generator=generator), torch.tensor([0, 1, 2, step])
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        if model_ema is not None:
            model_ema.update(model, step=step + 1)  # train.py: num_updates (EMA copies for the first two)
    args = _train_py_args(name, model_kwargs=dict(model_kwargs), model_ema=ema)
    directory.mkdir(parents=True)
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                            checkpoint_dir=str(directory), recovery_dir=str(directory), decreasing=False)  # fmt: skip
    saver.save_checkpoint(epoch=0, metric=40.0)
    if args_yaml:
        (directory / "args.yaml").write_text(yaml.safe_dump(vars(args), default_flow_style=False))
    return model.eval(), (model_ema.module.eval() if model_ema is not None else None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """train.py outputs: a DisMax model (EMA, args.yaml, --model-kwargs entropic_scale=5) and a stock twin
    (no EMA, no args.yaml: its options come from the checkpoint)."""
    root = tmp_path_factory.mktemp("train_py")
    dismax = _train_like_train_py(root / "dismax", "test_resnet_dismax", True, True, entropic_scale=5.0)
    twin = _train_like_train_py(root / "twin", "test_resnet", False, False)
    return root, {"dismax": dismax, "twin": twin}


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def _same_weights(loaded, model) -> bool:
    """Every tensor but the calibration's equals the trained model's."""
    skip = ("temperature", "calibration_scores", "score_index")
    state = loaded.state_dict()
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items() if not k.endswith(skip))


def test_import_train_py_checkpoint(checkpoints, folder, tmp_path, capsys):
    root, models = checkpoints
    assert {p.name for p in (root / "dismax").iterdir()} >= {"last.pth.tar", "model_best.pth.tar", "args.yaml"}
    out = tmp_path / "imported"
    code, err = _run(["import", "--checkpoint", str(root / "dismax"), "--data", str(folder), "--output", str(out)],
                     capsys)  # fmt: skip
    assert code == 0, err
    loaded = dtimm.load_model(out / "model")
    trained, ema = models["dismax"]
    assert _same_weights(loaded, trained) and not _same_weights(loaded, ema)
    assert dtimm.head_kind(loaded) == "dismax" and loaded.fc.entropic_scale == 5.0
    data = build_data(str(folder), loaded.dismax_metadata["metadata"]["preprocessing"])
    assert loaded.fc.calibration_size == len(data.val) and float(loaded.fc.temperature) != 1.0
    meta = loaded.dismax_metadata["metadata"]
    stock = timm.get_pretrained_cfg("test_resnet")  # train.py's data config: its options, then the model's cfg
    assert meta["preprocessing"] == {"input_size": [3, SIDE, SIDE], "mean": list(stock.mean), "std": list(stock.std),
                                     "interpolation": "bilinear", "crop_pct": 1.0}  # fmt: skip
    assert tuple(timm.data.resolve_data_config(model=loaded)["input_size"]) == (3, SIDE, SIDE)
    source = meta["imported_from"]
    assert source["checkpoint"].endswith("model_best.pth.tar") and source["ema"] is False and source["epoch"] == 0
    assert source["args"].endswith("args.yaml") and source["train_py_args"]["model_kwargs"] == {"entropic_scale": 5.0}
    assert meta["calibration"]["size"] == len(data.val) and meta["class_names"] == ["0", "1", "2"]

    code, err = _run(["evaluate", "--checkpoint", str(out), "--data", str(folder), "--no-track"], capsys)
    assert code == 0, err


def test_import_ema_weights_and_timm_checkpoint_path(checkpoints, folder, tmp_path, capsys):
    root, models = checkpoints
    _, ema = models["dismax"]
    out = tmp_path / "ema"
    code, err = _run(["import", "--checkpoint", str(root / "dismax" / "last.pth.tar"), "--use-ema", "--data",
                      str(folder), "--output", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    loaded = dtimm.load_model(out / "model")
    assert _same_weights(loaded, ema) and loaded.dismax_metadata["metadata"]["imported_from"]["ema"] is True
    # timm itself loads the train.py checkpoint of a registered variant (its load_checkpoint prefers EMA weights)
    again = timm.create_model("test_resnet_dismax", num_classes=CLASSES, entropic_scale=5.0,
                              checkpoint_path=str(root / "dismax" / "last.pth.tar"))  # fmt: skip
    assert _same_weights(again, ema)


def test_import_linear_twin(checkpoints, folder, tmp_path, capsys):
    """A stock train.py checkpoint, options read from the checkpoint itself: a linear model with MaxSoftmax
    calibration scores in its metadata."""
    root, models = checkpoints
    out = tmp_path / "twin"
    code, err = _run(["import", "--checkpoint", str(root / "twin"), "--data", str(folder), "--output", str(out)],
                     capsys)  # fmt: skip
    assert code == 0, err
    loaded = dtimm.load_model(out / "model")
    assert dtimm.head_kind(loaded) == "linear" and _same_weights(loaded, models["twin"][0])
    meta = loaded.dismax_metadata["metadata"]
    assert meta["imported_from"]["args"] == "checkpoint"
    scores = meta["calibration"]["scores"]["mps"]
    assert len(scores) == meta["calibration"]["size"] > 0 and scores == sorted(scores)


def _plain_state_dict(root):
    path = root / "plain.pth"
    if not path.exists():
        torch.save(timm.create_model("test_resnet", num_classes=CLASSES).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "{root}/missing.pth.tar"], "no such file"),
        (["--checkpoint", "{root}/twin", "--use-ema"], "holds no EMA weights"),
        (["--checkpoint", "{root}/dismax", "--model", "test_convnext_dismax"], "was trained as 'test_resnet_dismax'"),
        (["--checkpoint", "{root}/dismax", "--model", "no_such_net"], "Unknown timm architecture"),
        (["--checkpoint", "{root}/dismax", "--args-yaml", "{root}/none.yaml"], "no such file"),
        (["--checkpoint", "{plain}"], "records no model name"),
        (["--checkpoint", "{plain}", "--model", "test_convnext"], "do not fit --model test_convnext"),
        (["--checkpoint", "{plain}", "--model", "test_resnet_isomax"], "do not fit --model test_resnet_isomax"),
        (["--checkpoint", "{root}/dismax", "--data", "{two}"], "has 2 classes; the checkpoint's classifier has 3"),
        (["--checkpoint", "{root}/dismax", "--output", "{existing}"], "exists; add --overwrite"),
        (["--checkpoint", "{root}/dismax", "--args-yaml", "{own}", "--data", "{own_data}"], "which train.py trained"),
    ],
)
def test_bad_input_exits_2_with_one_line(checkpoints, folder, tmp_path, capsys, argv, message):
    root, _ = checkpoints
    two = tmp_path / "two"
    for c in range(2):
        _images(two / "train" / str(c), 4, seed=c, value=60 * c)
    _images(two / "ood" / "far" / "noise", 2, seed=9)
    (tmp_path / "existing" / "model").mkdir(parents=True)
    own_data = tmp_path / "own"  # train.py trained on own/train/: a calibration split drawn from it is refused
    for c in range(CLASSES):
        _images(own_data / "train" / str(c), 6, seed=c, value=40 + 80 * c)
    _images(own_data / "ood" / "far" / "noise", 2, seed=9)
    options = yaml.safe_load((root / "dismax" / "args.yaml").read_text())
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(dict(options, data=str(own_data), data_dir=str(own_data))))
    names = {"root": root, "plain": _plain_state_dict(root), "two": two, "existing": tmp_path / "existing",
             "own": tmp_path / "own.yaml", "own_data": own_data}  # fmt: skip
    argv = [a.format(**names) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(folder)]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    code, err = _run(["import", *argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dismax import: error:") and message in lines[0], err
    assert not (tmp_path / "out" / "model").exists()


def test_checkpoint_args_are_json_in_the_folder(checkpoints, folder, tmp_path, capsys):
    """The folder's config.json is plain JSON (timm's), with the head options as model arguments of the
    registered name, so timm's local-dir: loading rebuilds the head as it was trained."""
    root, _ = checkpoints
    out = tmp_path / "json"
    code, err = _run(["import", "--checkpoint", str(root / "dismax"), "--data", str(folder), "--output", str(out)],
                     capsys)  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architecture"] == "test_resnet_dismax" and config["model_args"]["entropic_scale"] == 5.0
    assert timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).fc.entropic_scale == 5.0
