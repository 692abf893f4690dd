r"""How the served model reads the axes of an image array: how many images, of which size, with how many
channels. The one place that decides it (:func:`split_images`), with explicit rules and a clear error where
a shape could mean two different things.

**A list** (or tuple) holds single images, one per item, of any sizes: ``[H, W]``, ``[H, W, C]`` or
``[C, H, W]``. **An array** (numpy, or anything ``np.asarray`` takes; a torch tensor) is read as one of

==================  ===========================  ==================
shape               reading                       images
==================  ===========================  ==================
``[H, W]``          one grey image                1
``[H, W, C]``       one image, channels last      1
``[C, H, W]``       one image, channels first     1
``[N, H, W]``       grey images                   N
``[N, H, W, C]``    images, channels last         N
``[N, C, H, W]``    images, channels first        N
==================  ===========================  ==================

with :math:`C \in \{1, 3, 4\}` (grey, RGB, RGBA). When a shape fits several readings (``(32, 32, 3)`` is
one RGB image or 32 grey images of 32 x 3 pixels; ``[2, 3, 32, 4]`` is channels first or last), the one
whose :math:`H \times W` is the model's input size (from the saved preprocessing) wins; else the one whose
sides are all longer than 4 pixels (an axis of 1, 3 or 4 is taken for channels, not for a side of an
image). ``[1, H, W]`` is one grey image either way. A shape that is still ambiguous — ``(3, 32, 32)``: three
grey images or one RGB image — is refused with one line naming the readings and the shapes that say it
unambiguously (a batch ``[N, H, W, C]`` or ``[N, C, H, W]`` that has one reading only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["CHANNELS", "Reading", "readings", "split_images"]

#: channel counts an image may have: grey, RGB, RGBA
CHANNELS = (1, 3, 4)
_SMALL_SIDE = max(CHANNELS)  # a side this short could as well be a channel axis
_AXES = {"HW": "[H, W]", "HWC": "[H, W, C]", "CHW": "[C, H, W]", "NHW": "[N, H, W]", "NHWC": "[N, H, W, C]",
         "NCHW": "[N, C, H, W]"}  # fmt: skip
_ACCEPTED = (
    "a batch [N, H, W] (grey), [N, H, W, C] or [N, C, H, W], one image [H, W], [H, W, C] or [C, H, W] "
    "(C in 1, 3, 4), or a list of images"
)


class Reading(NamedTuple):
    """One way to read an array: its ``layout`` (a key of the table above) and what it then holds."""

    layout: str
    count: int
    height: int
    width: int
    channels: int

    def describe(self, axes: bool = True) -> str:
        """E.g. ``3 images [N, H, W] of 32x32 pixels, 1 channel`` (without ``[N, H, W]`` unless ``axes``)."""
        what = "one image" if self.layout in ("HW", "HWC", "CHW") else f"{self.count} images"
        what += f" {_AXES[self.layout]}" if axes else ""
        plural = "" if self.channels == 1 else "s"
        return f"{what} of {self.height}x{self.width} pixels, {self.channels} channel{plural}"

    def unambiguous(self) -> tuple[int, int, int, int] | None:
        """A batch shape, channels last (else first), that has this reading only; ``None`` if neither has."""
        for shape in ((self.count, self.height, self.width, self.channels),
                      (self.count, self.channels, self.height, self.width)):  # fmt: skip
            if len(readings(shape)) == 1:
                return shape
        return None


def readings(shape: Sequence[int], single: bool = False) -> list[Reading]:
    """Every reading of an array of ``shape`` (only single images when ``single``), in table order."""
    shape = tuple(int(s) for s in shape)
    found: list[Reading] = []
    if len(shape) == 2:
        found.append(Reading("HW", 1, shape[0], shape[1], 1))
    elif len(shape) == 3:
        a, b, d = shape
        if d in CHANNELS:
            found.append(Reading("HWC", 1, a, b, d))
        if a in CHANNELS:
            found.append(Reading("CHW", 1, b, d, a))
        if not single and a != 1:  # [1, H, W]: the grey image [C, H, W] above
            found.append(Reading("NHW", a, b, d, 1))
    elif len(shape) == 4 and not single:
        n, a, b, d = shape
        if d in CHANNELS:
            found.append(Reading("NHWC", n, a, b, d))
        if a in CHANNELS:
            found.append(Reading("NCHW", n, b, d, a))
    return found


def _choose(shape: tuple[int, ...], input_size: Sequence[int], single: bool) -> Reading:
    candidates = readings(shape, single)
    if not candidates:
        what = "a single image (a list item) must be [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4" if single \
            else f"images must be {_ACCEPTED}"  # fmt: skip
        raise ValueError(f"{what}; got shape {shape}.")
    size = (int(input_size[-2]), int(input_size[-1]))
    for keep in (lambda r: (r.height, r.width) == size, lambda r: min(r.height, r.width) > _SMALL_SIDE):
        narrowed = [r for r in candidates if keep(r)]
        if len(narrowed) == 1:
            return narrowed[0]
        candidates = narrowed or candidates
    if len(candidates) == 1:
        return candidates[0]
    described = " or ".join(r.describe() for r in candidates)
    ways = [f"{r.unambiguous()} for {r.describe(axes=False)}" for r in candidates if r.unambiguous()]
    raise ValueError(
        f"images of shape {shape} are ambiguous: {described}; send them as a batch of shape "
        f"{' or '.join(ways) if ways else '[N, H, W, C]'}, or as a list of images."
    )


def _split(array: np.ndarray, reading: Reading) -> list[np.ndarray]:
    if reading.layout in ("HW", "HWC"):
        return [array]
    if reading.layout == "CHW":
        return [array.transpose(1, 2, 0)]
    if reading.layout == "NCHW":
        array = array.transpose(0, 2, 3, 1)
    return list(array)


def split_images(images: Any, input_size: Sequence[int]) -> list[np.ndarray]:
    """The single images ``[H, W]`` or ``[H, W, C]`` (as given, not converted) held by ``images``.

    :param images: a list of images or an array (see the module docstring for the rules).
    :param input_size: the model's ``[C, H, W]`` (its ``H, W`` decide between readings).
    :raises TypeError: for a DataFrame or a non-numeric array; ValueError for an empty input, an unsupported
        shape or an ambiguous one (the message names the readings and the shapes that are unambiguous).
    """
    if hasattr(images, "iloc"):
        raise TypeError("images must be a numpy array of images, not a pandas DataFrame.")
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)):
        singles = [np.asarray(im.detach().cpu().numpy() if hasattr(im, "detach") else im) for im in images]
        if not singles:
            raise ValueError("images must hold at least one image; got an empty list.")
        return [im for single in singles for im in _split(single, _choose(single.shape, input_size, True))]
    try:
        batch = np.asarray(images)
    except (TypeError, ValueError) as error:
        raise TypeError(f"images must be a numpy array batch of images; got {type(images).__name__}.") from error
    if batch.dtype == object:
        raise TypeError("images must be a numeric array (uint8 or float); got dtype object.")
    if batch.size == 0:
        raise ValueError(f"images must hold at least one image; got an empty batch of shape {batch.shape}.")
    return _split(batch, _choose(batch.shape, input_size, False))
