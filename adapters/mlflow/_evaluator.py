r"""The ``dismax-ood`` MLflow model evaluator: how well a model's ``ood_score`` separates in-distribution
images from OOD ones, per OOD set and per group, from pytorch-ood's metrics.

It is registered under the entry point group ``mlflow.model_evaluator`` (``pyproject.toml``), so MLflow
finds it by name once the package is installed::

    result = mlflow.models.evaluate(model_uri, data=df, model_type="ood", evaluators=["dismax-ood"],
                                    evaluator_config={"dismax-ood": {"score": "mds", "tpr": 0.99}})

(``model_type="ood"``: MLflow 3 refuses ``model_type=None`` without ``extra_metrics``.) Any pyfunc model whose
output has an ``ood_score`` column (larger = more in-distribution, as the dismax models) can be evaluated;
``score`` and ``tpr`` are passed as serve-time params, so the model must declare them in its signature.
Scores computed elsewhere work too: ``evaluate(data=df, predictions="ood_score", model_type="ood", ...)``.

**Data** (a DataFrame, one image per row): ``image`` (a raw image as the model takes it, or a file path),
``ood`` (bool: an OOD row), ``dataset`` (the set's name), optionally ``group`` (``near``/``far``, for OOD
rows) and ``label`` (the class of in-distribution rows). Rows go to the model in chunks of
``batch_size`` (default 256): a chunk of same-shaped images as one batch (a grey ``[H, W]`` image gains a
channel axis, so the batch is ``[N, H, W, 1]``), else a list of images.

**Metrics** (fractions; :mod:`._ood_metrics` for the definitions): ``AUROC``, ``AUPR-IN``, ``AUPR-OUT``,
``FPR95TPR`` (OOD positive, pytorch-ood's) and ``FPR95-ID`` (ID positive, conventional) of all ID rows
against all OOD rows; ``<dataset>/<metric>`` against each OOD set; ``<group>/<metric>`` the mean over the
group's sets (as ``dismax compare`` summarises); ``ACC`` on the labelled ID rows (against the output's
``class``, or ``class_name`` for string labels; left out, with a warning, when the output has neither);
and, when the output has ``is_ood`` decisions, ``ID-flagged`` (the fraction of ID rows flagged at ``tpr``)
and ``OOD-detected`` (of OOD rows; also per set and group). They are logged to the run with the model
and the evaluation dataset.

**Artifacts** (under ``dismax-ood/`` in the run): ``roc_curve.png``, ``score_histogram.png`` and
``metrics.json`` (one row per OOD set).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ._ood_metrics import METRIC_KEYS, ood_metrics, roc_figure, score_histogram

__all__ = ["EVALUATOR_NAME", "MODEL_TYPE", "DisMaxOODEvaluator"]

EVALUATOR_NAME = "dismax-ood"
MODEL_TYPE = "ood"
_CONFIG_KEYS = ("score", "tpr", "batch_size")
_ARTIFACT_DIR = EVALUATOR_NAME

log = logging.getLogger("dismax_plugin.adapters.mlflow")


def _invalid(message: str) -> MlflowException:
    return MlflowException(f"{EVALUATOR_NAME}: {message}", error_code=INVALID_PARAMETER_VALUE)


class DisMaxOODEvaluator(ModelEvaluator):
    """MLflow evaluator ``dismax-ood`` (``model_type="ood"``); see the module docstring."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        """Only ``model_type="ood"``: other evaluations of other models are left alone."""
        return model_type == MODEL_TYPE

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, extra_metrics=None,
                 custom_artifacts=None, predictions=None, **kwargs) -> EvaluationResult:  # fmt: skip
        """Predict ``dataset``'s images with ``model``, compute and log the metrics and artifacts.

        :raises MlflowException: (``INVALID_PARAMETER_VALUE``) for missing columns, bad values, a bad
            ``evaluator_config`` or a model output without ``ood_score``.
        """
        config = _check_config(evaluator_config)
        table = _check_table(dataset.features_data, images=model is not None)
        output = _predictions(model, dataset, table, config)
        metrics, rows = _metrics(table, output)
        metrics = {key: float(value) for key, value in metrics.items() if not math.isnan(value)}
        _log_metrics(run_id, metrics, kwargs.get("model_id"), dataset)
        artifacts = _log_artifacts(run_id, table, output, rows, metrics)
        return EvaluationResult(metrics=metrics, artifacts=artifacts, run_id=run_id)


# ----------------------------------------------------------------------------------------------- inputs
def _check_config(config: Any) -> dict:
    config = dict(config or {})
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise _invalid(f"unknown evaluator_config keys {unknown}; expected some of {list(_CONFIG_KEYS)}.")
    tpr = config.get("tpr")
    if tpr is not None and (isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0 < tpr <= 1):
        raise _invalid(f"evaluator_config 'tpr' must be a number in (0, 1]; got {tpr!r}.")
    score = config.get("score")
    if score is not None and (not isinstance(score, str) or not score):
        raise _invalid(f"evaluator_config 'score' must be a score name such as 'mds'; got {score!r}.")
    size = config.get("batch_size", 256)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise _invalid(f"evaluator_config 'batch_size' must be an integer >= 1; got {size!r}.")
    return {"params": {k: config[k] for k in ("score", "tpr") if config.get(k) is not None}, "batch_size": size}


def _column(frame, name: str, required: bool = True):
    if name in frame.columns:
        return frame[name]
    if required:
        raise _invalid(f"the data must have a column {name!r} (columns: image, ood, dataset, and optionally "
                       f"group, label); got {list(frame.columns)}.")  # fmt: skip
    return None


def _missing(value: Any) -> bool:
    import pandas as pd

    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # an array: not a missing scalar
        return False


def _names(values) -> np.ndarray:
    return np.asarray([None if _missing(v) else str(v) for v in values], dtype=object)


def _check_table(frame, images: bool = True) -> dict:
    """The evaluation data as arrays: ``image`` (objects; needed with a model), ``ood`` (bool), ``dataset``,
    ``group``, ``label``."""
    images = _column(frame, "image", required=images)
    ood, sets = _column(frame, "ood"), _column(frame, "dataset")
    values = ood.tolist()
    if not all(isinstance(v, (bool, np.bool_)) or v in (0, 1) for v in values):
        raise _invalid(f"column 'ood' must be bools (True = an OOD row); got values such as {values[:3]}.")
    ood = np.asarray(values, dtype=bool)
    sets = _names(sets)
    if any(s is None or not s for s in sets):
        raise _invalid("column 'dataset' must name the set of every row; got empty values.")
    if ood.all() or not ood.any():
        raise _invalid("the data must hold in-distribution rows (ood False) and OOD rows (ood True).")
    groups = _column(frame, "group", required=False)
    if groups is not None:
        groups = _names(groups)
        for name in sorted(set(sets[ood])):
            found = set(groups[ood & (sets == name)])
            if len(found) != 1 or None in found:
                raise _invalid(f"column 'group' must give OOD set {name!r} one group (near or far); got {found}.")
    clash = sorted(set(sets[ood]) & (set(groups[ood]) if groups is not None else set()))
    if clash:
        raise _invalid(f"OOD sets {clash} have the name of a group; rename them (metric names would collide).")
    labels = _column(frame, "label", required=False)
    return {"image": None if images is None else images.tolist(), "ood": ood, "dataset": sets, "group": groups,
            "label": None if labels is None else labels.tolist()}  # fmt: skip


def _load_image(value: Any) -> np.ndarray:
    """A cell of ``image``: an array as it is, or a file path decoded by PIL (palette/CMYK/... as RGB)."""
    if not isinstance(value, (str, os.PathLike)):
        return np.asarray(value)
    from PIL import Image

    try:
        with Image.open(value) as image:
            image.load()
            if image.mode not in ("L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I", "F"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
            return np.asarray(image)
    except OSError as error:
        raise _invalid(f"column 'image': cannot read the image file {os.fspath(value)!r} ({error}).") from error


def _batch(images: list[np.ndarray]):
    """Same-shaped images as one batch (grey ``[H, W]`` images gain a channel axis), else the list."""
    if len({im.shape for im in images}) == 1 and images[0].ndim in (2, 3):
        batch = np.stack(images)
        return batch[..., None] if batch.ndim == 3 else batch
    return images


def _predictions(model, dataset, table: dict, config: dict):
    """The model's output frame (one row per data row, with a finite ``ood_score``)."""
    import pandas as pd

    images, rows = table["image"], len(table["ood"])
    if model is None:
        if dataset.predictions_data is None:
            raise _invalid("needs a model, or data whose predictions column (predictions=...) is the ood_score.")
        output = pd.DataFrame({"ood_score": np.asarray(dataset.predictions_data, dtype=np.float64)})
    else:
        params = config["params"]
        schema = model.metadata.get_params_schema() if hasattr(model.metadata, "get_params_schema") else None
        declared = {p.name for p in schema.params} if schema is not None else set()
        if set(params) - declared:
            raise _invalid(f"evaluator_config {sorted(params)} are passed to the model as params, but it declares "
                           f"{sorted(declared) or 'none'} in its signature.")  # fmt: skip
        chunks, size = [], config["batch_size"]
        for start in range(0, len(images), size):
            batch = _batch([_load_image(v) for v in images[start : start + size]])
            chunks.append(_as_frame(model.predict(batch, params=params or None)))
        output = pd.concat(chunks, ignore_index=True)
    if len(output) != rows:
        raise _invalid(f"the model returned {len(output)} rows for {rows} images.")
    scores = pd.to_numeric(output["ood_score"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(scores).all():
        raise _invalid("the model's ood_score must be finite numbers; got NaN, inf or non-numbers.")
    return output.assign(ood_score=scores)


def _as_frame(output):
    import pandas as pd

    frame = output if isinstance(output, pd.DataFrame) else pd.DataFrame(output)
    if "ood_score" not in frame.columns:
        raise _invalid("the model's output must be a table with an 'ood_score' column (larger = more "
                       f"in-distribution); got columns {list(frame.columns)}.")  # fmt: skip
    return frame.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- metrics
def _flags(output) -> np.ndarray | None:
    if "is_ood" not in output.columns or output["is_ood"].isna().any():
        return None
    return output["is_ood"].to_numpy(dtype=bool)


def _metrics(table: dict, output) -> tuple[dict[str, float], list[dict]]:
    """All metrics (see the module docstring) and one row per OOD set."""
    scores, ood, sets, groups = output["ood_score"].to_numpy(), table["ood"], table["dataset"], table["group"]
    flags = _flags(output)
    metrics = ood_metrics(scores[~ood], scores[ood])
    if flags is not None:
        metrics.update({"ID-flagged": float(flags[~ood].mean()), "OOD-detected": float(flags[ood].mean())})
    rows = []
    for name in dict.fromkeys(sets[ood]):
        members = ood & (sets == name)
        row = {"dataset": name, "group": groups[members][0] if groups is not None else None,
               "size": int(members.sum()), **ood_metrics(scores[~ood], scores[members])}  # fmt: skip
        if flags is not None:
            row["OOD-detected"] = float(flags[members].mean())
        rows.append(row)
        metrics.update({f"{_key(name)}/{k}": v for k, v in row.items() if k not in ("dataset", "group", "size")})
    for group in dict.fromkeys(r["group"] for r in rows if r["group"] is not None):
        members = [r for r in rows if r["group"] == group]
        for key in [k for k in members[0] if k not in ("dataset", "group", "size")]:
            metrics[f"{_key(group)}/{key}"] = float(np.mean([r[key] for r in members]))
    accuracy = _accuracy(table["label"], output, ~ood)
    if accuracy is not None:
        metrics["ACC"] = accuracy
    return metrics, rows


def _key(name: str) -> str:
    """A set or group name as part of an MLflow metric key (letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def _accuracy(labels: list | None, output, in_distribution: np.ndarray) -> float | None:
    """pytorch-ood's closed-set accuracy on the ID rows that have a label, or ``None`` without labels."""
    if labels is None:
        return None
    import torch
    from pytorch_ood.metrics import Accuracy

    keep = [i for i in np.flatnonzero(in_distribution) if not _missing(labels[i])]
    if not keep:
        return None
    given = [labels[i] for i in keep]
    textual = any(isinstance(v, str) for v in given)
    column = "class_name" if textual else "class"
    if column not in output.columns:
        log.warning("%s: no ACC: the model's output has no %r column to compare column 'label' with",
                    EVALUATOR_NAME, column)  # fmt: skip
        return None
    predicted = output[column].to_numpy()[keep].tolist()
    if textual:
        vocabulary = {name: i for i, name in enumerate(dict.fromkeys(map(str, given + predicted)))}
        given, predicted = [vocabulary[str(v)] for v in given], [vocabulary[str(v)] for v in predicted]
    try:
        truth, guess = torch.as_tensor([int(v) for v in given]), torch.as_tensor([int(v) for v in predicted])
    except (TypeError, ValueError) as error:
        raise _invalid(f"column 'label' must hold class indices or class names; got {given[:3]}.") from error
    (value,) = Accuracy().update(guess, truth).compute().values()
    return float(value)


# ----------------------------------------------------------------------------------------------- logging
def _log_metrics(run_id: str, metrics: dict[str, float], model_id: str | None, dataset) -> None:
    """The metrics on the run, linked to the logged model and the evaluation dataset (as MLflow's own)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    link = {"model_id": model_id, "dataset_name": dataset.name, "dataset_digest": dataset.digest} if model_id else {}
    items = [Metric(key, value, stamp, 0, run_id=run_id, **link) for key, value in metrics.items()]
    MlflowClient().log_batch(run_id, metrics=items)


def _log_artifacts(run_id: str, table: dict, output, rows: list[dict], metrics: dict) -> dict:
    """ROC curves, score histogram and the per-set table, logged under ``dismax-ood/`` and returned."""
    from mlflow import MlflowClient
    from mlflow.models.evaluation.artifacts import ImageEvaluationArtifact, JsonEvaluationArtifact
    from mlflow.tracking.artifact_utils import get_artifact_uri

    scores, ood = output["ood_score"].to_numpy(), table["ood"]
    id_scores = scores[~ood]
    sets = {row["dataset"]: scores[ood & (table["dataset"] == row["dataset"])] for row in rows}
    aurocs = {row["dataset"]: row["AUROC"] for row in rows}
    made = {"roc_curve": roc_figure(id_scores, sets, aurocs), "score_histogram": score_histogram(id_scores, sets)}
    artifacts = {}
    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="dismax-ood-") as folder:
        for name, figure in made.items():
            path = os.path.join(folder, f"{name}.png")
            figure.savefig(path, dpi=100)
            artifacts[name] = (ImageEvaluationArtifact, path)
        path = os.path.join(folder, "metrics.json")
        with open(path, "w") as file:
            json.dump({"rows": rows, "overall": {k: metrics[k] for k in METRIC_KEYS}}, file, indent=1)
        artifacts["ood_metrics"] = (JsonEvaluationArtifact, path)
        result = {}
        for name, (kind, path) in artifacts.items():
            client.log_artifact(run_id, path, _ARTIFACT_DIR)
            artifact = kind(uri=get_artifact_uri(run_id, f"{_ARTIFACT_DIR}/{os.path.basename(path)}"))
            artifact._load(path)
            result[name] = artifact
    return result
