"""Image folders as ``dismax`` sees them: an unreadable image stops the command before any training (exit 2,
one line naming it), 16-bit images get the same 8-bit values from a folder and from the served model's array
path, and a benchmark name wins over a same-named folder unless the path is explicit."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dismax_plugin.adapters.engine.cli import main
from dismax_plugin.adapters.engine.data import build_data
from dismax_plugin.adapters.mlflow import preprocess_images
from dismax_plugin.adapters.pytorch_ood import DigitsBenchmark, FolderBenchmark
from dismax_plugin.adapters.timm.preprocessing import preprocessing_config

TINY = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "8", "--image-size", "16", "--no-track"]


def _folder(root, per_class: int = 10):
    rng = np.random.default_rng(0)
    for i in range(2 * per_class):
        path = root / "train" / "ab"[i % 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    (root / "ood" / "far" / "noise").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "ood" / "far" / "noise" / "0.png")


def test_a_zero_byte_image_exits_2_before_any_training(tmp_path, capsys):
    _folder(tmp_path / "data")
    (tmp_path / "data" / "ood" / "far" / "noise" / "broken.png").write_bytes(b"")
    code = main(["train", *TINY, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run")])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "broken.png" in err[0] and "cannot be read" in err[0], err
    assert "epoch 1/1" not in captured.out and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sixteen_bit_images_are_the_same_from_a_folder_and_from_the_served_array_path(tmp_path):
    _folder(tmp_path)
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    path = tmp_path / "train" / "a" / "deep.png"
    Image.fromarray(ramp).save(path)
    preprocessing = preprocessing_config("test_resnet", 16, 3)
    data = build_data(str(tmp_path), preprocessing)
    train = data.benchmark.train_set()
    if str(path) in train.files:
        from_folder, _ = train[train.files.index(str(path))]
    else:  # held out: read it through the same transform
        from_folder = train.transform(Image.open(path))
    served = preprocess_images(ramp[None], preprocessing)[0]
    torch.testing.assert_close(from_folder, served, rtol=0, atol=0)
    # the high byte: 8-bit values stored as 16 bits (v * 257) come back exactly, no saturation
    plain = preprocess_images(np.arange(256, dtype=np.uint8).reshape(16, 16)[None], preprocessing)[0]
    torch.testing.assert_close(served, plain, rtol=0, atol=0)


def test_benchmark_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch, caplog):
    _folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    preprocessing = preprocessing_config("test_resnet", 16, 3)
    with caplog.at_level("INFO", logger="dismax_plugin"):
        named = build_data("digits", preprocessing)
    assert isinstance(named.benchmark, DigitsBenchmark) and "not used" in caplog.text
    assert isinstance(build_data("./digits", preprocessing).benchmark, FolderBenchmark)
