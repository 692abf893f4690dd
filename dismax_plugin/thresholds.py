r"""OOD thresholds at chosen in-distribution true-positive rates: order statistics of held-out ID scores.

:func:`threshold_at` is the one definition of a threshold; :meth:`~dismax_plugin.PrototypeHead.threshold`,
:meth:`~dismax_plugin.PrototypeHead.is_ood`, :func:`compute_thresholds` and the served model all use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["DEFAULT_TPRS", "compute_thresholds", "flagged_count", "threshold_at"]

DEFAULT_TPRS = (0.90, 0.95, 0.99)


def _check_tpr(tpr) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], e.g. 0.95; got {tpr!r}.")
    return float(tpr)


def flagged_count(n: int, tpr: float) -> int:
    r""":math:`k = \min(\lfloor N (1 - \mathrm{tpr}) \rfloor, N - 1)`: how many of :math:`N` held-out
    in-distribution samples a threshold at ``tpr`` flags (the index of the threshold's order statistic)."""
    tpr = _check_tpr(tpr)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of calibration scores); got {n!r}.")
    # + 1e-9: N (1 - tpr) is often an integer computed with a rounding error below it (100 * 0.05 = 4.99...)
    return min(math.floor(n * (1.0 - tpr) + 1e-9), n - 1)


def threshold_at(sorted_scores: torch.Tensor, tpr: float) -> float:
    r"""The threshold that keeps a fraction ``tpr`` of in-distribution samples: the order statistic
    :math:`s_{(k)}` (0-based, ascending) of the sorted held-out scores with :math:`k` =
    :func:`flagged_count` :math:`(N, \mathrm{tpr})`. An input with ``score < threshold`` is OOD, so on the
    held-out scores themselves exactly :math:`k` are flagged when they are distinct (5 of 100 at TPR 0.95;
    ties at the threshold are all kept).

    :param sorted_scores: in-distribution scores :math:`N` (higher = more in-distribution), sorted ascending.
    :param tpr: in (0, 1].
    :raises ValueError: for an empty or unsorted tensor, or a tpr outside (0, 1].
    """
    if not isinstance(sorted_scores, torch.Tensor) or sorted_scores.ndim != 1 or sorted_scores.numel() == 0:
        raise ValueError("sorted_scores must be a non-empty 1-D tensor [N] sorted ascending.")
    k = flagged_count(sorted_scores.numel(), tpr)
    if sorted_scores.numel() > 1 and bool((sorted_scores[1:] < sorted_scores[:-1]).any()):
        raise ValueError("sorted_scores must be sorted ascending (e.g. torch.sort(scores).values).")
    return float(sorted_scores[k])


def compute_thresholds(id_scores: torch.Tensor, tprs: Iterable[float] = DEFAULT_TPRS) -> dict[float, float]:
    r"""``{tpr: threshold_at(sorted(id_scores), tpr)}`` for each ``tpr``.

    :param id_scores: in-distribution scores of held-out ID data, shape :math:`N` (any order), e.g.
        ``head.ood_score(model(val_images))``.
    :param tprs: true-positive rates in (0, 1].
    :return: ``{tpr: threshold}``
    :raises ValueError: for empty, non-finite or non-1-D scores, or a tpr outside (0, 1].
    """
    if not isinstance(id_scores, torch.Tensor):
        id_scores = torch.as_tensor(id_scores)
    if id_scores.ndim != 1 or id_scores.numel() == 0:
        raise ValueError(f"id_scores must be a non-empty 1-D tensor [N]; got shape {tuple(id_scores.shape)}.")
    scores = id_scores.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("id_scores must be finite; got NaN or inf.")
    tprs = [_check_tpr(t) for t in tprs]
    if not tprs:
        raise ValueError("tprs must name at least one true-positive rate, e.g. (0.95,).")
    ordered = scores.sort().values
    return {t: threshold_at(ordered, t) for t in tprs}
