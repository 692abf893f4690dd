"""The ``dismax`` subcommands: glue between the engine, the benchmarks, the comparison and tracking."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
from typing import Any

import dismax_plugin as dp

from .tracking import Tracker
from .training import ConfigError, Interrupted, TrainConfig, calibrate_model, train

__all__ = ["COMMANDS", "evaluate_model", "run_command"]

log = logging.getLogger("dismax_plugin.adapters.engine.cli")


# --------------------------------------------------------------------------- helpers
def _check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:6]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"--model: unknown timm architecture '{name}'{hint}.")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _make_tracker(args: argparse.Namespace, fallback_dir: str) -> Tracker:
    if not getattr(args, "track", False) or not _is_main_process():
        return Tracker()
    from ..mlflow import MlflowTracker

    return MlflowTracker(
        tracking_uri=args.tracking_uri,
        experiment=args.experiment or "dismax",
        run_name=args.run_name,
        register_model=args.register_model,
        fallback_dir=fallback_dir,
    )


@contextlib.contextmanager
def _tracked(tracker: Tracker, run_name: str | None, tags: dict[str, str]):
    """Start the run (an unusable tracking URI is a usage error) and end it with the outcome's status."""
    try:
        tracker.start(run_name=run_name, tags=tags)
    except (ValueError, ConnectionError, OSError) as error:
        raise ConfigError(f"--tracking-uri: {error}") from error
    try:
        yield tracker
    except (Interrupted, KeyboardInterrupt):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def _train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(overrides)
    if not values.get("output"):
        values["output"] = os.path.join(
            "runs", f"{args.command}-{args.model}-{values.get('head', args.head)}-{_slug(args.data)}"
        )
    return TrainConfig(**values)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(os.path.normpath(text)))


def _detector_names(args: argparse.Namespace) -> list[str]:
    from ..pytorch_ood.compare import DETECTOR_NAMES

    names = [d.strip() for d in (getattr(args, "detectors", "") or "").split(",") if d.strip()]
    known = {n.lower(): n for n in DETECTOR_NAMES}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise ConfigError(f"--detectors: unknown detector(s) {unknown}, expected names from {list(DETECTOR_NAMES)}.")
    return [known[n.lower()] for n in names]


# --------------------------------------------------------------------------- evaluation
def evaluate_model(
    model, data, *, batch_size: int = 256, device="cpu", workers: int = 0, detectors=(), fit_loader=None
) -> dict[str, Any]:
    """Evaluate ``model`` on every OOD set of ``data.benchmark`` with :func:`compare`'s machinery.

    An isotropic model is scored with every native score; a stock (linear) model with ``MaxSoftmax`` and
    the pytorch-ood ``detectors`` named (fitted on ``fit_loader`` where needed).

    :return: ``{"rows": [...], "scores": {(model, method): {"ID": tensor, <set>: tensor}}}``; row metrics are
        fractions (see :mod:`dismax_plugin.adapters.pytorch_ood.compare`).
    """
    from ..pytorch_ood.compare import compare

    scores: dict = {}
    isotropic = bool(dp.heads_of(model))
    if isotropic and detectors:
        raise ConfigError("--detectors applies to cross-entropy (linear head) models; isotropic: native scores.")
    rows = compare(
        model if isotropic else None,
        None if isotropic else model,
        data.benchmark,
        fit_loader=fit_loader,
        batch_size=batch_size,
        device=device,
        detectors=list(detectors) or ["MaxSoftmax"],
        num_workers=workers,
        keep_scores=scores,
    )
    return {"rows": rows, "scores": scores}


def _log_evaluation(tracker: Tracker, evaluation: dict, calibration: dict | None) -> None:
    from ..pytorch_ood.compare import METRIC_KEYS
    from .figures import reliability_diagram, roc_curves, score_histogram

    rows = evaluation["rows"]
    tracker.log_table(rows, "ood/results.json")
    metrics = {f"{r['Dataset']}.{r['Method']}.{key}": r[key] for r in rows for key in METRIC_KEYS}
    metrics.update(test_acc=rows[0]["ACC"], test_ece=rows[0]["ECE"])
    tracker.log_metrics(metrics)
    for (_, method), per_set in evaluation["scores"].items():
        # figures show in-distribution scores (larger = more in-distribution): negate pytorch-ood's sign
        id_scores = (-per_set["ID"]).numpy()
        ood = {name: (-values).numpy() for name, values in per_set.items() if name != "ID"}
        tracker.log_figure(score_histogram(id_scores, ood, title=f"{method}: ID vs OOD"), f"ood/histogram_{method}.png")
        tracker.log_figure(roc_curves(id_scores, ood, title=f"{method}: ROC"), f"ood/roc_{method}.png")
    if calibration and "val_logits" in calibration:
        logits, labels = calibration["val_logits"], calibration["val_labels"]
        scaled = logits / calibration["temperature"]
        for when, z in (("before", logits), ("after", scaled)):
            figure = reliability_diagram(z, labels, title=f"validation, {when} calibration")
            tracker.log_figure(figure, f"calibration/reliability_{when}.png")


def _example_input(data, n: int = 2):
    import numpy as np

    channels, height, width = data.preprocessing["input_size"]
    rng = np.random.default_rng(0)
    return rng.integers(
        0, 256, size=(n, height, width, channels) if channels == 3 else (n, height, width), dtype=np.uint8
    )


# --------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    _check_model_name(args.model)
    cfg = _train_config(args)
    detectors = _detector_names(args)
    if detectors and cfg.head != "linear":
        raise ConfigError("--detectors applies to --head linear (post-hoc detectors on a cross-entropy model).")
    tracker = _make_tracker(args, cfg.output)
    with _tracked(tracker, args.run_name or os.path.basename(cfg.output), {"command": "train"}):
        _train_and_report(cfg, tracker, detectors)
    return 0


def _train_and_report(cfg: TrainConfig, tracker: Tracker, detectors: list[str], quiet: bool = False):
    """Train, evaluate (native scores, or ``detectors`` for a linear head) and log; returns (result, rows)."""
    from torch.utils.data import DataLoader

    from ..pytorch_ood.compare import format_table

    result = train(cfg, tracker)
    if not _is_main_process():
        return result, []
    device = next(result.model.parameters()).device
    fit_loader = DataLoader(result.data.fit, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers)
    evaluation = evaluate_model(
        result.model,
        result.data,
        batch_size=cfg.eval_batch_size,
        device=device,
        workers=cfg.workers,
        detectors=detectors if cfg.head == "linear" else (),
        fit_loader=fit_loader,
    )
    if not quiet:
        log.info("\n%s (%s head) on %s:\n%s", cfg.model, cfg.head, cfg.data, format_table(evaluation["rows"]))
    _log_evaluation(tracker, evaluation, result.calibration)
    tracker.log_artifact(os.path.join(cfg.output, "checkpoint.pt"), "checkpoint")
    tracker.log_model(result.model_dir, model=result.model, input_example=_example_input(result.data))
    log.info("model saved to %s", result.model_dir)
    return result, evaluation["rows"]


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..pytorch_ood.compare import DETECTOR_NAMES, format_table

    _check_model_name(args.model)
    detectors = _detector_names(args) or list(DETECTOR_NAMES)
    base = _train_config(args)
    iso_cfg = dataclasses.replace(base, output=os.path.join(base.output, "isotropic"))
    ce_cfg = dataclasses.replace(base, head="linear", fpr=False, output=os.path.join(base.output, "baseline"))
    tracker = _make_tracker(args, base.output)
    with _tracked(tracker, args.run_name or os.path.basename(base.output), {"command": "compare"}):
        with tracker.child(args.head) as child:
            _, iso_rows = _train_and_report(iso_cfg, child, [], quiet=True)
        with tracker.child("linear") as child:
            _, ce_rows = _train_and_report(ce_cfg, child, detectors, quiet=True)
        if _is_main_process():
            rows = iso_rows + ce_rows
            title = f"Comparison on {base.data} ({base.model}, {base.head} head vs cross-entropy twin)"
            log.info("\n%s:\n%s", title, format_table(rows))
            tracker.log_table(rows, "comparison.json")
    return 0


def _load_for_eval(args: argparse.Namespace):
    from .. import timm as dtimm
    from .data import build_data

    path = args.checkpoint
    if os.path.isdir(os.path.join(path, "model")):
        path = os.path.join(path, "model")
    try:
        model = dtimm.load_model(path, device=args.device or "cpu")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--checkpoint: {error}") from error
    preprocessing = model.dismax_metadata["metadata"].get("preprocessing")
    if preprocessing is None:
        from ..timm.preprocessing import preprocessing_config

        preprocessing = preprocessing_config(model, args.image_size, args.channels)
    try:
        data = build_data(args.data, preprocessing, data_root=args.data_root, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data '{args.data}': {error}") from error
    return model, data, path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..pytorch_ood.compare import format_table

    detectors = _detector_names(args)
    model, data, path = _load_for_eval(args)
    tracker = _make_tracker(args, os.path.dirname(os.path.abspath(path)))
    tags = {"command": "evaluate", "checkpoint": path}
    with _tracked(tracker, args.run_name or f"evaluate-{_slug(args.data)}", tags):
        device = next(model.parameters()).device
        fit_loader = DataLoader(data.fit, batch_size=args.eval_batch_size, shuffle=False)
        evaluation = evaluate_model(
            model, data, batch_size=args.eval_batch_size, device=device, workers=args.workers,
            detectors=detectors, fit_loader=fit_loader,
        )  # fmt: skip
        log.info("\n%s on %s:\n%s", path, args.data, format_table(evaluation["rows"]))
        _log_evaluation(tracker, evaluation, None)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .. import timm as dtimm

    model, data, path = _load_for_eval(args)
    device = next(model.parameters()).device
    report = calibrate_model(
        model, data.val, args.calibration, batch_size=args.eval_batch_size, device=device, workers=args.workers
    )
    meta = dict(model.dismax_metadata["metadata"])
    meta.update(temperature=report["temperature"], thresholds=report["thresholds"], score=report["score"])
    dtimm.save_model(model.cpu(), path, metadata=meta)
    log.info(
        "calibrated %s on %s: temperature %.4g, ECE %.4f -> %.4f, thresholds (%s) %s",
        path,
        args.data,
        report["temperature"],
        report["ece_before"],
        report["ece_after"],
        report["score"],
        report["thresholds"],
    )
    return 0


COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "evaluate": _cmd_evaluate, "calibrate": _cmd_calibrate}


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed ``dismax`` subcommand; returns the exit code."""
    try:
        return COMMANDS[args.command](args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
