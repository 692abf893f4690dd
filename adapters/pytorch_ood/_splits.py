r"""The split interface every benchmark of this package offers, and the helpers that draw, describe and check splits.

Every image plays exactly one role:

=================  ==========================================  ===============================================
role               interface                                   used for
=================  ==========================================  ===============================================
train              ``train_set()``                             training; fitting post-hoc detectors
calibration /      ``val_set()``                               temperature, thresholds, TemperatureScaling /
validation (ID)                                                KLMatching fits, the ID half of every choice
ID test            ``test_sets(known=True, unknown=False)``    reported accuracy, ECE, the ID half of OOD metrics
OOD validation     ``ood_val_names``, ``ood_val_groups``,      the native score (``calibrate --score auto``),
                   ``ood_val_sets()`` (may be empty)           ``GridSearch``, the "best" marks of reports
OOD test           ``ood_names``, ``ood_groups``,              reported OOD metrics
                   ``test_sets()`` (pytorch-ood's)
=================  ==========================================  ===============================================

``validation_set()`` is the ID validation split followed by every OOD validation set (OOD labelled ``-1``),
the ``val_loader`` of :class:`pytorch_ood.utils.GridSearch`; it is ``None`` without OOD validation sets.
``split_info()`` is a JSON-serialisable record of the splits::

    {"benchmark": "folder", "seed": 0, "classes": [...],
     "sources": {"train": "train/", "val": "train/ (10% held out)", "test": "val/", ...},
     "splits": {"train": {"size": 216, "digest": "..."}, "val": {...}, "test": {...}},
     "ood_val": {name: {"size", "digest", "group"}}, "ood_test": {name: {"size", "digest", "group"}}}

A digest is the sha256 (16 hex digits) of the split's members in order: relative file paths and labels for
folders and image lists, indices for index-based datasets (the digits also store their indices). The
engine saves the record with the model and refuses data whose record differs (:func:`check_split`).

:func:`holdout` draws stratified, seeded hold-outs (the one definition of a drawn split);
:func:`describe_split` turns a record into the lines reports print; :class:`ValidationView` is a
pytorch-ood ``Benchmark`` over the validation splits, so validation is scored exactly as the test sets are.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pytorch_ood.benchmark import Benchmark
from torch.utils.data import ConcatDataset, Dataset

__all__ = [
    "SPLIT_KEYS",
    "TEST_FRACTION",
    "VAL_FRACTION",
    "ValidationView",
    "check_split",
    "describe_split",
    "digest",
    "holdout",
    "split_entry",
    "validation_set_of",
]

#: fraction of ``train/`` held out as the calibration/validation split when a benchmark has none
VAL_FRACTION = 0.1
#: fraction of ``train/`` held out as the ID test split when a folder has none
TEST_FRACTION = 0.2
#: the in-distribution splits of a record, in order
SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")


def digest(members: Iterable[Any]) -> str:
    """sha256 (first 16 hex digits) of ``members`` (paths, ``path\\tlabel`` lines or indices), in order."""
    hasher = hashlib.sha256()
    for member in members:
        hasher.update(str(member).encode("utf-8", "surrogateescape") + b"\n")
    return hasher.hexdigest()[:16]


def split_entry(members: Sequence[Any], **extra) -> dict:
    """``{"size": len(members), "digest": digest(members), **extra}``: one split of a record."""
    return {"size": len(members), "digest": digest(members), **extra}


def _allocate(quota: dict, available: dict, want: int) -> dict:
    """Integer counts per class close to ``quota`` (largest remainder), summing to ``want`` where possible."""
    counts = {c: min(math.floor(q), available[c]) for c, q in quota.items()}
    ranked = sorted(quota, key=lambda c: (-(quota[c] - math.floor(quota[c])), c))
    missing = want - sum(counts.values())
    while missing > 0 and any(counts[c] < available[c] for c in ranked):
        for c in ranked:
            if missing and counts[c] < available[c]:
                counts[c] += 1
                missing -= 1
    return counts


def holdout(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Stratified, seeded hold-outs of a labelled set: ``[part for each fraction..., rest]`` (sorted indices).

    Part ``k`` holds ``max(1, round(fractions[k] * N))`` items, spread over the classes in proportion to
    their sizes (largest remainder, ties to the smaller label); every class keeps at least one item in the
    rest. Within each class the items are taken in the order of one seeded permutation, so the draw depends
    only on the labels, the fractions and ``seed``.

    :param labels: class index of each item, length :math:`N`
    :param fractions: fraction of :math:`N` of each part, each in (0, 1), summing to less than 1
    :param seed: seed of :func:`numpy.random.default_rng`
    :raises ValueError: for bad fractions, or when a part would be empty (too few items)
    """
    labels = np.asarray(labels, dtype=np.int64)
    if any(not 0 < f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"fractions must each be in (0, 1) and sum to less than 1; got {list(fractions)}.")
    rng = np.random.default_rng(seed)
    classes = [int(c) for c in np.unique(labels)]
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    taken = dict.fromkeys(classes, 0)
    parts = []
    for fraction in fractions:
        available = {c: len(order[c]) - 1 - taken[c] for c in classes}
        quota = {c: fraction * len(order[c]) for c in classes}
        counts = _allocate(quota, available, max(1, int(round(fraction * len(labels)))))
        if not sum(counts.values()):
            raise ValueError(
                f"{len(labels)} images in {len(classes)} classes are too few to hold out {fraction:.0%} of them "
                "(every class keeps one image for training)."
            )
        parts.append(np.sort(np.concatenate([order[c][taken[c] : taken[c] + counts[c]] for c in classes])))
        taken = {c: taken[c] + counts[c] for c in classes}
    parts.append(np.sort(np.concatenate([order[c][taken[c] :] for c in classes])))
    return parts


def _ood_differences(stored: dict, current: dict) -> list[str]:
    return [
        f"{name}: {current.get(name, {}).get('size', 'absent')} images"
        f" where the model's has {entry['size']}"
        for name, entry in stored.items()
        if {k: current.get(name, {}).get(k) for k in ("size", "digest")} != {k: entry[k] for k in ("size", "digest")}
    ] + [f"{name}: not in the model's record" for name in current if name not in stored]


def check_split(stored: dict, current: dict) -> list[str]:
    """Compare the record ``current`` (the data at hand) with ``stored`` (saved with the model).

    The benchmark kind, the classes, the ID splits and the OOD validation sets must be the same (same sizes
    and digests): they decided the model's training, calibration and choices. OOD *test* sets may be added
    or changed (the model never saw them): their differences are returned, for the log.

    :return: one line per OOD test set that differs (empty when all match)
    :raises ValueError: naming what differs, when the ID splits, classes or OOD validation sets differ
    """
    problems = []
    for key in ("benchmark", "classes"):
        if stored.get(key) != current.get(key):
            problems.append(f"{key} {current.get(key)!r} where the model's is {stored.get(key)!r}")
    for key in SPLIT_KEYS:
        old, new = stored.get("splits", {}).get(key, {}), current.get("splits", {}).get(key, {})
        if (old.get("size"), old.get("digest")) != (new.get("size"), new.get("digest")):
            problems.append(
                f"{key} split has {new.get('size')} images (digest {new.get('digest')}) where the model's had "
                f"{old.get('size')} ({old.get('digest')})"
            )
    problems += [f"OOD validation {line}" for line in _ood_differences(stored.get("ood_val", {}),
                                                                         current.get("ood_val", {}))]  # fmt: skip
    if problems:
        raise ValueError(
            "the data does not match the split stored with the model (split seed "
            f"{stored.get('seed')}): " + "; ".join(problems) + ". Use the data the model was trained on."
        )
    return _ood_differences(stored.get("ood_test", {}), current.get("ood_test", {}))


def _sets(entries: dict) -> str:
    if not entries:
        return "none"
    return ", ".join(f"{name} ({entry.get('group', 'far')}, {entry['size']})" for name, entry in entries.items())


def describe_split(info: dict) -> list[str]:
    """The lines a report prints about the record ``info``: where each split came from and its size (and how
    many training images were used, when a record says ``train_used``)."""
    sources, splits = info.get("sources", {}), info.get("splits", {})
    seed = info.get("seed")

    def part(key: str) -> str:
        return f"{sources.get(key, key)}, {splits.get(key, {}).get('size', '?')} images"

    used = info.get("train_used")
    train = part("train") + (f" ({used} used)" if used is not None and used != splits.get("train", {}).get("size")
                             else "")  # fmt: skip
    return [
        f"splits of {info.get('benchmark')} (split seed {seed}): train = {train}; "
        f"calibration/validation = {part('val')}; ID test = {part('test')}",
        f"OOD validation sets: {_sets(info.get('ood_val', {}))}; OOD test sets: {_sets(info.get('ood_test', {}))}",
    ]


def combined_sets(id_set: Dataset, ood_sets: Sequence[Dataset], known: bool, unknown: bool) -> list[Dataset]:
    """pytorch-ood's ``Benchmark.test_sets`` rule on one ID set and its OOD sets: with ``known`` and ``unknown``,
    ``ConcatDataset([id_set, ood])`` per OOD set; with ``known`` only, ``[id_set]``; with ``unknown`` only, the
    OOD sets.

    :raises ValueError: if both ``known`` and ``unknown`` are false
    """
    if known and unknown:
        return [ConcatDataset([id_set, ood]) for ood in ood_sets]
    if known:
        return [id_set]
    if unknown:
        return list(ood_sets)
    raise ValueError("At least one of `known` or `unknown` must be True")


def validation_set_of(val: Dataset, ood_val: Sequence[Dataset]) -> Dataset | None:
    """``val`` followed by every set of ``ood_val`` (OOD labelled < 0), or ``None`` without ``ood_val``."""
    return ConcatDataset([val, *ood_val]) if ood_val else None


class ValidationView(Benchmark):
    """The validation splits of ``benchmark`` as a pytorch-ood ``Benchmark``: its ``test_sets`` pair the ID
    validation split (``val_set()``) with each OOD validation set (``ood_val_sets()``), its ``ood_names`` and
    ``ood_groups`` are the benchmark's ``ood_val_names`` and ``ood_val_groups``.

    :param benchmark: a benchmark with the interface of this module (at least one OOD validation set)
    :raises ValueError: when ``benchmark`` has no OOD validation set
    """

    def __init__(self, benchmark):
        self.source = benchmark
        self.ood_names: list[str] = list(getattr(benchmark, "ood_val_names", []))
        if not self.ood_names:
            raise ValueError(f"benchmark {type(benchmark).__name__} has no OOD validation sets.")
        self.ood_groups: dict[str, str] = dict(benchmark.ood_val_groups)
        self._id, self._ood = benchmark.val_set(), list(benchmark.ood_val_sets())

    def train_set(self) -> Dataset:
        return self.source.train_set()

    def test_sets(self, known: bool = True, unknown: bool = True) -> list[Dataset]:
        """As pytorch-ood's ``test_sets``, on the validation splits."""
        return combined_sets(self._id, self._ood, known, unknown)
