"""The image preprocessing shared by training, evaluation and the served MLflow model.

A ``preprocessing`` dict (stored in the saved model's metadata) says everything: ``input_size``
``[C, H, W]``, ``mean``, ``std``, ``interpolation`` and ``crop_pct``. Transforms are timm's
``create_transform``, preceded by a conversion of PIL images to ``RGB`` (C = 3) or ``L`` (C = 1).
Imports timm and PIL only, so a served model needs nothing of the training code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["eval_transform", "preprocessing_config", "train_transform"]


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


class _ConvertMode:
    """Convert PIL images to RGB/L before timm's transform (folders may hold palette or grey images)."""

    def __init__(self, transform, channels: int):
        self.transform, self.mode = transform, "RGB" if int(channels) == 3 else "L"

    def __call__(self, image):
        if hasattr(image, "convert") and getattr(image, "mode", self.mode) != self.mode:
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
