"""What a run leaves and what the commands accept: ``--overwrite`` leaves no model of the previous run, a run
folder whose model is missing or stale is refused by ``evaluate``/``calibrate``, weights are written with the
user's umask, every command resolves ``--device`` alike and refuses options it does not use, and
``compare --resume`` continues an interrupted comparison."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat

import pytest
import torch

from dismax_plugin.adapters.engine import training
from dismax_plugin.adapters.engine.cli import main

TINY = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "16", "--max-train-samples", "32", "--no-track",
        "--image-size", "16", "--device", "cpu"]  # fmt: skip


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def _terminate_in_validation(monkeypatch, number: int):
    """SIGTERM to this process in the ``number``-th end-of-epoch validation from now."""
    calls, original = [], training.collect_logits

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "collect_logits", wrapped)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run, trained under umask 022."""
    out = tmp_path_factory.mktemp("runs") / "run"
    previous = os.umask(0o022)
    try:
        assert main(["train", *TINY, "--output", str(out)]) == 0
    finally:
        os.umask(previous)
    return out


def test_weights_and_config_are_written_with_the_users_umask(finished):
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(finished / "model" / name).st_mode) == 0o644, name  # not safetensors' 0600


def test_overwrite_removes_the_previous_model_and_evaluate_says_there_is_none(finished, tmp_path, monkeypatch,
                                                                             capsys):  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    code, _, err = _run(["train", *TINY, "--head", "isomax", "--output", str(run)], capsys)
    assert code == 2 and "--overwrite" in err[-1]  # the folder holds a run
    _terminate_in_validation(monkeypatch, 1)  # the new run is stopped in its first epoch
    code, _, _ = _run(["train", *TINY, "--head", "isomax", "--epochs", "2", "--overwrite", "--output", str(run)],
                      capsys)  # fmt: skip
    assert code == 128 + signal.SIGTERM
    assert not (run / "model").exists()  # the old dismax model is gone with the old run
    monkeypatch.undo()
    for command in ("evaluate", "calibrate"):
        code, _, err = _run([command, "--checkpoint", str(run), "--data", "digits"], capsys)
        assert code == 2 and len(err) == 1 and "no saved model" in err[0] and "epoch 1 of 2" in err[0], err


def test_a_stale_model_is_refused_unless_named(finished, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _terminate_in_validation(monkeypatch, 1)  # extended to 2 epochs, stopped after the second one's training
    code, _, _ = _run(["train", *TINY, "--epochs", "2", "--resume", "--output", str(run)], capsys)
    assert code == 128 + signal.SIGTERM
    monkeypatch.undo()
    code, _, err = _run(["calibrate", "--checkpoint", str(run), "--data", "digits"], capsys)
    assert code == 2 and len(err) == 1 and "stale" in err[0] and "epoch 2 of 2" in err[0], err
    code, out, err = _run(["calibrate", "--checkpoint", str(run / "model"), "--data", "digits"], capsys)
    assert code == 0 and "calibrated" in out, err


@pytest.mark.parametrize(
    "argv, needle",
    [(["evaluate", "--register-model", "m"], "--register-model"),
     (["compare", "--register-model", "m", *TINY], "--register-model"),
     (["evaluate", "--alias", "champion"], "--alias"),
     (["compare", "--alias", "champion", *TINY], "--alias"),
     (["evaluate", "--image-size", "64"], "--image-size 64"),
     (["calibrate", "--channels", "1"], "--channels 1"),
     (["evaluate", "--device", "gpu"], "--device"),
     (["calibrate", "--device", "gpu"], "--device"),
     (["train", *TINY, "--device", "gpu"], "--device")],
)  # fmt: skip
def test_options_a_command_cannot_use_exit_2_with_one_line(finished, argv, needle, capsys, tmp_path):
    if argv[0] in ("evaluate", "calibrate"):
        argv = [*argv, "--checkpoint", str(finished), "--data", "digits"] + (["--no-track"] * (argv[0] == "evaluate"))
    else:
        argv = [*argv, "--output", str(tmp_path / "new")]
    code, _, err = _run(argv, capsys)
    assert code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_a_missing_cuda_device_is_one_line_for_every_command(finished, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for argv in (["train", *TINY, "--output", str(tmp_path / "new")], ["calibrate", "--checkpoint", str(finished)]):
        code, _, err = _run([*argv, "--device", "cuda"], capsys)
        assert code == 2 and len(err) == 1 and "--device cuda: CUDA is not available" in err[0], err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibrate_runs_on_cuda_by_default(finished, tmp_path, capsys, monkeypatch):
    seen = []
    original = training.calibrate_model

    def record(model, *args, **kwargs):
        seen.append(next(model.parameters()).device.type)
        return original(model, *args, **kwargs)

    from dismax_plugin.adapters.engine import commands

    monkeypatch.setattr(commands, "calibrate_model", record)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert _run(["calibrate", "--checkpoint", str(run), "--data", "digits"], capsys)[0] == 0
    assert seen == ["cuda"]


# --------------------------------------------------------------------------- compare --resume
def _rows(output):
    with open(output / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
def test_compare_resume_keeps_finished_models_resumes_the_interrupted_one_and_trains_the_missing(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, "--heads", "dismax", "--twins", "ce,logitnorm", "--detectors", "MaxSoftmax",
            "--output", str(out)]  # fmt: skip
    code, _, err = _run([*argv, "--resume"], capsys)
    assert code == 2 and "--resume: no checkpoint under" in err[-1]
    _terminate_in_validation(monkeypatch, 2)  # dismax finishes, ce is stopped, logitnorm not started
    assert _run(argv, capsys)[0] == 128 + signal.SIGTERM
    assert (out / "seed0" / "dismax" / "model").is_dir() and not (out / "seed0" / "ce" / "model").exists()
    assert not (out / "seed0" / "logitnorm").exists() and not (out / "results.csv").exists()
    kept = (out / "seed0" / "dismax" / "checkpoint.pt").read_bytes()
    monkeypatch.undo()
    code, _, err = _run(argv, capsys)
    assert code == 2 and "--resume" in err[-1]  # an interrupted comparison is not overwritten silently
    code, stdout, err = _run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert (out / "seed0" / "dismax" / "checkpoint.pt").read_bytes() == kept  # not trained again
    assert {r["model"] for r in _rows(out)} == {"dismax", "ce", "logitnorm"}
    assert "resuming" in stdout
