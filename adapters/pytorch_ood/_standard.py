"""Benchmarks by name: ``"digits"``, a folder, or a standard pytorch-ood benchmark built from data on disk only.

:func:`create_benchmark` builds ``"digits"`` (:class:`DigitsBenchmark`), an image folder
(:class:`FolderBenchmark`) or one of pytorch-ood's image benchmarks: ``CIFAR10_ODIN``, ``CIFAR100_ODIN``,
``CIFAR10_OpenOOD``, ``CIFAR100_OpenOOD``, ``ImageNet_OpenOOD``, ``ImageNet200_OpenOOD`` (wrapped in a
:class:`~._wrapped.StandardBenchmark`). Every benchmark it returns has the split interface of
:mod:`._splits` (``train_set``, ``val_set``, ``test_sets``, ``ood_names``/``ood_groups``,
``ood_val_names``/``ood_val_groups``/``ood_val_sets``, ``validation_set``, ``split_info``) and
``num_classes``. Nothing is ever downloaded: the ODIN files are checked before construction, the OpenOOD
benchmarks are built with ``download=False`` and a sample of the listed images is checked; a
:class:`FileNotFoundError` names what is missing.

**Names win over folders**: ``"digits"`` (or another name of :data:`BENCHMARK_NAMES`, any case) is the
benchmark even when a folder of that name is in the working directory (a log line says the folder is not
used); the folder is taken when the path is explicit: ``./digits``, a path with a separator, or absolute.

Groups of the standard benchmarks (:data:`STANDARD_GROUPS`): the OpenOOD v1.5 near/far lists; for the ODIN
benchmarks, which define no groups, TinyImageNet is near-OOD (as OpenOOD v1.5 treats it for CIFAR) and
LSUN and the noise sets are far-OOD. pytorch-ood's SSB benchmarks are not offered: they always download
a class-split file and read it with ``pickle.load``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from pytorch_ood.benchmark import Benchmark

from ._checks import check_channels, check_positive, check_transform
from ._digits import DigitsBenchmark
from ._folder import FolderBenchmark
from ._wrapped import StandardBenchmark

__all__ = ["BENCHMARK_NAMES", "STANDARD_GROUPS", "check_groups", "create_benchmark"]

log = logging.getLogger(__name__)

_NEAR, _FAR = "near", "far"
_ODIN_GROUPS = {
    "TinyImageNetCrop": _NEAR,
    "TinyImageNetResize": _NEAR,
    "LSUNResize": _FAR,
    "LSUNCrop": _FAR,
    "UniformNoise": _FAR,
    "GaussianNoise": _FAR,
}
_ODIN100_GROUPS = {**{k: v for k, v in _ODIN_GROUPS.items() if "Noise" not in k}, "Uniform": _FAR, "Gaussian": _FAR}
_CIFAR_FAR = {"MNIST": _FAR, "SVHN": _FAR, "Textures": _FAR, "Places365": _FAR}
_IMAGENET_GROUPS = {"SSBHard": _NEAR, "NINCO": _NEAR, "iNaturalist": _FAR, "Textures": _FAR, "OpenImagesO": _FAR}

#: ``{benchmark: {OOD set: "near" | "far"}}`` of the standard benchmarks
STANDARD_GROUPS: dict[str, dict[str, str]] = {
    "CIFAR10_ODIN": _ODIN_GROUPS,
    "CIFAR100_ODIN": _ODIN100_GROUPS,  # pytorch-ood 0.4 names its noise sets "Uniform" and "Gaussian" here
    "CIFAR10_OpenOOD": {"CIFAR100": _NEAR, "TinyImageNet": _NEAR, **_CIFAR_FAR},
    "CIFAR100_OpenOOD": {"CIFAR10": _NEAR, "TinyImageNet": _NEAR, **_CIFAR_FAR},
    "ImageNet_OpenOOD": _IMAGENET_GROUPS,
    "ImageNet200_OpenOOD": _IMAGENET_GROUPS,
}
_NUM_CLASSES = {
    "CIFAR10_ODIN": 10,
    "CIFAR100_ODIN": 100,
    "CIFAR10_OpenOOD": 10,
    "CIFAR100_OpenOOD": 100,
    "ImageNet_OpenOOD": 1000,
    "ImageNet200_OpenOOD": 200,
}

#: names accepted by :func:`create_benchmark` (case-insensitive), besides a folder path
BENCHMARK_NAMES: tuple[str, ...] = ("digits", *STANDARD_GROUPS)


def check_groups(benchmark) -> dict[str, str]:
    """The benchmark's ``ood_groups`` for each of its ``ood_names``.

    :raises ValueError: if ``ood_names`` or ``ood_groups`` is missing, a set has no group, or a group is
        neither ``"near"`` nor ``"far"``
    """
    names = getattr(benchmark, "ood_names", None)
    groups = getattr(benchmark, "ood_groups", None)
    kind = type(benchmark).__name__
    if not names:
        raise ValueError(f"benchmark {kind} has no ood_names (the OOD sets to evaluate).")
    if not isinstance(groups, dict):
        raise ValueError(f"benchmark {kind} has no near/far lists: set ood_groups = {{OOD set: 'near' | 'far'}}.")
    missing = [n for n in names if groups.get(n) not in (_NEAR, _FAR)]
    if missing:
        raise ValueError(f"benchmark {kind}: OOD sets {missing} are in neither the near nor the far list.")
    return {name: groups[name] for name in names}


class _EightBitOnly:
    """Refuse 16-bit and float images (the conversion to 8 bits is the timm adapter's preprocessing)."""

    def __call__(self, image):
        mode = getattr(image, "mode", "")
        if mode.startswith("I") or mode == "F":
            raise ValueError(
                f"image mode {mode!r} (16/32-bit or float): pass a transform that converts it, e.g. the timm "
                "adapter's eval_transform (16-bit images to 8 bits), or save the images with 8 bits."
            )
        return image


def _default_transform(image_size: int, channels: int):
    from pytorch_ood.utils import ToRGB
    from torchvision import transforms

    colour = ToRGB() if channels == 3 else transforms.Grayscale(num_output_channels=1)
    return transforms.Compose(
        [_EightBitOnly(), colour, transforms.Resize((image_size, image_size)), transforms.ToTensor()]
    )


def _benchmark_key(name: str) -> str | None:
    """The benchmark ``name`` stands for (``None``: a folder path); a name wins over a same-named folder unless
    the path is explicit (starts with ``.``, holds a separator, or is absolute)."""
    if name.startswith(".") or os.path.isabs(name) or "/" in name or os.sep in name:
        return None
    key = {n.lower(): n for n in BENCHMARK_NAMES}.get(name.strip().lower())
    if key is not None and os.path.isdir(name):
        log.info("'%s' is the %s benchmark; the folder '%s' in %s is not used (pass ./%s for the folder).", name,
                 key, name, os.getcwd(), name)  # fmt: skip
    return key


def _missing_error(name: str, root: str, missing: list[str], expected: str) -> FileNotFoundError:
    shown = "; ".join(missing[:12]) + (f"; ... ({len(missing)} in all)" if len(missing) > 12 else "")
    return FileNotFoundError(
        f"benchmark '{name}' needs data that is not on disk under root={root!r} (nothing is downloaded). "
        f"Missing or incomplete: {shown}. Expected: {expected}"
    )


def _odin_missing(root: str, cifar) -> list[str]:
    from pytorch_ood.dataset.img import LSUNCrop, LSUNResize, TinyImageNetCrop, TinyImageNetResize
    from torchvision.datasets import utils

    missing = []
    folder = os.path.join(root, cifar.base_folder)
    for filename, md5 in [*cifar.train_list, *cifar.test_list, (cifar.meta["filename"], cifar.meta["md5"])]:
        if not utils.check_integrity(os.path.join(folder, filename), md5):
            missing.append(os.path.join(folder, filename))
    for dataset in (TinyImageNetCrop, TinyImageNetResize, LSUNResize, LSUNCrop):
        if not utils.check_integrity(os.path.join(root, dataset.filename), dataset.tgz_md5):
            missing.append(os.path.join(root, dataset.filename))
        extracted = os.path.join(root, dataset.base_folder)
        if not (os.path.isdir(extracted) and os.listdir(extracted)):
            missing.append(extracted)
    return missing


def _build_odin(name: str, root: str, transform, options: dict) -> Benchmark:
    from pytorch_ood import benchmark as bm
    from torchvision.datasets import CIFAR10, CIFAR100

    if options:
        raise TypeError(f"benchmark '{name}' takes no extra options; got {sorted(options)}.")
    cifar = CIFAR10 if name == "CIFAR10_ODIN" else CIFAR100
    missing = _odin_missing(root, cifar)
    if missing:
        raise _missing_error(
            name,
            root,
            missing,
            f"torchvision's {cifar.__name__} files in <root>/{cifar.base_folder}/ and the ODIN OOD archives "
            "(Imagenet.tar.gz, Imagenet_resize.tar.gz, LSUN.tar.gz, LSUN_resize.tar.gz) in <root>, each also "
            f"extracted there (pytorch_ood.benchmark.{name}(root, transform) on a machine with internet).",
        )
    return getattr(bm, name)(root, transform)


def _listed_missing(datasets, sample: int = 64) -> list[str]:
    """Files of an evenly spaced sample of each image list that are not on disk."""
    missing = []
    for dataset in datasets:
        files = list(getattr(dataset, "files", []))
        step = max(1, len(files) // sample)
        missing += [f for f in files[::step] if not os.path.isfile(f)]
    return missing


def _build_openood(name: str, root: str, transform, options: dict) -> Benchmark:
    from pytorch_ood import benchmark as bm

    allowed = {"image_net_root"} if name.startswith("ImageNet") else set()
    if set(options) - allowed:
        raise TypeError(f"benchmark '{name}' accepts only {sorted(allowed)}; got {sorted(options)}.")
    expected = (
        "OpenOOD's benchmark_imglist/ in pytorch-ood's imglist cache (under torch.hub.get_dir()) and the "
        "OpenOOD image folders under <root>"
        + (" plus ImageNet-1K (image_net_root, <root>/imagenet_1k/val)" if name.startswith("ImageNet") else "")
        + "."
    )
    try:
        benchmark = getattr(bm, name)(root, transform, download=False, **options)
    except (RuntimeError, FileNotFoundError) as error:
        raise _missing_error(name, root, [str(error)], expected) from error
    parts = [getattr(benchmark, a, None) for a in ("train_in", "val_in", "test_in", "val_ood")]
    missing = _listed_missing([p for p in parts if p is not None] + list(getattr(benchmark, "test_oods", [])))
    if missing:
        raise _missing_error(name, root, missing, expected)
    return benchmark


def create_benchmark(
    name: str,
    root: str | os.PathLike | None = None,
    transform: Callable | None = None,
    image_size: int = 32,
    channels: int = 3,
    *,
    split_seed: int = 0,
    verify: bool = True,
    **options,
) -> Benchmark:
    """Build a benchmark by name (or from an image folder), with the split interface and ``num_classes``.

    :param name: ``"digits"``, a name from :data:`BENCHMARK_NAMES` (case-insensitive; it wins over a folder
        of the same name unless the path is explicit, see the module documentation) or the path of a
        folder laid out for :class:`FolderBenchmark`
    :param root: data directory; required for the standard benchmarks, unused otherwise
    :param transform: callable applied to each PIL image. ``None``: for ``"digits"`` see
        :class:`DigitsBenchmark`; otherwise convert to ``channels`` channels, resize to ``image_size`` and
        make a float tensor in :math:`[0, 1]` (8-bit images only)
    :param image_size: side of the square images produced without a ``transform``
    :param channels: 1 or 3, for images produced without a ``transform``
    :param split_seed: seed of the splits drawn from training data (folders, ODIN's calibration hold-out);
        the digits and OpenOOD splits are fixed
    :param verify: for a folder, open and verify every image first (:class:`FolderBenchmark`)
    :param options: ``ood_size`` and ``memoize`` for ``"digits"``, ``image_net_root`` for the ImageNet
        benchmarks
    :return: the benchmark
    :raises ValueError: for an unknown name (the message lists :data:`BENCHMARK_NAMES`), a missing ``root``
        or OOD sets without a near/far group
    :raises FileNotFoundError: when the data is not on disk (checked first; nothing is downloaded)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {list(BENCHMARK_NAMES)} or a folder; got {type(name)}.")
    check_transform(transform)
    check_positive("image_size", image_size, integer=True, minimum=1)
    check_channels(channels)
    check_positive("split_seed", split_seed, integer=True, minimum=0)
    key = _benchmark_key(name)
    if key == "digits":
        return DigitsBenchmark(root, transform, image_size, channels, **options)
    if transform is None:
        transform = _default_transform(image_size, channels)
    if key is None:
        if os.path.isdir(name):
            if options:
                raise TypeError(f"a folder benchmark takes no extra options; got {sorted(options)}.")
            return FolderBenchmark(name, transform, split_seed=split_seed, verify=verify)
        raise ValueError(f"Unknown benchmark '{name}', expected one of {list(BENCHMARK_NAMES)} or a folder path.")
    if root is None:
        raise ValueError(f"root is required for benchmark '{key}': the directory that holds its data.")
    root = os.fspath(root)
    log.info("Building benchmark %s from %s", key, root)
    build = _build_odin if key.endswith("_ODIN") else _build_openood
    benchmark = StandardBenchmark(build(key, root, transform, options), key, _NUM_CLASSES[key],
                                  dict(STANDARD_GROUPS[key]), split_seed)  # fmt: skip
    check_groups(benchmark)
    return benchmark
