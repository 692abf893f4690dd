"""Data for the training engine: a benchmark by name or an image folder, with timm transforms.

``--data digits`` (embedded, offline), a pytorch-ood benchmark name (``cifar10_odin``, ...) with
``--data-root``, or a folder laid out as ``train/<class>/``, ``val/<class>/`` (optional) and
``ood/<name>/`` (images, any sub-folders). Training and evaluation transforms come from timm's
``create_transform``; without ``--augment`` training uses the evaluation transform.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from pytorch_ood.benchmark import Benchmark
from torch.utils.data import ConcatDataset, Dataset, Subset

from ..timm.preprocessing import eval_transform, train_transform

__all__ = ["DataBundle", "FolderBenchmark", "build_data"]

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # held out from the training split when a benchmark has no validation split


@dataclass
class DataBundle:
    """Everything the engine needs from the data side."""

    train: Dataset
    val: Dataset
    benchmark: Any  # pytorch_ood Benchmark with evaluation transforms
    fit: Dataset  # training split with evaluation transforms (for fitting post-hoc detectors)
    num_classes: int
    class_names: list[str]
    preprocessing: dict = field(default_factory=dict)


class FolderBenchmark(Benchmark):
    """A pytorch-ood ``Benchmark`` over an image folder: ``train/``, optional ``val/``, ``ood/<name>/``.

    In-distribution test data is ``val/`` when present (else ``train/``, with a warning); the engine holds
    out part of ``train/`` for calibration. OOD images get label -1.
    """

    def __init__(self, root: str, transform=None):
        from torchvision.datasets import ImageFolder

        self.root = root
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(
                f"--data folder '{root}' must contain train/<class>/ image folders (and optionally val/, ood/<name>/)."
            )
        self.transform = transform
        self._train = ImageFolder(train_dir, transform=transform)
        self.class_names = list(self._train.classes)
        self.num_classes = len(self.class_names)
        if self.num_classes < 2:
            raise ValueError(f"--data folder '{train_dir}' needs at least 2 class folders; found {self.class_names}.")
        val_dir = os.path.join(root, "val")
        self._val = ImageFolder(val_dir, transform=transform) if os.path.isdir(val_dir) else None
        if self._val is None:
            log.warning("--data folder '%s' has no val/: in-distribution test data falls back to train/.", root)
        if self._val is not None and self._val.classes != self.class_names:
            raise ValueError(f"val/ classes {self._val.classes} differ from train/ classes {self.class_names}.")
        ood_dir = os.path.join(root, "ood")
        self.ood_names = sorted(os.listdir(ood_dir)) if os.path.isdir(ood_dir) else []
        self._ood = [_UnlabelledImages(os.path.join(ood_dir, name), transform) for name in self.ood_names]

    def train_set(self):
        return self._train

    def test_sets(self, known=True, unknown=True):
        if not (known or unknown):
            raise ValueError("known and unknown cannot both be False")
        known_set = self._val if self._val is not None else self._train
        if known and not unknown:
            return [known_set]
        if unknown and not known:
            return list(self._ood)
        return [ConcatDataset([known_set, ood]) for ood in self._ood]


class _UnlabelledImages(Dataset):
    def __init__(self, folder: str, transform=None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

        self.loader, self.transform = default_loader, transform
        self.files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not self.files:
            raise FileNotFoundError(f"OOD folder '{folder}' holds no images ({', '.join(IMG_EXTENSIONS)}).")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = self.loader(self.files[index])
        return (self.transform(image) if self.transform else image), -1


def _split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * fraction)))
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def _make_benchmark(name: str, root: str | None, transform, image_size: int, channels: int):
    if os.path.isdir(name):
        return FolderBenchmark(name, transform=transform)
    from ..pytorch_ood.benchmarks import create_benchmark

    return create_benchmark(name, root=root, transform=transform, image_size=image_size, channels=channels)


def build_data(
    data: str,
    preprocessing: dict,
    *,
    data_root: str | None = None,
    augment: bool = False,
    seed: int = 0,
    max_train_samples: int | None = None,
) -> DataBundle:
    """Datasets for training, validation (calibration) and OOD evaluation.

    :param data: ``"digits"``, a pytorch-ood benchmark name, or a folder path.
    :raises FileNotFoundError: when the data is absent; ValueError for an unknown name.
    """
    channels, image_size = preprocessing["input_size"][0], preprocessing["input_size"][1]
    eval_tf = eval_transform(preprocessing)
    train_tf = train_transform(preprocessing) if augment else eval_tf
    eval_bench = _make_benchmark(data, data_root, eval_tf, image_size, channels)
    train_bench = (
        eval_bench if train_tf is eval_tf else _make_benchmark(data, data_root, train_tf, image_size, channels)
    )
    train, fit = train_bench.train_set(), eval_bench.train_set()
    val = eval_bench.val_set() if hasattr(eval_bench, "val_set") else None
    if val is None:
        train, _ = _split(train, VAL_FRACTION, seed)
        fit, val = _split(fit, VAL_FRACTION, seed)
    if max_train_samples:
        keep = list(range(min(max_train_samples, len(train))))
        train, fit = Subset(train, keep), Subset(fit, keep)
    num_classes = int(eval_bench.num_classes)
    class_names = list(getattr(eval_bench, "class_names", [str(i) for i in range(num_classes)]))
    log.info("data %s: %d train, %d val, OOD sets %s", data, len(train), len(val), list(eval_bench.ood_names))
    return DataBundle(train, val, eval_bench, fit, num_classes, class_names, dict(preprocessing))
