"""Evaluation of a trained or saved model for the commands: the OOD table, its figures, and loading a saved
model with its data.

Scores go through the pytorch-ood adapter's comparison, which scores isotropic models with the
temperature-independent OOD score (agreed interface 1) and every model with pytorch-ood detectors on its
logits at temperature 1. The table's notes say which split each number comes from: ``test`` rows (ID test +
OOD test sets) are the results, ``val`` rows (ID validation + OOD validation sets) are there for choices.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

import torch

import dismax_plugin as dp

from .config import ConfigError
from .tracking import Tracker

__all__ = [
    "detector_names",
    "evaluate_model",
    "example_input",
    "format_rows",
    "load_for_eval",
    "log_evaluation",
    "score_on_validation",
    "set_score",
    "split_notes",
]

log = logging.getLogger("dismax_plugin.adapters.engine.cli")


def detector_names(text: str | None) -> list[str]:
    """``--detectors`` (comma list, or ``all``) as pytorch-ood detector names; ``[]`` when empty."""
    if not (text or "").strip():
        return []
    from ..pytorch_ood import check_detectors

    try:
        return check_detectors(text)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--detectors: {error}") from error


def format_rows(rows: list[dict], notes: list[str] | tuple[str, ...] = ()) -> str:
    """The rows of :func:`evaluate_model` as the pytorch-ood adapter's wide text table, then ``notes``
    (:func:`evaluate_model`'s ``"notes"``: where each split came from)."""
    from ..pytorch_ood import format_table

    return "\n".join([format_table(rows), *notes])


def split_notes(data) -> list[str]:
    """Where each split of ``data`` came from and what it decided (the lines under every results table)."""
    from ..pytorch_ood import describe_split

    lines = describe_split(data.split) if data.split else ["splits: no record (a benchmark without split_info)"]
    return lines + [
        "calibration/validation split: temperature and thresholds; OOD validation sets: choices only (val rows)",
        "pytorch-ood detectors score every model's logits at T = 1; the native scores do not depend on T",
    ]


def evaluate_model(model, data, *, name: str | None = None, batch_size: int = 256, device="cpu", workers: int = 0,
                   detectors=()) -> dict:  # fmt: skip
    """Evaluate ``model`` on every OOD set of ``data.benchmark`` with the pytorch-ood adapter's comparison.

    An isotropic model is scored with every native score through the temperature-independent path
    (agreed interface 1); every model with pytorch-ood's ``MaxSoftmax`` and the ``detectors`` named
    (fitted on ``data.fit`` where needed).

    :param name: the model's name in the rows (default: its head kind, ``linear`` for a stock model).
    :return: ``{"rows": [...], "scores": {(model, method): {"ID": tensor, <set>: tensor}}, "notes": [...]}``;
        rows as :func:`dismax_plugin.adapters.pytorch_ood.compare` makes them (metrics are fractions; ``split``
        ``test`` or ``val``), notes from :func:`split_notes`.
    """
    from ..pytorch_ood import compare

    heads = dp.heads_of(model)
    name = name or (heads[0][1].kind if heads else "linear")
    scores: dict = {}
    methods = list(dict.fromkeys(["MaxSoftmax", *detectors]))
    rows = compare({name: model}, data.benchmark, fit_data=data.fit, val_data=data.val, detectors=methods,
                   batch_size=batch_size, device=device, num_workers=workers, keep_scores=scores)  # fmt: skip
    return {"rows": rows, "scores": scores, "notes": split_notes(data)}


def log_evaluation(tracker: Tracker, evaluation: dict, calibration: dict | None) -> None:
    """The table, its metrics, score histograms, ROC curves and reliability diagrams, to ``tracker`` (the
    figures only to a tracker that keeps them: see :attr:`.tracking.Tracker.keeps_figures`)."""
    from ..pytorch_ood import METRIC_KEYS

    rows = evaluation["rows"]
    tracker.log_table(rows, "ood/results.json")
    # test rows keep the names of the logged inputs; validation rows get a "val." prefix
    metrics = {("val." if r.get("split") == "val" else "") + f"{r['dataset']}.{r['method']}.{key}": r[key]
               for r in rows for key in METRIC_KEYS}  # fmt: skip
    first = next(r for r in rows if r.get("split", "test") == "test")
    metrics.update(test_acc=first["ACC"], test_ece=first["ECE"])
    tracker.log_metrics(metrics)
    if getattr(tracker, "keeps_figures", True):
        _log_figures(tracker, evaluation, calibration)


def _log_figures(tracker: Tracker, evaluation: dict, calibration: dict | None) -> None:
    """Per method a score histogram and ROC curves; the reliability diagrams before and after calibration."""
    from .figures import reliability_diagram, roc_curves, score_histogram

    for (_, method), per_set in evaluation["scores"].items():
        # figures show in-distribution scores (larger = more in-distribution): negate pytorch-ood's sign
        id_scores = (-per_set["ID"]).numpy()
        ood = {name: (-values).numpy() for name, values in per_set.items() if name != "ID"}
        tracker.log_figure(score_histogram(id_scores, ood, title=f"{method}: ID vs OOD"), f"ood/histogram_{method}.png")
        tracker.log_figure(roc_curves(id_scores, ood, title=f"{method}: ROC"), f"ood/roc_{method}.png")
    if calibration and "val_logits" in calibration:
        logits, labels = calibration["val_logits"], calibration["val_labels"]
        for when, z in (("before", logits), ("after", logits / calibration["temperature"])):
            figure = reliability_diagram(z, labels, title=f"validation, {when} calibration")
            tracker.log_figure(figure, f"calibration/reliability_{when}.png")


def score_on_validation(model, data, *, batch_size: int = 256, device="cpu", workers: int = 0) -> dict[str, float]:
    """The validation quality of every native score: the mean of the near-OOD and far-OOD mean AUROCs (ID
    positive; the groups the OOD validation sets have) of the ID validation split against each OOD validation
    set. Isotropic heads score with ``head.ood_score``, linear models their logits at :math:`T = 1`.

    :raises ConfigError: when the data has no OOD validation split
    """
    from ..pytorch_ood import ood_metrics
    from ._calibration import collect_logits

    benchmark = data.benchmark
    names = list(getattr(benchmark, "ood_val_names", None) or [])
    if not names:
        raise ConfigError("--score auto chooses on the OOD validation split and the data has none (a folder: add "
                          "ood/val/<name>/); name a score or leave the default.")  # fmt: skip
    heads = dp.heads_of(model)

    def native(logits, name):
        return heads[0][1].ood_score(logits, name) if heads else dp.ood_score(logits, 1.0, name)

    loader = {"batch_size": batch_size, "device": device, "workers": workers}
    id_logits = collect_logits(model, data.val, **loader)[0]
    ood_logits = {n: collect_logits(model, d, **loader)[0] for n, d in zip(names, benchmark.ood_val_sets())}
    groups = [[n for n in names if benchmark.ood_val_groups[n] == g] for g in ("near", "far")]
    quality = {}
    for score in dp.SCORE_NAMES:
        ids = native(id_logits, score)
        auroc = {n: ood_metrics(-ids, -native(z, score))["AUROC"] for n, z in ood_logits.items()}
        quality[score] = statistics.fmean(statistics.fmean(auroc[n] for n in group) for group in groups if group)
    return quality


def set_score(model, data, report: dict, choice: str, **loader) -> dict[str, float] | None:
    """Apply ``dismax calibrate --score`` to a calibrated ``model`` and its calibration ``report`` (in place).

    ``"default"``: the head's default score (``mps`` for a linear model); a native score name: that one;
    ``"auto"``: the best :func:`score_on_validation` (ties to the default, then to the order of
    :data:`dismax_plugin.SCORE_NAMES`). The heads store the choice (``head.set_score``), the report's
    ``score`` and display ``thresholds`` follow; every score's calibration scores are already stored.

    :return: the validation quality of every score for ``"auto"``, else ``None``
    """
    heads = [head for _, head in dp.heads_of(model)]
    default = type(heads[0]).default_score if heads else "mps"
    quality = score_on_validation(model, data, **loader) if choice == "auto" else None
    if quality is not None:
        best = max(quality.values())
        tied = [name for name, value in quality.items() if value == best]
        choice = default if default in tied else tied[0]
    name = default if choice == "default" else choice
    for head in heads:
        head.set_score(None if choice == "default" else name)
    report["score"] = name
    if heads:
        report["thresholds"] = {str(t): heads[0].threshold(t) for t in dp.DEFAULT_TPRS}
    else:
        ordered = torch.tensor(report["calibration_scores"][name], dtype=torch.float64)
        report["thresholds"] = {str(t): dp.threshold_at(ordered, t) for t in dp.DEFAULT_TPRS}
    return quality


def example_input(data, n: int = 2):
    """``n`` random raw images (uint8, H x W x C) in the model's input size: the logged model's input example."""
    import numpy as np

    channels, height, width = data.preprocessing["input_size"]
    shape = (n, height, width, channels) if channels == 3 else (n, height, width)
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def load_for_eval(args: argparse.Namespace):
    """The saved model of ``--checkpoint`` (a model or run directory) and the ``--data`` it is evaluated on.

    The data is rebuilt with the split record stored with the model (its split seed; no ``--seed`` needed)
    and must match it: other ID splits, classes or OOD validation sets are a :class:`ConfigError`.
    A model saved without a record (before records existed, or not by ``dismax train``) cannot be checked: a
    warning says so and ``--seed`` draws the splits.
    """
    from .. import timm as dtimm
    from .data import build_data

    path = args.checkpoint
    if os.path.isdir(os.path.join(path, "model")):
        path = os.path.join(path, "model")
    try:
        model = dtimm.load_model(path, device=args.device or "cpu")
        metadata = dtimm.read_metadata(path).get("metadata") or {}
    except (FileNotFoundError, ValueError, OSError) as error:
        raise ConfigError(f"--checkpoint: {error}") from error
    preprocessing, split = metadata.get("preprocessing"), metadata.get("split")
    if preprocessing is None:
        from ..timm.preprocessing import preprocessing_config

        preprocessing = preprocessing_config(model, args.image_size, args.channels)
    if not split:
        log.warning("%s has no stored split record: the data cannot be checked against training's; splits drawn "
                    "from training data use --seed %s.", path, args.seed)  # fmt: skip
    try:
        data = build_data(args.data, preprocessing, data_root=args.data_root, seed=args.seed, split=split or None)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data '{args.data}': {error}") from error
    return model, data, path
