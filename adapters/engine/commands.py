"""The ``dismax`` subcommands (train, compare, evaluate, calibrate, import): each composes config, data, training,
evaluation and tracking, in that order, and returns the exit code.

The training loop (and with it the data sets, pytorch-ood and torchvision) is imported only once the options
and the tracking URI are checked, so bad input exits with code 2 before that import."""

from __future__ import annotations

import argparse
import logging
import os

from . import _report as report
from ._calibration import calibrate_model, calibration_metadata
from ._checkpoint import CHECKPOINT
from ._distributed import is_main_process, resolve_device
from .config import CompareOptions, ConfigError, TrainConfig, parse_list, train_config
from .tracking import Tracker, make_tracker, tracked

__all__ = ["COMMANDS", "evaluate_model", "run_command"]

log = logging.getLogger("dismax_plugin.adapters.engine.cli")

evaluate_model = report.evaluate_model


# --------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    cfg = train_config(args)
    detectors = report.detector_names(args.detectors)
    tracker = make_tracker(args, cfg.output)
    with tracked(tracker, args.run_name or os.path.basename(cfg.output), {"command": "train"}):
        _train_and_report(cfg, tracker, detectors)
    return 0


def _train_and_report(cfg: TrainConfig, tracker: Tracker, detectors: list[str], quiet: bool = False):
    """Train, evaluate (native scores, or ``detectors`` for a linear head) and log; returns (result, rows)."""
    from .training import train

    result = train(cfg, tracker)
    if not is_main_process():
        return result, []
    device = next(result.model.parameters()).device
    evaluation = report.evaluate_model(result.model, result.data, name=cfg.head, batch_size=cfg.eval_batch_size,
                                       device=device, workers=cfg.workers, detectors=detectors)  # fmt: skip
    if not quiet:
        title = f"{cfg.model} ({cfg.head} head) on {cfg.data}"
        log.info("\n%s:\n%s", title, report.format_rows(evaluation["rows"], evaluation["notes"]))
    report.log_evaluation(tracker, evaluation, result.calibration)
    tracker.log_artifact(os.path.join(result.output, CHECKPOINT), "checkpoint")
    tracker.log_model(result.model_dir, model=result.model, input_example=report.example_input(result.data))
    log.info("model saved to %s", result.model_dir)
    return result, evaluation["rows"]


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    CompareOptions(args.heads, args.twins, args.seeds, args.detectors).check()
    cfg = train_config(args, head=parse_list("heads", args.heads)[0])
    tracker = make_tracker(args, cfg.output)
    with tracked(tracker, args.run_name or os.path.basename(cfg.output), {"command": "compare"}):
        return run_compare(argparse.Namespace(**(vars(args) | {"output": cfg.output})), tracker)


def _saved_model(args: argparse.Namespace):
    """``report.load_for_eval`` of the run's current model (a stale or missing one is refused, see
    :func:`._checkpoint.current_model_dir`) on ``--device`` as every command resolves it, with the input size
    and channels the model was saved with: ``--image-size``/``--channels`` only for a model saved without
    them, else a :class:`ConfigError`."""
    from .. import timm as dtimm
    from ._checkpoint import current_model_dir

    path = current_model_dir(args.checkpoint)
    try:
        stored = (dtimm.read_metadata(path).get("metadata") or {}).get("preprocessing")
    except (FileNotFoundError, ValueError, OSError) as error:
        raise ConfigError(f"--checkpoint: {error}") from error
    shape = {"image_size": TrainConfig.image_size, "channels": TrainConfig.channels}
    if stored:
        channels, size = stored["input_size"][0], stored["input_size"][1]
        for name, saved in (("image_size", size), ("channels", channels)):
            given = getattr(args, name, None)
            if given is not None and given != saved:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {given}: the model in '{path}' was saved for {flag} {saved}; drop {flag}.")
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k, None) is not None})
    device = str(resolve_device(args.device))  # the one device rule of every command (cuda when available)
    return report.load_for_eval(argparse.Namespace(**(vars(args) | shape | {"checkpoint": path, "device": device})))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    detectors = report.detector_names(args.detectors)
    model, data, path = _saved_model(args)
    tracker = make_tracker(args, os.path.dirname(os.path.abspath(path)))
    tags = {"command": "evaluate", "checkpoint": path}
    with tracked(tracker, args.run_name or f"evaluate-{os.path.basename(os.path.normpath(args.data))}", tags):
        from .data import log_inputs

        log_inputs(tracker, data)
        device = next(model.parameters()).device
        evaluation = report.evaluate_model(model, data, batch_size=args.eval_batch_size, device=device,
                                           workers=args.workers, detectors=detectors)  # fmt: skip
        log.info("\n%s on %s:\n%s", path, args.data, report.format_rows(evaluation["rows"], evaluation["notes"]))
        report.log_evaluation(tracker, evaluation, None)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .. import timm as dtimm

    model, data, path = _saved_model(args)
    device = next(model.parameters()).device
    loader = {"batch_size": args.eval_batch_size, "device": device, "workers": args.workers}
    result = calibrate_model(model, data.val, args.calibration, **loader)
    quality = report.set_score(model, data, result, getattr(args, "score", "default"), **loader)
    if quality is not None:
        log.info("--score auto: mean of near/far AUROC on the OOD validation split (%s): %s -> %s",
                 ", ".join(data.benchmark.ood_val_names), {k: round(v, 4) for k, v in quality.items()},
                 result["score"])  # fmt: skip
    meta = dict(dtimm.read_metadata(path).get("metadata") or {})
    meta["calibration"] = calibration_metadata(result)
    dtimm.save_model(model.cpu(), path, metadata=meta)
    log.info("calibrated %s on the calibration split of %s (%s, %d images): temperature %.4g, ECE %.4f -> %.4f, "
             "thresholds (%s) %s", path, args.data, data.split.get("sources", {}).get("val", "val"), result["size"],
             result["temperature"], result["ece_before"], result["ece_after"], result["score"],
             result["thresholds"])  # fmt: skip
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from .importing import import_checkpoint

    import_checkpoint(args)
    return 0


COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "evaluate": _cmd_evaluate, "calibrate": _cmd_calibrate,
            "import": _cmd_import}  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed ``dismax`` subcommand; returns the exit code."""
    try:
        return COMMANDS[args.command](args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
