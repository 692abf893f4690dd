"""`dismax train/compare` tracked to a real MLflow server; the registered model's alias served by `mlflow models
serve` with serve-time params, loaded in Python and evaluated by the `dismax-ood` evaluator (found through its
entry point) with a passing and a failing gate; the server stopped mid-training; only rank 0 of a real
two-process `torchrun` talks to MLflow."""

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

TINY = ["--model", "test_resnet", "--batch-size", "32", "--max-train-samples", "64", "--image-size", "16"]
PARAMS = {
    "model": "test_resnet", "head": "dismax", "loss": "dismax", "entropic_scale": "10.0", "fpr": "True",
    "optimizer": "sgd", "lr": "0.05", "scheduler": "cosine", "batch_size": "32", "image_size": "16", "seed": "0",
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


_HEAVY = ("timm", "pytorch_ood", "torchvision", "mlflow")
_IMPORTED_AT_EXIT = (
    "import runpy, sys\n"
    "try:\n    runpy.run_module('dismax_plugin', run_name='__main__')\n"
    "except SystemExit:\n"
    f"    print(sorted(m for m in {_HEAVY!r} if m in sys.modules))\n"
    "    raise\n"
)


def _dismax_imports(*argv):
    """``dismax *argv`` as :func:`_dismax`, and which of the heavy libraries it had imported when it exited."""
    proc = subprocess.run([sys.executable, "-c", _IMPORTED_AT_EXIT, *argv], capture_output=True, text=True,
                          timeout=400)  # fmt: skip
    return proc, json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


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


def _near(n=6):
    """``n`` raw digits 6-9 (the near OOD set), as :func:`_digits`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[digits.target >= 6][:n] * 255 / 16).astype(np.uint8)


def _local_logits(model_dir, images):
    """The saved model's head and its calibrated logits of ``images`` (the library, not MLflow), in batches
    of 64 as the served model runs them (so the very same floats)."""
    model = dtimm.load_model(model_dir, device="cpu").eval()
    x = preprocess_images(images, dtimm.read_metadata(model_dir)["metadata"]["preprocessing"])
    with torch.no_grad():
        return dtimm.get_head(model), torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)]).double()


def _local_predictions(model_dir, images, tpr=0.95, score=None):
    """What the saved model itself says about ``images``: class, calibrated probability, OOD score, flag."""
    head, logits = _local_logits(model_dir, images)
    probability, predicted = torch.softmax(logits, 1).max(1)
    return {
        "class": predicted.tolist(),
        "probability": probability.tolist(),
        "ood_score": head.ood_score(logits, score).tolist(),
        "is_ood": head.is_ood(logits, tpr, score).tolist(),
        "temperature": float(head.temperature),
    }


@pytest.fixture(scope="module")
def tracked_train(mlflow_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    proc = _dismax(
        "train", *TINY, "--epochs", "2", "--output", str(out), "--tracking-uri", mlflow_server,
        "--experiment", "cli-train", "--run-name", "tiny", "--register-model", "dismax-digits-tiny",
        "--alias", "champion", "--alias", "staging",
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
    assert {r.get("split", "test") for r in rows} == {"test", "val"}  # digits has an OOD validation split
    for row in rows:  # every row of the table is a metric of the run (validation rows prefixed), same value
        prefix = "val." if row.get("split") == "val" else ""
        for key in METRIC_KEYS:
            assert metrics[f"{prefix}{row['dataset']}.{row['method']}.{key}"] == pytest.approx(row[key], abs=1e-9)
    assert metrics["test_acc"] == pytest.approx(next(r["ACC"] for r in rows if r.get("split", "test") == "test"))
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
    assert json.loads(inputs["digits_6_9"].dataset.profile)["num_rows"] == 571  # its test part (143 are OOD validation)
    (served,) = [o.model_id for o in run.outputs.model_outputs if client.get_logged_model(o.model_id).name == "model"]
    linked = {m.key: (m.dataset_name, m.dataset_digest) for m in client.get_logged_model(served).metrics}
    for name in OOD_SETS:
        assert linked[f"{name}.{method}.AUROC"] == (name, inputs[name].dataset.digest), name
    version = client.get_model_version("dismax-digits-tiny", "1")
    assert version.run_id == run.info.run_id
    assert client.get_registered_model("dismax-digits-tiny").aliases == {"champion": "1", "staging": "1"}


def _serve(model_uri, port, env, log):
    """``mlflow models serve`` as the README shows it, with the venv's bin (uvicorn) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _post(port, body):
    """POST ``body`` (JSON) to the scoring server: ``(HTTP status, parsed answer)``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for(server, port, log_path, seconds=240):
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow models serve did not start"
        time.sleep(0.5)


def test_champion_served_by_mlflow_models_serve_takes_params_exactly_like_the_library(
    mlflow_server, tracked_train, tmp_path, free_port
):
    import signal

    port = free_port()
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_DISABLE_TELEMETRY": "true"}
    images = _digits(40)  # raw [N, 8, 8] uint8 in-distribution digits
    answers = {}
    with open(tmp_path / "serve.log", "wb") as log:
        server = _serve("models:/dismax-digits-tiny@champion", port, env, log)
        try:
            _wait_for(server, port, tmp_path / "serve.log")
            body = json.dumps({"inputs": images[:6].tolist(), "params": {"tpr": 0.99}})  # the README's curl
            curl = subprocess.run(
                ["curl", "-s", "-X", "POST", f"http://127.0.0.1:{port}/invocations",
                 "-H", "Content-Type: application/json", "-d", body],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            answers["default"] = _post(port, {"inputs": images.tolist()})
            for tpr in (0.5, 0.8, 0.99):
                answers[tpr] = _post(port, {"inputs": images.tolist(), "params": {"tpr": tpr}})
            answers["mds"] = _post(port, {"inputs": images.tolist(), "params": {"score": "mds"}})
            answers["bad tpr"] = _post(port, {"inputs": images.tolist(), "params": {"tpr": 1.5}})
            answers["bad score"] = _post(port, {"inputs": images.tolist(), "params": {"score": "nope"}})
            answers["one image"] = _post(port, {"inputs": images[0].tolist()})  # [8, 8]: one image
            answers["ambiguous"] = _post(port, {"inputs": images[:3].tolist()})  # [3, 8, 8]: 3 images or 1 RGB
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    assert curl.returncode == 0, curl.stderr
    served = json.loads(curl.stdout)["predictions"]
    assert [row["is_ood"] for row in served] == _local_predictions(tracked_train / "model", images[:6], 0.99)["is_ood"]

    status, answer = answers["default"]
    assert status == 200, answer
    rows, want = answer["predictions"], _local_predictions(tracked_train / "model", images)
    assert [row["class"] for row in rows] == want["class"] and [row["is_ood"] for row in rows] == want["is_ood"]
    np.testing.assert_allclose([row["probability"] for row in rows], want["probability"], rtol=1e-5)
    np.testing.assert_allclose([row["ood_score"] for row in rows], want["ood_score"], rtol=1e-5, atol=1e-8)
    flagged = []
    for tpr in (0.5, 0.8, 0.99):  # raising tpr flags fewer ID images, exactly the images head.is_ood flags
        status, answer = answers[tpr]
        assert status == 200, answer
        is_ood = [row["is_ood"] for row in answer["predictions"]]
        assert is_ood == _local_predictions(tracked_train / "model", images, tpr)["is_ood"], tpr
        flagged.append(sum(is_ood))
    assert flagged == sorted(flagged, reverse=True) and flagged[0] > flagged[-1], flagged
    status, answer = answers["mds"]
    mds = _local_predictions(tracked_train / "model", images, score="mds")
    assert status == 200 and [row["is_ood"] for row in answer["predictions"]] == mds["is_ood"]
    np.testing.assert_allclose([row["ood_score"] for row in answer["predictions"]], mds["ood_score"], rtol=1e-5)
    assert not np.allclose(mds["ood_score"], want["ood_score"])  # another score
    for key, words in (("bad tpr", "params 'tpr' must be a number in (0, 1]"),
                       ("bad score", "params 'score' must be one of ['mps', 'es', 'mds'"),
                       ("ambiguous", "images of shape (3, 8, 8) are ambiguous")):  # fmt: skip
        status, answer = answers[key]
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
        assert answer["message"].splitlines()[-1].startswith(f"Error: {words}"), answer["message"][-400:]
    status, answer = answers["one image"]
    assert status == 200 and len(answer["predictions"]) == 1


@pytest.fixture(scope="module")
def champion(mlflow_server, tracked_train):
    """``models:/dismax-digits-tiny@champion`` loaded in this process (from the test server)."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        return mlflow.pyfunc.load_model("models:/dismax-digits-tiny@champion")
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def test_champion_loaded_in_python_agrees_with_head_is_ood_for_every_tpr_and_score(champion, tracked_train):
    from mlflow.exceptions import MlflowException

    images = np.concatenate([_digits(30), _near(30)])
    head, logits = _local_logits(tracked_train / "model", images)
    assert champion.metadata.get_params_schema().to_dict() == [
        {"name": "tpr", "type": "double", "default": 0.95, "shape": None},
        {"name": "score", "type": "string", "default": head.score, "shape": None},
    ]
    for score in ("mps", "mds", "mmles"):
        for tpr in (0.3, 0.9, 1.0):
            frame = champion.predict(images, params={"tpr": tpr, "score": score})
            assert frame["is_ood"].tolist() == head.is_ood(logits, tpr, score).tolist(), (score, tpr)
            np.testing.assert_allclose(frame["ood_score"], head.ood_score(logits, score).numpy(), rtol=1e-6)
    with pytest.raises(MlflowException, match=r"params 'tpr' must be a number in \(0, 1\]"):
        champion.predict(images, params={"tpr": -0.1})


_USER_MODEL = """
import mlflow
import pandas as pd


class Inverted(mlflow.pyfunc.PythonModel):
    \"\"\"A user's own OOD model: another model's ood_score, negated (no class, no is_ood).\"\"\"

    def load_context(self, context):
        self.inner = mlflow.pyfunc.load_model(context.model_config["inner"])

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"ood_score": -self.inner.predict(model_input)["ood_score"].to_numpy()})


mlflow.models.set_model(Inverted())
"""


def _evaluation_data(folder):
    """ID digits 0-5 (labelled), near OOD digits 6-9, far OOD uniform noise (as PNG files): the evaluator's
    table, and all its images as one array."""
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    labels = load_digits().target[load_digits().target < 6][:40]
    noise = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    files = [str(folder / f"noise{i}.png") for i in range(len(noise))]
    for image, file in zip(noise, files):
        Image.fromarray(image).save(file)
    images = np.concatenate([_digits(40), _near(30), noise])
    return images, pd.DataFrame({
        "image": [*images[:70], *files], "ood": [False] * 40 + [True] * 50,
        "dataset": ["digits_0_5"] * 40 + ["digits_6_9"] * 30 + ["noise"] * 20,
        "group": [None] * 40 + ["near"] * 30 + ["far"] * 20,
        "label": [*labels.tolist(), *[None] * 50],
    })  # fmt: skip


def test_dismax_ood_evaluator_from_its_entry_point_logs_metrics_and_gates_a_candidate(
    mlflow_server, champion, tracked_train, tmp_path, monkeypatch
):
    from importlib.metadata import entry_points

    import mlflow
    from mlflow.models import MetricThreshold
    from sklearn.metrics import roc_auc_score

    (point,) = [e for e in entry_points(group="mlflow.model_evaluator") if e.name == "dismax-ood"]
    assert point.value == "dismax_plugin.adapters.mlflow:DisMaxOODEvaluator"  # the installed distribution's
    assert "dismax-ood" in mlflow.models.list_evaluators()
    images, data = _evaluation_data(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # mlflow.models.evaluate logs to the active run
    experiment = mlflow.MlflowClient(mlflow_server).create_experiment("cli-evaluate")
    with mlflow.start_run(experiment_id=experiment, run_name="champion") as run:
        result = mlflow.models.evaluate(champion, data=data, model_type="ood", evaluators=["dismax-ood"],
                                        evaluator_config={"dismax-ood": {"tpr": 0.9}})  # fmt: skip
    metrics = result.metrics
    for prefix in ("", "digits_6_9/", "noise/", "near/", "far/"):
        for key in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "FPR95-ID"):
            assert 0.0 <= metrics[prefix + key] <= 1.0, prefix + key
    assert metrics["near/AUROC"] == metrics["digits_6_9/AUROC"]  # one set in the group
    head, logits = _local_logits(tracked_train / "model", images)
    scores, ood = head.ood_score(logits).numpy(), data["ood"].to_numpy()
    near = ~ood | (data["dataset"] == "digits_6_9").to_numpy()
    assert metrics["near/AUROC"] == pytest.approx(roc_auc_score(ood[near], -scores[near]), abs=1e-9)
    assert metrics["AUROC"] == pytest.approx(roc_auc_score(ood, -scores), abs=1e-9)
    assert metrics["ID-flagged"] == pytest.approx(head.is_ood(logits[~ood], 0.9).double().mean().item())
    labels = data["label"][~ood].astype(int).to_numpy()
    assert metrics["ACC"] == pytest.approx(float((logits[~ood].argmax(1).numpy() == labels).mean()))
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(run.info.run_id).data.metrics == pytest.approx(metrics)
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "dismax-ood")}
    assert listed == {"dismax-ood/roc_curve.png", "dismax-ood/score_histogram.png", "dismax-ood/metrics.json"}
    linked = {m.key: m.dataset_name for m in client.get_logged_model(champion.model_id).metrics}
    assert linked["near/AUROC"] == "dataset"  # the evaluation data set (MLflow's name for a DataFrame)

    (tmp_path / "user_model.py").write_text(_USER_MODEL)
    with mlflow.start_run(experiment_id=experiment, run_name="user model"):
        inverted = mlflow.pyfunc.log_model(name="inverted", python_model=str(tmp_path / "user_model.py"),
                                           model_config={"inner": "models:/dismax-digits-tiny@champion"},
                                           pip_requirements=["mlflow"])  # fmt: skip
        other = mlflow.models.evaluate(inverted.model_uri, data=data, model_type="ood", evaluators=["dismax-ood"])
    assert other.metrics["near/AUROC"] == pytest.approx(1.0 - metrics["near/AUROC"])
    assert "ACC" not in other.metrics and "ID-flagged" not in other.metrics  # it gives no class, no is_ood
    gate = {"near/AUROC": MetricThreshold(min_absolute_change=1e-9, greater_is_better=True)}
    better, worse = (result, other) if metrics["near/AUROC"] > 0.5 else (other, result)
    mlflow.validate_evaluation_results(gate, candidate_result=better, baseline_result=worse)  # passes
    with pytest.raises(mlflow.exceptions.MlflowException, match="near/AUROC"):
        mlflow.validate_evaluation_results(gate, candidate_result=worse, baseline_result=better)


def test_alias_without_register_model_exits_2_with_one_line(tmp_path):
    proc, imported = _dismax_imports("train", *TINY, "--epochs", "1", "--output", str(tmp_path / "o"),
                                     "--no-track", "--alias", "champion")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--alias champion needs --register-model" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
    assert imported == []  # refused before any data, model or tracking library is loaded: fast


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
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


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
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
    proc, imported = _dismax_imports("train", *TINY, "--epochs", "1", "--output", str(tmp_path / "o"),
                                     "--tracking-uri", f"http://127.0.0.1:{free_port()}")  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracking-uri" in lines[0] and "127.0.0.1" in lines[0]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
    assert imported == ["mlflow"]  # only MLflow, to ask the server: no data set, model or timm loaded first


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
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


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
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
