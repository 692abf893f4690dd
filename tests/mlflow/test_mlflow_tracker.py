"""MlflowTracker against a real ``mlflow server`` (no mocks): logging, nested runs, the pyfunc model loaded in a
fresh process, outages (queue + retry, local fallback store) and bad tracking URIs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dismax_plugin as dp
from dismax_plugin.adapters import timm as dtimm
from dismax_plugin.adapters.engine import figures
from dismax_plugin.adapters.mlflow import (
    MlflowTracker,
    TrackingRejectedWarning,
    TrackingUnavailableWarning,
    TrackingURIError,
    check_tracking_uri,
    preprocess_images,
)

PREP = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
        "crop_pct": 1.0}  # fmt: skip
CLASSES = ["zero", "one", "two"]


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _train(tracker, epochs=2, seed=0, after_epoch=None):
    """A tiny real training loop (test_resnet + DisMax head, random 32 px data) logged through ``tracker``."""
    torch.manual_seed(seed)
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3)
    x = (torch.rand(24, 3, 32, 32) - 0.5) / 0.25
    y = torch.arange(24) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker.log_params({"model": "test_resnet", "head": "dismax", "optimizer": {"name": "sgd", "lr": 0.05}})
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        logits = model(x)
        loss = dp.dismax_loss(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"train_loss": loss.item(), "train_acc": float((logits.argmax(1) == y).double().mean())}
        tracker.log_metrics(metrics, step=epoch)
        history.append(metrics)
        if after_epoch is not None:
            after_epoch(epoch)
    model.eval()
    head = dtimm.get_head(model)
    head.set_temperature(0.5)  # calibrated logits differ from the temperature-1 logits the OOD score uses
    with torch.no_grad():
        logits = model(x)
    head.set_score("mmles")
    head.calibrate_scores(logits)
    return model, x, y, logits, history


def _metric_steps(client, run_id, key):
    return [(m.step, round(m.value, 6)) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# ----------------------------------------------------------------------------------------------- full flow
_LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import mlflow

    import io, pickle, cloudpickle, torch

    def refuse(*args, **kwargs):
        raise RuntimeError("unpickling is refused in this process")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    pickle.load = pickle.loads = cloudpickle.load = cloudpickle.loads = refuse
    pickle.Unpickler = Refused
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buffer)
    try:  # the guard stops torch's own pickle path (what a pickled pytorch flavour would need)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        guarded = False
    except RuntimeError:
        guarded = True

    uri, torch_uri, out = sys.argv[1:4]
    torch_model = mlflow.pytorch.load_model(torch_uri)
    model = mlflow.pyfunc.load_model(uri)
    import dismax_plugin
    images = np.load(sys.argv[4])
    inputs = {
        "nhwc_uint8": images,
        "nchw_uint8": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        "nhwc_float": images / 255.0,
        "nhw_gray": images[..., 0],
    }
    result = {"origin": dismax_plugin.__file__, "columns": None, "predictions": {}, "guarded": guarded,
              "torch_model_class": type(torch_model).__name__}
    for name, batch in inputs.items():
        frame = model.predict(batch)
        result["columns"] = list(frame.columns)
        result["dtypes"] = {c: str(t) for c, t in frame.dtypes.items()}
        result["predictions"][name] = frame.astype({"is_ood": bool}).to_dict("list")
    import torch
    x = torch.from_numpy(np.load(sys.argv[5]))
    with torch.no_grad():
        result["torch_logits"] = torch_model(x).tolist()
    json.dump(result, open(out, "w"))
    """
)


def _expected(model, images, gray=False):
    """The model's own predictions with the evaluation transform of adapters.engine.data (timm + PIL)."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=tuple(PREP["input_size"]), is_training=False, crop_pct=1.0, interpolation="bilinear",
        mean=tuple(PREP["mean"]), std=tuple(PREP["std"]),
    )  # fmt: skip
    pil = [Image.fromarray(im[..., 0] if gray else im).convert("RGB") for im in images]
    x = torch.stack([transform(p) for p in pil])
    with torch.no_grad():
        logits = model(x)
    probability, predicted = torch.softmax(logits.double(), 1).max(1)
    return {
        "class": predicted.tolist(),
        "class_name": [CLASSES[c] for c in predicted.tolist()],
        "probability": probability.tolist(),
        "ood_score": dtimm.get_head(model).ood_score(logits, "mmles").tolist(),
        "is_ood": dtimm.get_head(model).is_ood(logits, 0.95).tolist(),
    }


def _check_logged_run(uri, tmp_path, parent_id, child_id, history):
    client = _client(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "compare"
    assert parent.data.tags["purpose"] == "test"
    assert parent.data.params["data"] == "random"
    assert len(parent.data.params["notes"]) <= 6000 and parent.data.params["notes"].endswith("[truncated]")
    full = client.download_artifacts(parent_id, "params/truncated.json", str(tmp_path / "dl"))
    assert json.load(open(full))["notes"] == "x" * 7000
    table = json.load(open(client.download_artifacts(parent_id, "ood/comparison.json", str(tmp_path / "dl"))))
    assert table["columns"] == ["method", "auroc"] and table["data"][1] == ["ce", 0.5]

    children = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}  # fmt: skip
    assert set(children) == {"dismax", "broken"}
    assert children["broken"].info.status == "FAILED"
    child = children["dismax"]
    assert child.info.run_id == child_id and child.info.status == "FINISHED"
    assert child.data.params["optimizer.lr"] == "0.05" and child.data.params["head"] == "dismax"
    assert _metric_steps(client, child_id, "train_loss") == [(i + 1, round(h["train_loss"], 6))
                                                              for i, h in enumerate(history)]  # fmt: skip
    for name in ("ood/histogram.png", "ood/roc.png", "calibration/reliability.png"):
        with open(client.download_artifacts(child_id, name, str(tmp_path / "dl")), "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert [a.path for a in client.list_artifacts(child_id, "saved")] == [f"saved/{dtimm.CONFIG_NAME}"]
    assert child.data.tags["dismax.pytorch_model.serialization"] == "pt2"

    logged = {client.get_logged_model(o.model_id).name: o.model_id for o in child.outputs.model_outputs}
    assert set(logged) == {"model", "pytorch_model"}
    assert all(str(client.get_logged_model(i).status).endswith("READY") for i in logged.values())
    assert child.data.tags["dismax.pyfunc_model_uri"] == f"models:/{logged['model']}"
    assert client.get_model_version("dismax-tiny", "1").source.endswith(logged["model"])

    # data lineage: both inputs with their context, size and digest; the OOD metric belongs to the model + set
    inputs = {d.dataset.name: d for d in child.inputs.dataset_inputs}
    assert set(inputs) == {"random-test", "noise"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"random-test": "test", "noise": "ood-far"}
    assert json.loads(inputs["random-test"].dataset.profile)["num_rows"] == 24
    assert json.loads(inputs["noise"].dataset.profile)["item_shape"] == [3, 32, 32]
    digests = {name: d.dataset.digest for name, d in inputs.items()}
    assert len(set(digests.values())) == 2
    served = client.get_logged_model(logged["model"])
    model_metrics = {(m.key, m.dataset_name, m.dataset_digest) for m in served.metrics}
    assert ("noise.MMLES.AUROC", "noise", digests["noise"]) in model_metrics
    assert not any(key.startswith("mean.") for key, _, _ in model_metrics)  # no dataset: not linked
    assert _metric_steps(client, child_id, "noise.MMLES.AUROC") == [(0, 0.75)]  # once in the run's history


def test_tracker_logs_run_children_and_servable_model(mlflow_server, tmp_path):
    tracker = MlflowTracker(mlflow_server, experiment="dismax-tests", run_name="compare",
                            register_model="dismax-tiny", fallback_dir=tmp_path / "fallback")  # fmt: skip
    tracker.start(tags={"purpose": "test"})
    parent_id = tracker.run_id
    assert parent_id and tracker.tracking_uri == mlflow_server
    tracker.log_params({"data": "random", "notes": "x" * 7000})
    with tracker.child("dismax") as sub:
        assert sub.run_id != parent_id
        model, x, y, logits, history = _train(sub)
        scores = dp.score(logits, "mmles")
        sub.log_figure(figures.score_histogram(scores, {"noise": scores - 1.0}, "scores"), "ood/histogram.png")
        sub.log_figure(figures.roc_curves(scores, {"noise": scores - 1.0}), "ood/roc.png")
        sub.log_figure(figures.reliability_diagram(logits, y, calibrated=logits / 2), "calibration/reliability.png")
        model_dir = tmp_path / "model"
        dtimm.save_model(model, model_dir, metadata={"preprocessing": PREP, "score": "mmles", "class_names": CLASSES})
        sub.log_artifact(str(model_dir / dtimm.CONFIG_NAME), "saved")
        sub.log_input("random-test", torch.utils.data.TensorDataset(x, y), "test")
        sub.log_input("noise", torch.utils.data.TensorDataset(torch.rand(10, 3, 32, 32)), "ood-far")
        sub.log_metrics({"noise.MMLES.AUROC": 0.75, "mean.MMLES.AUROC": 0.75, "test_acc": 0.5})
        sub.log_model(str(model_dir), model, np.full((2, 32, 32, 3), 100, dtype=np.uint8))  # as the CLI does
        child_id = sub.run_id
    with pytest.raises(RuntimeError, match="boom"), tracker.child("broken"):
        raise RuntimeError("boom")
    tracker.log_table([{"method": "dismax", "auroc": np.float32(0.75)}, {"method": "ce", "auroc": 0.5}],
                      "ood/comparison.json")  # fmt: skip
    tracker.end()
    assert tracker.pending == 0 and tracker.fallback_uri is None
    assert tracker.logged_models["model"]["registered_model_version"] == "1"

    # the registered pyfunc model and the pytorch model, loaded in a fresh process started elsewhere (it runs
    # while this process reads the run back)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "x.npy", x[:3].numpy())
    (tmp_path / "load.py").write_text(_LOADER)
    out = tmp_path / "out.json"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true")
    loader = subprocess.Popen(
        [sys.executable, str(tmp_path / "load.py"), "models:/dismax-tiny/1",
         tracker.logged_models["pytorch_model"]["model_uri"], str(out), str(tmp_path / "images.npy"),
         str(tmp_path / "x.npy")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _check_logged_run(mlflow_server, tmp_path, parent_id, child_id, history)
        _, stderr = loader.communicate(timeout=180)
    finally:
        loader.kill()
    assert loader.returncode == 0, stderr[-3000:]
    result = json.loads(out.read_text())
    assert "/code/dismax_plugin/" in result["origin"] and not result["origin"].startswith(os.getcwd())
    assert result["guarded"] and result["torch_model_class"] != "ResNet"  # pt2: a graph module, not our class
    assert result["columns"] == ["class", "class_name", "probability", "ood_score", "is_ood"]
    assert result["dtypes"]["class"] == "int64" and result["dtypes"]["probability"] == "float64"
    expected, expected_gray = _expected(model, images), _expected(model, images, gray=True)
    for name, want in (("nhwc_uint8", expected), ("nchw_uint8", expected), ("nhwc_float", expected),
                       ("nhw_gray", expected_gray)):  # fmt: skip
        got = result["predictions"][name]
        assert got["class"] == want["class"] and got["class_name"] == want["class_name"], name
        assert got["is_ood"] == want["is_ood"], name
        np.testing.assert_allclose(got["probability"], want["probability"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["ood_score"], want["ood_score"], rtol=1e-5, atol=1e-6, err_msg=name)
    with torch.no_grad():
        np.testing.assert_allclose(result["torch_logits"], model(x[:3]).numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- outages
def test_outage_queues_then_resends_or_falls_back(mlflow_server_process, tmp_path, monkeypatch):
    server = mlflow_server_process  # the session's server: killed, then restarted on its port and store
    # MLflow's own retries of a refused connection (the tracker's default: 2, with backoff) only cost seconds here
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        _outage(server, tmp_path)
    finally:
        if not server.healthy():  # leave it running for the other tests
            server.stop()
            server.start().wait(90)


def _outage(server, tmp_path):
    tracker = MlflowTracker(server.uri, experiment="outage", retry_interval=3600, end_retries=1,
                            fallback_dir=tmp_path / "fallback")  # fmt: skip
    tracker.start()
    run_id = tracker.run_id
    # a second run that will end while the server is still down: its unsent part goes to the fallback store
    second = MlflowTracker(server.uri, experiment="outage", run_name="second", end_retries=1, end_retry_wait=0,
                           fallback_dir=tmp_path / "fallback")  # fmt: skip
    second.start()
    second.log_metrics({"loss": 1.0}, step=1)
    # a third one probes the server on every call while offline, and so recovers as soon as it is back
    third = MlflowTracker(server.uri, experiment="outage", run_name="third", retry_interval=0)
    third.start()
    probes = {}

    def outage(epoch):
        if epoch == 1:
            server.stop()  # restarted below, on the same port and store, once the offline part is checked
            tracker.log_metrics({"val_acc": 0.1}, step=epoch)  # the first call finds the server gone
            probes["offline since"] = tracker._conn.last_probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, y, logits, history = _train(tracker, epochs=3, after_epoch=outage)
        tracker.log_figure(figures.reliability_diagram(logits, y), "calibration/reliability.png")
        with tracker.child("twin") as twin:
            twin.log_metrics({"train_loss": 9.0}, step=1)
        tracker.log_table([{"dataset": "noise", "auroc": 0.5}], "ood/results.json")
    outage_warnings = [w for w in caught if issubclass(w.category, TrackingUnavailableWarning)]
    assert len(outage_warnings) == 1 and server.uri in str(outage_warnings[0].message)
    assert tracker.offline and tracker.pending >= 6
    assert tracker._conn.last_probe == probes["offline since"]  # offline calls queue: no network attempt

    assert not server.healthy()  # still down: `second` and `third` find it down too
    with pytest.warns(TrackingUnavailableWarning, match="unreachable"):
        third.log_metrics({"acc": 0.5}, step=1)
    third.log_metrics({"acc": 0.6}, step=2)
    assert third.offline and third.pending == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second.log_metrics({"loss": 0.5}, step=2)
        second.log_figure(figures.score_histogram(np.arange(5.0), {"noise": np.arange(5.0) - 2}), "ood/h.png")
        second.end("FAILED")
    messages = [str(w.message) for w in caught if issubclass(w.category, TrackingUnavailableWarning)]
    fallback_uri = f"sqlite:///{(tmp_path / 'fallback').resolve() / 'mlflow.db'}"
    assert len(messages) == 2 and fallback_uri in messages[1], messages
    assert second.fallback_uri == fallback_uri and second.pending == 0
    local = _client(fallback_uri)
    (saved,) = local.search_runs([local.get_experiment_by_name("outage").experiment_id])
    assert saved.data.tags["dismax.fallback.source_run_id"] == second.run_id
    assert saved.data.tags["dismax.fallback.source_uri"] == server.uri
    assert saved.info.status == "FAILED" and saved.info.run_name == "second"
    assert _metric_steps(local, saved.info.run_id, "loss") == [(2, 0.5)]
    png = local.download_artifacts(saved.info.run_id, "ood/h.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert str((tmp_path / "fallback" / "mlflow-artifacts").resolve()) in saved.info.artifact_uri

    server.start().wait(90)
    third.log_metrics({"acc": 0.7}, step=3)  # finds the server back: sends its queue, then this
    assert not third.offline and third.pending == 0
    assert _metric_steps(_client(server.uri), third.run_id, "acc") == [(1, 0.5), (2, 0.6), (3, 0.7)]
    third.end()
    tracker.end()  # the server is back: the queue is sent to it
    assert tracker.pending == 0 and tracker.fallback_uri is None
    client = _client(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _metric_steps(client, run_id, "train_loss") == [(i + 1, round(h["train_loss"], 6))
                                                           for i, h in enumerate(history)]  # fmt: skip
    assert _metric_steps(client, run_id, "val_acc") == [(1, 0.1)]
    assert {a.path for a in client.list_artifacts(run_id, "calibration")} == {"calibration/reliability.png"}
    assert [a.path for a in client.list_artifacts(run_id, "ood")] == ["ood/results.json"]
    twins = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert [(t.info.run_name, t.info.status, t.data.metrics) for t in twins] == [("twin", "FINISHED",
                                                                                  {"train_loss": 9.0})]  # fmt: skip
    # the server only knows the beginning of `second`, which it has left RUNNING
    assert _metric_steps(client, second.run_id, "loss") == [(1, 1.0)]


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
def test_a_call_the_server_keeps_failing_is_retried_and_kept_not_an_outage(mlflow_server_factory, tmp_path,
                                                                          monkeypatch, caplog):
    blocker = tmp_path / "store"  # a file where the server's artifact folder should be: every upload fails (500)
    blocker.write_text("")
    server = mlflow_server_factory("broken-store", extra_args=(
        "--default-artifact-root", "mlflow-artifacts:/", "--artifacts-destination", str(blocker / "artifacts"),
    )).start().wait(240)  # fmt: skip (a loaded machine starts it slowly)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries of a 500 cost seconds
    tracker = MlflowTracker(server.uri, experiment="broken-store", retry_interval=0, end_retries=1,
                            end_retry_wait=0, fallback_dir=tmp_path / "fallback")  # fmt: skip
    tracker.start()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", "dismax_plugin.adapters.mlflow"):
        warnings.simplefilter("always")
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_dict({"a": 1}, "first.json")  # the store fails: HTTP 500 while /health answers
        tracker.log_metrics({"loss": 0.5}, step=2)  # sent at once, not queued behind it
        assert not tracker.offline and tracker.pending == 0 and len(tracker._conn.kept) == 1
        assert _metric_steps(_client(server.uri), tracker.run_id, "loss") == [(1, 1.0), (2, 0.5)]
        blocker.unlink()  # the store is repaired: the next call, after the backoff, sends the kept one too
        time.sleep(1.2)
        tracker.log_metrics({"loss": 0.25}, step=3)
        assert not tracker._conn.kept
        # broken again, for good, where the figure goes: a file in place of the run's folder ood/
        (blocker / "artifacts" / tracker.experiment_id / tracker.run_id / "artifacts" / "ood").write_text("")
        tracker.log_figure(figures.score_histogram(np.arange(5.0), {"noise": np.arange(5.0) - 2}), "ood/h.png")
        tracker.end()
    assert not [w for w in caught if issubclass(w.category, TrackingUnavailableWarning)]  # never "unreachable"
    rejected = [str(w.message) for w in caught if issubclass(w.category, TrackingRejectedWarning)]
    assert len(rejected) == 2 and "log_dict 'first.json' with HTTP 500" in rejected[0], rejected
    assert "too many 500 error responses from http://127.0.0.1" in rejected[0] and "unreachable" not in caplog.text
    assert f"kept failing 1 calls with HTTP >= 500: 1 unsent calls were written to the local fallback store " \
           f"{tracker.fallback_uri}" in rejected[1]  # fmt: skip
    client = _client(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and _metric_steps(client, tracker.run_id, "loss")[-1] == (3, 0.25)
    on_server = {a.path: a.is_dir for a in client.list_artifacts(tracker.run_id)}
    assert on_server == {"first.json": False, "ood": False}  # sent on its second try; ood: the blocking file
    local = _client(tracker.fallback_uri)
    (kept,) = local.search_runs([local.get_experiment_by_name("broken-store").experiment_id])
    assert kept.data.tags["dismax.fallback.source_run_id"] == tracker.run_id and kept.info.status == "FINISHED"
    png = local.download_artifacts(kept.info.run_id, "ood/h.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(4) == b"\x89PNG"


# ----------------------------------------------------------------------------------------------- bad URIs
def test_bad_tracking_uri_is_a_clear_error_at_start(tmp_path, free_port):

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingURIError, match="127.0.0.1") as error:
        MlflowTracker(dead, experiment="x").start()
    assert isinstance(error.value, ValueError) and dead in str(error.value)
    with pytest.raises(TrackingURIError, match="unsupported scheme 'bogus:'"):
        check_tracking_uri("bogus://somewhere")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrackingURIError, match="a-file"):
        check_tracking_uri(f"sqlite:///{tmp_path}/a-file/mlflow.db")
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/ok.db")
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"a": 1.0})
    with pytest.raises(TypeError, match="tracking_uri"):
        MlflowTracker(5)


def test_arguments_are_checked_before_anything_is_sent(mlflow_server, tmp_path, caplog):
    assert check_tracking_uri(mlflow_server) == mlflow_server
    tracker = MlflowTracker(mlflow_server, experiment="checks", fallback_dir=tmp_path / "fb")
    tracker.start()
    with pytest.raises(TypeError, match="metric 'acc'"):
        tracker.log_metrics({"acc": "high"})
    with pytest.raises(TypeError, match="step"):
        tracker.log_metrics({"acc": 1.0}, step=1.5)
    with pytest.raises(ValueError, match=r"artifact_file must end with \.json"):
        tracker.log_table([{"a": 1}], "ood/table.csv")
    with pytest.raises(TypeError, match="rows"):
        tracker.log_table("not rows", "t.json")
    with pytest.raises(ValueError, match="model_dir"):
        tracker.log_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="context must be one of"):
        tracker.log_input("noise", torch.utils.data.TensorDataset(torch.zeros(2, 1)), "validation")
    with pytest.raises(TypeError, match="map-style torch Dataset"):
        tracker.log_input("noise", 42, "ood-far")
    with pytest.raises(ValueError, match="logged with log_input"):
        tracker.log_metrics({"acc": 1.0}, dataset="never-logged")
    with pytest.raises(ValueError, match="status"):
        tracker.end("DONE")
    tracker.log_metrics({"acc": torch.tensor(0.25), "skipped": None}, step=3)
    tracker.log_params({"lr": 0.1})
    tracker.log_params({"lr": 0.2})  # changed value: skipped with a warning, not an MLflow error
    with caplog.at_level("WARNING", logger="dismax_plugin.adapters.mlflow"):
        tracker.log_metrics({"../escape": 1.0})  # the server rejects this name: logged and dropped
    assert "failed and was dropped" in caplog.text and "escape" in caplog.text
    assert not tracker.offline and tracker.pending == 0
    tracker.end()
    run = _client(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.metrics == {"acc": 0.25} and run.data.params == {"lr": "0.1"}
    tracker.end()  # a second end is a no-op


# ----------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_images_layouts_and_errors():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    nhwc = preprocess_images(images, PREP)
    assert nhwc.shape == (2, 3, 32, 32) and nhwc.dtype == torch.float32
    assert torch.equal(preprocess_images(images.transpose(0, 3, 1, 2), PREP), nhwc)
    assert torch.equal(preprocess_images(images / 255.0, PREP), nhwc)
    assert torch.equal(preprocess_images(images.astype(np.int64), PREP), nhwc)
    ragged = preprocess_images([images[0], images[1, :10]], PREP)
    assert torch.equal(ragged[0], nhwc[0]) and not torch.equal(ragged[1], nhwc[1])
    gray = preprocess_images(images[..., 0], PREP)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    mono = dict(PREP, input_size=[1, 32, 32], mean=[0.5], std=[0.25])
    assert preprocess_images(images, mono).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        preprocess_images(images[0, 0, 0], PREP)  # a row of pixels is no image
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_images(images * 2.0, PREP)
    with pytest.raises(ValueError, match="0..255"):
        preprocess_images(images.astype(np.int64) * 2, PREP)
    with pytest.raises(TypeError, match="dtype"):
        preprocess_images(images > 0, PREP)
    with pytest.raises(ValueError, match="input_size"):
        preprocess_images(images, {"mean": [0.5]})

    # log_model's examples: raw images are preprocessed; a preprocessed batch is turned back into images
    from dismax_plugin.adapters.mlflow._images import model_examples as _examples

    raw, model_input = _examples(images, PREP)
    assert raw.dtype == np.uint8 and np.array_equal(raw, images) and np.allclose(model_input, nhwc.numpy())
    raw_back, same = _examples(torch.from_numpy(model_input), PREP)
    assert raw_back.shape == (2, 32, 32, 3) and np.allclose(same, model_input)
    assert np.allclose(preprocess_images(raw_back, PREP).numpy(), model_input, atol=0.5 / 255 / 0.25 + 1e-6)


def test_batch_dimension_rules_are_explicit_and_ambiguous_shapes_refused():
    rng = np.random.default_rng(3)
    one = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = preprocess_images(one[None], PREP)
    assert batch.shape == (1, 3, 32, 32)  # a batch of one
    assert torch.equal(preprocess_images(one, PREP), batch)  # one image [H, W, C]: one row, not 32
    assert torch.equal(preprocess_images(one.transpose(2, 0, 1)[None], PREP), batch)  # [1, C, H, W]
    assert torch.equal(preprocess_images(one[..., 0], PREP), preprocess_images(one[None, ..., 0], PREP))  # [H, W]
    assert preprocess_images(one[None, ..., :1].transpose(0, 3, 1, 2)[0], PREP).shape == (1, 3, 32, 32)  # [1,H,W]
    with pytest.raises(ValueError, match=r"ambiguous.*\(1, 32, 32, 3\) for one image.*\(3, 32, 32, 1\) for 3 images"):
        preprocess_images(one.transpose(2, 0, 1), PREP)  # (3, 32, 32): one CHW image or 3 grey images
    assert preprocess_images(one.transpose(2, 0, 1)[..., None], PREP).shape == (3, 3, 32, 32)  # said clearly
    nchw = rng.integers(0, 256, (2, 3, 32, 4), dtype=np.uint8)  # once read as NHWC RGBA
    with pytest.raises(ValueError, match=r"ambiguous.*\(2, 32, 4, 3\) for 2 images of 32x4 pixels, 3 channels"):
        preprocess_images(nchw, PREP)
    said = preprocess_images(nchw.transpose(0, 2, 3, 1), PREP)  # as the message says: [N, H, W, C]
    second = nchw[1:].transpose(0, 2, 3, 1)
    assert said.shape == (2, 3, 32, 32) and torch.equal(said[1], preprocess_images(second, PREP)[0])
    # the model's input size decides where the sides cannot: a 4x4 RGB model takes [N, 4, 4, 3] channels last
    small = dict(PREP, input_size=[3, 4, 4])
    tiles = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    assert torch.equal(preprocess_images(tiles, small), preprocess_images(list(tiles), small))
    grey = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)  # a list is one image per item: 3 grey digits
    assert preprocess_images(list(grey), PREP).shape == (3, 3, 32, 32)
    assert preprocess_images(grey[:2], PREP).shape == (2, 3, 32, 32)  # [2, H, W] is unambiguous


def _linear_twin(tmp_path, calibration_scores):
    """A stock timm model as the engine saves a calibrated linear twin (temperature 2, sorted scores)."""
    torch.manual_seed(0)
    model = dtimm.create_model("test_resnet", head="linear", num_classes=3).eval()
    rng = np.random.default_rng(2)
    held_out, images = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (40, 12))
    with torch.no_grad():
        held_raw, raw = (model(preprocess_images(x, PREP)) for x in (held_out, images))
    scores = {name: dp.ood_score(held_raw, 1.0, name).sort().values.tolist() for name in calibration_scores}
    calibration = {"temperature": 2.0, "score": "mps", "size": 40, "scores": scores}
    dtimm.save_model(model, tmp_path / "linear", metadata={"preprocessing": PREP, "calibration": calibration})
    return held_out, images, raw, scores


def _served(model_dir, config=None):
    from mlflow.pyfunc import PythonModelContext

    from dismax_plugin.adapters.mlflow import DisMaxPyfuncModel

    pyfunc = DisMaxPyfuncModel()
    pyfunc.load_context(PythonModelContext({"model_dir": str(model_dir)}, config))
    return pyfunc


def test_pyfunc_model_of_a_linear_twin_thresholds_every_tpr_and_score(tmp_path):
    from mlflow.exceptions import MlflowException

    held_out, images, raw, scores = _linear_twin(tmp_path, dp.SCORE_NAMES)
    pyfunc = _served(tmp_path / "linear", {"batch_size": 4})
    frame = pyfunc.predict(None, images)  # the defaults: MaxSoftmax at TPR 0.95
    probability, predicted = torch.softmax(raw.double() / 2.0, 1).max(1)  # at the saved temperature
    assert frame["class"].tolist() == predicted.tolist()
    assert frame["class_name"].tolist() == [str(c) for c in predicted.tolist()]  # no class names saved
    np.testing.assert_allclose(frame["probability"], probability.numpy(), rtol=1e-6)
    deployed = dp.ood_score(raw, 1.0, "mps")  # at temperature 1, as calibration takes it
    assert not torch.allclose(deployed, dp.score(raw.double() / 2.0, "mps"))
    np.testing.assert_allclose(frame["ood_score"], deployed.numpy(), rtol=1e-6)
    assert frame["is_ood"].tolist() == (deployed < dp.threshold_at(torch.tensor(scores["mps"]), 0.95)).tolist()
    for score in ("mps", "mds"):
        deployed, ordered = dp.ood_score(raw, 1.0, score), torch.tensor(scores[score], dtype=torch.float64)
        flagged = []
        for tpr in (0.3, 0.7, 1.0):
            frame = pyfunc.predict(None, images, {"tpr": tpr, "score": score})
            np.testing.assert_allclose(frame["ood_score"], deployed.numpy(), rtol=1e-6)
            assert frame["is_ood"].tolist() == (deployed < dp.threshold_at(ordered, tpr)).tolist(), (score, tpr)
            flagged.append(int(frame["is_ood"].sum()))
        assert flagged == sorted(flagged, reverse=True) and flagged[0] > flagged[-1], (score, flagged)
    # on its own held-out images (same batch, so the very logits) exactly floor(N (1 - tpr)) are flagged
    whole = _served(tmp_path / "linear")
    for tpr in (0.9, 0.77):
        assert int(whole.predict(None, held_out, {"tpr": tpr})["is_ood"].sum()) == dp.flagged_count(40, tpr)

    for params, words in (({"tpr": 1.5}, "params 'tpr' must be a number in (0, 1]"), ({"tpr": 0}, "(0, 1]"),
                          ({"score": "nope"}, "params 'score' must be one of ['mps'")):  # fmt: skip
        with pytest.raises(MlflowException, match=re.escape(words)) as error:
            pyfunc.predict(None, images, params)
        assert error.value.error_code == "INVALID_PARAMETER_VALUE" and isinstance(error.value, ValueError)
        assert "\n" not in error.value.message
    with pytest.raises(MlflowException, match="DataFrame"):
        pyfunc.predict(None, frame)
    with pytest.raises(ValueError, match="serve-time params"):
        _served(tmp_path / "linear", {"tpr": 0.99})


def test_pyfunc_model_without_calibration_scores_says_so(tmp_path):
    from mlflow.exceptions import MlflowException

    _, images, _, _ = _linear_twin(tmp_path, ("mps",))  # an older twin: MaxSoftmax scores only
    pyfunc = _served(tmp_path / "linear")
    assert pyfunc.predict(None, images, {"tpr": 0.5})["is_ood"].notna().all()
    with pytest.raises(MlflowException, match="'mds' has no calibration scores in this model"):
        pyfunc.predict(None, images, {"score": "mds"})
    model = dtimm.load_model(tmp_path / "linear")
    dtimm.save_model(model, tmp_path / "bare", metadata={"preprocessing": PREP})
    frame = _served(tmp_path / "bare").predict(None, images[:2], {"tpr": 0.5, "score": "mds"})
    assert frame["is_ood"].isna().all() and frame["ood_score"].notna().all()  # no thresholds: no decision


def test_imports_stay_lazy():
    code = (
        "import sys, dismax_plugin, dismax_plugin.adapters, dismax_plugin.adapters.mlflow, "
        "dismax_plugin.adapters.engine.figures; print(sorted(m for m in ('mlflow', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _DataDependent(torch.nn.Module):
    """A model ``torch.export`` cannot trace: its branch depends on the input's values."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if bool(x.mean() > 0) else self.inner(-x)


def test_pytorch_flavour_falls_back_to_pickle_only_when_export_fails_and_says_so(tmp_path, monkeypatch):
    import mlflow.pytorch

    monkeypatch.chdir(tmp_path)  # a new sqlite store keeps its artifacts in ./mlruns

    torch.manual_seed(0)
    model = dtimm.create_model("test_resnet", head="dismax", num_classes=3).eval()
    dtimm.save_model(model, tmp_path / "model", metadata={"preprocessing": PREP})
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="fallback")
    tracker.start()
    unexportable = _DataDependent(model).eval()
    tracker.log_model(str(tmp_path / "model"), unexportable, np.full((2, 32, 32, 3), 90, dtype=np.uint8))
    tracker.end()
    run = _client(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.data.tags["dismax.pytorch_model.serialization"] == "pickle"
    assert run.data.tags["dismax.pytorch_model.export_error"]  # why export failed
    logged = _client(tracker.tracking_uri).get_logged_model(tracker.logged_models["pytorch_model"]["model_id"])
    loaded = mlflow.pytorch.load_model(logged.artifact_location)  # a local folder: no global tracking URI
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert isinstance(loaded, _DataDependent) and torch.equal(loaded(x), unexportable(x))


def test_telemetry_is_off_unless_the_user_opts_in(monkeypatch):
    from dismax_plugin.adapters.mlflow import telemetry_off_unless_opted_in

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert telemetry_off_unless_opted_in() and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    from mlflow.telemetry import get_telemetry_client

    assert get_telemetry_client() is None
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the opt-in is left alone
    assert not telemetry_off_unless_opted_in() and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
