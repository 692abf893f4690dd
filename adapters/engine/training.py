"""The training engine behind ``dismax train`` / ``compare``: timm model, timm optimizer and scheduler,
isotropic loss (+ FPR), per-epoch checkpoints with exact resume, DDP under ``torchrun``, then
temperature calibration, OOD thresholds, the saved model and its evaluation.

Resumption is exact on CPU: a checkpoint holds the model, optimizer, scheduler, all RNG states and the
position inside the epoch (batches are drawn from a permutation seeded by ``seed`` and the epoch), so a
run stopped by Ctrl-C/SIGTERM (checkpoint written at the current step) or killed (the end-of-epoch
checkpoint) continues where it stopped with ``--resume``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import dismax_plugin as dp

from .progress import progress
from .tracking import Tracker

__all__ = [
    "ConfigError",
    "HEAD_CHOICES",
    "Interrupted",
    "TrainConfig",
    "TrainResult",
    "calibrate_model",
    "collect_logits",
    "train",
]

log = logging.getLogger("dismax_plugin.train")

HEAD_CHOICES = ("dismax", "isomaxplus", "isomax", "linear")
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "plateau", "constant", "none")
CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
CHECKPOINT_VERSION = 1


class ConfigError(ValueError):
    """Bad user input (the CLI turns it into one line and exit code 2)."""


class Interrupted(RuntimeError):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, checkpoint: str, signum: int):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {checkpoint} (continue with --resume)")
        self.checkpoint, self.signum = checkpoint, signum


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is per process (the global batch is ``batch_size * world_size``)."""

    model: str = "resnet10t"
    head: str = "dismax"
    data: str = "digits"
    data_root: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    image_size: int = 32
    channels: int = 3
    seed: int = 0
    output: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    pretrained_file: str | None = None
    amp: bool = False
    fpr: bool = True
    entropic_scale: float = 10.0
    alpha: float = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    augment: bool = False
    max_train_samples: int | None = None
    workers: int = 0
    device: str | None = None
    eval_batch_size: int = 256
    calibration: str = "ece"

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the option for anything invalid."""
        if self.head not in HEAD_CHOICES:
            raise ConfigError(f"--head: unknown head '{self.head}', expected one of {list(HEAD_CHOICES)}.")
        for name in ("epochs", "batch_size", "image_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}.")
        if self.channels not in (1, 3):
            raise ConfigError(f"--channels must be 1 or 3; got {self.channels!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a finite number > 0; got {self.lr!r}.")
        if not self.entropic_scale > 0:
            raise ConfigError(f"--entropic-scale must be > 0; got {self.entropic_scale!r}.")
        if self.weight_decay < 0 or self.alpha < 0 or self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("--weight-decay, --alpha, --mixup and --cutmix must be >= 0.")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"--smoothing must be in [0, 1); got {self.smoothing!r}.")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler: unknown scheduler '{self.scheduler}', expected one of {list(SCHEDULERS)}.")
        from timm.optim import list_optimizers

        if self.optimizer.lower() not in list_optimizers():
            raise ConfigError(
                f"--optimizer: unknown optimizer '{self.optimizer}', expected a timm optimizer such as "
                "sgd, momentum, adamw, lamb, lion (see timm.optim.list_optimizers())."
            )
        if self.calibration not in ("ece", "nll"):
            raise ConfigError(f"--calibration must be 'ece' or 'nll'; got {self.calibration!r}.")
        if self.pretrained_file and not os.path.isfile(self.pretrained_file):
            raise ConfigError(f"--pretrained-file: no such file '{self.pretrained_file}'.")
        if self.data_root and not os.path.isdir(self.data_root):
            raise ConfigError(f"--data-root: no such directory '{self.data_root}'.")
        if self.uses_fpr and (self.mixup or self.cutmix):
            raise ConfigError("--mixup/--cutmix cannot be combined with DisMax's FPR; add --no-fpr to use them.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"--max-train-samples must be >= 1; got {self.max_train_samples!r}.")
        return self

    @property
    def uses_fpr(self) -> bool:
        return self.head == "dismax" and self.fpr

    @property
    def loss_name(self) -> str:
        return {"linear": "cross_entropy", "dismax": "dismax"}.get(self.head, "isomax")

    def params(self) -> dict[str, Any]:
        """The run's parameters as logged (plus the library versions)."""
        import timm

        params = dataclasses.asdict(self)
        params.update(
            loss=self.loss_name,
            fpr=self.uses_fpr,
            dismax_plugin=dp.__version__,
            torch=torch.__version__,
            timm=timm.__version__,
        )
        try:
            import pytorch_ood

            params["pytorch_ood"] = getattr(pytorch_ood, "__version__", "unknown")
        except ImportError:  # pragma: no cover - a dependency
            pass
        return params


@dataclass
class TrainResult:
    model: nn.Module
    output: str
    model_dir: str | None
    history: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    data: Any = None


# --------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def _resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a permutation seeded by ``(seed, epoch)``, sharded by rank, starting at batch ``start``.

    Rank ``r`` of ``world`` takes positions ``r, r + world, ...`` of the permutation (truncated to a
    multiple of ``world``), so the union of the ranks' ``i``-th batches is the ``i``-th batch of one
    process using ``batch_size * world``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start = rank, world, start

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = order[: len(order) - len(order) % self.world]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for b in range(self.start, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        per_rank = (self.n - self.n % self.world) // self.world
        return math.ceil(per_rank / self.batch_size)


# --------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(fpr_generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "fpr": fpr_generator.get_state(),
    }


def _set_rng_state(state: dict, fpr_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    fpr_generator.set_state(state["fpr"])


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_output(cfg: TrainConfig) -> None:
    try:
        os.makedirs(cfg.output, exist_ok=True)
        probe = os.path.join(cfg.output, f".write-test-{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output: cannot write to '{cfg.output}' ({error.strerror or error}).") from error
    ckpt = os.path.join(cfg.output, CHECKPOINT)
    if cfg.resume and not os.path.isfile(ckpt):
        raise ConfigError(f"--resume: no checkpoint at '{ckpt}'.")
    if not cfg.resume and not cfg.overwrite and os.path.isfile(ckpt):
        raise ConfigError(
            f"--output '{cfg.output}' already holds a checkpoint; pass --resume to continue it, "
            "--overwrite to start again, or choose another --output."
        )


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from .. import timm as dtimm

    kwargs: dict[str, Any] = {"in_chans": cfg.channels}
    if cfg.pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(cfg.pretrained_file)})
    try:  # ViT-like models need the image size at construction; the others reject the keyword.
        return dtimm.create_model(cfg.model, head=cfg.head, num_classes=num_classes, img_size=cfg.image_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return dtimm.create_model(cfg.model, head=cfg.head, num_classes=num_classes, **kwargs)


def _build_loss(cfg: TrainConfig) -> nn.Module:
    if cfg.head == "linear":
        return _CrossEntropy(cfg.smoothing)
    if cfg.head == "dismax":
        return dp.DisMaxLoss(cfg.entropic_scale, cfg.alpha)
    return dp.IsoMaxLoss(cfg.entropic_scale)


class _CrossEntropy(nn.Module):
    """Cross-entropy for class indices or soft targets (timm's Mixup), with optional label smoothing."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:
            return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def collect_logits(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | str = "cpu", workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits :math:`N \\times C` and labels :math:`N` of ``dataset`` in eval mode (model mode restored)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        for x, y in progress(loader, desc="evaluate"):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels).long()


def calibrate_model(
    model: nn.Module,
    dataset: Dataset,
    objective: str = "ece",
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
) -> dict:
    """Temperature + thresholds for ``model``'s isotropic heads from held-out ``dataset``, set in place.

    The heads are reset to temperature 1 first, so calibrating again does not compound. Returns the
    report: temperature, ECE/NLL before and after, thresholds, score, and the validation logits/labels.
    """
    for _, head in dp.heads_of(model):
        head.set_temperature(1.0)
    logits, labels = collect_logits(model, dataset, batch_size, device, workers)
    temperature = dp.calibrate_temperature(logits, labels, objective=objective)
    scaled = logits / temperature
    report = {
        "temperature": temperature,
        "ece_before": dp.expected_calibration_error(logits, labels),
        "ece_after": dp.expected_calibration_error(scaled, labels),
        "nll_before": float(F.cross_entropy(logits.double(), labels)),
        "nll_after": float(F.cross_entropy(scaled.double(), labels)),
    }
    heads = dp.heads_of(model)
    score_name = heads[0][1].default_score if heads else "mps"
    thresholds = dp.compute_thresholds(dp.score(scaled, score_name))
    for _, head in heads:
        head.set_temperature(float(head.temperature) * temperature)
        head.set_thresholds(thresholds, score_name)
    report.update(
        score=score_name, thresholds={str(k): v for k, v in thresholds.items()}, val_logits=logits, val_labels=labels
    )
    return report


# --------------------------------------------------------------------------- training
class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (handlers restored afterwards)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if _in_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signum:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def requested(self, ddp: _Dist, device: torch.device) -> bool:
        if not ddp.enabled:
            return bool(self.signum)
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.signum:
            self.signum = int(flag.item())
        return bool(flag.item())


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, tracker: Tracker | None = None) -> TrainResult:
    """Train, calibrate, store thresholds and save the model; see the module docstring.

    :raises ConfigError: for bad input found before training starts.
    :raises Interrupted: after SIGINT/SIGTERM, once the checkpoint is written.
    """
    cfg.validate()
    tracker = tracker or Tracker()
    device = _resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    ddp = _init_distributed(device)
    if not ddp.main:
        tracker = Tracker()
    _check_output(cfg)  # on every rank, so that a bad --output stops them all

    from ..timm.preprocessing import preprocessing_config
    from .data import build_data

    preprocessing = preprocessing_config(cfg.model, cfg.image_size, cfg.channels)
    try:
        data = build_data(
            cfg.data,
            preprocessing,
            data_root=cfg.data_root,
            augment=cfg.augment,
            seed=cfg.seed,
            max_train_samples=cfg.max_train_samples,
        )
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data '{cfg.data}': {error}") from error

    _seed_everything(cfg.seed)
    try:
        model = _build_model(cfg, data.num_classes).to(device)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        raise ConfigError(f"--model '{cfg.model}': {error}") from error
    loss_fn = _build_loss(cfg)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(
        model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    steps_per_epoch = len(EpochBatchSampler(len(data.train), cfg.batch_size, cfg.seed, 0, ddp.rank, ddp.world))
    scheduler = None
    if cfg.scheduler != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.scheduler,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            updates_per_epoch=steps_per_epoch,
        )
    from timm.data.mixup import one_hot as mixup_one_hot

    mixup = None
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=data.num_classes
        )
    fpr_generator = torch.Generator().manual_seed(cfg.seed + 1)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")

    ckpt_path = os.path.join(cfg.output, CHECKPOINT)
    start_epoch, start_step, history = 0, 0, []
    if cfg.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for key in ("model", "head", "data", "seed"):
            saved = state["config"].get(key)
            if saved != getattr(cfg, key):
                raise ConfigError(
                    f"--resume: the checkpoint in '{cfg.output}' was trained with --{key} {saved!r}, "
                    f"not {getattr(cfg, key)!r}."
                )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], fpr_generator)
        start_epoch, start_step, history = state["epoch"], state["step"], state["history"]
        log.info("resuming %s at epoch %d, step %d", ckpt_path, start_epoch + 1, start_step)

    train_model = model
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if ddp.main and start_epoch == 0 and start_step == 0:
        tracker.log_params(cfg.params() | {"world_size": ddp.world, "num_classes": data.num_classes})

    def save_checkpoint(epoch: int, step: int) -> None:
        if not ddp.main:
            return
        _atomic_save(
            {
                "version": CHECKPOINT_VERSION,
                "config": dataclasses.asdict(cfg),
                "epoch": epoch,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": _rng_state(fpr_generator),
                "history": history,
            },
            ckpt_path,
        )

    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            sampler = EpochBatchSampler(
                len(data.train), cfg.batch_size, cfg.seed, epoch, ddp.rank, ddp.world, start_step
            )
            loader = DataLoader(data.train, batch_sampler=sampler, num_workers=cfg.workers)
            loss_sum = correct = seen = judged = 0.0
            begin = time.perf_counter()
            bar = progress(loader, total=len(sampler), desc=f"epoch {epoch + 1}/{cfg.epochs}")
            for step, (x, y) in enumerate(bar, start=start_step):
                if stop.requested(ddp, device):
                    save_checkpoint(epoch, step)
                    raise Interrupted(ckpt_path, stop.signum)
                x, y = x.to(device), torch.as_tensor(y).to(device)
                inputs, targets = x, y
                if cfg.uses_fpr:
                    inputs, targets = dp.fpr_mix(x, y, data.num_classes, generator=fpr_generator)
                elif mixup is not None and x.shape[0] % 2 == 0:
                    inputs, targets = mixup(x, y)
                elif cfg.smoothing and cfg.head != "linear":
                    off = cfg.smoothing / data.num_classes
                    targets = mixup_one_hot(y, data.num_classes, on_value=1.0 - cfg.smoothing + off, off_value=off)
                with _autocast(device, cfg.amp):
                    logits = train_model(inputs)
                    loss = loss_fn(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step_update(epoch * steps_per_epoch + step + 1)
                hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
                # accuracy on the rows that have a class: FPR's stitched images have none
                scored = targets.amax(dim=1) > 1 - 1e-6 if cfg.uses_fpr else torch.ones_like(hard, dtype=torch.bool)
                loss_sum += loss.item() * x.shape[0]
                correct += float(((logits.argmax(dim=1) == hard) & scored).sum())
                judged += float(scored.sum())
                seen += x.shape[0]
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / max(judged, 1):.3f}")
            start_step = 0
            if scheduler is not None:
                scheduler.step(epoch + 1)
            if ddp.enabled:
                totals = torch.tensor([loss_sum, correct, seen, judged], device=device, dtype=torch.float64)
                dist.all_reduce(totals)
                loss_sum, correct, seen, judged = totals.tolist()
            metrics = {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(judged, 1)}
            if ddp.main:
                val_logits, val_labels = collect_logits(model, data.val, cfg.eval_batch_size, device, cfg.workers)
                metrics["val_acc"] = float((val_logits.argmax(1) == val_labels).double().mean())
                metrics["val_ece"] = dp.expected_calibration_error(val_logits, val_labels)
                for _, head in dp.heads_of(model):
                    if hasattr(head, "distance_scale"):
                        metrics["distance_scale"] = float(head.distance_scale.detach().abs())
                metrics["lr"] = optimizer.param_groups[0]["lr"]
                metrics["epoch_s"] = time.perf_counter() - begin
                history.append({"epoch": epoch + 1, **metrics})
                save_checkpoint(epoch + 1, 0)
                tracker.log_metrics(metrics, step=epoch + 1)
                log.info(
                    "epoch %d/%d  loss %.4f  train acc %.4f  val acc %.4f  val ECE %.4f  (%.1fs)",
                    epoch + 1,
                    cfg.epochs,
                    metrics["train_loss"],
                    metrics["train_acc"],
                    metrics["val_acc"],
                    metrics["val_ece"],
                    metrics["epoch_s"],
                )
            if ddp.enabled:
                dist.barrier()

    result = TrainResult(model=model, output=cfg.output, model_dir=None, history=history, data=data)
    if ddp.main:
        result.calibration, result.model_dir = _finish(cfg, model, data, device, tracker)
    if ddp.enabled:
        dist.barrier()
    return result


def _finish(cfg: TrainConfig, model: nn.Module, data, device, tracker: Tracker) -> tuple[dict, str]:
    """Calibrate on the validation split, store thresholds, save the model (timm adapter format)."""
    from .. import timm as dtimm

    report = calibrate_model(
        model, data.val, cfg.calibration, batch_size=cfg.eval_batch_size, device=device, workers=cfg.workers
    )
    log.info(
        "calibration: temperature %.4g, ECE %.4f -> %.4f, thresholds (%s) %s",
        report["temperature"],
        report["ece_before"],
        report["ece_after"],
        report["score"],
        report["thresholds"],
    )
    tracker.log_metrics(
        {
            "temperature": report["temperature"],
            "ece_before_calibration": report["ece_before"],
            "ece_after_calibration": report["ece_after"],
        }
    )
    model_dir = os.path.join(cfg.output, MODEL_DIR)
    metadata = {
        "preprocessing": data.preprocessing,
        "class_names": data.class_names,
        "score": report["score"],
        "temperature": report["temperature"],
        "thresholds": report["thresholds"],
        "train_config": dataclasses.asdict(cfg),
    }
    dtimm.save_model(model.cpu(), model_dir, metadata=metadata)
    model.to(device)
    return report, model_dir
