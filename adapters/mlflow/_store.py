"""One MLflow store and one tracker call against it.

A :class:`RunRef` is a run known by how it was created (experiment, name, tags, parent), so the same
call can be replayed against the tracking server or, later, the local fallback store: each
:class:`Target` creates the run (and its experiment) lazily and remembers the ids it got. :func:`apply`
performs one queued call (``params``, ``metrics``, ``input``, ``table``, ``dict``, ``figure``,
``artifact``, ``model``, ``terminate``) with an explicit run id (no fluent active-run state).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ._models import log_model

__all__ = ["RunRef", "Target", "apply"]

_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


class RunRef:
    """A run known by its creation info; its id is resolved per target store (created lazily offline)."""

    def __init__(self, experiment: str | None, run_name: str | None, tags: dict, parent: RunRef | None):
        self.experiment, self.run_name, self.tags, self.parent = experiment, run_name, tags, parent
        self.start_time = int(time.time() * 1000)


class Target:
    """One MLflow store (the primary URI or the fallback) with the run ids created in it."""

    def __init__(self, uri: str, artifact_root: str | None = None, extra_tags: dict | None = None):
        import mlflow

        self.uri, self.artifact_root, self.extra_tags = uri, artifact_root, extra_tags or {}
        if artifact_root is not None:  # a new sqlite store: its Default experiment keeps artifacts here too
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, Path(artifact_root).resolve().as_uri())
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.ids: dict[RunRef, str] = {}
        self.experiment_ids: dict[str | None, str] = {}
        self.source_ids: dict[RunRef, str] = {}  # for the fallback: the run's id in the primary store
        self.model_ids: dict[RunRef, str] = {}  # the served (pyfunc) model logged by each run, once logged

    def experiment_id(self, name: str | None) -> str:
        if name in self.experiment_ids:
            return self.experiment_ids[name]
        if name is None:  # MLflow's default experiment (the fallback store has its own "0")
            experiment_id = (self.artifact_root is None and os.environ.get("MLFLOW_EXPERIMENT_ID")) or "0"
        else:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                raise ValueError(
                    f"experiment '{name}' is deleted in {self.uri}; restore it or choose another --experiment name."
                )
            experiment_id = experiment.experiment_id if experiment is not None else self._create(name)
        self.experiment_ids[name] = experiment_id
        return experiment_id

    def _create(self, name: str) -> str:
        location = None
        if self.artifact_root is not None:
            location = Path(self.artifact_root).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            existing = self.client.get_experiment_by_name(name)  # created concurrently
            if existing is None:
                raise
            return existing.experiment_id

    def run_id(self, ref: RunRef) -> str:
        if ref in self.ids:
            return self.ids[ref]
        tags = dict(ref.tags)
        if ref.parent is not None:
            tags["mlflow.parentRunId"] = self.run_id(ref.parent)
        tags.update(self.extra_tags)
        if ref in self.source_ids:
            tags["dismax.fallback.source_run_id"] = self.source_ids[ref]
        run = self.client.create_run(
            self.experiment_id(ref.experiment), start_time=ref.start_time, tags=tags, run_name=ref.run_name
        )
        self.ids[ref] = run.info.run_id
        return run.info.run_id


def apply(target: Target, kind: str, ref: RunRef, payload: dict, conn) -> None:
    """Perform one tracker call against ``target`` (creating the run there first if needed)."""
    from mlflow.entities import Param

    run_id = target.run_id(ref)
    client = target.client
    if kind == "create":
        return
    if kind == "params":
        items = [Param(k, v) for k, v in payload["params"].items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
    elif kind == "metrics":
        log_metric_batch(client, run_id, payload, target.model_ids.get(ref))
    elif kind == "input":
        _log_input(client, run_id, payload)
    elif kind == "table":
        client.log_table(run_id, payload["frame"], payload["artifact_file"])
    elif kind == "dict":
        client.log_dict(run_id, payload["dictionary"], payload["artifact_file"])
    elif kind == "figure":
        client.log_figure(run_id, payload["figure"], payload["artifact_file"])
    elif kind == "artifact":
        path, artifact_path = payload["local_path"], payload["artifact_path"]
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path)
        else:
            client.log_artifact(run_id, path, artifact_path)
    elif kind == "model":
        model_id = log_model(target, run_id, payload, conn)
        if payload["flavor"] == "pyfunc":  # the served model: the evaluation metrics so far are its own
            target.model_ids[ref] = model_id
            for linked in payload.get("linked_metrics", ()):
                log_metric_batch(client, run_id, linked, model_id)
    elif kind == "terminate":
        client.set_terminated(run_id, payload["status"], end_time=payload["end_time"])
    else:  # pragma: no cover - internal
        raise AssertionError(kind)


def log_metric_batch(client, run_id: str, payload: dict, model_id: str | None = None) -> None:
    """``payload["metrics"]`` at its step and timestamp; linked to ``payload["dataset"]`` (name, digest)
    and to ``model_id`` when both are given (MLflow 3 records them as the logged model's metrics)."""
    from mlflow.entities import Metric

    step, stamp = payload["step"], payload["timestamp"]
    dataset = payload.get("dataset")
    link = {"model_id": model_id, "dataset_name": dataset[0], "dataset_digest": dataset[1]} if dataset else {}
    if not link.get("model_id"):
        link = {}  # MLflow keeps the dataset of a metric only with a model
    items = [Metric(k, v, stamp, step, **link) for k, v in payload["metrics"].items()]
    for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])


def _log_input(client, run_id: str, payload: dict) -> None:
    """One dataset input (``mlflow.data`` lineage) with its context tag."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = [InputTag(MLFLOW_DATASET_CONTEXT, payload["context"])]
    tags += [InputTag(k, v) for k, v in payload.get("tags", {}).items()]
    client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**payload["dataset"]), tags=tags)])
