"""``dismax import``: a checkpoint written by timm's ``train.py`` becomes a calibrated model folder.

train.py (with ``--device-modules dismax_plugin.adapters.timm.register`` for the isotropic variants) writes
``last.pth.tar`` / ``model_best.pth.tar`` (a dict with ``state_dict``, ``arch``, ``epoch``, ``args`` and,
with ``--model-ema``, ``state_dict_ema``) and ``args.yaml`` next to them. The steps, each taking what it
needs and returning what it made:

1. :func:`read_checkpoint`: the weights (EMA ones when asked), the epoch and train.py's options (``args.yaml``
   next to the checkpoint by default, else the ``args`` stored in it), read without unpickling code.
2. :func:`build_model`: the model name (``--model`` or the one train.py recorded; a stock architecture is a
   linear twin), the timm model built with train.py's model options and the weights loaded strictly.
3. :func:`preprocessing_of`: train.py's evaluation preprocessing, resolved as train.py resolves it (timm's
   ``resolve_data_config`` of its options and the model): input size, mean, std, interpolation, crop.
4. :func:`import_checkpoint`: the data (``--data``), the class count checked against it, calibration on its
   calibration split (temperature and calibration scores, as ``dismax train`` ends) and the model folder
   ``<output>/model`` (timm ``config.json`` + safetensors), which ``evaluate``, ``compare``, the detector
   and MLflow read.

Bad input (missing files, a wrong architecture, weights that do not fit, a class count that differs from
the data's) is a :class:`~.config.ConfigError`: one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ConfigError

__all__ = ["TrainPyCheckpoint", "build_model", "import_checkpoint", "preprocessing_of", "read_checkpoint"]

log = logging.getLogger("dismax_plugin.adapters.engine.importing")

#: the files of a train.py output folder, in the order ``--checkpoint FOLDER`` looks for them
CHECKPOINT_NAMES = ("model_best.pth.tar", "last.pth.tar")
ARGS_NAME = "args.yaml"
#: train.py's options recorded with the imported model (how it was trained)
_RECORDED_ARGS = ("model", "num_classes", "epochs", "batch_size", "lr", "opt", "sched", "weight_decay", "smoothing",
                  "mixup", "cutmix", "model_ema", "model_ema_decay", "model_kwargs", "input_size", "data", "data_dir",
                  "train_split", "val_split", "seed")  # fmt: skip


@dataclass
class TrainPyCheckpoint:
    """What :func:`read_checkpoint` found: the weights to import and how train.py made them."""

    path: str
    state_dict: dict[str, torch.Tensor]
    ema: bool  # the weights are train.py's EMA weights
    epoch: int | None
    recorded_name: str | None  # the --model train.py recorded (args.model, else a timm-named arch)
    args: dict[str, Any] = field(default_factory=dict)  # train.py's options
    args_source: str | None = None  # args.yaml's path, "checkpoint" or None


def _find_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        for name in CHECKPOINT_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ConfigError(f"--checkpoint: folder '{path}' holds none of {list(CHECKPOINT_NAMES)} (train.py's output).")
    if not os.path.isfile(path):
        raise ConfigError(f"--checkpoint: no such file '{path}' (train.py's last.pth.tar or model_best.pth.tar).")
    return path


def _load(path: str) -> Any:
    """The checkpoint's content; tensors, containers and train.py's ``argparse.Namespace`` only (timm's
    ``load_checkpoint_metadata``: ``torch.load(weights_only=True)``, nothing else is unpickled)."""
    from timm.utils import load_checkpoint_metadata

    try:
        return load_checkpoint_metadata(path)
    except Exception as error:  # torch raises many types for unreadable or unsafe files
        message = " ".join(str(error).split())
        raise ConfigError(f"--checkpoint: '{path}' could not be read as a train.py checkpoint: {message}") from error


def _read_args(args_yaml: str | None, checkpoint_dir: str, stored: Any) -> tuple[dict[str, Any], str | None]:
    """train.py's options: ``args_yaml`` (default: ``args.yaml`` next to the checkpoint), else the checkpoint's."""
    import yaml

    path = args_yaml or os.path.join(checkpoint_dir, ARGS_NAME)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as file:
                options = yaml.safe_load(file)
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"--args-yaml: '{path}' is not readable YAML: {' '.join(str(error).split())}") from error
        if not isinstance(options, dict):
            raise ConfigError(f"--args-yaml: '{path}' does not hold train.py's options (a mapping).")
        return options, path
    if args_yaml:
        raise ConfigError(f"--args-yaml: no such file '{args_yaml}'.")
    if isinstance(stored, argparse.Namespace):
        return dict(vars(stored)), "checkpoint"
    if isinstance(stored, dict):
        return dict(stored), "checkpoint"
    return {}, None


def read_checkpoint(path: str, use_ema: bool = False, args_yaml: str | None = None) -> TrainPyCheckpoint:
    """Step 1: the weights, epoch and options of a train.py checkpoint (or of its output folder).

    :param path: ``last.pth.tar``, ``model_best.pth.tar`` (or any checkpoint/state dict), or the folder
        holding them (``model_best.pth.tar`` first).
    :param use_ema: import ``state_dict_ema`` (train.py's ``--model-ema``); an error when it is absent.
    :param args_yaml: train.py's ``args.yaml`` (default: the one next to the checkpoint, if any).
    :raises ConfigError: for a missing or unreadable file, or EMA weights asked for and absent.
    """
    from timm.models import clean_state_dict

    path = _find_checkpoint(path)
    content = _load(path)
    if not isinstance(content, dict):
        raise ConfigError(f"--checkpoint: '{path}' holds a {type(content).__name__}, not a checkpoint dict.")
    key = "state_dict" if isinstance(content.get("state_dict"), dict) else None
    if use_ema:
        key = next((k for k in ("state_dict_ema", "model_ema") if isinstance(content.get(k), dict)), None)
        if key is None:
            raise ConfigError(f"--use-ema: '{path}' holds no EMA weights (train it with train.py's --model-ema).")
    elif "state_dict_ema" in content:
        log.info("%s also holds EMA weights (state_dict_ema); add --use-ema to import those.", path)
    weights = content[key] if key else content
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"--checkpoint: '{path}' holds no state_dict of tensors (train.py's checkpoint format).")
    args, source = _read_args(args_yaml, os.path.dirname(os.path.abspath(path)), content.get("args"))
    recorded = args.get("model") or (content.get("arch") if isinstance(content.get("arch"), str) else None)
    epoch = content.get("epoch") if isinstance(content.get("epoch"), int) else None
    return TrainPyCheckpoint(path, clean_state_dict(weights), key in ("state_dict_ema", "model_ema"), epoch,
                             recorded, args, source)  # fmt: skip


def _model_name(model: str | None, checkpoint: TrainPyCheckpoint) -> tuple[str, str, str]:
    """``(name, architecture, head)``: ``--model``, else the name train.py recorded; both must agree."""
    from .. import timm as dtimm

    recorded = checkpoint.recorded_name
    name = model or recorded
    if not name:
        raise ConfigError(f"--model: '{checkpoint.path}' records no model name; pass --model (e.g. resnet10t_dismax).")
    try:
        architecture, head = dtimm.split_registered_name(name)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--model: {error}") from error
    if model and recorded and model.partition(".")[0] != recorded.partition(".")[0]:
        try:
            dtimm.split_registered_name(recorded)
        except ValueError:
            recorded = None  # a class name (CheckpointSaver without args), not a timm model name
        if recorded:
            raise ConfigError(f"--model {model}: '{checkpoint.path}' was trained as '{recorded}'.")
    return name, architecture, head


def _classes_in(architecture: str, checkpoint: TrainPyCheckpoint, name: str) -> int:
    """The class count of the checkpoint's classifier (train.py's ``num_classes`` when it has none)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(architecture.partition(".")[0])
    declared = getattr(cfg, "classifier", None)
    first = declared if isinstance(declared, str) else (declared[0] if declared else None)
    weight = checkpoint.state_dict.get(f"{first}.weight") if first else None
    if weight is not None and weight.ndim >= 1:
        return int(weight.shape[0])
    recorded = checkpoint.args.get("num_classes")
    if isinstance(recorded, int) and recorded >= 2:
        return recorded
    raise ConfigError(f"--checkpoint: the weights in '{checkpoint.path}' do not fit --model {name}: no classifier "
                      f"weights '{first}.weight' and no recorded num_classes.")  # fmt: skip


def _model_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` options train.py built the model with that shape it or its evaluation."""
    input_size = args.get("input_size")
    in_chans = args.get("in_chans") or (input_size[0] if input_size else None)
    kwargs = {"in_chans": in_chans, "global_pool": args.get("gp"), "bn_eps": args.get("bn_eps")}
    extra = args.get("model_kwargs") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"--args-yaml: model_kwargs must be a mapping (train.py's --model-kwargs); got {extra!r}.")
    return {k: v for k, v in {**kwargs, **extra}.items() if v is not None}


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, path: str) -> None:
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # a size mismatch
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = "; ".join(lines[:3]) or " ".join(str(error).split())[:300]
        raise ConfigError(f"--checkpoint: the weights in '{path}' do not fit --model {name}: {detail}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"--checkpoint: the weights in '{path}' do not fit --model {name}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (a stock name imports a linear twin, '<arch>_<head>' an "
            "isotropic model)."
        )


def build_model(checkpoint: TrainPyCheckpoint, model: str | None = None) -> tuple[nn.Module, str]:
    """Step 2: the timm model of the checkpoint with its weights; returns ``(model, name)``.

    :param model: train.py's ``--model`` (``resnet10t_dismax``, ``resnet10t`` for the twin); default the
        recorded one.
    :raises ConfigError: unknown or disagreeing names, model options that do not apply, weights that do not fit.
    """
    from .. import timm as dtimm

    name, architecture, head = _model_name(model, checkpoint)
    kwargs = _model_kwargs(checkpoint.args)
    num_classes = _classes_in(architecture, checkpoint, name)
    try:
        built = dtimm.create_model(architecture, head=head, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"--model {name}: {' '.join(str(error).split())}") from error
    _load_weights(built, checkpoint.state_dict, name, checkpoint.path)
    return built.eval(), name


def preprocessing_of(model: nn.Module, args: dict[str, Any]) -> dict[str, Any]:
    """Step 3: train.py's evaluation preprocessing (its validation loader's): timm's ``resolve_data_config`` of
    train.py's options and the model, as a ``preprocessing`` dict (input size, mean, std, interpolation, crop).
    train.py's validation crops at the centre, whatever ``crop_mode`` says, and so does the saved model."""
    from timm.data import resolve_data_config

    config = resolve_data_config(args, model=model)
    return {
        "input_size": [int(v) for v in config["input_size"]],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": str(config["interpolation"]),
        "crop_pct": float(config["crop_pct"]),
    }


@dataclass
class ImportResult:
    """What :func:`import_checkpoint` made: the calibrated model, its folder, the calibration report, the data."""

    model: nn.Module
    name: str
    model_dir: str
    calibration: dict[str, Any]
    data: Any


def _model_dir(options: argparse.Namespace, name: str) -> str:
    from .training import MODEL_DIR

    data = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(os.path.normpath(options.data)))
    output = options.output or os.path.join("runs", f"import-{name}-{data}")
    model_dir = os.path.join(output, MODEL_DIR)
    if os.path.exists(model_dir) and not options.overwrite:
        raise ConfigError(f"--output: '{model_dir}' exists; add --overwrite to replace it.")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output: '{output}' is a file; expected a run directory.")
    return model_dir


def _build_data(options: argparse.Namespace, preprocessing: dict[str, Any]):
    from .data import build_data

    try:
        return build_data(options.data, preprocessing, data_root=options.data_root, seed=options.seed)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data '{options.data}': {' '.join(str(error).split())}") from error


def _check_calibration_split(options: argparse.Namespace, checkpoint: TrainPyCheckpoint, data) -> None:
    """The calibration split must hold no image train.py trained on: when ``--data`` is the folder train.py read,
    its calibration split may not be drawn from train.py's training folder."""
    trained_on = checkpoint.args.get("data") or checkpoint.args.get("data_dir")
    if not (isinstance(trained_on, str) and os.path.isdir(options.data) and os.path.isdir(trained_on)):
        return
    if os.path.realpath(trained_on) != os.path.realpath(options.data):
        return
    train_split = str(checkpoint.args.get("train_split") or "train").strip("/")
    record = getattr(data, "split", None) or {}
    source = str((record.get("sources") or {}).get("val") or "train/ (held out)")  # folders without a record: drawn
    if re.search(rf"(^|\s){re.escape(train_split)}/", source):  # "train/ ...", "10% of train/, held out ..."
        raise ConfigError(
            f"--data '{options.data}': its calibration split ({source}) is drawn from {train_split}/, on which "
            f"train.py trained; give the folder a val/ (and test/) that train.py did not train on (train.py "
            "--val-split val), or calibrate on another folder."
        )


def _metadata(checkpoint: TrainPyCheckpoint, name: str, data, preprocessing: dict, report: dict) -> dict[str, Any]:
    from ._calibration import calibration_metadata

    recorded = {k: checkpoint.args[k] for k in _RECORDED_ARGS if k in checkpoint.args}
    metadata = {
        "preprocessing": preprocessing,
        "class_names": data.class_names,
        "calibration": calibration_metadata(report),
        "imported_from": {
            "checkpoint": os.path.abspath(checkpoint.path),
            "model": name,
            "epoch": checkpoint.epoch,
            "ema": checkpoint.ema,
            "args": checkpoint.args_source,
            "train_py_args": recorded,
        },
    }
    if getattr(data, "split", None):
        metadata["split"] = data.split  # the split record: evaluate/calibrate rebuild and check the data with it
    return metadata


def import_checkpoint(options: argparse.Namespace) -> ImportResult:
    """``dismax import``: read, build, resolve the preprocessing, calibrate on ``--data``'s calibration split and
    save ``<output>/model``; see the module docstring.

    :param options: the parsed options (:class:`~.config.ImportOptions` and the data options of ``evaluate``).
    :raises ConfigError: for bad input, before anything is written.
    """
    from .. import timm as dtimm
    from ._calibration import calibrate_model

    checkpoint = read_checkpoint(options.checkpoint, options.use_ema, options.args_yaml)
    model, name = build_model(checkpoint, options.model)
    preprocessing = preprocessing_of(model, checkpoint.args)
    model_dir = _model_dir(options, name)
    data = _build_data(options, preprocessing)
    if data.num_classes != model.num_classes:
        raise ConfigError(f"--data '{options.data}' has {data.num_classes} classes; the checkpoint's classifier has "
                          f"{model.num_classes}.")  # fmt: skip
    _check_calibration_split(options, checkpoint, data)
    device = torch.device(options.device or "cpu")
    report = calibrate_model(model.to(device), data.val, options.calibration, batch_size=options.eval_batch_size,
                             device=device, workers=options.workers)  # fmt: skip
    dtimm.save_model(model.cpu(), model_dir, metadata=_metadata(checkpoint, name, data, preprocessing, report))
    source = f"epoch {checkpoint.epoch}" + (", EMA weights" if checkpoint.ema else "")
    log.info("imported %s (%s) from %s; calibrated on %d images: temperature %.4g, ECE %.4f -> %.4f; model saved "
             "to %s", name, source, checkpoint.path, report["size"], report["temperature"], report["ece_before"],
             report["ece_after"], model_dir)  # fmt: skip
    return ImportResult(model, name, model_dir, report, data)
