"""OOD thresholds at chosen in-distribution true-positive rates."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["DEFAULT_TPRS", "compute_thresholds"]

DEFAULT_TPRS = (0.90, 0.95, 0.99)


def _check_tpr(tpr) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], e.g. 0.95; got {tpr!r}.")
    return float(tpr)


def compute_thresholds(id_scores: torch.Tensor, tprs: Iterable[float] = DEFAULT_TPRS) -> dict[float, float]:
    r"""Score thresholds that keep a fraction ``tpr`` of in-distribution samples.

    For each ``tpr`` the threshold :math:`t` is the lower empirical :math:`(1 - \mathrm{tpr})`-quantile of
    ``id_scores``, so at least ``tpr`` of them satisfy ``score >= t``; an input with ``score < t`` is
    flagged OOD. Scores are in-distribution scores (higher = more in-distribution).

    :param id_scores: in-distribution scores of held-out ID data, shape :math:`N`.
    :param tprs: true-positive rates in (0, 1].
    :return: ``{tpr: threshold}``
    :raises ValueError: for empty, non-finite or non-1-D scores, or a tpr outside (0, 1].
    """
    if not isinstance(id_scores, torch.Tensor):
        id_scores = torch.as_tensor(id_scores)
    if id_scores.ndim != 1 or id_scores.numel() == 0:
        raise ValueError(f"id_scores must be a non-empty 1-D tensor [N]; got shape {tuple(id_scores.shape)}.")
    if not id_scores.is_floating_point():
        id_scores = id_scores.double()
    if not bool(torch.isfinite(id_scores).all()):
        raise ValueError("id_scores must be finite; got NaN or inf.")
    tprs = [_check_tpr(t) for t in tprs]
    if not tprs:
        raise ValueError("tprs must name at least one true-positive rate, e.g. (0.95,).")
    ordered = torch.sort(id_scores.detach().double().cpu()).values
    n = ordered.numel()
    return {t: float(ordered[int(math.floor((n - 1) * (1.0 - t) + 1e-9))]) for t in tprs}
