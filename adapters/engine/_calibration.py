r"""The calibration step: logits of the held-out calibration split, the temperature, and the calibration
scores behind every OOD threshold, set in place.

The temperature :math:`T` is fitted on the calibration logits :math:`z` (``ece`` or ``nll`` of
:math:`z / T`, :func:`dismax_plugin.calibrate_temperature`). The calibration scores are the native scores of
the logits the deployed model returns once :math:`T` is set (a second pass over the split), scored by the
same ``head.ood_score`` that ``head.is_ood``, the detector and the served model use, so a threshold flags
exactly :math:`\lfloor N (1 - \mathrm{tpr}) \rfloor` calibration images (distinct scores).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import dismax_plugin as dp

from .progress import progress

__all__ = ["calibrate_model", "calibration_metadata", "collect_logits"]


@torch.no_grad()
def collect_logits(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu", workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Logits :math:`N \times C` (float32, CPU) and labels :math:`N` of ``dataset`` in eval mode.

    :param model: any classifier; its training mode is restored afterwards.
    :param dataset: yields ``(image, label)``.
    :return: ``(logits, labels)``.
    """
    logits, labels = [], []
    with dp.eval_mode(model):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        for x, y in progress(loader, desc="evaluate"):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels).long()


def calibrate_model(
    model: nn.Module,
    dataset: Dataset,
    objective: str = "ece",
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> dict[str, Any]:
    """Temperature and calibration scores of ``model`` from the held-out calibration split ``dataset``.

    1. The heads are reset to temperature 1 (so calibrating again does not compound) and the logits of
       ``dataset`` collected; :func:`dismax_plugin.calibrate_temperature` fits :math:`T` on them.
    2. Isotropic heads: :math:`T` is set, the model runs on ``dataset`` again — the deployed path, the very
       logits ``head.is_ood`` will see — and ``head.calibrate_scores(logits)`` stores every native score,
       sorted. Linear (stock) models keep :math:`T` outside the model: their scores are taken at
       :math:`T = 1`, ``dp.ood_score(logits, 1.0, name)`` of the float32 model output, and returned sorted in
       ``calibration_scores`` for the model's metadata.

    :param objective: ``"ece"`` or ``"nll"``.
    :return: the report: ``temperature``, ``ece_before``/``ece_after``, ``nll_before``/``nll_after``,
        ``score`` (the score thresholds use by default), ``size`` (calibration images), ``thresholds``
        (``{"0.95": value, ...}`` at :data:`dismax_plugin.DEFAULT_TPRS`, for display), ``calibration_scores``
        (``{name: sorted list}``, linear models only) and the validation ``val_logits`` (at temperature 1)
        and ``val_labels``.
    """
    heads = [head for _, head in dp.heads_of(model)]
    for head in heads:
        head.set_temperature(1.0)
    logits, labels = collect_logits(model, dataset, batch_size, device, workers)
    temperature = dp.calibrate_temperature(logits, labels, objective=objective)
    scaled = logits / temperature
    report: dict[str, Any] = {
        "temperature": temperature,
        "ece_before": dp.expected_calibration_error(logits, labels),
        "ece_after": dp.expected_calibration_error(scaled, labels),
        "nll_before": float(F.cross_entropy(logits.double(), labels)),
        "nll_after": float(F.cross_entropy(scaled.double(), labels)),
        "size": int(labels.numel()),
    }
    if heads:
        for head in heads:
            head.set_temperature(temperature)
        deployed, _ = collect_logits(model, dataset, batch_size, device, workers)
        for head in heads:
            head.calibrate_scores(deployed)
        head = heads[0]
        report["score"] = head.score
        report["thresholds"] = {str(t): head.threshold(t) for t in dp.DEFAULT_TPRS}
    else:
        ordered = {name: dp.ood_score(logits, 1.0, name).sort().values for name in dp.SCORE_NAMES}
        report["score"] = "mps"
        report["thresholds"] = {str(t): dp.threshold_at(ordered["mps"], t) for t in dp.DEFAULT_TPRS}
        report["calibration_scores"] = {name: values.tolist() for name, values in ordered.items()}
    return report | {"val_logits": logits, "val_labels": labels}


def calibration_metadata(report: dict[str, Any]) -> dict[str, Any]:
    """What the saved model's ``metadata["calibration"]`` records of a :func:`calibrate_model` report:
    ``temperature``, ``score``, ``size`` and, for linear models, the sorted ``scores`` of every native score."""
    record = {key: report[key] for key in ("temperature", "score", "size")}
    if "calibration_scores" in report:
        record["scores"] = report["calibration_scores"]
    return record
