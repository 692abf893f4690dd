r"""The parts of a training run, built from its :class:`~.config.TrainConfig`: model, loss, optimizer,
scheduler and the batch transform (FPR stitching or timm's Mixup/CutMix).

Every loss is called as ``loss(logits [B, C], targets [B] | [B, C], stitched [B] bool | None)``. Label
smoothing is applied once, by the loss, to the clean rows (the isotropic heads multiply their training-mode
logits by ``--entropic-scale``; the losses scale nothing): ``F.cross_entropy``'s ``label_smoothing`` for the
linear head, the isotropic losses' ``label_smoothing`` (agreed interface 2) for the others; stitched FPR rows
keep their exact 0.25-mixtures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dismax_plugin as dp

from .config import LOGITNORM_TEMPERATURE, ConfigError, TrainConfig

__all__ = ["BatchTransform", "build_loss", "build_model", "build_optimizer", "build_scheduler", "check_architecture",
           "fpr_stream_seed"]  # fmt: skip

Loss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def check_architecture(name: str) -> None:
    """The timm adapter's architecture check, as a :class:`ConfigError` naming ``--model``."""
    from .. import timm as dtimm

    try:
        dtimm.check_architecture(name)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--model: {error}") from error


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The timm model with ``cfg.head`` (pretrained backbone from the hub or ``--pretrained-file``)."""
    from .. import timm as dtimm

    check_architecture(cfg.model)
    kwargs: dict[str, Any] = {"in_chans": cfg.channels}
    if cfg.head != "linear":
        kwargs["entropic_scale"] = cfg.entropic_scale  # the head applies it in training mode
    if cfg.pretrained:
        kwargs["pretrained"] = True
    if cfg.pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(cfg.pretrained_file)})
    flag = "--pretrained" if cfg.pretrained else ("--pretrained-file" if cfg.pretrained_file else "--model")
    try:
        try:  # ViT-like models need the image size at construction; the others reject the keyword.
            model = dtimm.create_model(cfg.model, head=cfg.head, num_classes=num_classes, img_size=cfg.image_size,
                                       **kwargs)  # fmt: skip
        except TypeError as error:
            if "img_size" not in str(error):
                raise
            model = dtimm.create_model(cfg.model, head=cfg.head, num_classes=num_classes, **kwargs)
    except (ValueError, RuntimeError, OSError, TypeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"{flag} ({cfg.model}): {message}") from error
    return model.to(device)


def build_loss(cfg: TrainConfig) -> Loss:
    """``loss(logits, targets, stitched)`` for ``cfg.loss_name``; see the module docstring.

    ``logitnorm`` is pytorch-ood's ``LogitNorm`` at the paper's temperature (:data:`~.config.LOGITNORM_TEMPERATURE`).
    """
    name, smoothing = cfg.loss_name, cfg.smoothing
    if name == "cross_entropy":
        return lambda logits, targets, stitched: F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
    if name == "logitnorm":
        from pytorch_ood.loss import LogitNorm

        module = LogitNorm(t=LOGITNORM_TEMPERATURE)
        return lambda logits, targets, stitched: module(logits.float(), targets)
    if name == "dismax":
        module = dp.DisMaxLoss(cfg.alpha, label_smoothing=smoothing)
        return lambda logits, targets, stitched: module(logits, targets, stitched=stitched)
    module = dp.IsoMaxLoss(label_smoothing=smoothing)
    return lambda logits, targets, stitched: module(logits, targets)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` (no weight decay on biases, norms and the distance scale)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)  # fmt: skip


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's scheduler ``cfg.scheduler`` stepped per update (``None`` for ``none``).

    timm's step decay points (every 90 epochs; at 90, 180, 270) are for ImageNet-length runs; here they
    scale with the run: ``step`` multiplies the lr by 0.1 every third of the epochs, ``multistep`` at half
    and three quarters of them. A run resumed with another ``--epochs`` is re-planned: its remaining epochs
    get the lr of a run planned for the new length from the start (:func:`._checkpoint.restore`).
    """
    if cfg.scheduler == "none":
        return None
    from timm.scheduler import create_scheduler_v2

    epochs = cfg.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.scheduler,
        num_epochs=epochs,
        warmup_epochs=cfg.warmup_epochs,
        decay_epochs=max(1, epochs // 3),
        # timm's multistep lowers the lr one epoch before each milestone: +1 so the decay starts at it
        decay_milestones=sorted({max(1, epochs // 2) + 1, max(1, 3 * epochs // 4) + 1}),
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def fpr_stream_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """Seed of the FPR stitching of batch ``step`` of ``epoch`` on ``rank``: a hash of the four numbers, so that
    every rank stitches its own pattern and a resumed run draws exactly what the uninterrupted one did."""
    import numpy as np

    words = np.random.SeedSequence([_FPR_STREAM, seed, rank, epoch, step]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1  # 62 bits: a valid torch seed


_FPR_STREAM = 0x0F9D  # tells the FPR streams apart from any other stream derived from the same numbers


class BatchTransform:
    """``(x, y, epoch, step) -> (inputs, targets, stitched)``: FPR stitching, timm Mixup/CutMix, or nothing.

    ``stitched`` is a bool mask [B] of the FPR-stitched rows (``None`` without FPR); rows that are not
    stitched have a class (targets may still be soft under Mixup). FPR draws from a generator seeded per
    batch with :func:`fpr_stream_seed` ``(seed, rank, epoch, step)``.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, rank: int = 0):
        self.num_classes, self.fpr, self.seed, self.rank = num_classes, cfg.uses_fpr, cfg.seed, rank
        self.generator = torch.Generator()
        self.mixup = None
        if cfg.mixup or cfg.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0,
                               num_classes=num_classes)  # fmt: skip

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int = 0, step: int = 0):
        if self.fpr:
            self.generator.manual_seed(fpr_stream_seed(self.seed, self.rank, epoch, step))
            return dp.fpr_mix(x, y, self.num_classes, generator=self.generator)
        if self.mixup is not None and x.shape[0] % 2 == 0:
            inputs, targets = self.mixup(x, y)
            return inputs, targets, None
        return x, y, None
