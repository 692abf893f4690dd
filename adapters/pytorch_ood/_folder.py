"""The :class:`FolderBenchmark`: a pytorch-ood ``Benchmark`` over an image folder, with explicit, disjoint splits.

Layout::

    root/train/<class>/...          in-distribution training images (at least 2 classes)
    root/val/<class>/...            optional (see the table)
    root/test/<class>/...           optional (see the table)
    root/ood/near/<name>/...        near-OOD test set <name> (images in any sub-folders)
    root/ood/far/<name>/...         far-OOD test set <name>
    root/ood/<name>/...             a test set outside near/ and far/: group "far" (logged)
    root/ood/val/near/<name>/...    near-OOD validation set <name> (also ood/val/far/<name>/, ood/val/<name>/)

``near``, ``far`` and ``val`` directly under ``ood/`` (and ``near``/``far`` under ``ood/val/``) are
reserved folder names, never set names. Which folder plays which role:

=========================  =========================================  ====================================
folders present            calibration/validation split (``val_set``)  ID test split
=========================  =========================================  ====================================
``train/`` only            10% of ``train/``, held out                 20% of ``train/``, held out
``train/`` + ``val/``      10% of ``train/``, held out                 ``val/`` (as timm's train/val)
``train/`` + ``test/``     10% of ``train/``, held out                 ``test/``
``train/ val/ test/``      ``val/``                                    ``test/``
=========================  =========================================  ====================================

Held-out splits are drawn per class (stratified) with ``split_seed``
(:func:`~._splits.holdout`); the rest of ``train/`` is the training split. No file plays two roles
(checked on the real paths, so a symbolic link into another split is refused). ``split_info()`` records
where each split came from, its size and the digest of its file list (relative paths and labels).
Files: see :mod:`._files` (hidden files and non-images skipped, links followed, every image checked with
``verify=True``). OOD images get the label ``-1``; in-distribution labels are Python ints (the class
index in ``train/``).
"""

from __future__ import annotations

import logging
import os

from pytorch_ood.benchmark import Benchmark
from torch.utils.data import Dataset

from ._checks import check_transform
from ._files import LabelledImages, UnlabelledImages, image_files, is_hidden, verify_images
from ._splits import TEST_FRACTION, VAL_FRACTION, combined_sets, holdout, split_entry, validation_set_of

__all__ = ["FolderBenchmark"]

log = logging.getLogger(__name__)

_GROUPS = ("near", "far")
_VAL = "val"


def _subfolders(folder: str) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder`` (links to folders included)."""
    return sorted(n for n in os.listdir(folder) if not is_hidden(n) and os.path.isdir(os.path.join(folder, n)))


def _ood_folders(ood_dir: str, reserved: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(name, group, path)`` of each OOD set under ``ood_dir`` (near/ and far/ first, then flat sets)."""
    if not os.path.isdir(ood_dir):
        return []
    found = []
    for group in _GROUPS:
        group_dir = os.path.join(ood_dir, group)
        if os.path.isdir(group_dir):
            found += [(n, group, os.path.join(group_dir, n)) for n in _subfolders(group_dir)]
    flat = [n for n in _subfolders(ood_dir) if n not in reserved]
    if flat:
        log.info("OOD folders directly under %s count as far-OOD: %s", ood_dir, flat)
    found += [(n, "far", os.path.join(ood_dir, n)) for n in flat]
    names = [n for n, _, _ in found]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"OOD set names must be unique within {ood_dir} (near/, far/ and flat); "
                         f"repeated: {duplicated}.")
    return found


def _labelled_files(folder: str, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image files and labels of ``folder/<class>/`` for each class (a class without images is an error)."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(os.path.join(folder, name))
        if not found:
            raise FileNotFoundError(f"class folder '{os.path.join(folder, name)}' holds no images.")
        files += found
        labels += [label] * len(found)
    return files, labels


class FolderBenchmark(Benchmark):
    """A pytorch-ood ``Benchmark`` over an image folder (see the module documentation for layout and roles).

    ``ood_names``/``ood_groups`` are the OOD test sets (near ones first), ``ood_val_names``/``ood_val_groups``
    the OOD validation sets (``ood/val/``; may be empty). ``sources`` says which folder each split came from.

    .. code-block:: python

        benchmark = FolderBenchmark("data/", transform)
        results = benchmark.evaluate(detector, loader_kwargs={"batch_size": 128})
    """

    def __init__(self, root: str | os.PathLike, transform=None, *, split_seed: int = 0, verify: bool = True):
        """
        :param root: the folder
        :param transform: callable applied to each PIL image (in its own mode: see :mod:`._files`)
        :param split_seed: seed of the held-out splits drawn from ``train/``
        :param verify: open and verify every image now (a bad file is reported before any training)
        :raises FileNotFoundError: without ``train/``, for a class or OOD folder that holds no images
        :raises ValueError: for fewer than 2 classes, ``val/``/``test/`` classes that differ from ``train/``'s,
            an OOD set name used twice in one role, a file in two roles, too few images to hold out, or an
            image that cannot be read
        """
        check_transform(transform)
        self.root, self.transform, self.split_seed = os.fspath(root), transform, int(split_seed)
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(
                f"folder '{self.root}' must contain train/<class>/ image folders (and optionally val/, test/, ood/)."
            )
        #: class names (folder names of train/), index = label
        self.class_names: list[str] = _subfolders(train_dir)
        self.num_classes: int = len(self.class_names)
        if self.num_classes < 2:
            raise ValueError(f"folder '{train_dir}' needs at least 2 class folders; found {self.class_names}.")
        members = self._id_splits()
        ood_dir = os.path.join(self.root, "ood")
        tests = _ood_folders(ood_dir, (*_GROUPS, _VAL))
        vals = _ood_folders(os.path.join(ood_dir, _VAL), _GROUPS)
        #: OOD test set names, in the order of :meth:`test_sets`; ``{name: "near" | "far"}``
        self.ood_names, self.ood_groups = [n for n, _, _ in tests], {n: g for n, g, _ in tests}
        #: OOD validation set names (``ood/val/``), in the order of :meth:`ood_val_sets`, and their groups
        self.ood_val_names, self.ood_val_groups = [n for n, _, _ in vals], {n: g for n, g, _ in vals}
        #: the OOD test sets found directly under ood/ (group "far" by default)
        self.ood_flat: list[str] = [name for name, _, path in tests if os.path.dirname(path) == ood_dir]
        self._ood = [UnlabelledImages(path, transform) for _, _, path in tests]
        self._ood_val = [UnlabelledImages(path, transform) for _, _, path in vals]
        self._id = {k: LabelledImages(*members[k], transform) for k in ("train", "val", "test")}
        self._check_disjoint()
        if verify:
            verify_images([f for d in self._all_sets() for f in d.files])
        log.info("folder %s: train = %s (%d), calibration = %s (%d), ID test = %s (%d), OOD val %s, OOD test %s",
                 self.root, self.sources["train"], len(self._id["train"]), self.sources["val"], len(self._id["val"]),
                 self.sources["test"], len(self._id["test"]), self.ood_val_names or "none", self.ood_names)  # fmt: skip

    def _id_splits(self) -> dict[str, tuple[list[str], list[int]]]:
        """Files and labels of the train/val/test splits (the table of the module documentation)."""
        read = {}
        for split in ("val", "test"):
            folder = os.path.join(self.root, split)
            if os.path.isdir(folder):
                if _subfolders(folder) != self.class_names:
                    raise ValueError(f"{split}/ classes {_subfolders(folder)} differ from train/ classes "
                                     f"{self.class_names}.")  # fmt: skip
                read[split] = _labelled_files(folder, self.class_names)
        if "test" in read:
            given, drawn = read, [] if "val" in read else ["val"]
        else:  # train/ + val/: val/ is the ID test split; train/ only: both are drawn
            given, drawn = ({"test": read["val"]}, ["val"]) if "val" in read else ({}, ["test", "val"])
        fractions = {"test": TEST_FRACTION, "val": VAL_FRACTION}
        files, labels = _labelled_files(os.path.join(self.root, "train"), self.class_names)
        parts = holdout(labels, [fractions[k] for k in drawn], self.split_seed) if drawn else [range(len(files))]
        picked = {k: ([files[i] for i in p], [labels[i] for i in p]) for k, p in zip([*drawn, "train"], parts)}
        held = f"held out (stratified, split seed {self.split_seed})"
        #: where each split came from
        self.sources: dict[str, str] = {
            "train": "train/" + (" minus the held-out splits" if drawn else ""),
            "val": f"{fractions['val']:.0%} of train/, {held}" if "val" in drawn else "val/",
            "test": f"{fractions['test']:.0%} of train/, {held}" if "test" in drawn else
            ("test/" if "test" in read else "val/"),
        }  # fmt: skip
        return {**given, **picked}

    def _all_sets(self) -> list[LabelledImages]:
        return [*self._id.values(), *self._ood_val, *self._ood]

    def _check_disjoint(self) -> None:
        owner: dict[str, str] = {}
        roles = [*self._id.items(), *zip((f"OOD validation set {n}" for n in self.ood_val_names), self._ood_val),
                 *zip((f"OOD test set {n}" for n in self.ood_names), self._ood)]  # fmt: skip
        for role, dataset in roles:
            for path in dataset.files:
                real = os.path.realpath(path)
                if owner.setdefault(real, role) != role:
                    raise ValueError(f"image '{path}' is in two roles ({owner[real]} and {role}): each image may "
                                     "play one role only.")  # fmt: skip

    # ------------------------------------------------------------------ the split interface (see ._splits)
    def train_set(self) -> Dataset:
        """The in-distribution training split."""
        return self._id["train"]

    def val_set(self) -> Dataset:
        """The in-distribution calibration/validation split (disjoint from train and test)."""
        return self._id["val"]

    def ood_val_sets(self) -> list[Dataset]:
        """The OOD validation sets (``ood/val/``), in the order of ``ood_val_names``."""
        return list(self._ood_val)

    def validation_set(self) -> Dataset | None:
        """ID validation + OOD validation sets (OOD labelled ``-1``), for GridSearch; ``None`` without ood/val/."""
        return validation_set_of(self._id["val"], self._ood_val)

    def test_sets(self, known: bool = True, unknown: bool = True) -> list[Dataset]:
        """As :meth:`pytorch_ood.benchmark.Benchmark.test_sets`: ID test + each OOD test set, or either alone.

        :raises ValueError: if both ``known`` and ``unknown`` are false
        """
        return combined_sets(self._id["test"], self._ood, known, unknown)

    def split_info(self) -> dict:
        """The JSON record of the splits (:mod:`._splits`): sources, sizes and file-list digests."""

        def lines(dataset: LabelledImages) -> list[str]:
            return [f"{os.path.relpath(f, self.root).replace(os.sep, '/')}\t{y}" for f, y in
                    zip(dataset.files, dataset.labels)]  # fmt: skip

        return {
            "benchmark": "folder",
            "seed": self.split_seed,
            "classes": list(self.class_names),
            "sources": dict(self.sources),
            "splits": {k: split_entry(lines(d)) for k, d in self._id.items()},
            "ood_val": {n: split_entry(lines(d), group=self.ood_val_groups[n]) for n, d in
                        zip(self.ood_val_names, self._ood_val)},  # fmt: skip
            "ood_test": {n: split_entry(lines(d), group=self.ood_groups[n]) for n, d in
                         zip(self.ood_names, self._ood)},  # fmt: skip
        }
