r"""Conv-form isotropic heads: the replacement of a 1x1 ``nn.Conv2d`` classifier (resnetv2, dla, dpn).

The head is applied at every position of a :math:`B \times D \times H \times W` map and returns
:math:`B \times C \times H \times W`; a :math:`B \times D` input gives :math:`B \times C`. One code path
serves both shapes (the channel axis is moved last, the head runs on the flattened rows, the class axis is
moved back), so ``torch.fx`` and TorchScript trace it without data-dependent branches; the shape check is
skipped only while tracing (``torch.fx``, ``torch.jit.trace``) or scripting.
"""

from __future__ import annotations

import torch

from dismax_plugin.heads import DisMaxHead, IsoMaxHead, IsoMaxPlusHead, PrototypeHead

__all__ = ["CONV_HEADS", "Conv2dDisMaxHead", "Conv2dIsoMaxHead", "Conv2dIsoMaxPlusHead"]


# torch >= 2.6 tells fx symbolic tracing apart from torch.export; older versions have only is_fx_tracing.
_is_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)


def _tracing() -> bool:
    """True under ``torch.jit.trace`` and ``torch.fx`` symbolic tracing (the shape check is skipped)."""
    return torch.jit.is_tracing() or _is_fx_symbolic_tracing()


class _Conv2dHeadMixin:
    """Forward of the conv-form heads (mixed in before a :class:`~dismax_plugin.PrototypeHead`)."""

    def _check_map(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(
                f"features must be a torch.Tensor [B, {self.in_features}, H, W]; got {type(features).__name__}."
            )
        if features.ndim not in (2, 4) or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape [B, {self.in_features}, H, W] or [B, {self.in_features}] "
                f"(in_features={self.in_features}); got {tuple(features.shape)}."
            )

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits :math:`B \\times C \\times H \\times W` (or :math:`B \\times C`): :math:`E z` in training mode,
        :math:`z / T` in eval mode (see :class:`~dismax_plugin.PrototypeHead`).

        :raises ValueError: if ``features`` is not :math:`B \\times D \\times H \\times W` or
            :math:`B \\times D` with ``D == in_features``.
        """
        if not torch.jit.is_scripting():
            if not _tracing():
                self._check_map(features)
        if pre_logits:
            return features
        rows = features.movedim(1, -1)
        logits = self._output(rows.reshape(-1, self.in_features))
        return logits.unflatten(0, rows.shape[:-1]).movedim(-1, 1)


class Conv2dIsoMaxHead(_Conv2dHeadMixin, IsoMaxHead):
    """:class:`~dismax_plugin.IsoMaxHead` in place of a 1x1 ``nn.Conv2d``: :math:`B \\times D \\times H
    \\times W \\to B \\times C \\times H \\times W` (also accepts :math:`B \\times D`)."""


class Conv2dIsoMaxPlusHead(_Conv2dHeadMixin, IsoMaxPlusHead):
    """:class:`~dismax_plugin.IsoMaxPlusHead` in place of a 1x1 ``nn.Conv2d`` (see :class:`Conv2dIsoMaxHead`)."""


class Conv2dDisMaxHead(_Conv2dHeadMixin, DisMaxHead):
    """:class:`~dismax_plugin.DisMaxHead` in place of a 1x1 ``nn.Conv2d`` (see :class:`Conv2dIsoMaxHead`)."""


CONV_HEADS: dict[str, type[PrototypeHead]] = {
    cls.kind: cls for cls in (Conv2dIsoMaxHead, Conv2dIsoMaxPlusHead, Conv2dDisMaxHead)
}
"""Conv-form head class of each isotropic head kind."""


def is_conv_head(module) -> bool:
    """Whether ``module`` is one of the conv-form heads."""
    return isinstance(module, _Conv2dHeadMixin)
