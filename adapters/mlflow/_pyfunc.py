"""The served model: :class:`DisMaxPyfuncModel`, an MLflow ``PythonModel`` taking raw images.

It is logged as *models-from-code* (``_served_model.py`` names it with ``mlflow.models.set_model``), so
loading it runs this code and reads ``model.safetensors`` + its config through
:func:`dismax_plugin.adapters.timm.load_model`: nothing is unpickled. This module imports MLflow, so the
package imports it only on demand.

``predict(images, params={"tpr": 0.95, "score": <the model's score>})`` returns one row per image:
``class`` (int), ``class_name`` (str), ``probability`` (calibrated softmax of the predicted class),
``ood_score`` (the native in-distribution score ``score``, larger = more in-distribution, computed from the
logits at temperature 1 so that calibration cannot degrade it) and ``is_ood`` (``ood_score`` below the
threshold at ``tpr``: the order statistic :func:`dismax_plugin.threshold_at` of the model's sorted
calibration scores of ``score``, exactly ``head.is_ood(logits, tpr, score)``; missing when the model holds
no calibration scores). Both params are declared in the signature (:func:`model_signature`) with those
defaults; a bad value is an :class:`InvalidServingInput` (MLflow's ``INVALID_PARAMETER_VALUE``: HTTP 400
over REST) with one line saying what is accepted.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from dismax_plugin.heads import PrototypeHead
from dismax_plugin.scores import SCORE_NAMES, ood_score
from dismax_plugin.thresholds import threshold_at

from ..timm.preprocessing import eval_transform
from ._images import check_preprocessing, preprocess_images

__all__ = ["DEFAULT_TPR", "DisMaxPyfuncModel", "InvalidServingInput", "check_params", "default_score",
           "model_signature"]  # fmt: skip

#: the in-distribution TPR of ``is_ood`` when none is asked for: the core's ``head.is_ood`` default
DEFAULT_TPR: float = inspect.signature(PrototypeHead.is_ood).parameters["tpr"].default
#: the score of a linear (stock) model without a recorded one: MaxSoftmax, as its calibration records
_LINEAR_SCORE = "mps"
_REMOVED_CONFIG = ("tpr", "score")


class InvalidServingInput(MlflowException, ValueError):
    """Bad images or params for the served model: MLflow's ``INVALID_PARAMETER_VALUE`` (HTTP 400 over
    REST) and a ``ValueError``."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def default_score(saved: Mapping[str, Any]) -> str:
    """The score a saved model uses when none is asked for: the head's (``read_metadata(dir)["score"]``),
    else the one its calibration recorded (linear models), else MaxSoftmax."""
    calibration = dict((saved.get("metadata") or {}).get("calibration") or {})
    return str(saved.get("score") or calibration.get("score") or _LINEAR_SCORE).lower()


def check_params(params: Mapping[str, Any] | None, default: str) -> tuple[float, str]:
    """``(tpr, score)`` of the serve-time ``params`` (missing ones: :data:`DEFAULT_TPR`, ``default``).

    :raises InvalidServingInput: for a tpr that is not a number in (0, 1] or an unknown score name.
    """
    params = dict(params or {})
    tpr = params.get("tpr")
    tpr = DEFAULT_TPR if tpr is None else tpr
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.number)) or not 0.0 < float(tpr) <= 1.0:
        raise InvalidServingInput(
            f"params 'tpr' must be a number in (0, 1], the fraction of in-distribution images kept "
            f"(default {DEFAULT_TPR}); got {tpr!r}."
        )
    score = params.get("score") or default
    if not isinstance(score, str) or score.lower() not in SCORE_NAMES:
        raise InvalidServingInput(f"params 'score' must be one of {list(SCORE_NAMES)} (default {default!r}); "
                                  f"got {score!r}.")  # fmt: skip
    return float(tpr), score.lower()


class DisMaxPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc model: raw images in, one row per image out (see the module docstring).

    Log it from code with ``artifacts={"model_dir": <folder written by dtimm.save_model>}`` and
    ``signature=model_signature(read_metadata(folder))``; ``model_config={"device": "cuda",
    "batch_size": 64}`` overrides the defaults (``cpu``, 64) at load time. The operating point is a
    serve-time parameter: ``predict(images, params={"tpr": 0.99, "score": "mds"})``.
    """

    def load_context(self, context) -> None:
        """Load the model once (``dismax_plugin.adapters.timm.load_model``) on ``model_config['device']``.

        An isotropic head holds its calibration scores and temperature. A linear (stock) model keeps its
        calibration in the metadata (``calibration``: temperature, score and the sorted calibration scores
        of every native score), applied here.

        :raises ValueError: for a ``model_config`` naming ``tpr`` or ``score`` (serve-time params now).
        """
        import torch

        from dismax_plugin.adapters.timm import get_head, load_model, read_metadata

        config = dict(getattr(context, "model_config", None) or {})
        moved = [key for key in _REMOVED_CONFIG if key in config]
        if moved:
            raise ValueError(
                f"model_config {moved} are serve-time params of this model: pass them to predict, "
                f"e.g. predict(images, params={{'tpr': 0.99}}), or as \"params\" in the REST body."
            )
        model_dir = context.artifacts["model_dir"]
        self.device = str(config.get("device", "cpu"))
        self.batch_size = int(config.get("batch_size", 64))
        self.model = load_model(model_dir, device=self.device).eval()
        saved = getattr(self.model, "dismax_metadata", None) or read_metadata(model_dir)
        self.metadata = dict(saved.get("metadata") or {})
        self.preprocessing = check_preprocessing(self.metadata.get("preprocessing"))
        self.transform = eval_transform(self.preprocessing)
        self.head = get_head(self.model)
        names = self.metadata.get("class_names")
        self.class_names = [str(n) for n in names] if names else None
        self.score_name = self.head.score if self.head is not None else default_score(saved)
        calibration = dict(self.metadata.get("calibration") or {})
        self.sorted_scores: dict[str, torch.Tensor] = {}
        if self.head is not None:  # calibrated inside the head
            self.temperature = 1.0
        else:  # a linear head: the calibrated temperature and the scores are in the metadata
            self.temperature = float(calibration.get("temperature") or 1.0)
            stored = calibration.get("scores") or {}
            self.sorted_scores = {name: torch.tensor(v, dtype=torch.float64) for name, v in stored.items() if v}

    def _calibrated(self) -> list[str]:
        """The scores this model holds calibration scores of (thresholds exist for these)."""
        if self.head is not None:
            return list(SCORE_NAMES) if self.head.calibration_size else []
        return [name for name in SCORE_NAMES if name in self.sorted_scores]

    def _scores(self, output, score: str, tpr: float):
        """``(ood scores [B] float64, threshold or None)`` of ``output`` (the model's logits [B, C])."""
        if self.head is not None:  # calibrated logits; scored at T = 1, as in calibration (= head.is_ood)
            scores = self.head.ood_score(output.to(self.head.temperature.device), score).cpu()
            threshold = self.head.threshold(tpr, score) if self.head.calibration_size else None
        else:  # raw logits: scored at T = 1, as in calibration
            scores = ood_score(output, 1.0, score)
            stored = self.sorted_scores.get(score)
            threshold = threshold_at(stored, tpr) if stored is not None else None
        calibrated = self._calibrated()
        if threshold is None and calibrated:
            raise InvalidServingInput(
                f"params 'score' {score!r} has no calibration scores in this model (it has {calibrated}); "
                "choose one of those, or re-run `dismax calibrate` on it."
            )
        return scores, threshold

    def predict(self, context, model_input: np.ndarray, params=None):
        """One row per image: ``class``, ``class_name``, ``probability``, ``ood_score``, ``is_ood``.

        :param model_input: raw images (see :func:`~dismax_plugin.adapters.mlflow.preprocess_images`).
        :param params: ``{"tpr": float in (0, 1], "score": native score name}`` (defaults: 0.95, the
            model's score).
        :raises InvalidServingInput: for bad images or params (one line; HTTP 400 over REST).
        """
        import pandas as pd
        import torch

        tpr, score = check_params(params, self.score_name)
        try:
            x = preprocess_images(model_input, self.preprocessing, self.transform)
        except (TypeError, ValueError) as error:
            raise InvalidServingInput(str(error)) from error
        chunks = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunks.append(self.model(x[start : start + self.batch_size].to(self.device)).float().cpu())
        output = torch.cat(chunks)
        scores, threshold = self._scores(output, score, tpr)
        # probabilities at the calibrated temperature (inside an isotropic head, in the metadata otherwise)
        probability, predicted = torch.softmax(output.double() / self.temperature, dim=1).max(dim=1)
        classes = predicted.tolist()
        frame = pd.DataFrame(
            {
                "class": np.asarray(classes, dtype=np.int64),
                "class_name": [self.class_names[c] if self.class_names else str(c) for c in classes],
                "probability": probability.numpy().astype(np.float64),
                "ood_score": scores.numpy().astype(np.float64),
            }
        )
        if threshold is None:
            frame["is_ood"] = pd.array([pd.NA] * len(frame), dtype="boolean")
        else:  # exactly head.is_ood: score < threshold, compared in float64
            frame["is_ood"] = (scores < torch.tensor(threshold, dtype=scores.dtype)).numpy().astype(bool)
        return frame


def model_signature(saved: Mapping[str, Any]):
    """The served model's signature: its output columns and the serve-time params ``tpr``
    (:data:`DEFAULT_TPR`) and ``score`` (:func:`default_score` of ``saved``, a ``read_metadata`` dict).
    No input schema: raw images of several layouts and dtypes (a tensor spec would accept one of them)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema(
            [
                ColSpec("long", "class"),
                ColSpec("string", "class_name"),
                ColSpec("double", "probability"),
                ColSpec("double", "ood_score"),
                ColSpec("boolean", "is_ood", required=False),
            ]
        ),
        params=ParamSchema(
            [ParamSpec("tpr", "double", DEFAULT_TPR), ParamSpec("score", "string", default_score(saved))]
        ),
    )
