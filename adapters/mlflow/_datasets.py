"""MLflow 3 data lineage for torch datasets: name, digest, size and profile of a ``Dataset``.

:func:`describe_dataset` turns a map-style ``torch.utils.data.Dataset`` into the fields of an MLflow
dataset entity. The digest hashes the length and up to :data:`SAMPLED_ITEMS` evenly spaced items as the
dataset returns them (tensors by dtype, shape and bytes; labels by value), under a fixed seed inside
``torch.random.fork_rng`` with Python's and numpy's random states restored afterwards: a random transform
gives the same digest every time, and logging a dataset never moves the training's random streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import numpy as np

__all__ = ["DATASET_CONTEXTS", "SAMPLED_ITEMS", "describe_dataset"]

#: The contexts of agreed interface 4 (tag ``mlflow.data.context``).
DATASET_CONTEXTS = ("train", "test", "ood-near", "ood-far")
SAMPLED_ITEMS = 64


def describe_dataset(name: str, dataset: Any) -> dict[str, str]:
    """The MLflow dataset fields of ``dataset``: ``name``, ``digest``, ``source_type``, ``source``, ``profile``.

    :param name: the dataset's name as the run reports it (e.g. the OOD set's name).
    :param dataset: a map-style dataset (``__len__`` and ``__getitem__``).
    :return: keyword arguments of ``mlflow.entities.Dataset``; ``profile`` is JSON with ``num_rows``,
        ``item_shape`` (of the first item's tensor, if any) and ``sampled_items``.
    :raises TypeError: if ``dataset`` has no length or no item access.
    :raises ValueError: if ``name`` is empty or longer than MLflow's 500 characters.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > 500:
        raise ValueError(f"name must be a non-empty dataset name of at most 500 characters; got {name!r}.")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"dataset must be a map-style torch Dataset (with __len__ and __getitem__); got {type(dataset).__name__}."
        )
    size = len(dataset)
    digest, first = _digest(dataset, size)
    profile = {"num_rows": size, "sampled_items": min(size, SAMPLED_ITEMS)}
    tensor = first[0] if isinstance(first, (tuple, list)) and first else first
    if hasattr(tensor, "shape"):
        profile["item_shape"] = [int(v) for v in tensor.shape]
    source_type, source = _source(dataset)
    return {"name": name, "digest": digest, "source_type": source_type, "source": source,
            "profile": json.dumps(profile)}  # fmt: skip


def _digest(dataset: Any, size: int) -> tuple[str, Any]:
    """sha256 (first 16 hex digits) of the length and the sampled items; also returns the first item."""
    import torch

    hasher = hashlib.sha256(f"len={size}".encode())
    indices = sorted({int(i) for i in np.linspace(0, size - 1, num=min(size, SAMPLED_ITEMS))}) if size else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    first = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            for index in indices:
                item = dataset[index]
                first = item if first is None else first
                _update(hasher, item)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return hasher.hexdigest()[:16], first


def _update(hasher, item: Any) -> None:
    import torch

    if isinstance(item, (tuple, list)):
        for part in item:
            _update(hasher, part)
    elif hasattr(item, "detach"):
        tensor = item.detach().cpu().contiguous()
        hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, np.ndarray):
        hasher.update(f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes())
    else:
        hasher.update(repr(item).encode())


def _source(dataset: Any) -> tuple[str, str]:
    """A local folder for datasets that name one (``root``), else the dataset's class."""
    for attribute in ("root", "root_dir", "directory"):
        folder = getattr(dataset, attribute, None)
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
            return "local", json.dumps({"uri": os.path.abspath(folder)})
    kind = type(dataset)
    return "code", json.dumps({"tags": {"dataset_class": f"{kind.__module__}.{kind.__qualname__}"}})
