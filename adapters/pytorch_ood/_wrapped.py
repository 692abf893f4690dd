"""pytorch-ood's standard image benchmarks with this package's split interface (:mod:`._splits`).

:class:`StandardBenchmark` wraps a built ``CIFAR10_ODIN``, ..., ``ImageNet200_OpenOOD`` (``inner``) and
keeps its train, ID test and OOD test sets. The calibration/validation split and the OOD validation set:

* OpenOOD v1.5 benchmarks: their own held-out splits, ``val_in`` (ID) and ``val_ood`` (TinyImageNet's
  validation images for CIFAR, OpenImage-O's for ImageNet), as OpenOOD tunes on them;
* ODIN benchmarks (no validation split): 10% of the training set held out (stratified, ``split_seed``), the
  rest is the training split; no OOD validation set.

Digests (``split_info``) cover the image lists (relative paths and labels) of the OpenOOD sets and the
indices of the index-based ones (CIFAR, the held-out parts).
"""

from __future__ import annotations

import os
from typing import Any

from pytorch_ood.benchmark import Benchmark
from torch.utils.data import ConcatDataset, Dataset, Subset

from ._splits import VAL_FRACTION, holdout, split_entry, validation_set_of

__all__ = ["StandardBenchmark"]

#: OpenOOD's validation OOD image list -> (set name, group)
_VAL_OOD = {"val_tin.txt": ("TinyImageNet", "near"), "val_openimage_o.txt": ("OpenImagesO", "far")}


def _members(dataset: Any, root: str | None) -> list[str]:
    """What identifies each item of ``dataset``: ``relative path<TAB>label``, ``index<TAB>label`` or the index."""
    if isinstance(dataset, Subset):
        parent = _members(dataset.dataset, root)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [m for part in dataset.datasets for m in _members(part, root)]
    files, labels = getattr(dataset, "files", None), getattr(dataset, "labels", None)
    if files is not None:
        labels = labels if labels is not None and len(labels) == len(files) else [""] * len(files)
        return [f"{os.path.relpath(f, root) if root else f}\t{y}" for f, y in zip(files, labels)]
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return [f"{i}\t{int(t)}" for i, t in enumerate(targets)]
    return [str(i) for i in range(len(dataset))]


class StandardBenchmark(Benchmark):
    """A pytorch-ood benchmark (``inner``) with ``val_set``, ``ood_val_*``, ``validation_set`` and ``split_info``.

    :param inner: the built pytorch-ood benchmark
    :param name: its name (``"CIFAR10_ODIN"``, ...)
    :param num_classes: its number of in-distribution classes
    :param groups: ``{OOD test set: "near" | "far"}``
    :param split_seed: seed of the calibration hold-out of the benchmarks that have no validation split
    """

    def __init__(self, inner: Benchmark, name: str, num_classes: int, groups: dict[str, str], split_seed: int = 0):
        self.inner, self.name, self.num_classes, self.split_seed = inner, name, int(num_classes), int(split_seed)
        self.root = getattr(inner, "root", None)
        self.ood_names: list[str] = list(inner.ood_names)
        self.ood_groups: dict[str, str] = dict(groups)
        val_in = getattr(inner, "val_in", None)
        if val_in is not None:
            self._train, self._val = inner.train_in, val_in
            self.sources = {"train": f"{name} train", "val": f"{name} validation (OpenOOD)", "test": f"{name} test"}
        else:
            targets = list(getattr(inner.train_in, "targets", []))
            val, train = holdout(targets, [VAL_FRACTION], self.split_seed)
            self._train, self._val = Subset(inner.train_in, train.tolist()), Subset(inner.train_in, val.tolist())
            self.sources = {"train": f"{name} train minus the held-out split", "test": f"{name} test",
                            "val": f"{VAL_FRACTION:.0%} of {name} train, held out (split seed {self.split_seed})"}
        val_ood = getattr(inner, "val_ood", None)
        listed = os.path.basename(getattr(val_ood, "imglist_path", "") or getattr(type(inner), "_val_ood_imglist", ""))
        name_group = _VAL_OOD.get(listed, ("val_ood", "far"))
        self._ood_val = [val_ood] if val_ood is not None else []
        self.ood_val_names: list[str] = [name_group[0]] if val_ood is not None else []
        self.ood_val_groups: dict[str, str] = {name_group[0]: name_group[1]} if val_ood is not None else {}

    def train_set(self) -> Dataset:
        """The in-distribution training split."""
        return self._train

    def val_set(self) -> Dataset:
        """The in-distribution calibration/validation split (disjoint from train and test)."""
        return self._val

    def test_sets(self, known: bool = True, unknown: bool = True) -> list[Dataset]:
        """The wrapped benchmark's ``test_sets``."""
        return self.inner.test_sets(known=known, unknown=unknown)

    def ood_val_sets(self) -> list[Dataset]:
        """The OOD validation set (OpenOOD), or none."""
        return list(self._ood_val)

    def validation_set(self) -> Dataset | None:
        """ID validation + OOD validation (OOD labelled ``-1``), for GridSearch; ``None`` without OOD validation."""
        return validation_set_of(self._val, self._ood_val)

    def split_info(self) -> dict:
        """The JSON record of the splits (:mod:`._splits`)."""
        (test,) = self.inner.test_sets(known=True, unknown=False)

        def entries(names, sets, groups) -> dict:
            return {n: split_entry(_members(d, self.root), group=groups[n]) for n, d in zip(names, sets)}

        return {
            "benchmark": self.name,
            "seed": self.split_seed,
            "classes": self.num_classes,
            "sources": dict(self.sources),
            "splits": {k: split_entry(_members(d, self.root)) for k, d in
                       (("train", self._train), ("val", self._val), ("test", test))},  # fmt: skip
            "ood_val": entries(self.ood_val_names, self._ood_val, self.ood_val_groups),
            "ood_test": entries(self.ood_names, self.inner.test_sets(known=False), self.ood_groups),
        }
