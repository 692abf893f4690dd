r"""The image preprocessing shared by training, evaluation and the served MLflow model.

A ``preprocessing`` dict (stored in the saved model's metadata) says everything: ``input_size``
``[C, H, W]``, ``mean``, ``std``, ``interpolation`` and ``crop_pct``. Transforms are timm's
``create_transform``, preceded by a conversion of PIL images to ``RGB`` (C = 3) or ``L`` (C = 1).
Imports timm and PIL only, so a served model needs nothing of the training code.

**Bit depth** (one rule for image files and arrays): 16-bit images (PIL modes ``I;16*``, and mode ``I`` with
values in 0..65535) are rescaled to 8 bits by keeping the high byte, :math:`v_8 = \lfloor v_{16} / 256
\rfloor` (:func:`to_8bit`) — what Pillow itself does when it reads 16-bit colour PNGs, so grey and colour
16-bit files agree, and 8-bit values stored as 16 bits (:math:`257 v`) come back unchanged. The served model
applies the same function to ``uint16`` arrays. Float images (mode ``F``) and 32-bit values above 65535 are
refused with a ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["eval_transform", "preprocessing_config", "to_8bit", "train_transform"]


def preprocessing_config(model, image_size: int, channels: int) -> dict:
    """The evaluation preprocessing at ``image_size``: input size, mean, std, interpolation, crop.

    :param model: a timm model, or a timm architecture name (its pretrained config; no model is built).
    """
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

    if isinstance(model, str):
        pretrained = timm.get_pretrained_cfg(model)
        mean = list(getattr(pretrained, "mean", None) or IMAGENET_DEFAULT_MEAN)
        std = list(getattr(pretrained, "std", None) or IMAGENET_DEFAULT_STD)
    else:
        cfg = resolve_data_config({}, model=model)
        mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) != channels:
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return {
        "input_size": [channels, image_size, image_size],
        "mean": mean,
        "std": std,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


def to_8bit(values) -> np.ndarray:
    """16-bit image values (0..65535, any integer dtype) as 8-bit ones: the high byte, ``v // 256`` (uint8).

    :raises ValueError: for values outside 0..65535
    """
    values = np.asarray(values)
    if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise ValueError(f"16-bit images must hold values in 0..65535; got [{int(values.min())}, {int(values.max())}].")
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


class _ConvertMode:
    """Convert PIL images to RGB/L before timm's transform: palette, grey, alpha and CMYK images by PIL,
    16-bit images by :func:`to_8bit` (see the module documentation); float images are refused."""

    def __init__(self, transform, channels: int):
        self.transform, self.mode = transform, "RGB" if int(channels) == 3 else "L"

    def __call__(self, image):
        mode = getattr(image, "mode", self.mode)
        if mode == "F":
            raise ValueError("float images (PIL mode 'F') are not supported: save them with 8 or 16 bits.")
        if mode.startswith("I"):
            from PIL import Image

            image = Image.fromarray(to_8bit(np.asarray(image)))  # 2-D uint8: mode L
        if hasattr(image, "convert") and image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image)


def _common(preprocessing: Mapping[str, Any]) -> dict:
    return dict(
        input_size=tuple(preprocessing["input_size"]),
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
        interpolation=preprocessing.get("interpolation", "bilinear"),
    )


def eval_transform(preprocessing: Mapping[str, Any]):
    """PIL image -> normalised tensor ``[C, H, W]`` (resize, centre crop at ``crop_pct``, normalise)."""
    from timm.data import create_transform

    transform = create_transform(
        is_training=False, crop_pct=preprocessing.get("crop_pct", 1.0), **_common(preprocessing)
    )
    return _ConvertMode(transform, preprocessing["input_size"][0])


def train_transform(preprocessing: Mapping[str, Any]):
    """The ``--augment`` training transform: timm's random resized crop (scale 0.7–1), no flip or colour jitter."""
    from timm.data import create_transform

    transform = create_transform(
        is_training=True, scale=(0.7, 1.0), hflip=0.0, color_jitter=0.0, **_common(preprocessing)
    )
    return _ConvertMode(transform, preprocessing["input_size"][0])
