r"""Calibration: expected calibration error and post-hoc temperature scaling.

DisMax calibrates a temperature :math:`T` after training, on held-out in-distribution data; the head
then returns :math:`z / T` (see :meth:`PrototypeHead.set_temperature`).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_class_targets, check_logits, check_positive

__all__ = ["OBJECTIVES", "CalibrationBins", "calibrate_temperature", "calibration_bins", "expected_calibration_error"]

OBJECTIVES = ("ece", "nll")

log = logging.getLogger(__name__)


def _prepare(logits, labels, name: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    check_logits(logits, name)
    check_class_targets(labels, logits.shape[0], logits.shape[1], name="labels")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample; got an empty batch.")
    return logits.detach().double().cpu(), labels.detach().cpu()


class CalibrationBins(NamedTuple):
    """Per-bin statistics of :func:`calibration_bins`, each float64 :math:`M`; empty bins hold 0."""

    confidence: torch.Tensor  #: mean confidence (max probability) of the bin
    accuracy: torch.Tensor  #: fraction of the bin's samples whose most probable class is the label
    count: torch.Tensor  #: number of samples in the bin


def _bins(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int) -> CalibrationBins:
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    # Bin m holds confidences in ((m-1)/M, m/M]; confidence is always > 0 for a softmax.
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp_(0, n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64)
    count = zeros.index_add(0, index, torch.ones_like(confidence))
    filled = count.clamp_min(1)
    return CalibrationBins(
        zeros.index_add(0, index, confidence) / filled, zeros.index_add(0, index, correct) / filled, count
    )


def calibration_bins(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> CalibrationBins:
    r"""Equal-width confidence bins, the one binning behind :func:`expected_calibration_error` (and the
    reliability diagrams): bin :math:`m` holds the samples whose confidence :math:`\max_j p_j` lies in
    :math:`((m-1)/M, m/M]`.

    .. math:: \mathrm{ECE} = \sum_m \frac{\mathrm{count}_m}{N}\,|\mathrm{accuracy}_m - \mathrm{confidence}_m|

    :param probabilities: :math:`N \times C`, rows are probability distributions (e.g. ``softmax(logits)``).
    :param labels: class indices :math:`N`.
    :param n_bins: :math:`M \ge 1`.
    :return: :class:`CalibrationBins` ``(confidence, accuracy, count)``, float64 :math:`M` each.
    :raises ValueError/TypeError: for bad shapes, labels or ``n_bins``, or rows that are not distributions.
    """
    check_positive("n_bins", n_bins, integer=True, minimum=1)
    probabilities, labels = _prepare(probabilities, labels, name="probabilities")
    if bool((probabilities < 0).any()) or not torch.allclose(
        probabilities.sum(dim=1), torch.ones(probabilities.shape[0], dtype=torch.float64), atol=1e-4
    ):
        raise ValueError("probabilities must have rows that are probability distributions (>= 0, summing to 1).")
    return _bins(probabilities, labels, n_bins)


def _ece(z: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    bins = _bins(F.softmax(z, dim=1), labels, n_bins)
    return float((bins.confidence - bins.accuracy).abs().mul(bins.count).sum() / labels.numel())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    r"""Expected calibration error with ``n_bins`` equal-width confidence bins.

    .. math:: \mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{N}\,\bigl|\mathrm{acc}(B_m) - \mathrm{conf}(B_m)\bigr|

    where the confidence is the maximum softmax probability and :math:`B_m` holds the samples whose
    confidence lies in :math:`((m-1)/M, m/M]`.

    :param logits: :math:`N \times C`.
    :param labels: class indices :math:`N`.
    :return: ECE in [0, 1].
    """
    check_positive("n_bins", n_bins, integer=True, minimum=1)
    z, labels = _prepare(logits, labels)
    return _ece(z, labels, n_bins)


def _nll(z: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(z, labels))


def calibrate_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: str = "ece",
    n_bins: int = 15,
    bounds: tuple[float, float] = (0.01, 100.0),
    tolerance: float | None = None,
) -> float:
    r"""Temperature :math:`T` minimising ``objective`` of :math:`z / T` on held-out data.

    A log-spaced grid over ``bounds`` (241 points) is followed by a finer grid around the best point;
    ``"nll"`` is convex in :math:`1/T`, ``"ece"`` is piecewise constant, so a grid serves both and
    the result is deterministic. Among the temperatures whose objective is within ``tolerance`` of the
    minimum, the one closest to 1 is kept: differences that small are below what held-out data can
    resolve, and when every held-out sample is classified correctly both objectives keep falling as
    :math:`T \to 0`, which would otherwise drive :math:`T` to the lower bound and saturate the
    probabilities. A result on a bound is logged as a warning.

    :param logits: :math:`N \times C` as produced by the model (already divided by any current temperature;
        multiply the current temperature by the result).
    :param labels: class indices :math:`N`.
    :param objective: ``"ece"`` (as in the DisMax paper) or ``"nll"``.
    :param tolerance: objective slack (default: 1e-3 for ECE, i.e. 0.1 percentage point; 1e-4 nats for NLL).
    :return: the temperature, a positive float.
    """
    objective = check_choice("objective", objective, OBJECTIVES)
    check_positive("n_bins", n_bins, integer=True, minimum=1)
    low, high = bounds
    if not 0 < low < high:
        raise ValueError(f"bounds must be (low, high) with 0 < low < high; got {bounds!r}.")
    z, labels = _prepare(logits, labels)

    def loss(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        return _ece(scaled, labels, n_bins) if objective == "ece" else _nll(scaled, labels)

    slack = tolerance if tolerance is not None else (1e-3 if objective == "ece" else 1e-4)
    check_positive("tolerance", slack, minimum=0.0)

    def best_of(grid: torch.Tensor) -> float:
        values = [(loss(float(g)), float(g)) for g in grid]
        lowest = min(v for v, _ in values)
        return min((abs(g), g) for v, g in values if v <= lowest + slack)[1]

    coarse = torch.linspace(math.log(low), math.log(high), 241, dtype=torch.float64)
    step = float(coarse[1] - coarse[0])
    best = best_of(coarse)
    fine = torch.linspace(best - step, best + step, 41, dtype=torch.float64).clamp(math.log(low), math.log(high))
    temperature = math.exp(best_of(fine))
    if math.isclose(temperature, low, rel_tol=1e-6) or math.isclose(temperature, high, rel_tol=1e-6):
        log.warning(
            "calibrate_temperature: the %s optimum lies on the search bound T=%.4g (bounds=%s).",
            objective,
            temperature,
            bounds,
        )
    return temperature
