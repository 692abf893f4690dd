r"""Isotropic losses: pure functions of ``(logits, targets)`` plus thin ``nn.Module`` wrappers.

The losses take the head's **training-mode** output, which is already the logits times the entropic scale
:math:`E` (10 in the papers; :data:`dismax_plugin.ENTROPIC_SCALE`, applied by the head, see
:mod:`dismax_plugin.heads`): they scale nothing themselves, so nothing is scaled twice, and the IsoMax loss is
the cross-entropy of that output (which is why stock training code with ``nn.CrossEntropyLoss`` trains it).
Targets are either class indices :math:`B` or soft targets :math:`B \times C`
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


def _prepare(logits, targets, reduction):
    check_logits(logits)
    check_targets(targets, logits)
    reduction = check_choice("reduction", reduction, _REDUCTIONS)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, reduction


def _cross_entropy(scaled: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-row ``F.cross_entropy`` for class indices [B] or probability targets [B, C]."""
    if targets.ndim == 2:
        targets = targets.to(scaled.dtype)
    return F.cross_entropy(scaled, targets, reduction="none", label_smoothing=label_smoothing)


def _check_smoothing(label_smoothing) -> float:
    check_positive("label_smoothing", label_smoothing, minimum=0.0)
    if not label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}.")
    return float(label_smoothing)


def _check_stitched(stitched, batch: int) -> torch.Tensor:
    if not isinstance(stitched, torch.Tensor) or stitched.dtype != torch.bool:
        raise TypeError(
            f"stitched must be a bool tensor [B] marking fpr_mix's stitched rows; got "
            f"{getattr(stitched, 'dtype', type(stitched).__name__)}."
        )
    if stitched.shape != (batch,):
        raise ValueError(f"stitched must have shape [B] = ({batch},); got {tuple(stitched.shape)}.")
    return stitched


def isomax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""IsoMax / IsoMax+ loss: cross-entropy of the entropically scaled logits :math:`E z` (the head's
    training-mode output).

    .. math:: \mathcal{L} = -\sum_j t_j \log \mathrm{softmax}(E z)_j

    with :math:`t` the one-hot or soft target, smoothed to :math:`(1 - \epsilon)\,t + \epsilon / C` by
    ``label_smoothing`` :math:`\epsilon` (``F.cross_entropy``'s own smoothing).

    :param logits: :math:`B \times C`, :math:`E z` as an isotropic head returns it in training mode.
    :param targets: class indices :math:`B` or soft targets :math:`B \times C`.
    :param reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample, :math:`B`).
    :param label_smoothing: :math:`\epsilon \in [0, 1)`.
    :raises ValueError: for bad shapes, out-of-range labels, rows not summing to 1.
    """
    scaled, reduction = _prepare(logits, targets, reduction)
    return _reduce(_cross_entropy(scaled, targets, _check_smoothing(label_smoothing)), reduction)


def dismax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    stitched: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""DisMax loss with fractional probability regularisation (FPR).

    Rows marked in ``stitched`` (the images :func:`fpr_mix` stitched from four sources) contribute
    :math:`\alpha\,\mathrm{KL}(t \,\Vert\, \mathrm{softmax}(E z))`; every other row is *clean* and contributes
    the cross-entropy of :math:`E z` with its target (class index or soft target such as Mixup), smoothed by
    ``label_smoothing`` as in :func:`isomax_loss`. Which rows are stitched is said by the mask, never guessed
    from the targets: without it, every row is clean. With ``reduction="mean"`` this is the paper's objective
    for any batch size,

    .. math:: \mathcal{L} = \tfrac12\bigl(\overline{\mathrm{CE}}_{clean} + \alpha\,\overline{\mathrm{KL}}_{st}\bigr),

    (:math:`st` = stitched rows), or the one mean that exists when the batch has only clean
    (:math:`\overline{\mathrm{CE}}`) or only stitched rows (:math:`\alpha\,\overline{\mathrm{KL}}`).
    ``"sum"``/``"none"`` give the per-row terms, stitched rows weighted by :math:`\alpha`. Without stitched
    rows it equals :func:`isomax_loss`.

    :param logits: :math:`B \times C`, :math:`E z` as a :class:`DisMaxHead` returns it in training mode.
    :param targets: class indices :math:`B` or soft targets :math:`B \times C`.
    :param alpha: weight :math:`\alpha \ge 0` of the KL term on stitched rows.
    :param label_smoothing: :math:`\epsilon \in [0, 1)`, applied to the clean rows only.
    :param stitched: bool :math:`B`, the third output of :func:`fpr_mix`; ``None``: no stitched rows.
    :raises ValueError/TypeError: for bad shapes, labels, ``alpha < 0`` or a ``stitched`` that is not bool [B].
    """
    scaled, reduction = _prepare(logits, targets, reduction)
    check_positive("alpha", alpha, minimum=0.0)
    smoothing = _check_smoothing(label_smoothing)
    if stitched is None:
        return _reduce(_cross_entropy(scaled, targets, smoothing), reduction)
    stitched = _check_stitched(stitched, scaled.shape[0]).to(scaled.device)
    plain = _cross_entropy(scaled, targets, 0.0)
    kl = plain
    if targets.ndim == 2:  # KL(t || q) = CE(t, q) + sum t log t
        soft = targets.to(plain.dtype)
        kl = plain + torch.special.xlogy(soft, soft).sum(dim=1)
    clean = _cross_entropy(scaled, targets, smoothing) if smoothing else plain
    if reduction != "mean":
        return _reduce(torch.where(stitched, float(alpha) * kl, clean), reduction)
    if clean.numel() == 0:
        return clean.sum()
    n_stitched = stitched.sum().to(clean.dtype)
    n_clean = stitched.numel() - n_stitched
    weighted = torch.where(stitched, float(alpha) * kl / n_stitched.clamp_min(1), clean / n_clean.clamp_min(1))
    both = (n_stitched > 0) & (n_clean > 0)
    return torch.where(both, 0.5, 1.0).to(clean.dtype) * weighted.sum()


class IsoMaxLoss(nn.Module):
    """Module form of :func:`isomax_loss`: ``forward(logits [B, C], targets [B] | [B, C]) -> loss``."""

    def __init__(self, reduction: str = "mean", *, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return isomax_loss(logits, targets, self.reduction, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


class DisMaxLoss(nn.Module):
    """Module form of :func:`dismax_loss`:
    ``forward(logits [B, C], targets [B] | [B, C], stitched=None [B] bool) -> loss``."""

    def __init__(self, alpha: float = 1.0, reduction: str = "mean", *, label_smoothing: float = 0.0):
        super().__init__()
        check_positive("alpha", alpha, minimum=0.0)
        self.alpha = float(alpha)
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.reduction = check_choice("reduction", reduction, _REDUCTIONS)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, stitched: torch.Tensor | None = None
    ) -> torch.Tensor:
        return dismax_loss(logits, targets, self.alpha, self.reduction, self.label_smoothing, stitched)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"
