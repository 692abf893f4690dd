r"""The calibration step: logits of held-out data, the temperature, and the OOD thresholds, set in place.

The temperature :math:`T` is fitted on the validation logits :math:`z` (``ece`` or ``nll`` of
:math:`z / T`, :func:`dismax_plugin.calibrate_temperature`); the thresholds are quantiles of the head's OOD
score of the calibrated validation logits, ``head.ood_score(z / T)``, the same path that ``head.is_ood``,
the detector and the served model use (agreed interface 1: that score does not depend on :math:`T`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import dismax_plugin as dp

from .progress import progress

__all__ = ["calibrate_model", "collect_logits"]


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
    """Temperature + thresholds for ``model``'s isotropic heads from held-out ``dataset``, set in place.

    The heads are reset to temperature 1 first, so calibrating again does not compound.

    :param objective: ``"ece"`` or ``"nll"``.
    :return: the report: ``temperature``, ``ece_before``/``ece_after``, ``nll_before``/``nll_after``,
        ``score`` (the head's default score), ``thresholds`` (``{"0.95": value, ...}``) and the validation
        ``val_logits`` (at temperature 1) and ``val_labels``.
    """
    heads = dp.heads_of(model)
    for _, head in heads:
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
        "score": None,
        "thresholds": {},
    }
    for _, head in heads:
        head.set_temperature(temperature)
        score_name = type(head).default_score
        thresholds = dp.compute_thresholds(head.ood_score(scaled))
        head.set_thresholds(thresholds, score_name)
        report.update(score=score_name, thresholds={str(k): v for k, v in thresholds.items()})
    return report | {"val_logits": logits, "val_labels": labels}
