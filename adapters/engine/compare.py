"""The ``dismax compare`` flow: train the isotropic models and the linear twins per seed, compare, report, track.

``run_compare(args, tracker)`` is called by the command with the parsed options and the started parent run.
For each seed and each model (``--heads``: isotropic heads; ``--twins``: ``ce`` = linear head + cross-entropy,
``logitnorm`` = linear head + pytorch-ood's ``LogitNorm`` loss) one :class:`TrainConfig` is trained with
:func:`train` (same backbone, data order, epochs, optimizer and seed) under a child run
``<model>-seed<seed>``. The models of a seed are then evaluated together with the pytorch-ood adapter's
:func:`compare` on the data they were trained with (each model's stored split record is checked against it),
every model's logits at temperature 1 for pytorch-ood's detectors. Reported numbers are the test sets; the
detectors' hyperparameters (GridSearch) and the report's "best" marks come from the OOD validation split
when the benchmark has one (else defaults and no marks). Outputs under ``--output``: ``results.csv`` (tidy
rows, test and validation), ``results.json``, ``report.md``, ``near_far_auroc.png`` and
``histogram_<model>_<method>.png``; all are logged to the parent run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import textwrap
import time

import dismax_plugin as dp

from ..pytorch_ood import (
    ROW_KEYS,
    check_detectors,
    check_split,
    compare,
    describe_split,
    format_summary,
    report_markdown,
    summarize,
)
from ._checkpoint import CHECKPOINT
from ._distributed import is_main_process
from .config import COMPARE_HEADS, TWINS, parse_list, train_config
from .tracking import Tracker
from .training import ConfigError, train

__all__ = ["run_compare"]

log = logging.getLogger("dismax_plugin.adapters.engine.compare")

#: the twins: a linear head trained with each loss
_TWIN_LOSSES = {"ce": "cross_entropy", "logitnorm": "logitnorm"}
#: what a comparison writes into --output besides the per-model run folders and histogram_*.png
_REPORT_FILES = ("results.csv", "results.json", "report.md", "near_far_auroc.png")


def _models(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """``(name, TrainConfig overrides)`` of every model of the comparison, isotropic first."""
    heads = parse_list("heads", getattr(args, "heads", "dismax"), COMPARE_HEADS)
    twins = parse_list("twins", getattr(args, "twins", ",".join(TWINS)), TWINS)
    models = [(head, {"head": head, "loss": "auto"}) for head in dict.fromkeys(heads)]
    models += [(twin, {"head": "linear", "loss": _TWIN_LOSSES[twin]}) for twin in dict.fromkeys(twins)]
    return models


def _options(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    seeds = parse_list("seeds", getattr(args, "seeds", "0"), item=int)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must not repeat a seed; got {args.seeds!r}.")
    try:
        detectors = check_detectors(getattr(args, "detectors", None) or None)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--detectors: {error}") from error
    return seeds, detectors


def _train_seed(args, models, seed: int, tracker: Tracker) -> tuple[dict, object]:
    """Train (or, with ``--resume``, continue) every model of ``seed``; a model without a checkpoint yet starts
    fresh, a finished one is only re-calibrated."""
    trained, data = {}, None
    for name, overrides in models:
        output = _model_output(args, seed, name)
        resume = bool(getattr(args, "resume", False)) and os.path.isfile(os.path.join(output, CHECKPOINT))
        cfg = train_config(args, **overrides, seed=seed, output=output, resume=resume)
        with tracker.child(f"{name}-seed{seed}") as child:
            start = time.perf_counter()
            result = train(cfg, child)
            child.log_metrics({"train_s": time.perf_counter() - start})
        trained[name], data = result.model, data or result.data
    return trained, data


def _check_stored_splits(args, trained: dict, data, seed: int) -> None:
    """Each trained model's saved split record must be the data's (a resumed comparison may mix runs)."""
    from .. import timm as dtimm

    for name in trained:
        model_dir = os.path.join(args.output, f"seed{seed}", name, "model")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            continue
        stored = (dtimm.read_metadata(model_dir).get("metadata") or {}).get("split")
        if stored and data.split:
            try:
                check_split(stored, data.split)
            except ValueError as error:
                raise ConfigError(f"--data '{args.data}': {name}, seed {seed}: {error}") from error


def _model_output(args, seed: int, name: str) -> str:
    return os.path.join(args.output, f"seed{seed}", name)


def _prepare(args, models, seeds: list[int]) -> None:
    """``--resume`` needs a checkpoint of at least one model; ``--overwrite`` removes the previous report files."""
    if getattr(args, "resume", False) and not any(
        os.path.isfile(os.path.join(_model_output(args, s, n), CHECKPOINT)) for s in seeds for n, _ in models
    ):
        raise ConfigError(f"--resume: no checkpoint under '{args.output}' (seed<N>/<model>/{CHECKPOINT}).")
    if getattr(args, "overwrite", False) and is_main_process() and os.path.isdir(args.output):
        for entry in os.listdir(args.output):
            if entry in _REPORT_FILES or (entry.startswith("histogram_") and entry.endswith(".png")):
                os.remove(os.path.join(args.output, entry))


def _evaluate_seed(trained: dict, data, seed: int, args, detectors: list[str], keep: dict, skipped: list):
    device = next(iter(trained.values())).parameters().__next__().device
    _check_stored_splits(args, trained, data, seed)
    try:
        return compare(
            trained, data.benchmark, fit_data=data.fit, val_data=data.val, detectors=detectors, seed=seed,
            batch_size=getattr(args, "eval_batch_size", 256), device=device, num_workers=getattr(args, "workers", 0),
            calibration=getattr(args, "calibration", "ece"), norm_std=data.preprocessing.get("std"),
            keep_scores=keep, skipped=skipped,
        )  # fmt: skip
    except ValueError as error:  # e.g. a benchmark without near/far lists
        raise ConfigError(f"--data '{args.data}': {error}") from error


def _seed_metrics(rows: list[dict]) -> dict[str, float]:
    """``<model>.<method>.<group>.<metric>`` (group means of one seed) for the parent run, step = seed."""
    metrics = {}
    for item in summarize(rows):
        for group in ("near", "far"):
            for metric in ("AUROC", "FPR95-ID"):
                value = item[f"{group} {metric}"]
                if not math.isnan(value):
                    metrics[f"{item['model']}.{item['method']}.{group}.{metric}"] = value
    return metrics


def _split_lines(splits: dict[int, dict]) -> list[str]:
    """Where each split came from (once when every seed has the same record, else per seed)."""
    records = [r for r in splits.values() if r]
    if not records:
        return []
    same = all({k: v for k, v in r.items() if k != "train_used"} == {k: v for k, v in records[0].items()
               if k != "train_used"} for r in records)  # fmt: skip
    if same:
        return describe_split(records[0])
    return [f"seed {seed}: {line}" for seed, record in splits.items() for line in describe_split(record)]


def _notes(data, rows: list[dict], skipped: list[dict], seeds: list[int], splits: dict | None = None) -> list[str]:
    groups = data.benchmark.ood_groups
    near = [n for n, g in groups.items() if g == "near"] or ["none"]
    far = [n for n, g in groups.items() if g == "far"] or ["none"]
    tuned = sorted({r["tuning"] for r in rows if r["tuning"] != "defaults"})
    val_sets = list(getattr(data.benchmark, "ood_val_names", []) or [])
    notes = [f"near-OOD test sets: {', '.join(near)}; far-OOD test sets: {', '.join(far)}", f"seeds: {seeds}"]
    notes += _split_lines(splits if splits is not None else {seeds[-1]: getattr(data, "split", None)})
    notes.append("reported numbers: the test sets (ID test + OOD test); the validation rows (split val) of "
                 "results.csv are for choices only")  # fmt: skip
    if hasattr(data.benchmark, "ood_flat") and data.benchmark.ood_flat:
        notes.append(f"OOD folders outside ood/near/ and ood/far/ count as far: {data.benchmark.ood_flat}")
    notes.append(
        "detector hyperparameters: tuned with pytorch-ood's GridSearch on the validation split (ID validation + "
        f"OOD validation sets {', '.join(val_sets) or 'of the benchmark'})"
        if tuned else "detector hyperparameters: pytorch-ood's defaults (the benchmark has no OOD validation split)"
    )  # fmt: skip
    for method, reason in dict.fromkeys((s["method"], s["reason"]) for s in skipped):
        matching = [s for s in skipped if (s["method"], s["reason"]) == (method, reason)]
        where = []
        for model in dict.fromkeys(s["model"] for s in matching):
            missed = sorted({s["seed"] for s in matching if s["model"] == model})
            where.append(model if len(missed) == len(seeds) else f"{model} (seeds {missed})")
        notes.append(f"{method} not run on {', '.join(where)}: {reason}")
    notes.append("every model alike: pytorch-ood's detectors see each model's logits at T = 1 (the isotropic "
                 "heads' calibration temperature is set to 1 during evaluation); the native scores do not depend "
                 "on T")  # fmt: skip
    notes.append("ECE: after temperature scaling fitted the same way for every model on the calibration/validation "
                 "split")  # fmt: skip
    return notes


def _write(output: str, rows: list[dict], summary: list[dict], report: str) -> list[str]:
    paths = [os.path.join(output, n) for n in ("results.csv", "results.json", "report.md")]
    with open(paths[0], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROW_KEYS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    def clean(items):  # strict JSON: NaN (e.g. a group without sets) becomes null
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in i.items()} for i in items]

    with open(paths[1], "w") as handle:
        json.dump({"rows": clean(rows), "summary": clean(summary)}, handle, indent=1, allow_nan=False)
    with open(paths[2], "w") as handle:
        handle.write(report)
    return paths


def _figures(output: str, summary: list[dict], keep: dict, tracker: Tracker, title: str) -> list[str]:
    from .figures import close, near_far_auroc, score_histogram

    made = {"near_far_auroc.png": near_far_auroc(summary, title=title)}
    for (model, method), per_set in keep.items():
        # histograms of each model's main method: the head's default native score, MaxSoftmax for twins
        main = "MaxSoftmax" if model in _TWIN_LOSSES else dp.HEADS[model].default_score.upper()
        if method == main:
            ood = {name: (-s).numpy() for name, s in per_set.items() if name != "ID"}
            figure = score_histogram((-per_set["ID"]).numpy(), ood, title=f"{model} + {method}: ID vs OOD")
            made[f"histogram_{model}_{method}.png"] = figure
    paths = []
    for name, figure in made.items():
        path = os.path.join(output, name)
        figure.savefig(path, dpi=110)
        tracker.log_figure(figure, f"comparison/{name}")
        close(figure)
        paths.append(path)
    return paths


def run_compare(args: argparse.Namespace, tracker: Tracker) -> int:
    """Run ``dismax compare`` (see the module documentation); returns the exit code.

    :param args: the parsed options: every training option, ``heads``, ``twins``, ``seeds``, ``detectors``,
        ``output``
    :param tracker: the started parent run (or a no-op :class:`Tracker`)
    :raises ConfigError: for an unknown head/twin/detector, seeds that are not a list of integers, or data
        the comparison cannot use (no near/far lists, an empty OOD folder)
    """
    models = _models(args)
    seeds, detectors = _options(args)
    _prepare(args, models, seeds)
    if not is_main_process():  # under torchrun: train with the others; rank 0 evaluates, writes and reports
        for seed in seeds:
            _train_seed(args, models, seed, tracker)
        return 0
    os.makedirs(args.output, exist_ok=True)
    rows, keep, skipped, data, splits = [], {}, [], None, {}
    start = time.perf_counter()
    for seed in seeds:
        trained, data = _train_seed(args, models, seed, tracker)
        splits[seed] = data.split
        scores: dict = {}
        seed_rows = _evaluate_seed(trained, data, seed, args, detectors, scores, skipped)
        tracker.log_metrics(_seed_metrics(seed_rows), step=seed)
        rows += seed_rows
        if not keep:
            keep = scores
    summary = summarize(rows)
    names = ", ".join(name for name, _ in models)
    title = f"Comparison on {args.data} ({args.model}, {getattr(args, 'epochs', '?')} epochs): {names}"
    notes = _notes(data, rows, skipped, seeds, splits)
    paths = _write(args.output, rows, summary, report_markdown(summary, rows, title=title, notes=notes))
    paths += _figures(args.output, summary, keep, tracker, title)
    tracker.log_table(rows, "comparison/results.json")  # the rows of results.json, as an MLflow table
    for path in paths:
        if os.path.basename(path) != "results.json":  # would overwrite the table above
            tracker.log_artifact(path, "comparison")
    wrapped = [line for note in notes for line in textwrap.wrap(note, 100, subsequent_indent="  ")]
    log.info("\n%s\n%s\n%s", "\n".join(textwrap.wrap(title, 100)), format_summary(summary), "\n".join(wrapped))
    log.info("wrote %s (%.0f s); speed = images_per_s relative to ce + MaxSoftmax", args.output,
             time.perf_counter() - start)  # fmt: skip
    return 0
