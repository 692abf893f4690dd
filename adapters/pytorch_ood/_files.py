"""Image files of a folder benchmark: which files count, how they are read, and the check before training.

* **Which files**: names ending in one of torchvision's ``IMG_EXTENSIONS`` (case-insensitive), in any
  sub-folder; hidden files and folders (name starting with ``.``: ``.DS_Store``, ``.ipynb_checkpoints``,
  ``._x.png``) are skipped everywhere, as are other files (``README.txt``). Symbolic links to files and
  folders are followed (a folder reached twice through links is read once).
* **How they are read**: :func:`open_image` decodes the file with PIL and returns it *unconverted* (mode
  ``L``, ``RGB``, ``I;16``, ...): the transform converts it (the timm adapter's preprocessing rescales
  16-bit images to 8 bits, the same rule the served model applies to ``uint16`` arrays).
* **The check**: :func:`verify_images` opens every file and runs PIL's ``verify()`` (header and, for PNG,
  the chunk checksums; no full decode), so a 0-byte or truncated image is reported by name before any
  training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

__all__ = ["LabelledImages", "UnlabelledImages", "image_files", "is_hidden", "open_image", "verify_images"]


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(e.lower() for e in IMG_EXTENSIONS)


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with ``.``)."""
    return name.startswith(".")


def image_files(folder: str) -> list[str]:
    """Sorted paths of the image files under ``folder`` (see the module documentation)."""
    extensions, found, seen = _extensions(), [], set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:  # a link back into a folder already read (or a link cycle)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        found += [os.path.join(current, f) for f in files if not is_hidden(f) and f.lower().endswith(extensions)]
    return sorted(found)


def open_image(path: str):
    """The decoded PIL image of ``path``, in its own mode (no conversion)."""
    from PIL import Image

    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    return image


def verify_images(paths: Sequence[str]) -> None:
    """Open every image and run PIL's ``verify()``.

    :raises ValueError: naming the first file that cannot be read and why
    """
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, OSError, ...)
            reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"image '{path}' cannot be read ({reason}); remove or replace it.") from error


class LabelledImages(Dataset):
    """``(image, label)`` for ``files[i]`` and ``labels[i]`` (Python ints), read with :func:`open_image`.

    :param files: image paths
    :param labels: class index of each file (``-1`` for OOD)
    :param transform: callable applied to each PIL image, or ``None``
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], transform: Callable | None = None):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels.")
        self.files, self.labels, self.transform = list(files), [int(y) for y in labels], transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = open_image(self.files[index])
        return (self.transform(image) if self.transform is not None else image), self.labels[index]


class UnlabelledImages(LabelledImages):
    """Every image file under ``folder`` (:func:`image_files`), each with the label ``-1``.

    :raises FileNotFoundError: when ``folder`` holds no image
    """

    def __init__(self, folder: str, transform: Callable | None = None):
        files = image_files(folder)
        if not files:
            raise FileNotFoundError(
                f"OOD folder '{folder}' holds no images ({', '.join(_extensions())}; hidden files are skipped)."
            )
        super().__init__(files, [-1] * len(files), transform)
