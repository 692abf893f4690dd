"""One signal policy for the whole command, against a real ``mlflow server``: SIGTERM in the last epoch's
validation checkpoints and exits 143 (the run does not "finish"); in calibration, evaluation or logging the
tracked run ends ``KILLED`` with everything sent (or written to the local fallback when the server is gone);
a resumed run logs its parameters and where it resumed from.

The signal is a real ``SIGTERM`` the process sends itself at the start of the phase under test (the phase's
function is wrapped); the command runs in this process (``cli.main``).
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest
import torch

from dismax_plugin.adapters.engine import _report, training
from dismax_plugin.adapters.engine.cli import main

TINY = ["--model", "test_resnet", "--epochs", "2", "--batch-size", "16", "--max-train-samples", "32",
        "--image-size", "16", "--device", "cpu"]  # fmt: skip


def _terminate_at(monkeypatch, module, name, when=lambda *a, **k: True):
    """Wrap ``module.name`` so that it sends this process SIGTERM first (when ``when(*args)`` holds)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _train(output, uri, experiment, *extra):
    argv = ["train", *TINY, "--output", str(output), "--tracking-uri", uri, "--experiment", experiment, *extra]
    return main(argv)


def _runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)


@pytest.fixture
def experiment():
    return f"signals-{uuid.uuid4().hex[:8]}"


def test_sigterm_in_the_last_validation_checkpoints_and_resume_logs_its_params(
    mlflow_server, tmp_path, monkeypatch, capsys, experiment, one_thread
):
    calls = []

    def last_epoch(*args, **kwargs):
        calls.append(1)
        return len(calls) == 2  # the second validation: the last epoch's

    _terminate_at(monkeypatch, training, "collect_logits", last_epoch)
    out = tmp_path / "run"
    assert _train(out, mlflow_server, experiment) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "checkpoint saved" in err and "--resume" in err
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 0)  # the last epoch's checkpoint, and no model: not finished
    assert not (out / "model").exists()
    client, (killed,) = _runs(mlflow_server, experiment)
    assert killed.info.status == "KILLED" and killed.info.end_time
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "val_acc")] == [1, 2]

    monkeypatch.undo()  # resume: the run calibrates and saves its model (then stops in the evaluation, to be quick)
    _terminate_at(monkeypatch, _report, "evaluate_model")
    assert _train(out, mlflow_server, experiment, "--resume", "--workers", "0") == 128 + signal.SIGTERM
    assert (out / "model" / "model.safetensors").is_file()
    client, (_, resumed) = _runs(mlflow_server, experiment)
    params = resumed.data.params
    assert params["model"] == "test_resnet" and params["lr"] == "0.05" and params["epochs"] == "2"
    assert params["resumed_from"].startswith(str(out / "checkpoint.pt")) and "epoch 2" in params["resumed_from"]
    assert params["resumed_from_run_id"] == killed.info.run_id
    assert "temperature" in resumed.data.metrics


@pytest.mark.parametrize(
    "phase, module, name",
    [("calibration", training, "calibrate_model"), ("evaluation", _report, "evaluate_model"),
     ("logging", _report, "log_evaluation")],
)  # fmt: skip
def test_sigterm_after_training_marks_the_run_killed(
    mlflow_server, tmp_path, monkeypatch, capsys, experiment, one_thread, phase, module, name
):
    _terminate_at(monkeypatch, module, name)
    out = tmp_path / "run"
    assert _train(out, mlflow_server, experiment, "--epochs", "1") == 128 + signal.SIGTERM, phase
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "dismax train: interrupted by signal 15", err
    client, (run,) = _runs(mlflow_server, experiment)
    assert run.info.status == "KILLED" and run.info.end_time, phase
    assert run.data.params["model"] == "test_resnet" and "train_loss" in run.data.metrics
    assert ("temperature" in run.data.metrics) == (phase != "calibration")
    assert (out / "checkpoint.pt").is_file()
    assert (out / "model").exists() == (phase != "calibration")


@pytest.mark.slow  # a server of its own, and a fallback store created at the end
def test_sigterm_with_the_server_gone_writes_the_killed_run_to_the_fallback(
    mlflow_server_factory, tmp_path, monkeypatch, capsys, experiment, one_thread
):
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory("gone").start().wait(90)
    original = training.calibrate_model

    def calibrate_then_lose_the_server(*args, **kwargs):
        server.stop()  # the calibration metrics that follow are queued
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "calibrate_model", calibrate_then_lose_the_server)
    _terminate_at(monkeypatch, _report, "evaluate_model")
    out = tmp_path / "run"
    assert _train(out, server.uri, experiment, "--epochs", "1") == 128 + signal.SIGTERM
    assert f"sqlite:///{out.resolve() / 'mlflow.db'}" in capsys.readouterr().out  # the user is told where
    fallback = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (kept,) = fallback.search_runs([e.experiment_id for e in fallback.search_experiments()])
    assert kept.info.status == "KILLED" and kept.info.end_time
    assert {"temperature", "ece_after_calibration"} <= set(kept.data.metrics)  # the queue was flushed there
    (on_server,) = _runs(server.db_uri, experiment)[1]  # the server's own store, read directly
    assert kept.data.tags["dismax.fallback.source_uri"] == server.uri
    assert on_server.data.params["model"] == "test_resnet" and "train_loss" in on_server.data.metrics
