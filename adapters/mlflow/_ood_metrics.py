r"""OOD metrics of in-distribution scores, from pytorch-ood itself, and the evaluator's two figures.

Scores here are *in-distribution* scores (larger = more in-distribution, the ``ood_score`` column of the
served model); pytorch-ood takes outlier scores (larger = more OOD) with OOD labels :math:`< 0`, so they
are negated on the way in. The metric names are those of ``dismax compare``:

=============  =================================================================================
``AUROC``      :class:`pytorch_ood.metrics.OODMetrics` (OOD positive)
``AUPR-IN``    idem, in-distribution samples positive
``AUPR-OUT``   idem, OOD samples positive
``FPR95TPR``   idem, OOD positive (pytorch-ood's): fraction of ID samples flagged at 95 % OOD recall
``FPR95-ID``   :class:`pytorch_ood.metrics.FPRAtTPR` with ID positive (conventional): fraction of OOD
               samples accepted at 95 % ID recall
=============  =================================================================================

All are fractions in [0, 1]. Imports torch and pytorch-ood when called; matplotlib for the figures.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

__all__ = ["METRIC_KEYS", "ood_metrics", "roc_figure", "score_histogram"]

#: the metrics of one comparison of ID scores with OOD scores (fractions)
METRIC_KEYS: tuple[str, ...] = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "FPR95-ID")
_FPR_TPR = 0.95  # the TPR of both FPR95 conventions


def _outlier_inputs(id_scores: np.ndarray, ood_scores: np.ndarray):
    import torch

    scores = torch.as_tensor(np.concatenate([id_scores, ood_scores]), dtype=torch.float64)
    labels = torch.cat([torch.zeros(len(id_scores), dtype=torch.long), torch.full((len(ood_scores),), -1)])
    return -scores, labels  # outlier scores (larger = more OOD), OOD labelled -1


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """:data:`METRIC_KEYS` of in-distribution scores (larger = more ID) of ID and OOD samples.

    :param id_scores: scores of the in-distribution samples, :math:`N_{id}` (at least one).
    :param ood_scores: scores of the OOD samples, :math:`N_{ood}` (at least one).
    :raises ValueError: for an empty side or non-finite scores.
    """
    from pytorch_ood.metrics import FPRAtTPR, OODMetrics

    id_scores, ood_scores = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if not len(id_scores) or not len(ood_scores):
        raise ValueError("OOD metrics need at least one in-distribution and one OOD sample.")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise ValueError("ood_score must be finite numbers; got NaN or inf.")
    outlier, labels = _outlier_inputs(id_scores, ood_scores)
    with warnings.catch_warnings():  # AUTC (not reported) warns for constant scores
        warnings.simplefilter("ignore", UserWarning)
        result = {k: float(v) for k, v in OODMetrics(fpr_at=_FPR_TPR).update(outlier, labels).compute().items()}
    # ID positive: ID gets pytorch-ood's positive ("unknown") label, and the scores their ID sign
    (value,) = FPRAtTPR(tpr=_FPR_TPR).update(-outlier, -1 - labels).compute().values()
    result["FPR95-ID"] = float(value)
    return {key: result[key] for key in METRIC_KEYS}


def roc_figure(id_scores: np.ndarray, ood_sets: Mapping[str, np.ndarray], aurocs: Mapping[str, float]):
    """ROC curves (OOD positive, pytorch-ood's ``roc_curve``) of the ID scores against each OOD set."""
    from matplotlib.figure import Figure
    from pytorch_ood.metrics.functional import roc_curve

    figure = Figure(figsize=(5.5, 4.5))
    axes = figure.subplots()
    for name, scores in ood_sets.items():
        outlier, labels = _outlier_inputs(np.asarray(id_scores), np.asarray(scores))
        fpr, tpr, _ = roc_curve(outlier, labels)
        axes.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUROC {aurocs[name]:.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    axes.set(xlabel="false positive rate (ID flagged)", ylabel="true positive rate (OOD flagged)",
             title="ROC, OOD positive", xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def score_histogram(id_scores: np.ndarray, ood_sets: Mapping[str, np.ndarray]):
    """Density histograms of the in-distribution score, ID against each OOD set (common bins)."""
    from matplotlib.figure import Figure

    everything = np.concatenate([np.asarray(id_scores), *(np.asarray(s) for s in ood_sets.values())])
    low, high = float(everything.min()), float(everything.max())
    bins = np.linspace(low, high if high > low else low + 1.0, 41)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.hist(id_scores, bins=bins, density=True, alpha=0.5, label="in-distribution")
    for name, scores in ood_sets.items():
        axes.hist(scores, bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
    axes.set(xlabel="ood_score (larger = more in-distribution)", ylabel="density", title="score histogram")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
