r"""Fractional probability regularisation (FPR) of DisMax: a batch transform, separate from the loss.

Half of the shuffled batch keeps its images and one-hot targets; the other half is replaced by images
stitched from the four quadrants of four different images of the batch, whose target gives 0.25 to the
class of each source image (0.5 if two sources share a class, and so on). The transform returns a mask of
the stitched rows, which :class:`~dismax_plugin.DisMaxLoss` takes to weight them with the KL term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_class_targets, check_positive

__all__ = ["fpr_mix"]


def fpr_mix(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Build an FPR batch.

    The output holds the first :math:`B - \lfloor B/2 \rfloor` images of a random permutation of the
    batch (clean, one-hot targets) followed by :math:`\lfloor B/2 \rfloor` stitched images. Quadrants
    split at ``H // 2`` and ``W // 2``, so odd sizes work. Each stitched image uses four distinct source
    images when :math:`B \ge 4` (with replacement otherwise).

    :param inputs: images :math:`B \times Ch \times H \times W` with :math:`H, W \ge 2`.
    :param targets: class indices :math:`B`.
    :param num_classes: :math:`C`.
    :param generator: ``torch.Generator`` making the draw reproducible (its device is used for sampling).
    :return: ``(images [B, Ch, H, W], soft_targets [B, C], stitched [B])``; soft targets are float32 (or the
        inputs' floating dtype) and each row sums to 1; ``stitched`` is a bool mask of the stitched rows
        (the last :math:`\lfloor B/2 \rfloor`), to pass to :class:`~dismax_plugin.DisMaxLoss`.
    :raises TypeError/ValueError: for non-image inputs, bad targets or ``num_classes``.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of images [B, Ch, H, W]; got {type(inputs).__name__}.")
    if inputs.ndim != 4 or inputs.shape[2] < 2 or inputs.shape[3] < 2:
        raise ValueError(f"inputs must be images [B, Ch, H, W] with H, W >= 2; got shape {tuple(inputs.shape)}.")
    check_positive("num_classes", num_classes, integer=True, minimum=2)
    batch, _, height, width = inputs.shape
    check_class_targets(targets, batch, num_classes)
    soft_dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    sample_device = generator.device if generator is not None else torch.device("cpu")

    order = torch.randperm(batch, generator=generator, device=sample_device).to(inputs.device)
    n_mixed = batch // 2
    clean = order[: batch - n_mixed]
    if batch >= 4:
        keys = torch.rand(n_mixed, batch, generator=generator, device=sample_device)
        sources = keys.argsort(dim=1)[:, :4]
    else:
        sources = torch.randint(0, batch, (n_mixed, 4), generator=generator, device=sample_device)
    sources = sources.to(inputs.device)

    top, left = height // 2, width // 2
    stitched = torch.empty((n_mixed, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
    stitched[:, :, :top, :left] = inputs[sources[:, 0], :, :top, :left]
    stitched[:, :, :top, left:] = inputs[sources[:, 1], :, :top, left:]
    stitched[:, :, top:, :left] = inputs[sources[:, 2], :, top:, :left]
    stitched[:, :, top:, left:] = inputs[sources[:, 3], :, top:, left:]

    targets = targets.to(inputs.device)
    mixed_targets = torch.zeros(n_mixed, num_classes, dtype=soft_dtype, device=inputs.device)
    quarter = torch.full((n_mixed, 4), 0.25, dtype=soft_dtype, device=inputs.device)
    mixed_targets.scatter_add_(1, targets[sources], quarter)
    clean_targets = F.one_hot(targets[clean], num_classes).to(soft_dtype)
    mask = torch.arange(batch, device=inputs.device) >= batch - n_mixed
    return torch.cat([inputs[clean], stitched]), torch.cat([clean_targets, mixed_targets]), mask
