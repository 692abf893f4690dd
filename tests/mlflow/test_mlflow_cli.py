"""`dismax train/compare` tracked to a real MLflow server; the logged model served in a fresh process;
the server stopped mid-training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

TINY = ["--model", "test_resnet", "--batch-size", "32", "--max-train-samples", "64"]


def _dismax(*argv, env=None, timeout=400):
    return subprocess.run(
        [sys.executable, "-m", "dismax_plugin", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def tracked_train(mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = _dismax(
        "train", *TINY, "--epochs", "2", "--output", str(out), "--tracking-uri", mlflow_server,
        "--experiment", "cli-train", "--run-name", "tiny", "--register-model", "dismax-digits-tiny",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_train_run_has_params_metric_histories_artifacts_and_models(mlflow_server, tracked_train):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = _runs(client, "cli-train")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    for key, value in {
        "model": "test_resnet", "head": "dismax", "loss": "dismax", "entropic_scale": "10.0", "fpr": "True",
        "optimizer": "sgd", "lr": "0.05", "scheduler": "cosine", "epochs": "2", "batch_size": "32",
        "image_size": "32", "seed": "0", "data": "digits",
    }.items():  # fmt: skip
        assert params[key] == value, key
    assert params["torch"] and params["timm"] and params["dismax_plugin"]

    for name in ("train_loss", "train_acc", "val_acc", "val_ece", "distance_scale"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    metrics = run.data.metrics
    assert metrics["temperature"] > 0
    assert {"ece_before_calibration", "ece_after_calibration", "test_acc"} <= set(metrics)
    for key in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "FPR95-ID"):
        assert 0.0 <= metrics[f"mean.MMLES.{key}"] <= 1.0
        assert f"digits_6_9.MPS.{key}" in metrics

    def listing(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"ood/results.json", "ood/histogram_MMLES.png", "ood/roc_MMLES.png"} <= listing("ood")
    assert {"calibration/reliability_before.png", "calibration/reliability_after.png"} <= listing("calibration")
    assert "checkpoint/checkpoint.pt" in listing("checkpoint")
    rows = json.loads(open(client.download_artifacts(run.info.run_id, "ood/results.json")).read())
    assert isinstance(rows, (list, dict)) and rows

    version = client.get_model_version("dismax-digits-tiny", "1")
    assert version.run_id == run.info.run_id


def test_logged_model_serves_raw_digits_in_a_fresh_process(mlflow_server, tracked_train, tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        import mlflow, numpy as np
        from sklearn.datasets import load_digits
        mlflow.set_tracking_uri(sys.argv[1])
        model = mlflow.pyfunc.load_model("models:/dismax-digits-tiny/1")
        digits = load_digits()
        keep = digits.target < 6
        images = (digits.images[keep][:5] * 255 / 16).astype(np.uint8)   # raw [N, 8, 8] uint8
        frame = model.predict(images)
        floats = model.predict(images[..., None].repeat(3, axis=3) / 255.0)  # [N, H, W, C] floats in [0, 1]
        print(json.dumps({"columns": list(frame.columns), "rows": len(frame),
                          "same": bool((frame["class"].values == floats["class"].values).all()),
                          "p": frame["probability"].tolist(), "flags": [bool(v) for v in frame["is_ood"]],
                          "dismax_loaded_before": "dismax_plugin.adapters.engine.training" in sys.modules}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, mlflow_server], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"class", "probability", "ood_score", "is_ood"} <= set(result["columns"])
    assert result["rows"] == 5 and result["same"]
    assert all(0.0 < p <= 1.0 for p in result["p"])
    assert not result["dismax_loaded_before"]  # served without the training code path


def test_compare_logs_two_child_runs_and_the_table_on_the_parent(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    proc = _dismax(
        "compare", *TINY, "--epochs", "1", "--detectors", "MaxSoftmax,KNN", "--output", str(tmp_path / "cmp"),
        "--tracking-uri", mlflow_server, "--experiment", "cli-compare",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "KNN" in proc.stdout and "MMLES" in proc.stdout
    client = MlflowClient(mlflow_server)
    runs = _runs(client, "cli-compare")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["head"] for c in children} == {"dismax", "linear"}
    assert "comparison.json" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_server_stopped_during_training_loses_nothing(mlflow_server_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    server = mlflow_server_factory("outage").start().wait(90)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dismax_plugin", "train", *TINY, "--epochs", "3", "--output", str(out),
         "--tracking-uri", server.uri, "--experiment", "outage"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.stop()  # the tracking server dies after epoch 1
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-4000:]
    assert (out / "checkpoint.pt").is_file() and (out / "model" / "model.safetensors").is_file()
    warned = stderr.count("TrackingUnavailableWarning") + stdout.count("TrackingUnavailableWarning")
    assert 1 <= warned <= 2  # once (as a warning, and in the log), not once per call
    # what the server did not receive is in the local fallback store, named in the output
    assert "mlflow.db" in stdout + stderr
    fallback = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for e in fallback.search_experiments() for r in fallback.search_runs([e.experiment_id])]
    assert runs, "nothing was written to the fallback store"
    steps = {m.step for r in runs for m in fallback.get_metric_history(r.info.run_id, "train_loss")}
    assert 3 in steps  # the last epoch's metrics were kept


def test_unreachable_tracking_uri_exits_2_before_training(tmp_path):
    from conftest import free_port

    start = time.monotonic()
    proc = _dismax("train", *TINY, "--epochs", "1", "--output", str(tmp_path / "o"),
                   "--tracking-uri", f"http://127.0.0.1:{free_port()}")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracking-uri" in lines[0] and "127.0.0.1" in lines[0]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
    assert time.monotonic() - start < 120
