"""Data for the training engine: a benchmark by name or an image folder, with timm's transforms and its splits.

``--data digits`` (embedded, offline), a pytorch-ood benchmark name (``cifar10_odin``, ...) with
``--data-root``, or a folder laid out as ``train/<class>/``, ``val/<class>/``, ``test/<class>/`` (both
optional) and ``ood/near/<name>/``, ``ood/far/<name>/``, ``ood/<name>/`` (far), ``ood/val/...`` (OOD
validation) — the pytorch-ood adapter's :class:`~dismax_plugin.adapters.pytorch_ood.FolderBenchmark`. A
benchmark name wins over a folder of the same name unless the path is explicit (``./digits``).

The splits are the benchmark's (the pytorch-ood adapter's split interface, one definition): train,
calibration/validation (``val``: temperature, thresholds, score choice), ID test, OOD validation and OOD
test. Splits drawn from training data (folders without ``val/``/``test/``, ODIN's calibration hold-out) use
the split seed — the run's ``--seed`` when training, the seed stored with the model when a saved model is
evaluated or calibrated (``split=`` of :func:`build_data`: the data must then match the stored record, see
:func:`~dismax_plugin.adapters.pytorch_ood.check_split`). Training and evaluation transforms come from
timm's ``create_transform`` (:mod:`dismax_plugin.adapters.timm.preprocessing`); without ``--augment``
training uses the evaluation transform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset, Subset

from ..pytorch_ood import check_split, create_benchmark, describe_split
from ..timm.preprocessing import eval_transform, train_transform

__all__ = ["DataBundle", "build_data", "log_inputs"]

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Everything the engine needs from the data side."""

    train: Dataset  # training split with the training transform
    val: Dataset  # in-distribution calibration/validation split (temperature, thresholds, choices)
    benchmark: Any  # the benchmark with evaluation transforms (ID test, OOD test and OOD validation sets)
    fit: Dataset  # training split with evaluation transforms (for fitting post-hoc detectors)
    num_classes: int
    class_names: list[str]
    preprocessing: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)  # the benchmark's split record (+ "train_used")


def _make_benchmark(name: str, root: str | None, transform, image_size: int, channels: int, *, augment: bool,
                    split_seed: int, verify: bool):  # fmt: skip
    # the embedded digits are small: keep their transformed items unless the transform augments
    options = {"memoize": not augment} if name.strip().lower() == "digits" else {}
    return create_benchmark(name, root=root, transform=transform, image_size=image_size, channels=channels,
                            split_seed=split_seed, verify=verify, **options)  # fmt: skip


def build_data(
    data: str,
    preprocessing: dict,
    *,
    data_root: str | None = None,
    augment: bool = False,
    seed: int = 0,
    max_train_samples: int | None = None,
    split: dict | None = None,
) -> DataBundle:
    """Datasets for training, calibration/validation and OOD evaluation, with their split record.

    :param data: ``"digits"``, a pytorch-ood benchmark name, or a folder path.
    :param preprocessing: the timm data config of the model (``input_size``, mean/std, interpolation...).
    :param augment: timm's training augmentation for the training split.
    :param seed: the split seed of splits drawn from training data (a training run passes its ``--seed``).
    :param max_train_samples: keep only the first N training samples.
    :param split: the split record saved with a model: its seed replaces ``seed`` and the data must match it.
    :raises FileNotFoundError: when the data is absent; ValueError for an unknown name, an unreadable image,
        no OOD test set, or data that does not match ``split``.
    """
    channels, image_size = preprocessing["input_size"][0], preprocessing["input_size"][1]
    split_seed = int(split["seed"]) if split and split.get("seed") is not None else seed
    eval_tf = eval_transform(preprocessing)
    common = {"image_size": image_size, "channels": channels, "split_seed": split_seed}
    eval_bench = _make_benchmark(data, data_root, eval_tf, augment=False, verify=True, **common)
    train_bench = eval_bench
    if augment:
        train_bench = _make_benchmark(data, data_root, train_transform(preprocessing), augment=True, verify=False,
                                      **common)  # fmt: skip
    if not list(getattr(eval_bench, "ood_names", None) or []):
        raise ValueError("the data has no OOD test sets (a folder needs ood/near/<name>/ or ood/far/<name>/).")
    info = eval_bench.split_info()
    if split:
        for line in check_split(split, info):
            log.info("OOD test set differs from the one at training (allowed: the model never saw it): %s", line)
    train, fit, val = train_bench.train_set(), eval_bench.train_set(), eval_bench.val_set()
    if max_train_samples:
        keep = list(range(min(max_train_samples, len(train))))
        train, fit = Subset(train, keep), Subset(fit, keep)
    num_classes = int(eval_bench.num_classes)
    class_names = list(getattr(eval_bench, "class_names", [str(i) for i in range(num_classes)]))
    info["train_used"] = len(train)
    for line in describe_split(info):
        log.info("data %s: %s", data, line)
    return DataBundle(train, val, eval_bench, fit, num_classes, class_names, dict(preprocessing), info)


def _split_params(info: dict) -> dict[str, str]:
    """The split record as run parameters: seed, and source and size of each split."""
    sources, splits = info.get("sources", {}), info.get("splits", {})
    params = {"split.benchmark": str(info.get("benchmark")), "split.seed": str(info.get("seed"))}
    for key in ("train", "val", "test"):
        params[f"split.{key}"] = f"{sources.get(key, key)} ({splits.get(key, {}).get('size')})"
    for key in ("ood_val", "ood_test"):
        params[f"split.{key}"] = ", ".join(f"{n} ({e['size']})" for n, e in info.get(key, {}).items()) or "none"
    return params


def log_inputs(tracker, data: DataBundle) -> None:
    """Log the in-distribution test set and each OOD test set as tracked inputs (agreed interfaces 4 and 5),
    and the split record (seed, sources and sizes) as ``split.*`` parameters.

    Contexts: ``"test"`` for the in-distribution test set, ``"ood-near"``/``"ood-far"`` from the
    benchmark's ``ood_groups``.
    """
    benchmark = data.benchmark
    tracker.log_input("in-distribution", benchmark.test_sets(known=True, unknown=False)[0], "test")
    for name, dataset in zip(benchmark.ood_names, benchmark.test_sets(known=False, unknown=True)):
        tracker.log_input(name, dataset, f"ood-{benchmark.ood_groups[name]}")
    if data.split:
        tracker.log_params(_split_params(data.split))
