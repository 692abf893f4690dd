"""Data for the training engine: a benchmark by name or an image folder, with timm's transforms.

``--data digits`` (embedded, offline), a pytorch-ood benchmark name (``cifar10_odin``, ...) with
``--data-root``, or a folder laid out as ``train/<class>/``, ``val/<class>/`` (optional) and
``ood/near/<name>/``, ``ood/far/<name>/`` or ``ood/<name>/`` (far) — the pytorch-ood adapter's
:class:`~dismax_plugin.adapters.pytorch_ood.FolderBenchmark`. When a benchmark has no validation split
(folders, the standard benchmarks) :data:`VAL_FRACTION` of the training split is held out for calibration,
drawn with the run's seed. Training and evaluation transforms come from timm's ``create_transform``
(:mod:`dismax_plugin.adapters.timm.preprocessing`); without ``--augment`` training uses the evaluation
transform.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..pytorch_ood import FolderBenchmark, create_benchmark
from ..timm.preprocessing import eval_transform, train_transform

__all__ = ["VAL_FRACTION", "DataBundle", "build_data", "log_inputs"]

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # held out from the training split when a benchmark has no validation split


@dataclass
class DataBundle:
    """Everything the engine needs from the data side."""

    train: Dataset  # training split with the training transform
    val: Dataset  # in-distribution validation split (calibration, thresholds)
    benchmark: Any  # pytorch_ood Benchmark with evaluation transforms (ID test set + OOD sets)
    fit: Dataset  # training split with evaluation transforms (for fitting post-hoc detectors)
    num_classes: int
    class_names: list[str]
    preprocessing: dict = field(default_factory=dict)


def _split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(rest, held_out)``: ``round(fraction * n)`` (at least 1) samples drawn with ``seed`` are held out."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * fraction)))
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def _make_benchmark(name: str, root: str | None, transform, image_size: int, channels: int, augment: bool):
    if os.path.isdir(name):
        return FolderBenchmark(name, transform=transform)
    # the embedded digits are small: keep their transformed items unless the transform augments
    options = {"memoize": not augment} if name == "digits" else {}
    return create_benchmark(name, root=root, transform=transform, image_size=image_size, channels=channels, **options)


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
    :param preprocessing: the timm data config of the model (``input_size``, mean/std, interpolation...).
    :param augment: timm's training augmentation for the training split.
    :param seed: draws the validation hold-out when the benchmark has no validation split.
    :param max_train_samples: keep only the first N training samples.
    :raises FileNotFoundError: when the data is absent; ValueError for an unknown name.
    """
    channels, image_size = preprocessing["input_size"][0], preprocessing["input_size"][1]
    eval_tf = eval_transform(preprocessing)
    train_tf = train_transform(preprocessing) if augment else eval_tf
    eval_bench = _make_benchmark(data, data_root, eval_tf, image_size, channels, augment=False)
    train_bench = eval_bench if not augment else _make_benchmark(data, data_root, train_tf, image_size, channels, True)
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


def log_inputs(tracker, data: DataBundle) -> None:
    """Log the in-distribution test set and each OOD set as tracked inputs (agreed interfaces 4 and 5).

    Contexts: ``"test"`` for the in-distribution test set, ``"ood-near"``/``"ood-far"`` from the
    benchmark's ``ood_groups``.
    """
    benchmark = data.benchmark
    tracker.log_input("in-distribution", benchmark.test_sets(known=True, unknown=False)[0], "test")
    for name, dataset in zip(benchmark.ood_names, benchmark.test_sets(known=False, unknown=True)):
        tracker.log_input(name, dataset, f"ood-{benchmark.ood_groups[name]}")
