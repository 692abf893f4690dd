"""DigitsBenchmark (offline) and create_benchmark, including the fail-fast path of the standard benchmarks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_ood.benchmark import Benchmark
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from dismax_plugin.adapters.pytorch_ood import BENCHMARK_NAMES, DigitsBenchmark, create_benchmark

STANDARD = ("CIFAR10_ODIN", "CIFAR100_ODIN", "CIFAR10_OpenOOD", "CIFAR100_OpenOOD", "ImageNet_OpenOOD",
            "ImageNet200_OpenOOD")


@pytest.fixture(scope="module")
def bench() -> DigitsBenchmark:
    return DigitsBenchmark()


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_split_sizes_are_the_documented_ones(bench, digits):
    assert isinstance(bench, Benchmark)
    assert (len(bench.train_set()), len(bench.val_set()), len(bench.test_sets(unknown=False)[0])) == (650, 108, 325)
    assert bench.ood_names == ["digits_6_9", "image_patches", "gaussian_noise", "uniform_noise"]
    assert [len(d) for d in bench.test_sets(known=False)] == [571, 400, 400, 400]
    assert bench.ood_val_names == bench.ood_names and bench.ood_val_groups == bench.ood_groups
    assert [len(d) for d in bench.ood_val_sets()] == [143, 100, 100, 100]  # 20% of each OOD source
    assert int((digits.target >= 6).sum()) == 714 == 571 + 143
    combined = bench.test_sets()
    assert len(combined) == len(bench.ood_names)
    assert [len(d) for d in combined] == [325 + 571, 725, 725, 725]
    validation = bench.validation_set()
    assert len(validation) == 108 + 443 and int((torch.tensor([y for _, y in validation]) < 0).sum()) == 443
    with pytest.raises(ValueError, match="known"):
        bench.test_sets(known=False, unknown=False)


def test_splits_are_disjoint_stratified_and_cover_digits_0_to_5(bench, digits):
    train, val, test = (set(bench.indices[k].tolist()) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(np.flatnonzero(digits.target < 6).tolist())
    for name, size in (("val", 0.1), ("test", 0.3)):
        counts = np.bincount(digits.target[bench.indices[name]], minlength=6)
        expected = np.rint(size * np.bincount(digits.target)[:6])
        np.testing.assert_array_equal(counts, expected)
    assert DigitsBenchmark().indices["test"].tolist() == bench.indices["test"].tolist()  # fixed split
    # the OOD sources: validation and test parts are disjoint and make up the source
    info = bench.split_info()
    near_val, near_test = (set(info[k]["digits_6_9"]["indices"]) for k in ("ood_val", "ood_test"))
    assert not near_val & near_test and near_val | near_test == set(np.flatnonzero(digits.target >= 6).tolist())
    assert np.bincount(digits.target[sorted(near_val)], minlength=10)[6:].tolist() == [36, 36, 35, 36]  # stratified
    for name in bench.ood_names[1:]:
        val, test = (set(info[k][name]["indices"]) for k in ("ood_val", "ood_test"))
        assert not val & test and val | test == set(range(500))


def test_labels_are_python_ints(bench, digits):
    train = bench.train_set()
    labels = [train[i][1] for i in range(len(train))]
    assert all(type(y) is int for y in labels)
    assert labels == digits.target[bench.indices["train"]].tolist()
    val_labels = [bench.val_set()[i][1] for i in range(len(bench.val_set()))]
    assert set(val_labels) == set(range(6)) == set(range(DigitsBenchmark.num_classes))
    assert DigitsBenchmark.class_names == ("0", "1", "2", "3", "4", "5")
    for ood in bench.test_sets(known=False):
        assert {type(ood[i][1]) for i in (0, len(ood) - 1)} == {int}
        assert {ood[i][1] for i in range(0, len(ood), 37)} == {-1}


def test_default_items_are_unit_range_tensors(bench, digits):
    x, y = bench.train_set()[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated over channels
    # the 8x8 source is recovered by averaging 4x4 blocks of the (bilinear) upsampled image
    source = digits.images[bench.indices["train"][0]] / 16.0
    assert np.corrcoef(x[0].reshape(8, 4, 8, 4).mean(dim=(1, 3)).numpy().ravel(), source.ravel())[0, 1] > 0.9
    small = DigitsBenchmark(image_size=64, channels=1, ood_size=3)
    for dataset in (small.train_set(), small.val_set(), *small.test_sets(known=False)):
        x, _ = dataset[0]
        assert x.shape == (1, 64, 64) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_transform_receives_pil_images():
    seen = []

    def transform(image):
        seen.append((type(image), image.mode, image.size))
        return torch.zeros(1)

    small = DigitsBenchmark(transform=transform, image_size=40, ood_size=2)
    x, y = small.train_set()[0]
    assert torch.equal(x, torch.zeros(1)) and type(y) is int
    small.test_sets()[3][-1]
    assert seen and all(issubclass(kind, Image.Image) for kind, _, _ in seen)
    assert {s[1:] for s in seen} == {("RGB", (40, 40))}
    grey = DigitsBenchmark(transform=lambda im: im, channels=1, image_size=16, ood_size=2)
    image, _ = grey.val_set()[0]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (16, 16)


def test_ood_sets_are_fixed_and_differ_from_each_other(bench):
    again = DigitsBenchmark()
    first = [ds[5][0] for ds in bench.test_sets(known=False)]
    assert all(torch.equal(a, ds[5][0]) for a, ds in zip(first, bench.test_sets(known=False)))  # same each pass
    assert all(torch.equal(a, ds[5][0]) for a, ds in zip(first, again.test_sets(known=False)))  # same each build
    gaussian, uniform = bench.test_sets(known=False)[2:]
    assert not torch.equal(gaussian[0][0], uniform[0][0])
    patches = bench.test_sets(known=False)[1]
    assert len({tuple(patches[i][0][0, ::4, ::4].flatten().tolist()) for i in range(20)}) == 20


def test_default_collate_on_mixed_id_and_ood(bench):
    loader = DataLoader(bench.test_sets()[0], batch_size=400, shuffle=False)
    batches = list(loader)
    x, y = batches[0]
    assert x.shape == (400, 3, 32, 32) and y.dtype == torch.long
    labels = torch.cat([b[1] for b in batches])
    assert int((labels >= 0).sum()) == 325 and int((labels < 0).sum()) == 571


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="channels"):
        DigitsBenchmark(channels=2)
    with pytest.raises(ValueError, match="image_size"):
        DigitsBenchmark(image_size=4)
    with pytest.raises(TypeError, match="image_size"):
        DigitsBenchmark(image_size=32.0)
    with pytest.raises(TypeError, match="transform"):
        DigitsBenchmark(transform="resize")
    with pytest.raises(ValueError, match="ood_size"):
        DigitsBenchmark(ood_size=0)


# -------------------------------------------------------------------- create_benchmark
def test_create_benchmark_by_name():
    assert BENCHMARK_NAMES == ("digits", *STANDARD)
    digits = create_benchmark("DiGiTs", image_size=48, channels=1, ood_size=5)
    assert isinstance(digits, DigitsBenchmark)
    assert digits.train_set()[0][0].shape == (1, 48, 48) and len(digits.test_sets(known=False)[3]) == 4  # 5 - 1 val
    with pytest.raises(ValueError) as error:
        create_benchmark("svhn")
    assert all(name in str(error.value) for name in BENCHMARK_NAMES)
    with pytest.raises(TypeError, match="name"):
        create_benchmark(None)
    with pytest.raises(ValueError, match="root"):
        create_benchmark("cifar10_odin")


@pytest.mark.parametrize("name", STANDARD)
def test_standard_benchmark_without_data_fails_fast(offline, name):
    root = offline / "data"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        create_benchmark(name.lower(), root=root)
    message = str(error.value)
    assert name in message and str(root) in message and "Expected" in message
    assert os.listdir(root) == []  # nothing written, no partial download


def test_incomplete_cifar_is_reported_file_by_file(offline):
    root = offline / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"truncated")
    with pytest.raises(FileNotFoundError) as error:
        create_benchmark("CIFAR10_ODIN", root=root)
    message = str(error.value)
    assert str(folder / "data_batch_1") in message and str(folder / "test_batch") in message
    assert "Imagenet.tar.gz" in message
    assert sorted(os.listdir(folder)) == ["data_batch_1"]


def test_openood_benchmark_builds_from_data_on_disk(offline):
    """A minimal OpenOOD layout on disk is enough: the benchmark is built without any download."""
    from pytorch_ood.benchmark import CIFAR10_OpenOOD

    root = offline / "data"
    for folder in CIFAR10_OpenOOD._download_names:
        (root / folder).mkdir(parents=True)
        Image.new("L" if folder == "mnist" else "RGB", (28, 28), color=90).save(root / folder / "a.png")
    imglists = offline / "hub" / "openood_benchmark_imglist" / "benchmark_imglist" / "cifar10"
    imglists.mkdir(parents=True)
    for fname in (CIFAR10_OpenOOD._train_imglist, CIFAR10_OpenOOD._val_id_imglist, CIFAR10_OpenOOD._test_id_imglist):
        (imglists / fname).write_text("cifar10/a.png 3\n")
    for fname in [CIFAR10_OpenOOD._val_ood_imglist] + [f for _, f in CIFAR10_OpenOOD._ood_imglists]:
        (imglists / fname).write_text("mnist/a.png -1\n")

    benchmark = create_benchmark("cifar10_openood", root=root, image_size=24)
    assert isinstance(benchmark, Benchmark) and isinstance(benchmark.inner, CIFAR10_OpenOOD)
    assert benchmark.ood_names == [name for name, _ in CIFAR10_OpenOOD._ood_imglists]
    # OpenOOD's own validation splits: val_in (ID) and the TinyImageNet validation images (OOD)
    assert benchmark.val_set() is benchmark.inner.val_in and benchmark.ood_val_sets() == [benchmark.inner.val_ood]
    assert benchmark.ood_val_names == ["TinyImageNet"] and benchmark.ood_val_groups == {"TinyImageNet": "near"}
    assert len(benchmark.validation_set()) == 2
    info = benchmark.split_info()
    assert info["benchmark"] == "CIFAR10_OpenOOD" and info["splits"]["train"]["size"] == 1
    assert set(info["ood_test"]) == set(benchmark.ood_names) and "TinyImageNet" in info["ood_val"]
    x, y = benchmark.train_set()[0]
    assert x.shape == (3, 24, 24) and y == 3
    x, y = benchmark.test_sets(known=False)[2][0]  # grey MNIST image made RGB
    assert x.shape == (3, 24, 24) and y == -1


# -------------------------------------------------------------------- image folders
def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def test_folder_benchmark_groups_near_far_and_flat_sets(tmp_path, caplog):
    from dismax_plugin.adapters.pytorch_ood import FolderBenchmark

    for i, label in enumerate(("cat", "dog", "cat")):
        _image(tmp_path / "train" / label / f"{i}.png", i)
        _image(tmp_path / "val" / label / f"{i}.png", 10 + i)
    _image(tmp_path / "ood" / "near" / "fox" / "a.png", 20)
    _image(tmp_path / "ood" / "far" / "noise" / "deep" / "b.png", 21)  # images in sub-folders count
    _image(tmp_path / "ood" / "cars" / "c.png", 22)
    with caplog.at_level("INFO"):
        bench = create_benchmark(str(tmp_path), image_size=8)
    assert isinstance(bench, FolderBenchmark) and bench.class_names == ["cat", "dog"] and bench.num_classes == 2
    assert bench.ood_names == ["fox", "noise", "cars"]
    assert bench.ood_groups == {"fox": "near", "noise": "far", "cars": "far"} and bench.ood_flat == ["cars"]
    assert "far-OOD" in caplog.text and "cars" in caplog.text
    mixed = bench.test_sets()[1]
    assert len(mixed) == 3 + 1 and mixed[3][1] == -1 and mixed[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="At least one"):
        bench.test_sets(known=False, unknown=False)


def test_folder_benchmark_rejects_empty_and_duplicate_ood_sets(tmp_path):
    from dismax_plugin.adapters.pytorch_ood import FolderBenchmark

    for i in range(12):
        _image(tmp_path / "train" / "ab"[i % 2] / f"{i}.png", i)
    (tmp_path / "ood" / "far" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty.*no images"):
        FolderBenchmark(tmp_path)
    (tmp_path / "ood" / "far" / "empty").rmdir()
    _image(tmp_path / "ood" / "near" / "x" / "1.png")
    _image(tmp_path / "ood" / "x" / "2.png")
    with pytest.raises(ValueError, match="unique.*'x'"):
        FolderBenchmark(tmp_path)
    with pytest.raises(FileNotFoundError, match="train"):
        FolderBenchmark(tmp_path / "ood")


def test_memoized_digits_transform_each_item_once_and_return_the_same_items():
    calls = []

    def transform(image):
        calls.append(1)
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    plain, memo = DigitsBenchmark(transform=transform), DigitsBenchmark(transform=transform, memoize=True)
    calls.clear()
    first = [memo.train_set()[i] for i in range(5)]
    again = [memo.train_set()[i] for i in range(5)]
    assert len(calls) == 5  # the second pass reads the memo
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and y == y2
    for i, (x, y) in enumerate(first):
        px, py = plain.train_set()[i]
        assert torch.equal(x, px) and y == py
