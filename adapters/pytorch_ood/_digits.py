r"""The offline :class:`DigitsBenchmark` on scikit-learn's bundled digits (no network: scikit-learn ships every image).

* In-distribution: the digits 0–5 of :func:`sklearn.datasets.load_digits` (1083 images of
  :math:`8 \times 8` pixels), split per class with a fixed seed into train 650, validation 108 and
  test 325 images (10% validation and 30% test, stratified: :func:`~._splits.holdout`).
* OOD sources, all labelled ``-1``; each is split with a fixed seed into a validation part (20%,
  ``ood_val_names``, for choices) and a test part (80%, ``ood_names``, for reported numbers):

  ==================  =====  =========  ======  ======================================================
  name                all    val        test    content
  ==================  =====  =========  ======  ======================================================
  ``digits_6_9``      714    143        571     the digits 6–9 of the same dataset (group ``near``)
  ``image_patches``   500    100        400     grey crops of ``china.jpg``/``flower.jpg`` from
                                                :func:`sklearn.datasets.load_sample_images` (``far``)
  ``gaussian_noise``  500    100        400     pytorch-ood :class:`~pytorch_ood.dataset.img.GaussianNoise` (``far``)
  ``uniform_noise``   500    100        400     pytorch-ood :class:`~pytorch_ood.dataset.img.UniformNoise` (``far``)
  ==================  =====  =========  ======  ======================================================

  (the last three have ``ood_size`` images in all). Every OOD image is rendered in the digits' own format
  (:math:`8 \times 8` grey levels 0–16) and then goes through the same pipeline as the digits, so the
  sets differ in content, not in resolution, quantisation or colour. The noise sets are drawn once with
  fixed seeds, so every pass over them sees the same images.

The splits never change (they do not depend on any run's seed); :meth:`DigitsBenchmark.split_info` records
them with their indices. Items are ``(image, label)`` with Python-int labels. The :math:`8 \times 8` image is
resized (bilinear) to ``image_size`` and given ``channels`` identical channels; without a ``transform`` it
becomes a float tensor :math:`channels \times image\_size \times image\_size` in :math:`[0, 1]`, otherwise
the ``transform`` receives that PIL image (mode ``"L"`` or ``"RGB"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_ood.api import BenchmarkInfo, Paper, Task
from pytorch_ood.benchmark import Benchmark
from torch.utils.data import Dataset

from ._checks import check_channels, check_positive, check_transform
from ._splits import combined_sets, holdout, split_entry, validation_set_of

__all__ = ["DigitsBenchmark"]

log = logging.getLogger(__name__)

_LEVELS = 16  # the digits have grey levels 0..16
_SPLIT_SEED = 0
_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.3
_OOD_VAL_FRACTION = 0.2  # of each OOD source
_PATCH_SEED, _GAUSSIAN_SEED, _UNIFORM_SEED = 1, 2, 3


def _to_digit_levels(gray: np.ndarray) -> np.ndarray:
    """Quantise 0..255 grey values to the digits' 17 levels, back on the 0..255 scale (uint8)."""
    levels = np.rint(gray.astype(np.float64) * _LEVELS / 255.0)
    return np.rint(levels * 255.0 / _LEVELS).astype(np.uint8)
_MEMO_BYTES = 256 * 2**20  # a memoized split keeps at most this many bytes of tensors


class _DigitsFormatImages(Dataset):
    """:math:`8 \\times 8` grey images (uint8) rendered to ``image_size`` and ``channels``.

    With ``memoize``, each item is kept after its first read while the whole split fits in
    :data:`_MEMO_BYTES` (judged on the first item), so epochs and models after the first skip the PIL work.
    """

    def __init__(
        self, images: np.ndarray, labels: Sequence[int], image_size: int, channels: int, transform, memoize=False
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = [int(label) for label in labels]
        self.image_size = image_size
        self.channels = channels
        self.transform = transform
        self._memo: dict[int, tuple[Any, int]] | None = {} if memoize else None

    def __len__(self) -> int:
        return len(self.labels)

    def render(self, index: int) -> Image.Image:
        """The PIL image of item ``index`` (mode ``"L"`` or ``"RGB"``, ``image_size`` square)."""
        image = Image.fromarray(self.images[index], mode="L")
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        return image.convert("RGB") if self.channels == 3 else image

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self._memo is not None and index in self._memo:
            return self._memo[index]
        item = self._item(index)
        if self._memo is not None:
            size = item[0].nbytes if isinstance(item[0], torch.Tensor) else _MEMO_BYTES
            if size * len(self) <= _MEMO_BYTES:
                self._memo[index] = item
            else:
                self._memo = None
        return item

    def _item(self, index: int) -> tuple[Any, int]:
        image = self.render(index)
        if self.transform is not None:
            return self.transform(image), self.labels[index]
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy())
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
        return tensor, self.labels[index]


def _split_indices(targets: np.ndarray, classes: Sequence[int]) -> dict[str, np.ndarray]:
    """Indices into the digits of the train/val/test splits of the in-distribution ``classes``."""
    members = np.flatnonzero(np.isin(targets, list(classes)))
    test, val, train = holdout(targets[members], [_TEST_FRACTION, _VAL_FRACTION], _SPLIT_SEED)
    return {"train": members[train], "val": members[val], "test": members[test]}


def _ood_parts(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Positions of the validation and test parts of one OOD source (stratified by ``labels``)."""
    if len(labels) < 2:
        return {"val": np.arange(0), "test": np.arange(len(labels))}
    val, test = holdout(labels, [_OOD_VAL_FRACTION], _SPLIT_SEED)
    return {"val": val, "test": test}


def _image_patches(count: int) -> np.ndarray:
    """``count`` random grey crops (16–96 px) of scikit-learn's sample images, reduced to 8x8."""
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(image).convert("L") for image in load_sample_images().images]
    rng = np.random.default_rng(_PATCH_SEED)
    patches = np.empty((count, 8, 8), dtype=np.uint8)
    for i in range(count):
        source = sources[i % len(sources)]
        size = int(rng.integers(16, 97))
        left = int(rng.integers(0, source.width - size + 1))
        top = int(rng.integers(0, source.height - size + 1))
        crop = source.crop((left, top, left + size, top + size)).resize((8, 8), Image.BOX)
        patches[i] = np.asarray(crop)
    return _to_digit_levels(patches)


def _noise(kind: str, count: int) -> np.ndarray:
    """``count`` images of pytorch-ood's noise dataset ``kind`` at 8x8x1, drawn once."""
    from pytorch_ood.dataset.img import GaussianNoise, UniformNoise

    if kind == "gaussian":
        dataset = GaussianNoise(count, size=(8, 8, 1), seed=_GAUSSIAN_SEED)
    else:
        dataset = UniformNoise(count, size=(8, 8, 1), seed=_UNIFORM_SEED)
    images = np.stack([np.asarray(dataset[i][0], dtype=np.uint8) for i in range(count)])
    return _to_digit_levels(images)


def _ood_sources(images: np.ndarray, targets: np.ndarray, ood_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(8x8 images, stratification labels)`` of each OOD source, in the order of ``ood_names``; the digits
    6–9 carry their digit, the synthetic sources one label."""
    near = np.flatnonzero(targets >= DigitsBenchmark.num_classes)
    synthetic = [_image_patches(ood_size), _noise("gaussian", ood_size), _noise("uniform", ood_size)]
    return [(images[near], targets[near]), *((a, np.zeros(len(a), dtype=np.int64)) for a in synthetic)]


class DigitsBenchmark(Benchmark):
    """Offline OOD benchmark on scikit-learn's bundled digits (see the module documentation for the sets).

    In-distribution: digits 0–5 (train 650, validation 108, test 325). ``ood_names`` (test) and
    ``ood_val_names`` (validation) are ``digits_6_9`` (571 test / 143 validation), ``image_patches``,
    ``gaussian_noise`` and ``uniform_noise`` (80% / 20% of ``ood_size``: 400 / 100 by default). OOD labels
    are ``-1``.

    .. code-block:: python

        benchmark = DigitsBenchmark()
        model = timm.create_model("resnet10t", num_classes=DigitsBenchmark.num_classes)
        results = benchmark.evaluate(DisMaxDetector(model.eval()), loader_kwargs={"batch_size": 256})
    """

    info = BenchmarkInfo(
        # No publication defines this protocol; the record names the source of the in-distribution data.
        paper=Paper(
            title="Optical Recognition of Handwritten Digits",
            venue="UCI Machine Learning Repository",
            year=1998,
            url="https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits",
        ),
        tasks={Task.CLASSIFICATION},
    )

    #: number of in-distribution classes (digits 0–5)
    num_classes: int = 6
    #: names of the in-distribution classes, index = label
    class_names: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        image_size: int = 32,
        channels: int = 3,
        *,
        ood_size: int = 500,
        memoize: bool = False,
    ):
        """
        :param root: unused (scikit-learn ships the data); accepted for the signature of the other benchmarks
        :param transform: callable applied to each PIL image (mode ``"L"`` or ``"RGB"``, ``image_size`` square);
            ``None`` gives float tensors :math:`channels \\times image\\_size \\times image\\_size` in :math:`[0, 1]`
        :param image_size: side of the square images, at least 8
        :param channels: 1 (grey) or 3 (the grey value repeated, as RGB models expect)
        :param ood_size: number of images of each synthetic or patch OOD source (validation and test parts)
        :param memoize: keep each transformed item after its first read (up to 256 MiB per split). Only for a
            deterministic ``transform``: an augmenting one would repeat its first draw
        :raises TypeError/ValueError: for a bad ``transform``, ``image_size``, ``channels`` or ``ood_size``
        """
        from sklearn.datasets import load_digits

        check_transform(transform)
        check_positive("image_size", image_size, integer=True, minimum=8)
        check_channels(channels)
        check_positive("ood_size", ood_size, integer=True, minimum=1)
        self.root = root
        self.transform = transform
        self.image_size = image_size
        self.channels = channels

        digits = load_digits()
        targets = digits.target.astype(np.int64)
        images = np.rint(digits.images * 255.0 / _LEVELS).astype(np.uint8)

        #: indices into ``sklearn.datasets.load_digits()`` of the in-distribution splits
        self.indices: dict[str, np.ndarray] = _split_indices(targets, range(self.num_classes))

        def make(array: np.ndarray, labels) -> _DigitsFormatImages:
            return _DigitsFormatImages(array, labels, image_size, channels, transform, memoize)

        self.train_in = make(images[self.indices["train"]], targets[self.indices["train"]])
        self.val_in = make(images[self.indices["val"]], targets[self.indices["val"]])
        self.test_in = make(images[self.indices["test"]], targets[self.indices["test"]])

        #: OOD set names (the same for the test and the validation parts), in the order of :meth:`test_sets`
        self.ood_names: list[str] = ["digits_6_9", "image_patches", "gaussian_noise", "uniform_noise"]
        #: group of each OOD set: the unseen digits are near-OOD, the rest far-OOD
        self.ood_groups: dict[str, str] = {name: "far" for name in self.ood_names} | {"digits_6_9": "near"}
        self._split_ood(_ood_sources(images, targets, ood_size), make)
        self._ood_size, self._near_indices = ood_size, np.flatnonzero(targets >= self.num_classes)
        log.debug("DigitsBenchmark: train %d, val %d, test %d, OOD test %s, OOD val %s", len(self.train_in),
                  len(self.val_in), len(self.test_in), {n: len(d) for n, d in zip(self.ood_names, self.test_oods)},
                  {n: len(d) for n, d in zip(self.ood_val_names, self.val_oods)})  # fmt: skip

    def _split_ood(self, sources: list[tuple[np.ndarray, np.ndarray]], make) -> None:
        """The validation and test parts of each OOD source (``ood_indices``, ``test_oods``, ``val_oods``)."""
        #: positions within each OOD source of its validation and test parts
        self.ood_indices: dict[str, dict[str, np.ndarray]] = {
            name: _ood_parts(labels) for name, (_, labels) in zip(self.ood_names, sources)
        }
        parts = {key: [make(a[self.ood_indices[n][key]], [-1] * len(self.ood_indices[n][key]))
                       for n, (a, _) in zip(self.ood_names, sources)] for key in ("val", "test")}  # fmt: skip
        self.test_oods: list[Dataset] = parts["test"]
        #: the OOD validation sets (sources too small to split have none)
        self.ood_val_names: list[str] = [n for n, d in zip(self.ood_names, parts["val"]) if len(d)]
        self.ood_val_groups: dict[str, str] = {n: self.ood_groups[n] for n in self.ood_val_names}
        self.val_oods: list[Dataset] = [d for d in parts["val"] if len(d)]

    def train_set(self) -> Dataset:
        """In-distribution training set (650 images of the digits 0–5)."""
        return self.train_in

    def val_set(self) -> Dataset:
        """Held-out in-distribution set (108 images), disjoint from train and test: for temperature
        calibration and OOD thresholds."""
        return self.val_in

    def ood_val_sets(self) -> list[Dataset]:
        """The OOD validation sets (20% of each source), in the order of ``ood_val_names``."""
        return list(self.val_oods)

    def validation_set(self) -> Dataset | None:
        """ID validation (108) + every OOD validation set (labelled ``-1``): the ``val_loader`` of GridSearch."""
        return validation_set_of(self.val_in, self.val_oods)

    def split_info(self) -> dict:
        """The JSON record of the splits (:mod:`._splits`), with their indices: ID splits and ``digits_6_9``
        into ``load_digits()``, the synthetic sets as positions among the ``ood_size`` generated images."""

        def ood(key: str, names: list[str]) -> dict:
            entries = {}
            for name in names:
                positions = self.ood_indices[name][key]
                indices = self._near_indices[positions] if name == "digits_6_9" else positions
                entries[name] = split_entry(indices.tolist(), group=self.ood_groups[name], indices=indices.tolist())
            return entries

        return {
            "benchmark": "digits",
            "seed": _SPLIT_SEED,
            "classes": list(self.class_names),
            "sources": {"train": "digits 0-5, 60%", "val": "digits 0-5, 10%", "test": "digits 0-5, 30%"},
            "splits": {k: split_entry(v.tolist(), indices=v.tolist()) for k, v in self.indices.items()},
            "ood_size": self._ood_size,
            "ood_val": ood("val", self.ood_val_names),
            "ood_test": ood("test", self.ood_names),
        }

    def test_sets(self, known: bool = True, unknown: bool = True) -> list[Dataset]:
        """
        :param known: include the in-distribution test set (325 images)
        :param unknown: include the OOD test sets (the test parts of the OOD sources)
        :return: with ``known`` and ``unknown``, one dataset per entry of ``ood_names`` that combines the ID
            test set with that OOD set; with ``unknown`` only, the OOD sets in the order of ``ood_names``;
            with ``known`` only, the ID test set, once. OOD samples are labelled ``-1``.
        :raises ValueError: if both ``known`` and ``unknown`` are false
        """
        return combined_sets(self.test_in, self.test_oods, known, unknown)
