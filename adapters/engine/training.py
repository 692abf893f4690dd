"""The training loop behind ``dismax train``, as small steps: set up, one epoch, end of epoch, finish.

:func:`train` validates the :class:`~.config.TrainConfig`, builds the data, model, loss, optimizer and
scheduler (:mod:`._setup`), runs the epochs, then calibrates the temperature, stores the OOD thresholds and
saves the model (:func:`finish`). Resumption is exact on CPU: a checkpoint (:mod:`._checkpoint`) holds
the model, optimizer, scheduler, all RNG states and the position inside the epoch (batches come from a
permutation seeded by ``seed`` and the epoch), so a run stopped by Ctrl-C/SIGTERM (checkpoint at the
current step) or killed (the end-of-epoch checkpoint) continues where it stopped with ``resume=True``.
Under ``torchrun`` each rank trains on its shard (:mod:`._distributed`); rank 0 evaluates, checkpoints
and tracks.

The names other packages use are importable from here: ``TrainConfig``, ``TrainResult``, ``train``,
``ConfigError``, ``Interrupted``, ``calibrate_model``, ``collect_logits``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import dismax_plugin as dp

from . import _checkpoint, _distributed
from ._calibration import calibrate_model, calibration_metadata, collect_logits
from ._setup import BatchTransform, build_loss, build_model, build_optimizer, build_scheduler
from ._signals import Interrupted, StopFlag
from .config import ConfigError, TrainConfig
from .data import log_inputs
from .progress import progress
from .tracking import Tracker

__all__ = [
    "ConfigError",
    "Interrupted",
    "MODEL_DIR",
    "TrainConfig",
    "TrainResult",
    "calibrate_model",
    "collect_logits",
    "train",
]

log = logging.getLogger("dismax_plugin.train")

MODEL_DIR = "model"


@dataclass
class TrainResult:
    """What :func:`train` made: the (calibrated) model, the run directory and saved model, the history."""

    model: nn.Module
    output: str
    model_dir: str | None
    history: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    data: Any = None


@dataclass
class _Run:
    """The state one training run carries from step to step."""

    cfg: TrainConfig
    tracker: Tracker
    device: torch.device
    ddp: _distributed.Dist
    data: Any
    parts: dict[str, Any]  # model, optimizer, scheduler, scaler, generator (what a checkpoint holds)
    train_model: nn.Module
    loss: Any
    batches: BatchTransform
    checkpoint: str
    steps_per_epoch: int
    start: tuple[int, int] = (0, 0)
    history: list[dict] = field(default_factory=list)

    def save(self, epoch: int, step: int) -> None:
        if self.ddp.main:
            _checkpoint.save_checkpoint(self.checkpoint, self.cfg, (epoch, step), self.parts, self.history)


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _build_data(cfg: TrainConfig):
    from ..timm.preprocessing import preprocessing_config
    from .data import build_data

    preprocessing = preprocessing_config(cfg.model, cfg.image_size, cfg.channels)
    try:
        return build_data(cfg.data, preprocessing, data_root=cfg.data_root, augment=cfg.augment, seed=cfg.seed,
                          max_train_samples=cfg.max_train_samples)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data '{cfg.data}': {error}") from error


def setup(cfg: TrainConfig, tracker: Tracker) -> _Run:
    """Validate, join DDP, build data and parts, restore the checkpoint on ``resume``, log the params."""
    device = _distributed.resolve_device(cfg.device)
    ddp = _distributed.init_distributed(device)
    if not ddp.main:
        tracker = Tracker()
    checkpoint = _checkpoint.prepare_output(cfg)  # on every rank, so that a bad --output stops them all
    state = _checkpoint.load_checkpoint(checkpoint, cfg) if cfg.resume else None
    data = _build_data(cfg)
    _checkpoint.seed_everything(cfg.seed)
    model = build_model(cfg, data.num_classes, device)
    optimizer = build_optimizer(cfg, model)
    steps = len(_distributed.EpochBatchSampler(len(data.train), cfg.batch_size, cfg.seed, 0, ddp))
    batches = BatchTransform(cfg, data.num_classes)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    parts = {"model": model, "optimizer": optimizer, "scheduler": build_scheduler(cfg, optimizer, steps),
             "scaler": scaler, "generator": batches.generator}  # fmt: skip
    run = _Run(cfg, tracker, device, ddp, data, parts, _distributed.wrap_model(model, ddp, device),
               build_loss(cfg), batches, checkpoint, steps)  # fmt: skip
    if state is not None:
        _checkpoint.restore(state, parts)
        run.start, run.history = (state["epoch"], state["step"]), list(state["history"])
        log.info("resuming %s at epoch %d, step %d", checkpoint, run.start[0] + 1, run.start[1])
    elif ddp.main:
        tracker.log_params(cfg.params() | {"world_size": ddp.world, "num_classes": data.num_classes})
    if ddp.main:
        log_inputs(tracker, data)  # the evaluation's metrics are named after these sets
    return run


def run_epoch(run: _Run, epoch: int, start_step: int, stop: StopFlag) -> dict[str, float]:
    """One epoch from batch ``start_step``; returns the summed loss/accuracy counts (this rank's)."""
    cfg, device = run.cfg, run.device
    model, optimizer, scheduler, scaler = (run.parts[k] for k in ("model", "optimizer", "scheduler", "scaler"))
    model.train()
    sampler = _distributed.EpochBatchSampler(len(run.data.train), cfg.batch_size, cfg.seed, epoch, run.ddp,
                                             start_step)  # fmt: skip
    loader = DataLoader(run.data.train, batch_sampler=sampler, num_workers=cfg.workers)
    sums = dict.fromkeys(("loss", "correct", "seen", "judged"), 0.0)
    bar = progress(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for step, (x, y) in enumerate(bar, start=start_step):
        if stop.requested(run.ddp, device):
            run.save(epoch, step)
            raise Interrupted(run.checkpoint, stop.signum)
        inputs, targets, stitched = run.batches(x.to(device), torch.as_tensor(y).to(device))
        with _autocast(device, cfg.amp):
            logits = run.train_model(inputs)
            loss = run.loss(logits, targets, stitched)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step_update(epoch * run.steps_per_epoch + step + 1)
        hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
        scored = ~stitched if stitched is not None else torch.ones_like(hard, dtype=torch.bool)  # stitched: no class
        sums["loss"] += loss.item() * x.shape[0]
        sums["correct"] += float(((logits.argmax(dim=1) == hard) & scored).sum())
        sums["judged"] += float(scored.sum())
        sums["seen"] += x.shape[0]
        accuracy = sums["correct"] / max(sums["judged"], 1)
        bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}", acc=f"{accuracy:.3f}")
    return sums


def end_epoch(run: _Run, epoch: int, sums: dict[str, float], seconds: float) -> None:
    """Step the scheduler; on rank 0 validate, record, checkpoint and log the epoch."""
    if run.parts["scheduler"] is not None:
        run.parts["scheduler"].step(epoch + 1)
    loss_sum, correct, seen, judged = _distributed.all_reduce_sum(
        [sums["loss"], sums["correct"], sums["seen"], sums["judged"]], run.ddp, run.device
    )
    if run.ddp.main:
        cfg, model = run.cfg, run.parts["model"]
        metrics = {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(judged, 1)}
        val_logits, val_labels = collect_logits(model, run.data.val, cfg.eval_batch_size, run.device, cfg.workers)
        metrics["val_acc"] = float((val_logits.argmax(1) == val_labels).double().mean())
        metrics["val_ece"] = dp.expected_calibration_error(val_logits, val_labels)
        for _, head in dp.heads_of(model):
            if hasattr(head, "distance_scale"):
                metrics["distance_scale"] = float(head.distance_scale.detach().abs())
        metrics["lr"] = run.parts["optimizer"].param_groups[0]["lr"]
        metrics["epoch_s"] = seconds
        run.history.append({"epoch": epoch + 1, **metrics})
        run.save(epoch + 1, 0)
        run.tracker.log_metrics(metrics, step=epoch + 1)
        log.info("epoch %d/%d  loss %.4f  train acc %.4f  val acc %.4f  val ECE %.4f  (%.1fs)", epoch + 1,
                 cfg.epochs, metrics["train_loss"], metrics["train_acc"], metrics["val_acc"], metrics["val_ece"],
                 seconds)  # fmt: skip
    _distributed.barrier(run.ddp)


def finish(run: _Run) -> tuple[dict, str]:
    """Calibrate on the calibration split (temperature, calibration scores), save the model (timm format)."""
    from .. import timm as dtimm

    cfg, model = run.cfg, run.parts["model"]
    report = calibrate_model(model, run.data.val, cfg.calibration, batch_size=cfg.eval_batch_size,
                             device=run.device, workers=cfg.workers)  # fmt: skip
    log.info("calibration: temperature %.4g, ECE %.4f -> %.4f, thresholds (%s) %s", report["temperature"],
             report["ece_before"], report["ece_after"], report["score"], report["thresholds"])  # fmt: skip
    run.tracker.log_metrics({"temperature": report["temperature"], "ece_before_calibration": report["ece_before"],
                             "ece_after_calibration": report["ece_after"]})  # fmt: skip
    model_dir = os.path.join(cfg.output, MODEL_DIR)
    metadata = {
        "preprocessing": run.data.preprocessing,
        "class_names": run.data.class_names,
        "calibration": calibration_metadata(report),
        "train_config": dataclasses.asdict(cfg),
        "split": run.data.split,  # the split record: evaluate/calibrate rebuild and check the data with it
    }
    dtimm.save_model(model.cpu(), model_dir, metadata=metadata)
    model.to(run.device)
    return report, model_dir


def train(cfg: TrainConfig, tracker: Tracker | None = None) -> TrainResult:
    """Train, calibrate, store thresholds and save the model; see the module docstring.

    :param cfg: the run (``cfg.output`` defaults to ``runs/train-<model>-<head>-<data>``).
    :param tracker: receives params, per-epoch metrics and calibration (rank 0 only); default: none.
    :raises ConfigError: for bad input found before training starts.
    :raises Interrupted: after SIGINT/SIGTERM, once the checkpoint is written.
    """
    run = setup(cfg.validate(), tracker or Tracker())
    start_epoch, start_step = run.start
    with StopFlag() as stop:
        for epoch in range(start_epoch, run.cfg.epochs):
            begin = time.perf_counter()
            sums = run_epoch(run, epoch, start_step if epoch == start_epoch else 0, stop)
            end_epoch(run, epoch, sums, time.perf_counter() - begin)
    result = TrainResult(model=run.parts["model"], output=run.cfg.output, model_dir=None, history=run.history,
                         data=run.data)  # fmt: skip
    if run.ddp.main:
        result.calibration, result.model_dir = finish(run)
    _distributed.barrier(run.ddp)
    return result
