r"""The isotropic losses (IsoMax, IsoMax+, DisMax) as pytorch-ood losses: ``LossInfo`` metadata, OOD targets dropped.

Samples with class-index targets :math:`< 0` (OOD, pytorch-ood's convention) are discarded with
pytorch-ood's warning; soft targets :math:`B \times C` pass. A ``stitched`` mask [B] (from
:func:`dismax_plugin.fpr_mix`) is passed through to the core loss, filtered like the targets.

The logits are an isotropic head's training-mode output :math:`E z`: the head applies the entropic scale
:math:`E` (:data:`dismax_plugin.ENTROPIC_SCALE`), the losses do not scale again.
"""

from __future__ import annotations

from pytorch_ood.api import LossInfo, Representation, Task
from pytorch_ood.utils import drop_unknown
from torch import Tensor

from dismax_plugin import losses as _core_losses

from ._papers import DISMAX_PAPER, ISOMAX_PAPER, ISOMAX_PLUS_PAPER

__all__ = ["DisMaxLoss", "IsoMaxLoss", "IsoMaxPlusLoss"]


class _DropsUnknown:
    """Discards samples with class-index targets < 0 (with pytorch-ood's warning); soft targets pass."""

    def forward(self, logits: Tensor, targets: Tensor, stitched: Tensor | None = None) -> Tensor:
        """
        :param logits: logits :math:`B \\times C`
        :param targets: class indices :math:`B` (values :math:`< 0` are dropped) or soft targets :math:`B \\times C`
        :param stitched: optional bool mask :math:`B` of the FPR-stitched rows, passed to the core loss
        :return: the loss
        """
        if isinstance(targets, Tensor) and targets.ndim == 1 and not targets.is_floating_point():
            if stitched is not None:
                stitched = stitched[targets >= 0]
            targets, logits = drop_unknown(targets, logits)
        if stitched is None:
            return super().forward(logits, targets)
        return super().forward(logits, targets, stitched=stitched)


_LOSS_TASKS = {Task.CLASSIFICATION}
_LOSS_INPUTS = {Representation.LOGITS}


class IsoMaxLoss(_DropsUnknown, _core_losses.IsoMaxLoss):
    r"""IsoMax loss for pytorch-ood: cross-entropy of the entropically scaled logits :math:`E z` of an
    :class:`~dismax_plugin.IsoMaxHead` in training mode.

    .. math:: \mathcal{L} = -\log \mathrm{softmax}(E\,z)_y, \qquad z_j = -\lVert f - p_j \rVert

    Logits :math:`B \times C`, targets :math:`B` or :math:`B \times C`; returns a 0-d loss (or :math:`B'`
    with ``reduction="none"``).
    """

    info = LossInfo(tasks=_LOSS_TASKS, inputs=_LOSS_INPUTS, supervised=False, paper=ISOMAX_PAPER)


class IsoMaxPlusLoss(_DropsUnknown, _core_losses.IsoMaxLoss):
    r"""IsoMax+ loss for pytorch-ood: the IsoMax loss on the logits of an :class:`~dismax_plugin.IsoMaxPlusHead`,
    :math:`z_j = -|s|\,\lVert \hat f - \hat p_j \rVert` (normalised features and prototypes).

    .. math:: \mathcal{L} = -\log \mathrm{softmax}(E\,z)_y

    Logits :math:`B \times C`, targets :math:`B` or :math:`B \times C`; returns a 0-d loss.
    """

    info = LossInfo(tasks=_LOSS_TASKS, inputs=_LOSS_INPUTS, supervised=False, paper=ISOMAX_PLUS_PAPER)


class DisMaxLoss(_DropsUnknown, _core_losses.DisMaxLoss):
    r"""DisMax loss for pytorch-ood, on the logits of a :class:`~dismax_plugin.DisMaxHead`.

    Clean rows contribute :math:`-\log \mathrm{softmax}(E\,z)_y`; the rows marked ``stitched`` (from
    :func:`~dismax_plugin.fpr_mix`) contribute :math:`\alpha\,\mathrm{KL}(t \,\Vert\, \mathrm{softmax}(E\,z))`.
    The outliers of the fractional probability regularisation are synthesised from in-distribution data,
    so the objective is unsupervised in pytorch-ood's sense. Logits :math:`B \times C`, targets :math:`B`
    or :math:`B \times C`, ``stitched`` :math:`B` (bool) or ``None``.
    """

    info = LossInfo(tasks=_LOSS_TASKS, inputs=_LOSS_INPUTS, supervised=False, paper=DISMAX_PAPER)
