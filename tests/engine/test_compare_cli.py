"""``dismax compare`` end to end (run_compare and the CLI): outputs, near/far groups, seeds, the standard
benchmarks on miniature on-disk replicas of their exact layouts (nothing downloaded), and bad input."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import dismax_plugin as dp
from dismax_plugin.adapters.engine.cli import main
from dismax_plugin.adapters.engine.compare import run_compare
from dismax_plugin.adapters.engine.tracking import Tracker
from dismax_plugin.adapters.engine.training import TrainConfig

TINY = {"model": "test_resnet", "epochs": 1, "batch_size": 16, "max_train_samples": 48, "eval_batch_size": 128}
TINY_ARGV = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "16", "--max-train-samples", "48", "--no-track"]


def _args(output, **options) -> argparse.Namespace:
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    values |= {"heads": "dismax", "twins": "ce", "seeds": "0", "detectors": "MaxSoftmax,KNN", "command": "compare"}
    return argparse.Namespace(**(values | TINY | {"output": str(output)} | options))


class _Recording(Tracker):
    """Keeps what a run logs (the parent and its children share the lists)."""

    def __init__(self, log=None, name="parent"):
        self.log, self.name = (log if log is not None else []), name

    def log_metrics(self, metrics, step=None):
        self.log.append((self.name, "metrics", dict(metrics)))

    def log_table(self, rows, artifact_file):
        self.log.append((self.name, "table", artifact_file))

    def log_figure(self, figure, artifact_file):
        self.log.append((self.name, "figure", artifact_file))

    def log_artifact(self, local_path, artifact_path=None):
        self.log.append((self.name, "artifact", os.path.basename(local_path)))

    def child(self, run_name):
        import contextlib

        return contextlib.nullcontext(_Recording(self.log, run_name))


def test_notes_say_which_detectors_did_not_run_where():
    from types import SimpleNamespace

    from dismax_plugin.adapters.engine.compare import _notes

    data = SimpleNamespace(benchmark=SimpleNamespace(ood_groups={"a": "near", "b": "far"}))
    rows = [{"tuning": "defaults"}]
    skipped = [{"model": "dismax", "method": "ViM", "reason": "needs W", "seed": s} for s in (0, 1)]
    skipped.append({"model": "logitnorm", "method": "SHE", "reason": "fit failed", "seed": 1})
    notes = _notes(data, rows, skipped, [0, 1])
    assert "near-OOD test sets: a; far-OOD test sets: b" in notes and "seeds: [0, 1]" in notes
    assert "ViM not run on dismax: needs W" in notes and "SHE not run on logitnorm (seeds [1]): fit failed" in notes
    assert any("pytorch-ood's defaults" in note for note in notes)
    assert any("T = 1" in note for note in notes) and any("reported numbers: the test sets" in n for n in notes)


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_digits_comparison_writes_tidy_results_report_and_figures(tmp_path, caplog):
    tracker = _Recording()
    args = _args(tmp_path / "cmp", twins="logitnorm", seeds="0,1", image_size=8)  # 8 px: the protocol, cheaply
    with caplog.at_level("INFO", logger="dismax_plugin"):
        assert run_compare(args, tracker) == 0
    out = tmp_path / "cmp"
    every = _read_csv(out / "results.csv")
    assert list(every[0]) == ["model", "seed", "split", "method", "dataset", "group", "AUROC", "AUPR-IN",
                              "AUPR-OUT", "FPR95-ID", "FPR95TPR", "ACC", "ECE", "ECE-raw", "fit_s", "images_per_s",
                              "tuning"]  # fmt: skip
    rows = [r for r in every if r["split"] == "test"]
    validation = [r for r in every if r["split"] == "val"]  # the digits have OOD validation sets
    assert len(validation) == len(rows) and {r["dataset"] for r in validation} == {r["dataset"] for r in rows}
    assert {r["tuning"].split()[0] for r in rows if r["method"] == "KNN"} == {"GridSearch"}
    assert {(r["model"], r["seed"]) for r in rows} == {(m, s) for m in ("dismax", "logitnorm") for s in "01"}
    assert {r["group"] for r in rows if r["dataset"] == "digits_6_9"} == {"near"}
    assert {r["group"] for r in rows if r["dataset"] != "digits_6_9"} == {"far"}
    assert {r["method"] for r in rows if r["model"] == "logitnorm"} == {"MaxSoftmax", "KNN"}
    assert {"MMLES", "MPS", "MaxSoftmax", "KNN"} <= {r["method"] for r in rows if r["model"] == "dismax"}
    assert all(math.isfinite(float(r["AUROC"])) and float(r["images_per_s"]) > 0 for r in rows)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert all(s["seeds"] == 2 and s["near AUROC std"] is not None for s in summary)
    report = (out / "report.md").read_text()
    assert "| logitnorm | MaxSoftmax |" in report and "**" in report and "near-OOD test sets: digits_6_9" in report
    assert "chosen on the OOD validation split" in report and "GridSearch on the validation split" in report
    assert "ID test = digits 0-5, 30%" in report and "OOD validation sets: digits_6_9 (near, 143)" in report
    default = dp.DisMaxHead.default_score.upper()
    for figure in ("near_far_auroc.png", f"histogram_dismax_{default}.png", "histogram_logitnorm_MaxSoftmax.png"):
        assert Image.open(out / figure).size[0] > 300
    # every trained model is a child run; the parent gets the table, the figures and the files
    children = {name for name, kind, _ in tracker.log if name != "parent"}
    assert children == {f"{m}-seed{s}" for m in ("dismax", "logitnorm") for s in (0, 1)}
    parent = {(kind, what) for name, kind, what in tracker.log if name == "parent" and kind != "metrics"}
    assert {("table", "comparison/results.json"), ("artifact", "results.csv"), ("artifact", "report.md"),
            ("figure", "comparison/near_far_auroc.png")} <= parent  # fmt: skip
    seed_metrics = [what for name, kind, what in tracker.log if name == "parent" and kind == "metrics"]
    assert len(seed_metrics) == 2 and "dismax.MMLES.near.AUROC" in seed_metrics[0]
    printed = caplog.text[caplog.text.index("Comparison on digits") :]
    summary_lines = printed[: printed.index("INFO")].splitlines()
    assert len(summary_lines) > 10 and all(len(line) <= 100 for line in summary_lines) and "±" in printed


# ---------------------------------------------------------------------------- standard benchmarks on disk
def _png(path, size=20, grey=False, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size, size) if grey else (size, size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)


def _cifar_files(root, cifar, num_classes: int, per_file: int = 6) -> None:
    """torchvision's CIFAR python batches (pickled dicts of uint8 rows and labels) and the meta file."""
    folder = os.path.join(root, cifar.base_folder)
    os.makedirs(folder)
    key = "labels" if num_classes == 10 else "fine_labels"
    for index, (filename, _) in enumerate([*cifar.train_list, *cifar.test_list]):
        rng = np.random.default_rng(index)
        labels = [(index + i) % 2 for i in range(per_file)]  # classes 0 and 1
        entry = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), key: labels}
        with open(os.path.join(folder, filename), "wb") as handle:
            pickle.dump(entry, handle)
    with open(os.path.join(folder, cifar.meta["filename"]), "wb") as handle:
        pickle.dump({cifar.meta["key"]: [f"c{i}" for i in range(num_classes)]}, handle)


def _odin_replica(root, name, monkeypatch) -> None:
    import pytorch_ood.dataset.img.odin as odin
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.utils as tv_utils
    from pytorch_ood.dataset.img import LSUNCrop, LSUNResize, TinyImageNetCrop, TinyImageNetResize
    from torchvision.datasets import CIFAR10, CIFAR100

    def present(fpath, md5=None):  # the replica's files cannot have the real md5 sums
        return os.path.isfile(fpath)

    for module in (tv_utils, tv_cifar, odin):
        monkeypatch.setattr(module, "check_integrity", present)
    _cifar_files(root, CIFAR10 if name == "CIFAR10_ODIN" else CIFAR100, 10 if name == "CIFAR10_ODIN" else 100)
    for k, dataset in enumerate((TinyImageNetCrop, TinyImageNetResize, LSUNResize, LSUNCrop)):
        with open(os.path.join(root, dataset.filename), "wb") as handle:
            handle.write(b"archive")
        for i in range(4):
            _png(os.path.join(root, dataset.base_folder, f"{i}.png"), size=32, seed=10 * k + i)


_OPENOOD = {  # imglist subdir, ID lists, validation OOD list, OOD test lists (file, folder) of OpenOOD v1.5
    "CIFAR10_OpenOOD": ("cifar10", "cifar10", "val_tin.txt",
                        [("test_cifar100.txt", "cifar100"), ("test_tin.txt", "tin"), ("test_mnist.txt", "mnist"),
                         ("test_svhn.txt", "svhn"), ("test_texture.txt", "texture"),
                         ("test_places365.txt", "places365")]),
    "CIFAR100_OpenOOD": ("cifar100", "cifar100", "val_tin.txt",
                         [("test_cifar10.txt", "cifar10"), ("test_tin.txt", "tin"), ("test_mnist.txt", "mnist"),
                          ("test_svhn.txt", "svhn"), ("test_texture.txt", "texture"),
                          ("test_places365.txt", "places365")]),
    "ImageNet_OpenOOD": ("imagenet", "imagenet", "val_openimage_o.txt",
                         [("test_ssb_hard.txt", "ssb_hard"), ("test_ninco.txt", "ninco"),
                          ("test_inaturalist.txt", "inaturalist"), ("test_textures.txt", "texture"),
                          ("test_openimage_o.txt", "openimage_o")]),
    "ImageNet200_OpenOOD": ("imagenet200", "imagenet200", "val_openimage_o.txt",
                            [("test_ssb_hard.txt", "ssb_hard"), ("test_ninco.txt", "ninco"),
                             ("test_inaturalist.txt", "inaturalist"), ("test_textures.txt", "texture"),
                             ("test_openimage_o.txt", "openimage_o")]),
}  # fmt: skip


def _openood_replica(root, hub, name) -> None:
    """OpenOOD's image lists (in pytorch-ood's imglist cache under the torch.hub dir) and the listed images."""
    subdir, id_name, val_ood, tests = _OPENOOD[name]
    lists = os.path.join(hub, "openood_benchmark_imglist", "benchmark_imglist", subdir)
    os.makedirs(lists)
    id_folder = "imagenet_1k" if name.startswith("ImageNet") else id_name

    def write(fname, folder, count, labelled, seed):
        lines = []
        for i in range(count):
            relative = f"{folder}/{'train/n0' + str(i % 2) + '/' if labelled else ''}{fname[:-4]}_{i}.png"
            _png(os.path.join(root, relative), grey=folder == "mnist", seed=seed + i)
            lines.append(f"{relative} {i % 2 if labelled else -1}")
        with open(os.path.join(lists, fname), "w") as handle:
            handle.write("\n".join(lines) + "\n")

    write(f"train_{id_name}.txt", id_folder, 24, True, 0)
    write(f"val_{id_name}.txt", id_folder, 6, True, 100)
    write(f"test_{id_name}.txt", id_folder, 8, True, 200)
    write(val_ood, "tin" if val_ood == "val_tin.txt" else "openimage_o", 6, False, 300)
    for k, (fname, folder) in enumerate(tests):
        write(fname, folder, 5, False, 400 + 10 * k)


def _standard(name, offline, monkeypatch):
    root = offline / "data"
    root.mkdir()
    if name.endswith("_ODIN"):
        _odin_replica(str(root), name, monkeypatch)
    else:
        _openood_replica(str(root), str(offline / "hub"), name)
    return root


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("CIFAR10_ODIN", marks=pytest.mark.slow),  # the OpenOOD replica runs in make test
        "CIFAR10_OpenOOD",
        pytest.param("CIFAR100_ODIN", marks=pytest.mark.slow),
        pytest.param("CIFAR100_OpenOOD", marks=pytest.mark.slow),
        pytest.param("ImageNet_OpenOOD", marks=pytest.mark.slow),
        pytest.param("ImageNet200_OpenOOD", marks=pytest.mark.slow),
    ],
)
def test_standard_benchmark_end_to_end_from_a_replica_on_disk(name, offline, monkeypatch):
    from dismax_plugin.adapters.pytorch_ood import STANDARD_GROUPS

    root = _standard(name, offline, monkeypatch)
    out = offline / "cmp"
    args = _args(out, data=name, data_root=str(root), image_size=16, max_train_samples=None)
    assert run_compare(args, Tracker()) == 0
    every = _read_csv(out / "results.csv")
    rows = [r for r in every if r["split"] == "test"]
    # OpenOOD's own OOD validation set is scored as validation rows; ODIN has none
    assert {r["dataset"] for r in every if r["split"] == "val"} == ({"TinyImageNet"} if "CIFAR" in name and
                                                                   "OpenOOD" in name else {"OpenImagesO"} if
                                                                   "OpenOOD" in name else set())  # fmt: skip
    groups = STANDARD_GROUPS[name]
    for model in ("dismax", "ce"):
        for method in ("MaxSoftmax", "KNN"):
            chosen = [r for r in rows if r["model"] == model and r["method"] == method]
            assert [r["dataset"] for r in chosen] == list(groups)  # every OOD set, in order
            assert [r["group"] for r in chosen] == list(groups.values())
            assert all(math.isfinite(float(r[k])) for r in chosen for k in ("AUROC", "FPR95-ID", "ACC"))
    assert {"near", "far"} == {r["group"] for r in rows}
    tuned = {r["tuning"] for r in rows if r["method"] == "KNN"}
    # OpenOOD has an ID + OOD validation split: KNN's k is tuned there; ODIN has none: library defaults
    assert all(t.startswith("GridSearch k=") for t in tuned) if "OpenOOD" in name else tuned == {"defaults"}
    if "OpenOOD" in name:  # nothing added to the imglist cache the test wrote (no download)
        assert os.listdir(offline / "hub") == ["openood_benchmark_imglist"]


# ---------------------------------------------------------------------------- bad input: exit 2, one line
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--twins", "ce,focal"], "--twins"),
        (["--heads", "dismax,softmax"], "--heads"),
        (["--detectors", "MaxSoftmax,Energy"], "--detectors"),
        (["--seeds", "0,one"], "--seeds"),
    ],
)
def test_bad_compare_options_exit_2_with_one_line(extra, expected, tmp_path, capsys):
    code = main(["compare", *TINY_ARGV, "--output", str(tmp_path / "cmp"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp" / "results.csv").exists()


def test_an_ood_folder_without_images_exits_2(tmp_path, capsys):
    for label in ("a", "b"):
        for i in range(3):
            _png(str(tmp_path / "data" / "train" / label / f"{i}.png"), seed=i)
    (tmp_path / "data" / "ood" / "far" / "empty").mkdir(parents=True)
    code = main(["compare", *TINY_ARGV, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err and "no images" in err and len(err.strip().splitlines()) == 1


def test_a_benchmark_without_near_far_lists_exits_2(offline, monkeypatch, capsys):
    from dismax_plugin.adapters.pytorch_ood import STANDARD_GROUPS

    root = _standard("CIFAR10_OpenOOD", offline, monkeypatch)
    monkeypatch.setitem(STANDARD_GROUPS, "CIFAR10_OpenOOD", {"CIFAR100": "near"})  # lists without the other sets
    argv = ["compare", *TINY_ARGV, "--data", "CIFAR10_OpenOOD", "--data-root", str(root),
            "--output", str(offline / "cmp")]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "near" in err and "TinyImageNet" in err and len(err.strip().splitlines()) == 1
