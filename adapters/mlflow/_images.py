"""The served model's input: raw images (several layouts and dtypes) to the model's input tensor.

:func:`preprocess_images` accepts what a user of the served model has at hand (numpy batches
``[N, H, W]``, ``[N, H, W, C]``, ``[N, C, H, W]``, single images, uint8 or float in [0, 1], or a list of
images of different sizes; which axes are which is decided by :mod:`._layouts`) and applies the evaluation
transform of :mod:`dismax_plugin.adapters.timm.preprocessing` (the one definition shared with training and
evaluation). :func:`model_examples` makes the input examples logged
with the models. Imports numpy only at module level (torch, PIL and timm when called).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._layouts import split_images

__all__ = ["check_preprocessing", "model_examples", "preprocess_images"]

log = logging.getLogger("dismax_plugin.adapters.mlflow")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    numeric = np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    if image.dtype == np.bool_ or not numeric:
        raise TypeError(
            f"images must hold uint8 (or integer 0..255), uint16 or float [0, 1] values; got dtype {image.dtype}."
        )
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("float images must be finite values in [0, 1]; got NaN or inf.")
        low, high = float(image.min()), float(image.max())
        if low < -1e-6 or high > 1.0 + 1e-6:
            raise ValueError(
                f"float images must be in [0, 1] (uint8 images in 0..255); got range [{low:.4g}, {high:.4g}]."
            )
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.dtype == np.uint16:  # 16-bit images: the rule of image files (timm adapter's preprocessing)
        from ..timm.preprocessing import to_8bit

        return to_8bit(image)
    if image.dtype != np.uint8:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"integer images must be in 0..255; got range [{low}, {high}].")
        image = image.astype(np.uint8)
    return image


def check_preprocessing(preprocessing: Any) -> dict:
    if not isinstance(preprocessing, Mapping):
        raise TypeError(
            "preprocessing must be a dict {'input_size': [C, H, W], 'mean': [...], 'std': [...]}; "
            f"got {type(preprocessing).__name__}."
        )
    missing = [k for k in ("input_size", "mean", "std") if k not in preprocessing]
    size = preprocessing.get("input_size")
    if missing or not isinstance(size, Sequence) or len(size) != 3 or int(size[0]) not in (1, 3):
        raise ValueError(
            "preprocessing must hold 'input_size' [C, H, W] with C in (1, 3), 'mean' and 'std'; "
            f"got {dict(preprocessing)} (missing: {missing})."
        )
    return dict(preprocessing)


def preprocess_images(images: Any, preprocessing: Mapping[str, Any], transform=None):
    """Raw images to the model's input tensor, exactly as evaluation does it.

    Each image goes through PIL and timm's evaluation transform (``create_transform(is_training=False,
    input_size, interpolation, mean, std, crop_pct)``: resize of the shorter edge, centre crop, scaling to
    [0, 1], normalisation), after conversion to ``RGB`` or ``L`` to match ``input_size[0]`` (grey
    images are replicated to three channels, colour images reduced to luminance, alpha is dropped) —
    :func:`dismax_plugin.adapters.timm.preprocessing.eval_transform`, which evaluation applies to image files.

    :param images: a batch as a numpy array (or anything ``np.asarray`` accepts): ``[N, H, W]`` (grey),
        ``[N, H, W, C]`` or ``[N, C, H, W]`` with ``C`` in 1, 3, 4, one image ``[H, W]``, ``[H, W, C]`` or
        ``[C, H, W]``, or a list of single images of any sizes; a shape that fits two of these is read by the
        rules of :mod:`._layouts` (the model's input size decides, else sides > 4 pixels) or refused. Values
        are uint8 (or other integers in 0..255), uint16 (16-bit images: rescaled to 8 bits as 16-bit image
        files are, ``v // 256``) or floats in [0, 1] (quantised to 8 bits, as an image file would be).
    :param preprocessing: ``{"input_size": [C, H, W], "mean": [...], "std": [...]}`` plus optional
        ``"interpolation"`` (default ``"bilinear"``) and ``"crop_pct"`` (default 1.0).
    :param transform: a prebuilt transform (from the same ``preprocessing``) to reuse.
    :return: float32 tensor :math:`N \\times C \\times H \\times W`.
    :raises TypeError: for an unsupported container or dtype.
    :raises ValueError: for an unsupported or ambiguous shape, or out-of-range values.
    """
    preprocessing = check_preprocessing(preprocessing)
    singles = split_images(images, preprocessing["input_size"])
    return _stack([_single_hwc(im) for im in singles], preprocessing, transform)


def _single_hwc(image: np.ndarray) -> np.ndarray:
    """One image ``[H, W]`` or ``[H, W, C]`` (as :func:`split_images` gives it) as uint8, ``C = 1`` dropped."""
    image = _to_uint8(np.asarray(image))
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return np.ascontiguousarray(image)


def _stack(images: list[np.ndarray], preprocessing: dict, transform):
    """HWC/HW uint8 images -> ``[N, C, H, W]`` float32 through the evaluation transform (which also
    converts each PIL image to ``RGB`` or ``L``)."""
    import torch
    from PIL import Image

    from ..timm.preprocessing import eval_transform

    transform = transform or eval_transform(preprocessing)
    return torch.stack([transform(Image.fromarray(image)) for image in images]).float()


def _is_model_input(example: Any, preprocessing: dict) -> bool:
    """A float batch shaped like the model input, ``[N, *input_size]``: already preprocessed."""
    shape, dtype = getattr(example, "shape", None), getattr(example, "dtype", None)
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != tuple(int(v) for v in preprocessing["input_size"]):
        return False
    return bool(getattr(example, "is_floating_point", lambda: False)()) or (
        isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating)
    )


def model_examples(input_example: Any, preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(raw images, model input)`` examples (2 items each) for the pyfunc and the pytorch model.

    ``input_example`` is either raw images (anything :func:`preprocess_images` takes) or a preprocessed
    float batch ``[N, C, H, W]`` (then the raw example is that batch un-normalised to uint8 images);
    without a usable one, mid-grey images are used.
    """
    import torch

    channels, height, width = (int(v) for v in preprocessing["input_size"])
    if input_example is not None:
        try:
            if _is_model_input(input_example, preprocessing):
                model_input = torch.as_tensor(np.asarray(input_example[:2], dtype=np.float32))
                x = model_input.double().numpy() * np.asarray(preprocessing["std"]).reshape(1, -1, 1, 1)
                x = x + np.asarray(preprocessing["mean"]).reshape(1, -1, 1, 1)
                raw = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
                raw = raw if channels == 3 else raw[..., 0]
            else:
                raw = input_example[:2]
                raw = raw.detach().cpu().numpy() if hasattr(raw, "detach") else np.asarray(raw)
                model_input = preprocess_images(raw, preprocessing)
            return raw, model_input.numpy()
        except Exception:  # an odd example must not stop the model from being logged
            log.warning("MLflow tracker: input_example not usable (see the log_model docstring); using grey images")
    raw = np.full((2, height, width, 3) if channels == 3 else (2, height, width), 128, dtype=np.uint8)
    return raw, preprocess_images(raw, preprocessing).numpy()


