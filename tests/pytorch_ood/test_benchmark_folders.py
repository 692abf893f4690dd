"""Image-folder benchmarks: which folder plays which role, drawn hold-outs, records and their checks, odd files
(hidden, non-images, links, unreadable), OOD validation sets, and benchmark names against same-named folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dismax_plugin.adapters.pytorch_ood import (
    TEST_FRACTION,
    VAL_FRACTION,
    DigitsBenchmark,
    FolderBenchmark,
    check_split,
    create_benchmark,
)
from dismax_plugin.adapters.pytorch_ood._splits import ValidationView, holdout


def _image(path, seed=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _classes(root, split, counts, offset=0):
    for label, count in counts.items():
        for i in range(count):
            _image(root / split / label / f"{label}{i}.png", offset + 100 * ord(label[0]) + i)


def _ids(bench):
    return bench.train_set(), bench.val_set(), bench.test_sets(known=True, unknown=False)[0]


# ----------------------------------------------------------------------------------- roles by layout
def test_train_only_holds_out_a_stratified_test_and_calibration_split(tmp_path):
    _classes(tmp_path, "train", {"a": 30, "b": 20})
    bench = FolderBenchmark(tmp_path, split_seed=3)
    train, val, test = _ids(bench)
    assert (len(test), len(val), len(train)) == (10, 5, 35)  # 20% and 10% of 50
    assert [test.labels.count(c) for c in (0, 1)] == [6, 4] and [val.labels.count(c) for c in (0, 1)] == [3, 2]
    files = [set(d.files) for d in (train, val, test)]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])  # no image in two roles
    assert set().union(*files) == {str(p) for p in (tmp_path / "train").rglob("*.png")}
    assert "held out" in bench.sources["test"] and "held out" in bench.sources["val"]
    again, other = FolderBenchmark(tmp_path, split_seed=3), FolderBenchmark(tmp_path, split_seed=4)
    assert _ids(again)[2].files == test.files and _ids(other)[2].files != test.files  # drawn with the split seed
    assert (TEST_FRACTION, VAL_FRACTION) == (0.2, 0.1)


@pytest.mark.parametrize(
    "folders, sources",
    [
        (("val",), {"val": "held out", "test": "val/"}),  # timm's train/val: val/ is the ID test split
        (("test",), {"val": "held out", "test": "test/"}),
        (("val", "test"), {"val": "val/", "test": "test/"}),
    ],
)
def test_val_and_test_folders_play_the_documented_roles(tmp_path, folders, sources):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    for k, split in enumerate(folders):
        _classes(tmp_path, split, {"a": 3, "b": 2}, offset=1000 * (k + 1))
    bench = FolderBenchmark(tmp_path)
    train, val, test = _ids(bench)
    for key, dataset in (("val", val), ("test", test)):
        assert sources[key] in bench.sources[key]
        if sources[key].endswith("/"):
            assert {os.path.basename(os.path.dirname(os.path.dirname(f))) for f in dataset.files} == {sources[key][:-1]}
    assert len(train) == 20 - (0 if folders == ("val", "test") else 2)
    assert not set(train.files) & set(val.files) and not set(test.files) & (set(train.files) | set(val.files))
    with pytest.raises(ValueError, match="classes"):
        _image(tmp_path / folders[0] / "c" / "x.png")
        FolderBenchmark(tmp_path)


def test_split_record_is_json_and_the_check_refuses_other_data(tmp_path):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    _image(tmp_path / "ood" / "far" / "noise" / "0.png", 7)
    bench = FolderBenchmark(tmp_path, split_seed=1)
    info = json.loads(json.dumps(bench.split_info()))
    assert info["seed"] == 1 and info["classes"] == ["a", "b"]
    assert {k: v["size"] for k, v in info["splits"].items()} == {"train": 14, "val": 2, "test": 4}
    assert info["ood_test"]["noise"]["size"] == 1 and info["ood_val"] == {}
    assert check_split(info, FolderBenchmark(tmp_path, split_seed=1).split_info()) == []
    with pytest.raises(ValueError, match="does not match.*test split"):
        check_split(info, FolderBenchmark(tmp_path, split_seed=2).split_info())
    _image(tmp_path / "train" / "a" / "new.png", 99)
    with pytest.raises(ValueError, match="does not match.*train split has 15 images"):
        check_split(info, FolderBenchmark(tmp_path, split_seed=1).split_info())
    os.remove(tmp_path / "train" / "a" / "new.png")
    _image(tmp_path / "ood" / "far" / "noise" / "1.png", 8)  # an OOD test set may change: reported, not refused
    (line,) = check_split(info, FolderBenchmark(tmp_path, split_seed=1).split_info())
    assert "noise" in line and "2 images" in line
    with pytest.raises(ValueError, match="benchmark 'digits'"):
        check_split(info, DigitsBenchmark(ood_size=2).split_info())


# ----------------------------------------------------------------------------------- OOD validation sets
def test_ood_val_folder_gives_validation_sets_and_is_reserved(tmp_path):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    _image(tmp_path / "ood" / "near" / "fox" / "t.png", 1)
    _image(tmp_path / "ood" / "val" / "near" / "fox" / "v.png", 2)  # the validation part of the same source
    _image(tmp_path / "ood" / "val" / "cars" / "v.png", 3)
    bench = FolderBenchmark(tmp_path)
    assert bench.ood_names == ["fox"] and bench.ood_groups == {"fox": "near"}  # "val" is not a test set
    assert bench.ood_val_names == ["fox", "cars"] and bench.ood_val_groups == {"fox": "near", "cars": "far"}
    validation = bench.validation_set()
    assert len(validation) == len(bench.val_set()) + 2 and [validation[i][1] for i in (-2, -1)] == [-1, -1]
    view = ValidationView(bench)
    assert view.ood_names == ["fox", "cars"] and [len(d) for d in view.test_sets()] == [3, 3]
    plain = tmp_path / "plain"
    _classes(plain, "train", {"a": 10, "b": 10})
    _image(plain / "ood" / "x" / "0.png")
    assert FolderBenchmark(plain).validation_set() is None and FolderBenchmark(plain).ood_val_names == []


# ----------------------------------------------------------------------------------- odd files
def test_hidden_files_non_images_and_checkpoints_folders_are_skipped(tmp_path):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    _image(tmp_path / "train" / ".ipynb_checkpoints" / "x.png")  # would be a third class
    _image(tmp_path / "train" / "a" / ".ipynb_checkpoints" / "a0-checkpoint.png")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _image(tmp_path / "ood" / "near" / "fox" / "0.png", 5)
    for junk in ("near/.DS_Store", "far/README.txt", ".DS_Store"):
        (tmp_path / "ood" / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ood" / junk).write_text("not an image")
    _image(tmp_path / "ood" / ".ipynb_checkpoints" / "y.png")
    (tmp_path / "ood" / "near" / "fox" / "notes.txt").write_text("skipped")
    bench = FolderBenchmark(tmp_path)
    assert bench.class_names == ["a", "b"] and bench.ood_names == ["fox"]
    assert sum(len(d) for d in _ids(bench)) == 20 and len(bench.test_sets(known=False)[0]) == 1


def test_linked_ood_folders_are_followed_and_a_file_in_two_roles_is_refused(tmp_path):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        _image(elsewhere / "deep" / f"{i}.png", 50 + i)
    (tmp_path / "ood" / "far").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "ood" / "far" / "linked")
    bench = FolderBenchmark(tmp_path)
    assert bench.ood_names == ["linked"] and len(bench.test_sets(known=False)[0]) == 3
    os.symlink(tmp_path / "train" / "a", tmp_path / "ood" / "far" / "leak")
    with pytest.raises(ValueError, match="two roles"):
        FolderBenchmark(tmp_path)


def test_an_unreadable_image_is_named_before_anything_uses_the_data(tmp_path):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    bad = tmp_path / "ood" / "far" / "noise" / "empty.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*cannot be read"):
        FolderBenchmark(tmp_path)
    assert len(FolderBenchmark(tmp_path, verify=False).test_sets(known=False)[0]) == 1  # the check can be skipped
    bad.write_bytes((tmp_path / "train" / "a" / "a0.png").read_bytes()[:40])  # truncated PNG
    with pytest.raises(ValueError, match="empty.png"):
        FolderBenchmark(tmp_path)


def test_sixteen_bit_images_reach_the_transform_unconverted(tmp_path):
    _classes(tmp_path, "train", {"a": 10, "b": 10})
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "train" / "a" / "deep.png")
    bench = FolderBenchmark(tmp_path, transform=lambda image: image, verify=False)
    index = bench.train_set().files.index(str(tmp_path / "train" / "a" / "deep.png"))
    image, _ = bench.train_set()[index]
    assert image.mode == "I;16" and np.array_equal(np.asarray(image), ramp)  # no clipping in the loader
    with pytest.raises(ValueError, match="16"):  # the default transform refuses what it cannot convert
        create_benchmark(str(tmp_path), image_size=8).train_set()[index]


# ----------------------------------------------------------------------------------- names against folders
def test_benchmark_names_win_over_folders_unless_the_path_is_explicit(tmp_path, monkeypatch, caplog):
    _classes(tmp_path / "digits", "train", {"a": 10, "b": 10})
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="dismax_plugin"):
        named = create_benchmark("digits", ood_size=2)
    assert isinstance(named, DigitsBenchmark) and "./digits" in caplog.text and "not used" in caplog.text
    for explicit in ("./digits", str(tmp_path / "digits"), "digits/"):
        assert isinstance(create_benchmark(explicit, image_size=8), FolderBenchmark)


def test_holdout_is_stratified_seeded_and_refuses_too_few_items():
    labels = [0] * 7 + [1] * 3
    test, val, rest = holdout(labels, [0.2, 0.1], seed=0)
    assert (len(test), len(val), len(rest)) == (2, 1, 7)
    assert not set(test) & set(val) and sorted([*test, *val, *rest]) == list(range(10))
    assert {labels[i] for i in rest} == {0, 1}  # every class keeps an image
    assert [a.tolist() for a in holdout(labels, [0.2, 0.1], seed=0)] == [test.tolist(), val.tolist(), rest.tolist()]
    with pytest.raises(ValueError, match="too few"):
        holdout([0, 1], [0.2], seed=0)
    with pytest.raises(ValueError, match="fractions"):
        holdout(labels, [0.6, 0.5], seed=0)
