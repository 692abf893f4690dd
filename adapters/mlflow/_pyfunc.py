"""The served model: :class:`DisMaxPyfuncModel`, an MLflow ``PythonModel`` taking raw images.

It is logged as *models-from-code* (``_served_model.py`` names it with ``mlflow.models.set_model``), so
loading it runs this code and reads ``model.safetensors`` + its config through
:func:`dismax_plugin.adapters.timm.load_model`: nothing is unpickled. This module imports MLflow, so the
package imports it only on demand.

``predict(images)`` returns one row per image: ``class`` (int), ``class_name`` (str), ``probability``
(calibrated softmax of the predicted class), ``ood_score`` (the native in-distribution score, larger =
more in-distribution, computed from the logits at temperature 1 so that calibration cannot degrade it)
and ``is_ood`` (bool at the threshold stored for ``tpr``, missing when none was stored).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np

from dismax_plugin.scores import ood_score
from dismax_plugin.thresholds import threshold_at

from ..timm.preprocessing import eval_transform
from ._images import check_preprocessing, preprocess_images

__all__ = ["DisMaxPyfuncModel", "output_signature"]


class DisMaxPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc model: raw images in, one row per image out (see the module docstring).

    Log it from code with ``artifacts={"model_dir": <folder written by dtimm.save_model>}``;
    ``model_config={"device": "cuda", "tpr": 0.99, "batch_size": 64}`` overrides the defaults
    (``cpu``, 0.95, 64) at load time.
    """

    def load_context(self, context) -> None:
        """Load the model once (``dismax_plugin.adapters.timm.load_model``) on ``model_config['device']``.

        The OOD score is the head's chosen ``score`` and its thresholds come from the head's calibration
        scores. A linear (stock) model keeps its calibration in the metadata (``calibration``: temperature,
        score and the sorted calibration scores), which is applied here.
        """
        import torch

        from dismax_plugin.adapters.timm import get_head, load_model, read_metadata

        config = dict(getattr(context, "model_config", None) or {})
        model_dir = context.artifacts["model_dir"]
        self.device = str(config.get("device", "cpu"))
        self.tpr = float(config.get("tpr", 0.95))
        self.batch_size = int(config.get("batch_size", 64))
        self.model = load_model(model_dir, device=self.device).eval()
        saved = getattr(self.model, "dismax_metadata", None) or read_metadata(model_dir)
        self.metadata = dict(saved.get("metadata") or {})
        self.preprocessing = check_preprocessing(self.metadata.get("preprocessing"))
        self.transform = eval_transform(self.preprocessing)
        self.head = get_head(self.model)
        names = self.metadata.get("class_names")
        self.class_names = [str(n) for n in names] if names else None
        calibration = dict(self.metadata.get("calibration") or {})
        self.sorted_scores = None
        if self.head is not None:
            self.score_name = self.head.score
            if self.head.calibration_size:
                self.sorted_scores = self.head.stored_scores()
            self.temperature = 1.0  # the model's logits are calibrated inside the head
        else:  # a linear head: the calibrated temperature is not inside the model
            self.score_name = calibration.get("score") or "mps"
            stored = (calibration.get("scores") or {}).get(self.score_name)
            if stored:
                self.sorted_scores = torch.tensor(stored, dtype=torch.float64)
            self.temperature = float(calibration.get("temperature") or 1.0)
        self.threshold = threshold_at(self.sorted_scores, self.tpr) if self.sorted_scores is not None else None

    def predict(self, context, model_input: np.ndarray, params=None):
        """One row per image: ``class``, ``class_name``, ``probability``, ``ood_score``, ``is_ood``."""
        import pandas as pd
        import torch

        x = preprocess_images(model_input, self.preprocessing, self.transform)
        chunks = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunks.append(self.model(x[start : start + self.batch_size].to(self.device)).float().cpu())
        output = torch.cat(chunks)
        if self.head is not None:  # calibrated logits; the score is taken at T = 1, as in calibration
            scores = self.head.ood_score(output.to(self.head.temperature.device), self.score_name).cpu()
            probabilities = torch.softmax(output.double(), dim=1)
        else:  # raw logits: scores at T = 1 as in calibration, probabilities at the calibrated temperature
            scores = ood_score(output, 1.0, self.score_name)
            probabilities = torch.softmax(output.double() / self.temperature, dim=1)
        probability, predicted = probabilities.max(dim=1)
        classes = predicted.tolist()
        frame = pd.DataFrame(
            {
                "class": np.asarray(classes, dtype=np.int64),
                "class_name": [self.class_names[c] if self.class_names else str(c) for c in classes],
                "probability": probability.numpy().astype(np.float64),
                "ood_score": scores.numpy().astype(np.float64),
            }
        )
        if self.threshold is None:
            frame["is_ood"] = pd.array([pd.NA] * len(frame), dtype="boolean")
        else:
            frame["is_ood"] = (scores < self.threshold).numpy().astype(bool)
        return frame


def output_signature():
    """The served model's signature: the output columns; no input schema (raw images of several layouts
    and dtypes: a tensor spec would accept one of them only)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

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
    )
