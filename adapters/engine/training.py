"""The training loop behind ``dismax train``, as small steps: set up, one epoch, end of epoch, finish.

:func:`train` validates the :class:`~.config.TrainConfig`, builds the data, model, loss, optimizer and
scheduler (:mod:`._setup`), runs the epochs, then calibrates the temperature, stores the OOD thresholds and
saves the model (:func:`finish`). Resumption is exact on CPU: a checkpoint (:mod:`._checkpoint`) holds
the model, optimizer, scheduler, all RNG states and the position inside the epoch (batches come from a
permutation seeded by ``seed`` and the epoch, FPR stitches from a stream of ``(seed, rank, epoch, step)``),
so a run stopped by Ctrl-C/SIGTERM (checkpoint at a step boundary, :mod:`._signals`) or killed (the
end-of-epoch checkpoint) continues where it stopped with ``resume=True``; a resumed run must match the
checkpoint's configuration (:data:`~.config.RESUME_MAY_CHANGE` lists what may differ) and number of
processes, and a longer ``epochs`` re-plans the lr schedule. Under ``torchrun`` each rank trains on its
shard (:mod:`._distributed`); rank 0 evaluates, checkpoints and tracks.

An epoch makes no device-to-host read per step: the running loss and accuracy are summed on the device and
read at the epoch's end (and every :data:`LOG_EVERY` steps for a progress bar on a terminal); under DDP
the ranks agree on a pending stop every :data:`~._signals.STOP_CHECK_EVERY` steps.

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
from ._checkpoint import MODEL_DIR
from ._setup import BatchTransform, build_loss, build_model, build_optimizer, build_scheduler
from ._signals import STOP_CHECK_EVERY, Interrupted, SignalPolicy, deferred, polling
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
    parts: dict[str, Any]  # model, optimizer, scheduler, scaler (what a checkpoint holds)
    train_model: nn.Module
    loss: Any
    batches: BatchTransform
    checkpoint: str
    steps_per_epoch: int
    start: tuple[int, int] = (0, 0)
    history: list[dict] = field(default_factory=list)

    def save(self, epoch: int, step: int) -> None:
        if self.ddp.main:
            with deferred():  # a signal waits until the checkpoint is on disk
                _checkpoint.save_checkpoint(self.checkpoint, self.cfg, (epoch, step), self.parts, self.history,
                                            world_size=self.ddp.world,
                                            tracking_run_id=getattr(self.tracker, "run_id", None))  # fmt: skip


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


def _steps_per_epoch(cfg: TrainConfig, n: int, ddp: _distributed.Dist) -> int:
    sampler = _distributed.EpochBatchSampler(n, cfg.batch_size, cfg.seed, 0, ddp)
    if sampler.per_rank < 2:
        raise ConfigError(
            f"--max-train-samples/--data: {n} training image(s) give each of {ddp.world} process(es) "
            f"{sampler.per_rank} per epoch; at least 2 are needed."
        )
    return len(sampler)


def setup(cfg: TrainConfig, tracker: Tracker) -> _Run:
    """Validate, join DDP, build data and parts, restore the checkpoint on ``resume``, log the params."""
    device = _distributed.resolve_device(cfg.device)
    ddp = _distributed.init_distributed(device)
    if not ddp.main:
        tracker = Tracker()
    checkpoint = _checkpoint.prepare_output(cfg, ddp.main)  # on every rank, so that a bad --output stops them all
    state = _checkpoint.load_checkpoint(checkpoint, cfg, ddp.world) if cfg.resume else None
    data = _build_data(cfg)
    steps = _steps_per_epoch(cfg, len(data.train), ddp)
    _checkpoint.seed_everything(cfg.seed)
    model = build_model(cfg, data.num_classes, device)
    optimizer = build_optimizer(cfg, model)
    batches = BatchTransform(cfg, data.num_classes, ddp.rank)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    parts = {"model": model, "optimizer": optimizer, "scheduler": build_scheduler(cfg, optimizer, steps),
             "scaler": scaler}  # fmt: skip
    run = _Run(cfg, tracker, device, ddp, data, parts, _distributed.wrap_model(model, ddp, device),
               build_loss(cfg), batches, checkpoint, steps)  # fmt: skip
    params = cfg.params() | {"world_size": ddp.world, "num_classes": data.num_classes}
    if state is not None:
        _checkpoint.restore(state, parts, cfg.epochs)
        run.start, run.history = (state["epoch"], state["step"]), list(state["history"])
        log.info("resuming %s at epoch %d, step %d", checkpoint, run.start[0] + 1, run.start[1])
        params["resumed_from"] = f"{checkpoint} (epoch {state['epoch']}, step {state['step']})"
        if state["tracking_run_id"]:
            params["resumed_from_run_id"] = state["tracking_run_id"]
    if ddp.main:
        tracker.log_params(params)
        log_inputs(tracker, data)  # the evaluation's metrics are named after these sets
    return run


#: without DDP the loop reads its running loss/accuracy for the progress bar every this many steps (and
#: only when the bar is shown); the sums stay on the device otherwise and are read once, at the epoch's end
LOG_EVERY = STOP_CHECK_EVERY


def run_epoch(run: _Run, epoch: int, start_step: int, stop: SignalPolicy) -> torch.Tensor:
    """One epoch from batch ``start_step``; returns this rank's float64 sums ``[loss * B, correct, judged, seen]``
    (on the device: nothing is read back to the host per step; ``judged`` counts the rows with a class).

    A pending signal is checked at every step boundary (under DDP: every :data:`STOP_CHECK_EVERY` steps, the
    ranks agree on it); the checkpoint is written at that step and :class:`Interrupted` raised.
    """
    cfg, device = run.cfg, run.device
    model, optimizer, scheduler, scaler = (run.parts[k] for k in ("model", "optimizer", "scheduler", "scaler"))
    model.train()
    sampler = _distributed.EpochBatchSampler(len(run.data.train), cfg.batch_size, cfg.seed, epoch, run.ddp,
                                             start_step)  # fmt: skip
    loader = DataLoader(run.data.train, batch_sampler=sampler, num_workers=cfg.workers)
    sums, seen = torch.zeros(3, dtype=torch.float64, device=device), 0
    bar = progress(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}")
    check_every = STOP_CHECK_EVERY if run.ddp.enabled else 1
    for step, (x, y) in enumerate(bar, start=start_step):
        if step % check_every == 0 and stop.requested(run.ddp, device):
            run.save(epoch, step)
            raise stop.interrupt(run.checkpoint if run.ddp.main else None)
        inputs, targets, stitched = run.batches(x.to(device), torch.as_tensor(y).to(device), epoch, step)
        with _autocast(device, cfg.amp):
            logits = run.train_model(inputs)
            loss = run.loss(logits, targets, stitched)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step_update(epoch * run.steps_per_epoch + step + 1)
        _accumulate(sums, loss.detach(), logits.detach(), targets, stitched)
        seen += x.shape[0]
        if not bar.disable and (step + 1) % LOG_EVERY == 0:
            loss_sum, correct, judged = sums.tolist()
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", acc=f"{correct / max(judged, 1):.3f}")
    return torch.cat([sums, sums.new_tensor([seen])])


def _accumulate(sums: torch.Tensor, loss, logits, targets, stitched) -> None:
    """Add a batch's ``[loss * B, correct, judged]`` to ``sums`` in place, on the device (no host sync; stitched
    rows have no class)."""
    batch = targets.shape[0]
    hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
    hit = logits.argmax(dim=1) == hard
    sums[0].add_(loss.double(), alpha=batch)
    if stitched is not None:
        sums[1].add_((hit & ~stitched).sum())
        sums[2].add_((~stitched).sum())
    else:
        sums[1].add_(hit.sum())
        sums[2].add_(batch)


def end_epoch(run: _Run, epoch: int, sums: torch.Tensor, seconds: float) -> None:
    """Step the scheduler; on rank 0 validate, record, checkpoint and log the epoch."""
    lr = run.parts["optimizer"].param_groups[0]["lr"]  # the lr this epoch trained with
    if run.parts["scheduler"] is not None:
        run.parts["scheduler"].step(epoch + 1)
    loss_sum, correct, judged, seen = _distributed.all_reduce_sum(sums, run.ddp)
    if run.ddp.main:
        cfg, model = run.cfg, run.parts["model"]
        metrics = {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(judged, 1)}
        val_logits, val_labels = collect_logits(model, run.data.val, cfg.eval_batch_size, run.device, cfg.workers)
        metrics["val_acc"] = float((val_logits.argmax(1) == val_labels).double().mean())
        metrics["val_ece"] = dp.expected_calibration_error(val_logits, val_labels)
        for _, head in dp.heads_of(model):
            if hasattr(head, "distance_scale"):
                metrics["distance_scale"] = float(head.distance_scale.detach().abs())
        metrics["lr"] = lr
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
        # the checkpoint this model is the end of: `evaluate` refuses a run folder whose checkpoint moved on
        "checkpoint": {"epoch": cfg.epochs, "step": 0},
    }
    with deferred():  # config.json and the weights are written as a pair
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
    with polling() as stop:
        for epoch in range(start_epoch, run.cfg.epochs):
            begin = time.perf_counter()
            sums = run_epoch(run, epoch, start_step if epoch == start_epoch else 0, stop)
            end_epoch(run, epoch, sums, time.perf_counter() - begin)
            if stop.requested(run.ddp, run.device):  # e.g. during the validation: the epoch's checkpoint is saved
                raise stop.interrupt(run.checkpoint if run.ddp.main else None)
    result = TrainResult(model=run.parts["model"], output=run.cfg.output, model_dir=None, history=run.history,
                         data=run.data)  # fmt: skip
    if run.ddp.main:
        result.calibration, result.model_dir = finish(run)
    _distributed.barrier(run.ddp)
    return result
