"""Matplotlib figures for OOD evaluation reports: score histograms, ROC curves, reliability diagrams.

matplotlib and scikit-learn are imported when a function is called, not when this module is imported.
Each figure is a :class:`matplotlib.figure.Figure` on its own ``Agg`` canvas (no display, no ``pyplot``
state, no global backend switch). Close it with :func:`close` once saved or logged;
:meth:`dismax_plugin.adapters.mlflow.MlflowTracker.log_figure` closes it for you.

Scores follow :mod:`dismax_plugin.scores`: *in-distribution* scores, larger means more in-distribution.
The ROC curves therefore treat in-distribution samples as the positive class (the convention of the
``FPR95TPR`` metric: the false-positive rate on OOD data at 95 % in-distribution true-positive rate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["close", "near_far_auroc", "reliability_diagram", "roc_curves", "score_histogram"]


def _figure(ncols: int = 1, width: float = 5.5, height: float = 4.0):
    # A Figure on its own Agg canvas: no pyplot, no global backend switch, works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _to_numpy(name: str, values: Any, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor
        values = values.detach().cpu().double().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of numbers (numpy, torch or list); got {type(values)}.") from error
    if array.ndim != ndim or array.shape[0] == 0:
        shape = "[N]" if ndim == 1 else "[N, C]"
        raise ValueError(f"{name} must be a non-empty {ndim}-D array {shape}; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite; got NaN or inf.")
    return array


def _check_ood(ood_scores: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(ood_scores, Mapping) or not ood_scores:
        raise TypeError(
            "ood_scores must be a non-empty mapping {dataset name: scores [N]}, e.g. {'noise': scores}; "
            f"got {type(ood_scores).__name__}."
        )
    return {str(name): _to_numpy(f"ood_scores['{name}']", s, 1) for name, s in ood_scores.items()}


def score_histogram(id_scores: Any, ood_scores: Mapping[str, Any], title: str = "", bins: int = 50):
    """Overlaid, density-normalised histograms of in-distribution and OOD scores.

    :param id_scores: in-distribution scores :math:`N`.
    :param ood_scores: ``{dataset name: scores}`` (each :math:`N_k`).
    :param title: figure title.
    :param bins: number of shared bins.
    :return: a matplotlib ``Figure`` with one axes.
    :raises TypeError: if ``ood_scores`` is not a non-empty mapping.
    :raises ValueError: for empty, non-1-D or non-finite scores, or ``bins < 1``.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins!r}.")
    id_values = _to_numpy("id_scores", id_scores, 1)
    ood = _check_ood(ood_scores)
    everything = np.concatenate([id_values, *ood.values()])
    low, high = float(everything.min()), float(everything.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    fig, (ax,) = _figure()
    ax.hist(id_values, bins=edges, density=True, alpha=0.6, label=f"in-distribution (n={id_values.size})")
    for name, values in ood.items():
        ax.hist(values, bins=edges, density=True, alpha=0.45, label=f"{name} (n={values.size})")
    ax.set_xlabel("in-distribution score (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def roc_curves(id_scores: Any, ood_scores: Mapping[str, Any], title: str = ""):
    """ROC curve of in-distribution vs each OOD set, in-distribution as the positive class.

    The legend gives the AUROC and the FPR at 95 % TPR of each curve.

    :param id_scores: in-distribution scores :math:`N`.
    :param ood_scores: ``{dataset name: scores}``.
    :param title: figure title.
    :return: a matplotlib ``Figure`` with one axes.
    :raises TypeError: if ``ood_scores`` is not a non-empty mapping.
    :raises ValueError: for empty, non-1-D or non-finite scores.
    """
    from sklearn.metrics import auc, roc_curve

    id_values = _to_numpy("id_scores", id_scores, 1)
    ood = _check_ood(ood_scores)
    fig, (ax,) = _figure(height=4.5, width=5.0)
    for name, values in ood.items():
        labels = np.concatenate([np.ones(id_values.size), np.zeros(values.size)])
        fpr, tpr, _ = roc_curve(labels, np.concatenate([id_values, values]))
        fpr95 = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
        ax.plot(fpr, tpr, label=f"{name}: AUROC {auc(fpr, tpr):.3f}, FPR95 {fpr95:.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.axhline(0.95, linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (OOD accepted)")
    ax.set_ylabel("true-positive rate (in-distribution kept)")
    ax.legend(fontsize="small", loc="lower right")
    if title:
        ax.set_title(title)
    return fig


def _probabilities(values: np.ndarray) -> np.ndarray:
    """Rows that are already probability vectors are kept; anything else is treated as logits."""
    is_probability = (values >= 0).all() and (values <= 1).all() and np.allclose(values.sum(axis=1), 1.0, atol=1e-4)
    if is_probability:
        return values
    shifted = values - values.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _reliability_panel(ax, probabilities: np.ndarray, labels: np.ndarray, n_bins: int, title: str) -> float:
    import torch

    from dismax_plugin.calibration import calibration_bins

    bins = calibration_bins(torch.from_numpy(probabilities), torch.from_numpy(labels), n_bins)
    mean_conf, accuracy, count = (t.numpy() for t in bins)
    filled = count > 0
    ece = float(np.abs(accuracy - mean_conf)[filled] @ count[filled] / labels.size)
    width = 1.0 / n_bins
    centers = (np.arange(n_bins) + 0.5) * width
    ax.bar(centers[filled], accuracy[filled], width=width, edgecolor="black", alpha=0.7, label="accuracy")
    ax.bar(
        centers[filled],
        (mean_conf - accuracy)[filled],
        bottom=accuracy[filled],
        width=width,
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title + ': ' if title else ''}ECE {100 * ece:.2f} %")
    ax.legend(fontsize="small", loc="upper left")
    return ece


def reliability_diagram(
    logits_or_probs: Any,
    labels: Any,
    n_bins: int = 15,
    title: str = "",
    *,
    calibrated: Any = None,
    panel_titles: tuple[str, str] = ("before calibration", "after calibration"),
):
    """Reliability diagram: accuracy against confidence in ``n_bins`` equal-width bins, with the ECE.

    Rows of ``logits_or_probs`` that are all probability vectors (in [0, 1], summing to 1) are used as
    they are; otherwise a softmax turns logits into probabilities. The bins match
    :func:`dismax_plugin.expected_calibration_error`, so the ECE in the panel title equals it.

    :param logits_or_probs: :math:`N \\times C` logits or probabilities.
    :param labels: class indices :math:`N`.
    :param n_bins: number of confidence bins.
    :param title: figure title.
    :param calibrated: optional second :math:`N \\times C` array (e.g. the logits after temperature
        scaling) drawn in a second panel, for a before/after figure.
    :param panel_titles: titles of the two panels when ``calibrated`` is given.
    :return: a matplotlib ``Figure`` with one axes, or two with ``calibrated``; the figure keeps the ECE
        of each panel in ``fig.ece`` (a list of floats).
    :raises ValueError: for bad shapes, labels outside ``[0, C)`` or ``n_bins < 1``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}.")
    first = _to_numpy("logits_or_probs", logits_or_probs, 2)
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    targets = np.asarray(labels)
    if targets.ndim != 1 or targets.shape[0] != first.shape[0] or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(
            f"labels must be integer class indices of shape [{first.shape[0]}]; got {targets.dtype} {targets.shape}."
        )
    if targets.min() < 0 or targets.max() >= first.shape[1]:
        raise ValueError(f"labels must lie in [0, {first.shape[1]}); got range [{targets.min()}, {targets.max()}].")
    panels = [first]
    if calibrated is not None:
        second = _to_numpy("calibrated", calibrated, 2)
        if second.shape != first.shape:
            raise ValueError(f"calibrated must have the shape of logits_or_probs {first.shape}; got {second.shape}.")
        panels.append(second)
    fig, axes = _figure(ncols=len(panels), width=4.5, height=4.5)
    names = panel_titles if len(panels) == 2 else ("",)
    fig.ece = [
        _reliability_panel(ax, _probabilities(values), targets, n_bins, name)
        for ax, values, name in zip(axes, panels, names)
    ]
    if title:
        fig.suptitle(title)
    return fig


def near_far_auroc(summary: Any, title: str = ""):
    """Near- and far-OOD AUROC (percent) of every (model, method), as paired horizontal bars with the std over
    seeds as error bars; one row per entry of ``summary`` (from the pytorch-ood adapter's ``summarize``).

    :param summary: list of dicts with ``model``, ``method``, ``near AUROC``, ``far AUROC`` (fractions) and
        optionally ``near AUROC std`` / ``far AUROC std``.
    :param title: figure title.
    :return: a matplotlib ``Figure`` whose height grows with the number of rows.
    :raises ValueError: for an empty summary or entries without those keys.
    """
    entries = list(summary) if isinstance(summary, (list, tuple)) else None
    needed = ("model", "method", "near AUROC", "far AUROC")
    if not entries or not all(isinstance(e, Mapping) and all(k in e for k in needed) for e in entries):
        raise ValueError(f"summary must be a non-empty list of dicts with keys {list(needed)}.")
    labels = [f"{e['model']} · {e['method']}" for e in entries]
    rows = np.arange(len(entries))
    fig, (ax,) = _figure(width=7.5, height=1.2 + 0.28 * len(entries))
    for offset, group, colour in ((-0.2, "near", "tab:orange"), (0.2, "far", "tab:blue")):
        values = np.array([100 * float(e[f"{group} AUROC"]) for e in entries])
        errors = np.array([100 * float(e.get(f"{group} AUROC std") or 0.0) for e in entries])
        xerr = errors if errors.any() else None  # one seed: no error bars
        ax.barh(rows + offset, values, height=0.38, xerr=xerr, color=colour, label=f"{group}-OOD", capsize=2)
    ax.set_yticks(rows, labels, fontsize="small")
    ax.invert_yaxis()
    shown = [100 * float(e[k]) for e in entries for k in ("near AUROC", "far AUROC") if np.isfinite(float(e[k]))]
    ax.set_xlim(max(0.0, min(shown, default=0.0) - 5), 100)
    ax.set_xlabel("AUROC (%)")
    ax.grid(axis="x", linestyle=":", linewidth=0.6)
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)
    if title:
        ax.set_title(title)
    return fig


def close(figure: Any) -> None:
    """Release a figure made here (or by ``pyplot``); anything else is ignored."""
    import sys

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)
    if hasattr(figure, "clear"):
        figure.clear()
