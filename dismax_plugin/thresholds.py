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

    An input with ``score < t`` is flagged OOD. For each ``tpr`` the threshold is the largest sample value
    that keeps at least ``tpr`` of the :math:`N` scores: the order statistic :math:`s_{(k)}` (0-based,
    ascending) with :math:`k = \lfloor N (1 - \mathrm{tpr}) \rfloor`, taken as ``torch.quantile(scores,
    k / (N - 1), interpolation="nearest")``. On distinct scores exactly :math:`k` samples are flagged (5 of
    100 at TPR 0.95); ties at the threshold are all kept. Scores are in-distribution scores (higher = more
    in-distribution), e.g. ``head.ood_score(val_logits)``.

    :param id_scores: in-distribution scores of held-out ID data, shape :math:`N`.
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
    n = scores.numel()
    # k / (n - 1) lands on the k-th order statistic; "nearest" absorbs the rounding of the division.
    flagged = [min(math.floor(n * (1.0 - t) + 1e-9), n - 1) for t in tprs]
    q = torch.tensor([k / max(n - 1, 1) for k in flagged], dtype=torch.float64)
    values = torch.quantile(scores, q, interpolation="nearest")
    return {t: float(v) for t, v in zip(tprs, values)}
