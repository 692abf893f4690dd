"""The ``dismax`` command end to end on the embedded digits data, and its answers to bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dismax_plugin.adapters.engine.cli import main

TINY = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64",
        "--image-size", "16", "--no-track"]  # fmt: skip


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors (unknown choice)
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny `dismax train` run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "dismax"
    proc = subprocess.run(
        [sys.executable, "-m", "dismax_plugin", "train", *TINY, "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_train_writes_checkpoint_model_and_prints_table(trained_run):
    out, stdout = trained_run
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    assert ckpt["config"]["model"] == "test_resnet" and ckpt["config"]["head"] == "dismax"
    assert {"model", "optimizer", "scheduler", "rng", "history"} <= set(ckpt)
    assert (out / "model" / "model.safetensors").is_file()
    # the evaluation table names every OOD set of the digits benchmark and every native score
    for name in ("MMLES", "MPS", "ES", "MDS", "MMLS", "MaxSoftmax", "near", "far", "AUROC", "FPR95-ID", "digits_6_9",
                 "uniform_noise"):  # fmt: skip
        assert name in stdout
    assert "calibration: temperature" in stdout
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []  # atomic writes leave no temporary file


def _validation_logits(model_dir):
    """Logits at temperature 1 and labels of the run's validation split, rebuilt independently of the run."""
    from dismax_plugin.adapters import timm as dtimm
    from dismax_plugin.adapters.engine.data import build_data
    from dismax_plugin.adapters.engine.training import collect_logits

    model = dtimm.load_model(str(model_dir))
    head = dtimm.get_head(model)
    stored = float(head.temperature)
    head.set_temperature(1.0)
    preprocessing = dtimm.read_metadata(model_dir)["metadata"]["preprocessing"]
    data = build_data("digits", preprocessing, seed=0)
    logits, labels = collect_logits(model, data.val)
    return model, head, stored, logits, labels


def data_val(model):
    """The validation split of the digits, preprocessed as the saved model says."""
    from dismax_plugin.adapters import timm as dtimm
    from dismax_plugin.adapters.engine.data import build_data

    preprocessing = model.dismax_metadata["metadata"]["preprocessing"]
    assert dtimm.get_head(model) is not None
    return build_data("digits", preprocessing, seed=0).val


def test_saved_model_is_calibrated_and_flags_ood(trained_run):
    import dismax_plugin as dp
    from dismax_plugin.adapters.engine.training import collect_logits

    out, _ = trained_run
    model, head, stored, logits, labels = _validation_logits(out / "model")
    # the stored temperature is the ECE optimum on the validation split (the default --calibration)
    assert stored == pytest.approx(dp.calibrate_temperature(logits, labels, objective="ece"), rel=1e-6)
    head.set_temperature(stored)
    assert head.score == type(head).default_score and head.calibration_size == labels.numel()
    # calibration scores: every native score of the deployed (calibrated) validation logits, sorted
    deployed, _ = collect_logits(model, data_val(model))
    for name in dp.SCORE_NAMES:
        assert torch.equal(head.stored_scores(name), head.ood_score(deployed, name).sort().values)
    # on the deployed path exactly floor(N (1 - tpr)) validation images are flagged (distinct scores)
    for tpr in (0.9, 0.95, 0.99):
        flags = head.is_ood(deployed, tpr=tpr)
        assert flags.dtype == torch.bool and flags.shape == labels.shape
        assert int(flags.sum()) == dp.flagged_count(labels.numel(), tpr)


def test_evaluate_and_calibrate_commands(trained_run, capsys):
    out, _ = trained_run
    code, stdout, _ = _run(["evaluate", "--checkpoint", str(out), "--data", "digits", "--no-track"], capsys)
    assert code == 0
    assert "MMLES" in stdout and "AUROC" in stdout
    code, stdout, _ = _run(["calibrate", "--checkpoint", str(out), "--data", "digits", "--calibration", "nll"], capsys)
    assert code == 0 and "temperature" in stdout
    import dismax_plugin as dp

    _, head, stored, logits, labels = _validation_logits(out / "model")
    nll = dp.calibrate_temperature(logits, labels, objective="nll")
    ece = dp.calibrate_temperature(logits, labels, objective="ece")
    assert stored == pytest.approx(nll, rel=1e-6)  # the NLL optimum was written back ...
    assert abs(nll - ece) > 1e-3 * ece  # ... and it is not the ECE one the run stored
    assert head.score == type(head).default_score and head.calibration_size == labels.numel()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--model", "no_such_net_xyz"], "--model"),
        (["train", "--data", "no_such_dataset"], "--data"),
        (["train", "--optimizer", "sgdx"], "--optimizer"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--data-root", "/nonexistent/root"], "--data-root"),
        (["train", "--data", "/nonexistent/folder/"], "--data"),
        (["train", "--data", "cifar10_odin", "--data-root", "{tmp}"], "--data"),
        (["train", "--output", "/etc/hostname/run"], "--output"),
        (["train", "--pretrained-file", "/nonexistent.pth"], "--pretrained-file"),
        (["evaluate", "--checkpoint", "/nonexistent/model", "--no-track"], "--checkpoint"),
        (["train", "--resume", "--output", "{tmp}/empty"], "--resume"),
        (["train", "--head", "cosine"], "--head"),
        (["train", "--scheduler", "cosinex"], "--scheduler"),
        (["train", "--scheduler", "plateau"], "--scheduler"),  # not resumable exactly: not offered
        (["train", "--scheduler", "tanh"], "--scheduler"),
        (["train", "--head", "linear", "--detectors", "MaxSoftmax,NoSuchDetector"], "--detectors"),
        (["evaluate", "--checkpoint", "{tmp}", "--detectors", "nope", "--no-track"], "--detectors"),
        (["train", "--loss", "logitnorm"], "--loss"),  # LogitNorm is a linear-head loss
        (["train", "--head", "linear", "--loss", "dismax"], "--loss"),
        (["train", "--head", "linear", "--loss", "logitnorm", "--smoothing", "0.1"], "--loss logitnorm"),
        (["train", "--pretrained", "--pretrained-file", "/etc/hostname"], "--pretrained"),
        (["train", "--batch-size", "-3"], "--batch-size"),
        (["train", "--workers", "-1"], "--workers"),
        (["train", "--seed", "-2"], "--seed"),
        (["train", "--epochs", "two"], "--epochs"),
        (["train", "--lr", "nan"], "--lr"),
        (["compare", "--heads", "dismax,cosine", "--no-track"], "--heads"),
        (["compare", "--twins", "svm", "--no-track"], "--twins"),
        (["compare", "--seeds", "0,one", "--no-track"], "--seeds"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv = argv + ["--model", "test_resnet", "--no-track"] if "--model" not in argv else argv + ["--no-track"]
        if "--output" not in argv:
            argv += ["--output", str(tmp_path / "out")]
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_resume_with_another_architecture_is_refused(trained_run, capsys, tmp_path):
    out, _ = trained_run
    code, _, err = _run(["train", *TINY[2:], "--model", "test_vit", "--resume", "--output", str(out)], capsys)
    assert code == 2 and "--model" in err and "test_resnet" in err


def test_resume_with_another_head_is_refused(trained_run, capsys):
    out, _ = trained_run
    code, _, err = _run(["train", *TINY, "--head", "isomaxplus", "--resume", "--output", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--head" in err and "'dismax'" in err


def test_existing_run_is_not_overwritten_silently(trained_run, capsys):
    out, _ = trained_run
    code, _, err = _run(["train", *TINY, "--output", str(out)], capsys)
    assert code == 2 and "--resume" in err


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['dismax', '--help']\n"
        "try:\n    runpy.run_module('dismax_plugin', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('mlflow', 'timm', 'pytorch_ood') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def _write_image_folder(root):
    """A tiny ImageFolder layout from the bundled digits: train/<class>, val/<class>, ood/<name>."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = {}
    for image, label in zip(digits.images, digits.target):
        split = "ood/sevens" if label == 7 else ("train" if counts.get(label, 0) < 12 else "val")
        if label > 2 and label != 7:
            continue
        counts[label] = counts.get(label, 0) + 1
        if counts[label] > 16:
            continue
        folder = root / split / (str(label) if split != "ood/sevens" else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{label}_{counts[label]}.png")


def test_train_on_an_image_folder(tmp_path, capsys):
    _write_image_folder(tmp_path / "data")
    code, stdout, err = _run(
        ["train", *TINY, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--batch-size", "8"],
        capsys,
    )
    assert code == 0, err
    assert "sevens" in stdout and "MMLES" in stdout
    from dismax_plugin.adapters import timm as dtimm

    meta = dtimm.read_metadata(tmp_path / "run" / "model")
    assert meta["num_classes"] == 3 and meta["metadata"]["class_names"] == ["0", "1", "2"]


@pytest.mark.slow  # a whole training run with Mixup + CutMix + smoothing (the clash below stays in make test)
def test_mixup_with_an_isotropic_loss_trains(tmp_path, capsys):
    argv = ["train", *TINY, "--mixup", "0.4", "--cutmix", "1.0", "--smoothing", "0.1"]
    code, _, err = _run([*argv, "--head", "isomaxplus", "--output", str(tmp_path / "a")], capsys)
    assert code == 0, err


def test_mixup_clashes_with_fpr_before_training(tmp_path, capsys):
    argv = ["train", *TINY, "--mixup", "0.4", "--cutmix", "1.0", "--smoothing", "0.1"]
    code, _, err = _run([*argv, "--head", "dismax", "--output", str(tmp_path / "b")], capsys)
    assert code == 2 and "--no-fpr" in err
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
