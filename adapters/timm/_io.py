"""The saved model: a timm model directory (``config.json`` + ``model.safetensors``), written atomically.

``config.json`` is written by timm's own ``save_config_for_hf`` (as ``timm.models.save_for_hf`` does):
``architecture`` (``"<arch>_<head>"``, the stock name for a linear head), ``num_classes``,
``model_args`` and ``pretrained_cfg`` -- whose input size, interpolation, mean, std and crop are the
training preprocessing when ``metadata["preprocessing"]`` is given, so that
``timm.data.resolve_data_config(model=loaded)`` returns it -- plus a ``"dismax"`` block: format, stock
architecture, head kind and options, temperature, the chosen OOD score and the size of the calibration
split behind its thresholds, versions and the caller's ``metadata``. Each file
is written under a temporary name and renamed into place (``os.replace``). Loading reads JSON and
safetensors only (nothing is unpickled). Folders of the first format (``dismax_model.json``) still load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError
from timm.models._hub import save_config_for_hf
from torch import nn

from dismax_plugin import __version__ as _plugin_version

from ._convert import convert_timm_model, get_head, head_kind, head_options
from ._names import HEAD_KINDS, HEAD_OPTIONS, architecture_of, check_timm_model

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "load_model", "read_metadata", "save_model"]

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "dismax-plugin/timm"
_FORMAT_VERSION = 2
_LEGACY_CONFIG_NAME = "dismax_model.json"  # format version 1
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serializable (str, numbers, lists, dicts); {error}.") from error


def _data_config(preprocessing: Any) -> dict[str, Any] | None:
    """timm ``data_config`` from ``metadata["preprocessing"]`` (its timm keys), or ``None``."""
    if preprocessing is None:
        return None
    if not isinstance(preprocessing, Mapping):
        raise TypeError(
            "metadata['preprocessing'] must be a dict such as {'input_size': [3, 32, 32], 'mean': [...], "
            f"'std': [...], 'interpolation': 'bilinear', 'crop_pct': 1.0}}; got {type(preprocessing).__name__}."
        )
    config = {k: preprocessing[k] for k in _DATA_KEYS if preprocessing.get(k) is not None}
    if "input_size" in config:
        config["input_size"] = tuple(config["input_size"])
    return config


def _dismax_block(model: nn.Module, metadata: Mapping[str, Any]) -> dict[str, Any]:
    head = get_head(model)
    return {
        "format": FORMAT,
        "format_version": _FORMAT_VERSION,
        "architecture": architecture_of(model),
        "head": head_kind(model),
        "head_options": head_options(model),
        "temperature": float(head.temperature) if head is not None else 1.0,
        "score": head.score if head is not None else None,
        "calibration_size": head.calibration_size if head is not None else 0,
        "versions": {"dismax_plugin": _plugin_version, "timm": timm.__version__, "torch": torch.__version__},
        "metadata": _jsonable(dict(metadata), "metadata"),
    }


@contextlib.contextmanager
def _temporary(directory: Path, name: str):
    """A temporary file name next to ``directory / name``, renamed onto it when the block succeeds, with the
    permissions of a file the user creates (``0o666`` less the umask: safetensors' writer makes it ``0o600``)."""
    tmp = str(directory / f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, directory / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` to the directory ``path`` (created) as a timm model directory, atomically.

    :param model: a timm model, converted or stock (``head="linear"``), or a ``torch.compile`` wrapper of one.
    :param metadata: JSON-serializable information (``preprocessing`` from
        :func:`~dismax_plugin.adapters.timm.preprocessing.preprocessing_config`, ``class_names``, ...).
    :return: the directory.
    :raises TypeError: if ``model`` is not a timm model or ``metadata`` is not a dict.
    :raises ValueError: if the model has no classifier, or something is not JSON-serializable.
    """
    model = check_timm_model(model)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict (JSON-serializable) or None; got {type(metadata).__name__}.")
    metadata = metadata or {}
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"model has num_classes={num_classes!r}; only classifiers with >= 2 classes can be saved.")
    model_config: dict[str, Any] = {"dismax": _dismax_block(model, metadata)}
    names = metadata.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == num_classes:
        model_config["label_names"] = [str(n) for n in names]
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path must be a directory (it is created if needed); '{directory}' is a file.")
    directory.mkdir(parents=True, exist_ok=True)
    with _temporary(directory, CONFIG_NAME) as config, _temporary(directory, WEIGHTS_NAME) as weights:
        data_config = _data_config(metadata.get("preprocessing"))
        # model_args are the arguments of config.json's "architecture" (the registered "<arch>_<head>"
        # entrypoint, as for timm's local-dir: loading), so they carry the head options too
        head_args = head_options(model) if head_kind(model) != "linear" else {}
        try:
            save_config_for_hf(model, config, model_config=model_config, model_args=head_args, data_config=data_config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"The timm config of '{architecture_of(model)}' cannot be saved: {error}") from error
        safetensors.torch.save_model(model, weights, metadata={"format": "pt"})
    _logger.info(
        "Saved %s (%s head, %d classes) to %s", architecture_of(model), head_kind(model), num_classes, directory
    )
    return directory


def _model_dir(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory written by save_model); got {path!r}.")
    directory = Path(path)
    if directory.is_file() and directory.name in (CONFIG_NAME, _LEGACY_CONFIG_NAME, WEIGHTS_NAME):
        directory = directory.parent
    if not directory.exists():
        raise FileNotFoundError(f"path '{directory}' does not exist; expected a directory written by save_model().")
    if not directory.is_dir():
        raise ValueError(f"path '{directory}' is a file; expected a directory written by save_model().")
    return directory


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"'{file}' is not valid JSON (corrupt or truncated): {error}.") from error


def _from_timm_config(config: Any, file: Path) -> dict[str, Any]:
    block = config.get("dismax") if isinstance(config, dict) else None
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise ValueError(
            f"'{file}' was not written by dismax_plugin.adapters.timm.save_model (no 'dismax' block "
            f"with format {FORMAT!r})."
        )
    pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    return dict(
        block,
        num_classes=config.get("num_classes"),
        # the stock architecture's arguments: the head options are the block's "head_options"
        model_args={k: v for k, v in (config.get("model_args") or {}).items()
                    if k != "num_classes" and k not in HEAD_OPTIONS},  # fmt: skip
        data_config={k: pretrained_cfg[k] for k in _DATA_KEYS if k in pretrained_cfg},
        pretrained_cfg=pretrained_cfg,
    )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a directory written by :func:`save_model` says, as one dict.

    Keys: ``format``, ``format_version``, ``architecture`` (the stock timm name), ``model_args``, ``head``,
    ``num_classes``, ``head_options``, ``temperature``, ``score``, ``calibration_size``, ``data_config``, ``versions``,
    ``metadata`` (the caller's) and, for the timm-native format, ``pretrained_cfg``.

    :raises FileNotFoundError: if the directory or its ``config.json`` is missing.
    :raises ValueError: if the JSON file is corrupt or was not written by :func:`save_model`.
    """
    directory = _model_dir(path)
    file = directory / CONFIG_NAME
    if file.is_file():
        return _from_timm_config(_read_json(file), file)
    legacy = directory / _LEGACY_CONFIG_NAME
    if not legacy.is_file():
        raise FileNotFoundError(f"'{file}' is missing; expected a directory written by save_model().")
    config = _read_json(legacy)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"'{legacy}' was not written by dismax_plugin.adapters.timm.save_model (format != {FORMAT!r})."
        )
    return config


def _check_config(config: Mapping[str, Any], where: Path) -> tuple[str, str, int, dict]:
    kind = config.get("head")
    if kind not in HEAD_KINDS:
        raise ValueError(f"Unknown head '{kind}' in '{where}', expected one of {sorted(HEAD_KINDS)}.")
    arch, num_classes, model_args = config.get("architecture"), config.get("num_classes"), config.get("model_args")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(f"Architecture {arch!r} in '{where}' is not a timm {timm.__version__} architecture.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes in '{where}' must be an integer >= 2; got {num_classes!r}.")
    if not isinstance(model_args, dict):
        raise ValueError(f"model_args in '{where}' must be a dict of timm.create_model arguments; got {model_args!r}.")
    return kind, arch, num_classes, model_args


def load_model(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in eval mode, with one call (JSON + safetensors only).

    The timm architecture is built with the saved arguments, converted to the saved head, given the saved
    ``pretrained_cfg`` (the training preprocessing), and the weights (temperature and calibration scores included)
    are loaded strictly. ``model.dismax_metadata`` holds :func:`read_metadata`.

    :param device: where to put the model (default: CPU).
    :raises FileNotFoundError: if the directory, its config or its weights file is missing.
    :raises ValueError: for a corrupt file, an unknown head or architecture, or weights that do not fit.
    """
    config = read_metadata(path)
    directory = _model_dir(path)
    kind, arch, num_classes, model_args = _check_config(config, directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"'{weights}' is missing; expected a directory written by save_model().")
    model = timm.create_model(arch, pretrained=False, **dict(model_args, num_classes=num_classes))
    if kind != "linear":
        convert_timm_model(model, kind, **dict(config.get("head_options") or {}))
    if config.get("pretrained_cfg"):
        model.pretrained_cfg = model.default_cfg = {
            **model.pretrained_cfg,
            **config["pretrained_cfg"],
            "architecture": model.pretrained_cfg["architecture"],
        }
    try:
        safetensors.torch.load_model(model, str(weights), strict=True)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"'{weights}' is not a readable safetensors file (corrupt or truncated): {error}") from error
    except RuntimeError as error:
        raise ValueError(f"The weights in '{weights}' do not fit {arch} with a {kind} head: {error}") from error
    model.dismax_metadata = config
    return model.to(device if device is not None else "cpu").eval()
