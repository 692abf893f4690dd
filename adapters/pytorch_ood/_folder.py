"""The :class:`FolderBenchmark`: a pytorch-ood ``Benchmark`` over an image folder, OOD sets grouped near/far.

Layout::

    root/train/<class>/...        in-distribution training images (at least 2 classes)
    root/val/<class>/...          optional; the in-distribution test set (else train/, with a warning)
    root/ood/near/<name>/...      near-OOD set <name> (images in any sub-folders)
    root/ood/far/<name>/...       far-OOD set <name>
    root/ood/<name>/...           a set outside near/ and far/: group "far" (logged)

``near`` and ``far`` directly under ``ood/`` are group folders, never set names. OOD images get the
label ``-1``; in-distribution labels are Python ints (the class index of ``train/``).
"""

from __future__ import annotations

import logging
import os

from pytorch_ood.benchmark import Benchmark
from torch.utils.data import ConcatDataset, Dataset

from ._checks import check_transform

__all__ = ["FolderBenchmark"]

log = logging.getLogger(__name__)

_GROUPS = ("near", "far")


class _UnlabelledImages(Dataset):
    """Every image file under ``folder`` (sorted paths), each with the label ``-1``."""

    def __init__(self, folder: str, transform=None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

        self.loader, self.transform = default_loader, transform
        self.files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not self.files:
            raise FileNotFoundError(f"OOD folder '{folder}' holds no images ({', '.join(IMG_EXTENSIONS)}).")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = self.loader(self.files[index])
        return (self.transform(image) if self.transform else image), -1


def _ood_folders(ood_dir: str) -> list[tuple[str, str, str]]:
    """``(name, group, path)`` of each OOD set under ``ood_dir`` (near/ and far/ first, then flat sets)."""
    if not os.path.isdir(ood_dir):
        return []
    found = []
    for group in _GROUPS:
        group_dir = os.path.join(ood_dir, group)
        if os.path.isdir(group_dir):
            found += [(n, group, os.path.join(group_dir, n)) for n in sorted(os.listdir(group_dir))]
    flat = [n for n in sorted(os.listdir(ood_dir)) if n not in _GROUPS and os.path.isdir(os.path.join(ood_dir, n))]
    if flat:
        log.info("OOD folders outside ood/near/ and ood/far/ count as far-OOD: %s", flat)
    found += [(n, "far", os.path.join(ood_dir, n)) for n in flat]
    names = [n for n, _, _ in found]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"OOD set names must be unique across ood/near/, ood/far/ and ood/; repeated: {duplicated}.")
    return found


class FolderBenchmark(Benchmark):
    """A pytorch-ood ``Benchmark`` over an image folder (see the module documentation for the layout).

    ``ood_names`` lists the OOD sets (near ones first) and ``ood_groups`` maps each to ``"near"`` or
    ``"far"``. The in-distribution test set is ``val/`` when present, else ``train/``.

    .. code-block:: python

        benchmark = FolderBenchmark("data/", transform)
        results = benchmark.evaluate(detector, loader_kwargs={"batch_size": 128})
    """

    def __init__(self, root: str | os.PathLike, transform=None):
        """
        :param root: the folder
        :param transform: callable applied to each PIL image
        :raises FileNotFoundError: without ``train/`` or for an OOD folder that holds no images
        :raises ValueError: for fewer than 2 classes, ``val/`` classes that differ from ``train/``'s, or
            an OOD set name used twice
        """
        from torchvision.datasets import ImageFolder

        check_transform(transform)
        self.root = os.fspath(root)
        self.transform = transform
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(
                f"folder '{self.root}' must contain train/<class>/ image folders (and optionally val/, ood/)."
            )
        self._train = ImageFolder(train_dir, transform=transform)
        #: class names (folder names of train/), index = label
        self.class_names: list[str] = list(self._train.classes)
        self.num_classes: int = len(self.class_names)
        if self.num_classes < 2:
            raise ValueError(f"folder '{train_dir}' needs at least 2 class folders; found {self.class_names}.")
        val_dir = os.path.join(self.root, "val")
        self._val = ImageFolder(val_dir, transform=transform) if os.path.isdir(val_dir) else None
        if self._val is None:
            log.warning("folder '%s' has no val/: the in-distribution test set is train/.", self.root)
        elif self._val.classes != self.class_names:
            raise ValueError(f"val/ classes {self._val.classes} differ from train/ classes {self.class_names}.")
        ood_dir = os.path.join(self.root, "ood")
        folders = _ood_folders(ood_dir)
        #: OOD set names, in the order of :meth:`test_sets`
        self.ood_names: list[str] = [name for name, _, _ in folders]
        #: ``{OOD set name: "near" | "far"}``
        self.ood_groups: dict[str, str] = {name: group for name, group, _ in folders}
        #: the OOD sets found directly under ood/ (group "far" by default)
        self.ood_flat: list[str] = [name for name, _, path in folders if os.path.dirname(path) == ood_dir]
        self._ood = [_UnlabelledImages(path, transform) for _, _, path in folders]

    def train_set(self) -> Dataset:
        """The in-distribution training images (``train/``)."""
        return self._train

    def test_sets(self, known: bool = True, unknown: bool = True) -> list[Dataset]:
        """As :meth:`pytorch_ood.benchmark.Benchmark.test_sets`: ID test + each OOD set, or either alone.

        :raises ValueError: if both ``known`` and ``unknown`` are false
        """
        if not (known or unknown):
            raise ValueError("At least one of `known` or `unknown` must be True")
        known_set = self._val if self._val is not None else self._train
        if not unknown:
            return [known_set]
        if not known:
            return list(self._ood)
        return [ConcatDataset([known_set, ood]) for ood in self._ood]
