"""`dismax train/compare` tracked to a real MLflow server; the logged model served by `mlflow models serve`;
the server stopped mid-training; only rank 0 of a real two-process `torchrun` talks to MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dismax_plugin.adapters import timm as dtimm
from dismax_plugin.adapters.mlflow import preprocess_images

TINY = ["--model", "test_resnet", "--batch-size", "32", "--max-train-samples", "64"]
PARAMS = {
    "model": "test_resnet", "head": "dismax", "loss": "dismax", "entropic_scale": "10.0", "fpr": "True",
    "optimizer": "sgd", "lr": "0.05", "scheduler": "cosine", "batch_size": "32", "image_size": "32", "seed": "0",
    "data": "digits",
}  # fmt: skip
OOD_SETS = {"digits_6_9", "image_patches", "gaussian_noise", "uniform_noise"}
METRIC_KEYS = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "FPR95-ID")


def _dismax(*argv, env=None, timeout=400, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dismax_plugin", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} was not created"
    return client.search_runs([exp.experiment_id])


def _table(client, run_id, path, dst):
    """A JSON artifact of result rows as a list of row dicts: an MLflow table (``{"columns", "data"}``) or a
    report (``{"rows": [...]}``)."""
    table = json.loads(Path(client.download_artifacts(run_id, path, str(dst))).read_text())
    if "rows" in table:
        return table["rows"]
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _digits(n=6):
    """``n`` raw in-distribution digits, uint8 ``[N, 8, 8]`` as a user would send them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[digits.target < 6][:n] * 255 / 16).astype(np.uint8)


def _local_predictions(model_dir, images):
    """What the saved model itself says about ``images``: class, calibrated probability, OOD score, flag."""
    model = dtimm.load_model(model_dir, device="cpu").eval()
    preprocessing = dtimm.read_metadata(model_dir)["metadata"]["preprocessing"]
    head = dtimm.get_head(model)
    with torch.no_grad():
        logits = model(preprocess_images(images, preprocessing)).double()
    probability, predicted = torch.softmax(logits, 1).max(1)
    return {
        "class": predicted.tolist(),
        "probability": probability.tolist(),
        "ood_score": head.ood_score(logits, head.score).tolist(),
        "is_ood": head.is_ood(logits, 0.95).tolist(),
        "temperature": float(head.temperature),
    }


@pytest.fixture(scope="module")
def tracked_train(mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = _dismax(
        "train", *TINY, "--epochs", "2", "--output", str(out), "--tracking-uri", mlflow_server,
        "--experiment", "cli-train", "--run-name", "tiny", "--register-model", "dismax-digits-tiny",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_train_run_has_params_metric_histories_artifacts_and_models(mlflow_server, tracked_train, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = _runs(client, "cli-train")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert {k: params.get(k) for k in PARAMS} == PARAMS and params["epochs"] == "2"
    for name in ("torch", "timm", "dismax_plugin"):
        assert params[name] == __import__(name).__version__, name

    for name in ("train_loss", "train_acc", "val_acc", "val_ece", "distance_scale"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    metrics = run.data.metrics
    saved = _local_predictions(tracked_train / "model", _digits(2))
    assert metrics["temperature"] == pytest.approx(saved["temperature"], rel=1e-6)  # what the saved head holds
    assert metrics["ece_after_calibration"] <= metrics["ece_before_calibration"] + 1e-9

    rows = _table(client, run.info.run_id, "ood/results.json", tmp_path)
    assert {r["dataset"] for r in rows} >= OOD_SETS
    assert {r["method"].lower() for r in rows} >= {"mps", "es", "mds", "mmls", "mmles"}
    for row in rows:  # every row of the table is a metric of the run, with the same value
        for key in METRIC_KEYS:
            assert metrics[f"{row['dataset']}.{row['method']}.{key}"] == pytest.approx(row[key], abs=1e-9)
    assert metrics["test_acc"] == pytest.approx(rows[0]["ACC"])
    method = next(r["method"] for r in rows if r["method"].lower() == "mmles")

    def listing(path=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert {"ood/results.json", f"ood/histogram_{method}.png", f"ood/roc_{method}.png"} <= listing("ood")
    assert {"calibration/reliability_before.png", "calibration/reliability_after.png"} <= listing("calibration")
    assert "checkpoint/checkpoint.pt" in listing("checkpoint")
    assert run.data.tags["dismax.pytorch_model.serialization"] == "pt2"

    # data lineage: the test set and every OOD set with its group; OOD metrics belong to the model and set
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"in-distribution": "test", "digits_6_9": "ood-near", "image_patches": "ood-far",
                        "gaussian_noise": "ood-far", "uniform_noise": "ood-far"}  # fmt: skip
    assert json.loads(inputs["in-distribution"].dataset.profile)["num_rows"] == 325
    assert json.loads(inputs["digits_6_9"].dataset.profile)["num_rows"] == 714
    (served,) = [o.model_id for o in run.outputs.model_outputs if client.get_logged_model(o.model_id).name == "model"]
    linked = {m.key: (m.dataset_name, m.dataset_digest) for m in client.get_logged_model(served).metrics}
    for name in OOD_SETS:
        assert linked[f"{name}.{method}.AUROC"] == (name, inputs[name].dataset.digest), name
    version = client.get_model_version("dismax-digits-tiny", "1")
    assert version.run_id == run.info.run_id


def _serve(model_uri, port, env, log):
    """``mlflow models serve`` as the README shows it, with the venv's bin (uvicorn) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_mlflow_models_serve_answers_curl_with_the_local_models_predictions(
    mlflow_server, tracked_train, tmp_path, free_port
):
    import signal

    port = free_port()
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(tmp_path / "serve.log", "wb") as log:
        server = _serve("models:/dismax-digits-tiny/1", port, env, log)
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
            images = _digits(6)
            body = json.dumps({"inputs": images.tolist()})  # raw [N, 8, 8] uint8 digits
            curl = subprocess.run(
                ["curl", "-s", "-X", "POST", f"http://127.0.0.1:{port}/invocations",
                 "-H", "Content-Type: application/json", "-d", body],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    assert curl.returncode == 0, curl.stderr
    served = json.loads(curl.stdout)["predictions"]
    want = _local_predictions(tracked_train / "model", images)
    assert [row["class"] for row in served] == want["class"]
    assert [row["is_ood"] for row in served] == want["is_ood"]
    np.testing.assert_allclose([row["probability"] for row in served], want["probability"], rtol=1e-5)
    np.testing.assert_allclose([row["ood_score"] for row in served], want["ood_score"], rtol=1e-5, atol=1e-8)


def test_compare_logs_two_child_runs_and_the_table_on_the_parent(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    proc = _dismax(
        "compare", *TINY, "--epochs", "1", "--twins", "ce", "--detectors", "MaxSoftmax,KNN",
        "--output", str(tmp_path / "cmp"), "--tracking-uri", mlflow_server, "--experiment", "cli-compare",
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
    rows = _table(client, parents[0].info.run_id, "comparison/results.json", tmp_path)
    assert {r["method"] for r in rows} >= {"MaxSoftmax", "KNN", "MMLES"}  # both models' rows on the parent


def _store_run(client, run_id=None, source_id=None):
    """The run with ``run_id``, or the one whose ``dismax.fallback.source_run_id`` is ``source_id``."""
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    if run_id is not None:
        return next(r for r in runs if r.info.run_id == run_id)
    (run,) = [r for r in runs if r.data.tags.get("dismax.fallback.source_run_id") == source_id]
    return run


def _artifacts(client, run_id, path=None):
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


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
    assert f"sqlite:///{out.resolve() / 'mlflow.db'}" in stdout + stderr  # the fallback store is named

    # the server's own store (read directly: the server is gone) and the fallback store hold the run together
    primary = MlflowClient(server.db_uri)
    (server_run,) = _runs(primary, "outage")
    fallback = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    kept = _store_run(fallback, source_id=server_run.info.run_id)
    assert kept.data.tags["dismax.fallback.source_uri"] == server.uri and kept.info.status == "FINISHED"
    for name in ("train_loss", "train_acc", "val_acc", "lr"):
        steps = [m.step for c, r in ((primary, server_run), (fallback, kept))
                 for m in c.get_metric_history(r.info.run_id, name)]  # fmt: skip
        assert sorted(steps) == [1, 2, 3], name  # every epoch once, on one side or the other
    params = {**server_run.data.params, **kept.data.params}
    assert {k: params.get(k) for k in PARAMS} == PARAMS
    metrics = {**server_run.data.metrics, **kept.data.metrics}
    assert {"temperature", "test_acc"} <= set(metrics)
    assert {f"{name}.MMLES.AUROC".lower() for name in OOD_SETS} <= {key.lower() for key in metrics}
    artifacts = _artifacts(primary, server_run.info.run_id) | _artifacts(fallback, kept.info.run_id)
    assert {"ood/results.json", "checkpoint/checkpoint.pt", "calibration/reliability_after.png"} <= artifacts
    models = fallback.search_logged_models(experiment_ids=[kept.info.experiment_id])
    assert {m.name for m in models} == {"model", "pytorch_model"}
    assert all(str(m.status).endswith("READY") and m.source_run_id == kept.info.run_id for m in models)


def test_unreachable_tracking_uri_exits_2_before_training(tmp_path, free_port):

    proc = _dismax("train", *TINY, "--epochs", "1", "--output", str(tmp_path / "o"),
                   "--tracking-uri", f"http://127.0.0.1:{free_port()}")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracking-uri" in lines[0] and "127.0.0.1" in lines[0]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_only_rank_0_talks_to_mlflow_under_ddp(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "cwd"  # where a stray rank would create MLflow's default local store
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dismax_plugin",
         "train", "--model", "test_vit", "--head", "isomaxplus", "--epochs", "1", "--max-train-samples", "32",
         "--batch-size", "8", "--scheduler", "none", "--device", "cpu", "--output", str(tmp_path / "ddp"),
         "--tracking-uri", mlflow_server, "--experiment", "cli-ddp"],
        capture_output=True, text=True, timeout=400, cwd=work,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(mlflow_server)
    (run,) = _runs(client, "cli-ddp")  # one run: rank 1 created none
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"ood", "checkpoint"}
    assert sorted(p.name for p in work.iterdir()) == []  # no mlflow.db / mlruns from any rank


# MLflow's own telemetry stays off when any of these is set (mlflow/telemetry/utils.py): a user's shell has none
_NO_TELEMETRY_MARKERS = (
    "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "CIRCLECI", "GITLAB_CI",
    "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE",
    "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",
)  # fmt: skip
_OPTED_IN = """
import sys, time
from dismax_plugin.adapters.mlflow import MlflowTracker
tracker = MlflowTracker(sys.argv[1], experiment="telemetry")
tracker.start()
tracker.log_metrics({"a": 1.0})
tracker.end()
time.sleep(2)  # MLflow's telemetry threads run in the background
"""


def _guarded(tmp_path, name, argv, **env):
    log = tmp_path / f"{name}.jsonl"
    environment = {k: v for k, v in os.environ.items() if k not in _NO_TELEMETRY_MARKERS}
    environment.update(SOCKET_LOG=str(log), **env)
    guard = str(Path(__file__).with_name("_socket_guard.py"))
    proc = subprocess.run([sys.executable, guard, *argv], capture_output=True, text=True, timeout=400,
                          env=environment, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_tracked_run_on_a_local_store_connects_nowhere_else(tmp_path):
    # the guard works: a user who opts in to MLflow's telemetry gets its outside lookup (refused here)
    (tmp_path / "opted_in.py").write_text(_OPTED_IN)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    refused = _guarded(tmp_path, "opted-in", ["opted_in.py", store], MLFLOW_DISABLE_TELEMETRY="false")
    assert refused and all("mlflow-telemetry" in target for _, target in refused), refused
    # by default a tracked `dismax train` talks to its local store only
    argv = ["dismax_plugin", "train", *TINY, "--epochs", "1", "--output", str(tmp_path / "run"), "--tracking-uri",
            store, "--experiment", "telemetry"]  # fmt: skip
    assert _guarded(tmp_path, "default", argv) == []
    from mlflow.tracking import MlflowClient

    runs = _runs(MlflowClient(store), "telemetry")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # both runs were tracked
