r"""Isotropic losses: pure functions of ``(logits, targets)`` plus thin ``nn.Module`` wrappers.

The entropic scale :math:`E` (10 in the papers) multiplies the logits inside the loss only; inference
uses the plain logits. Targets are either class indices :math:`B` or soft targets :math:`B \times C`
(rows are probability distributions: label smoothing, Mixup/CutMix, or :func:`fpr_mix`). Everything is
computed with ``log_softmax``, never ``log(softmax)``, and no :math:`C \times C` one-hot is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice, check_logits, check_positive, check_targets

__all__ = ["DisMaxLoss", "IsoMaxLoss", "dismax_loss", "isomax_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum" or per_sample.numel() == 0:
        return per_sample.sum()
    return per_sample.mean()


def _prepare(logits, targets, entropic_scale, reduction):
    check_logits(logits)
    check_targets(targets, logits)
    check_positive("entropic_scale", entropic_scale)
    reduction = check_choice("reduction", reduction, _REDUCTIONS)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return entropic_scale * logits, reduction


def _soft_cross_entropy(log_probs: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    return -(soft.to(log_probs.dtype) * log_probs).sum(dim=1)


def isomax_loss(
    logits: torch.Tensor, targets: torch.Tensor, entropic_scale: float = 10.0, reduction: str = "mean"
) -> torch.Tensor:
    r"""IsoMax / IsoMax+ loss: cross-entropy of the entropically scaled logits.

    .. math:: \mathcal{L} = -\sum_j t_j \log \mathrm{softmax}(E z)_j

    :param logits: :math:`B \times C` (negative distances from an isotropic head).
    :param targets: class indices :math:`B` or soft targets :math:`B \times C`.
    :param entropic_scale: :math:`E > 0`.
    :param reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample, :math:`B`).
    :raises ValueError: for bad shapes, out-of-range labels, rows not summing to 1, ``entropic_scale <= 0``.
    """
    scaled, reduction = _prepare(logits, targets, entropic_scale, reduction)
    if targets.ndim == 2:
        per_sample = _soft_cross_entropy(F.log_softmax(scaled, dim=1), targets)
    else:
        per_sample = F.cross_entropy(scaled, targets, reduction="none")
    return _reduce(per_sample, reduction)


def dismax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    entropic_scale: float = 10.0,
    alpha: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""DisMax loss with fractional probability regularisation (FPR).

    Rows whose target is one-hot (or a class index) are *clean* and contribute the cross-entropy of
    :math:`E z`; rows whose target is fractional (the stitched images of :func:`fpr_mix`, or any other soft
    target) are *mixed* and contribute :math:`\mathrm{KL}(t \,\Vert\, \mathrm{softmax}(E z))`. With
    ``reduction="mean"`` this is the paper's objective for any batch size,

    .. math:: \mathcal{L} = \tfrac12\bigl(\overline{\mathrm{CE}}_{clean} + \alpha\,\overline{\mathrm{KL}}_{mixed}\bigr),

    or the one mean that exists when the batch has only clean (:math:`\overline{\mathrm{CE}}`) or only mixed
    rows (:math:`\alpha\,\overline{\mathrm{KL}}`). ``"sum"``/``"none"`` give the per-row terms, mixed rows
    weighted by :math:`\alpha`. With class-index targets it equals :func:`isomax_loss`. (A stitched image whose
    four sources share one class has a one-hot target and counts as clean; its KL equals its CE.)

    :param logits: :math:`B \times C` from a :class:`DisMaxHead`.
    :param targets: class indices :math:`B` or soft targets :math:`B \times C`.
    :param alpha: weight :math:`\alpha \ge 0` of the KL term on mixed rows.
    """
    scaled, reduction = _prepare(logits, targets, entropic_scale, reduction)
    check_positive("alpha", alpha, minimum=0.0)
    if targets.ndim != 2:
        return _reduce(F.cross_entropy(scaled, targets, reduction="none"), reduction)
    soft = targets.to(scaled.dtype)
    cross_entropy = _soft_cross_entropy(F.log_softmax(scaled, dim=1), soft)
    neg_entropy = torch.special.xlogy(soft, soft).sum(dim=1)  # sum t log t, 0 for one-hot rows
    per_row = cross_entropy + neg_entropy  # KL(t || q); equals the CE on one-hot rows
    mixed = soft.amax(dim=1) < 1.0 - 1e-6
    if reduction != "mean":
        return _reduce(torch.where(mixed, float(alpha) * per_row, per_row), reduction)
    if per_row.numel() == 0:
        return per_row.sum()
    n_mixed = mixed.sum().to(per_row.dtype)
    n_clean = mixed.numel() - n_mixed
    weight = torch.where(mixed, float(alpha) / n_mixed.clamp_min(1), 1.0 / n_clean.clamp_min(1))
    both = (n_mixed > 0) & (n_clean > 0)
    return torch.where(both, 0.5, 1.0).to(per_row.dtype) * (weight * per_row).sum()


class IsoMaxLoss(nn.Module):
    """Module form of :func:`isomax_loss`: ``forward(logits [B, C], targets [B] | [B, C]) -> loss``."""

    def __init__(self, entropic_scale: float = 10.0, reduction: str = "mean"):
        super().__init__()
        check_positive("entropic_scale", entropic_scale)
        self.entropic_scale = float(entropic_scale)
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return isomax_loss(logits, targets, self.entropic_scale, self.reduction)

    def extra_repr(self) -> str:
        return f"entropic_scale={self.entropic_scale}, reduction={self.reduction!r}"


class DisMaxLoss(nn.Module):
    """Module form of :func:`dismax_loss`: ``forward(logits [B, C], targets [B] | [B, C]) -> loss``."""

    def __init__(self, entropic_scale: float = 10.0, alpha: float = 1.0, reduction: str = "mean"):
        super().__init__()
        check_positive("entropic_scale", entropic_scale)
        check_positive("alpha", alpha, minimum=0.0)
        self.entropic_scale = float(entropic_scale)
        self.alpha = float(alpha)
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return dismax_loss(logits, targets, self.entropic_scale, self.alpha, self.reduction)

    def extra_repr(self) -> str:
        return f"entropic_scale={self.entropic_scale}, alpha={self.alpha}, reduction={self.reduction!r}"
