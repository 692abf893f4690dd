"""Run directory and checkpoint: what a run saves to resume exactly, and how it is read back safely.

``<output>/checkpoint.pt`` holds the model, optimizer and scheduler states, every RNG state (Python,
NumPy, torch, CUDA, the FPR generator) as tensors and plain types, the position (epoch, step) and the
history. It is written atomically (temporary name, then ``os.replace``) and read with
``torch.load(weights_only=True)``, so a checkpoint dropped into ``--output`` cannot run code; anything that
is not a checkpoint of this engine is refused with a :class:`~.config.ConfigError` naming the file, and so
is resuming it with another value of an option that changes the run or another number of processes
(:func:`check_resumable`). ``--overwrite`` removes the previous run's checkpoint and model; a saved model
records the checkpoint position it ends, so a run folder whose checkpoint moved on is not evaluated as if
its model were current (:func:`current_model_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, flag_of

__all__ = ["CHECKPOINT", "MODEL_DIR", "check_resumable", "current_model_dir", "load_checkpoint", "prepare_output",
           "remove_run_outputs", "restore", "rng_state", "save_checkpoint", "seed_everything",
           "set_rng_state"]  # fmt: skip

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
_MODEL_FILES = ("config.json", "model.safetensors", "dismax_model.json")  # the timm adapter's saved model
FORMAT = "dismax-checkpoint"
VERSION = 3  # 3: world_size, tracking run id; the FPR stream is derived per step (no generator state)
_KEYS = ("format", "version", "config", "world_size", "epoch", "step", "model", "optimizer", "scheduler", "scaler",
         "rng", "history", "tracking_run_id")  # fmt: skip
_MAY_CHANGE_FLAGS = tuple(
    f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE if name not in ("output", "resume", "overwrite")
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the FPR generator is seeded where it is made)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state the loop draws from (Python, NumPy, torch, CUDA), as tensors, ints, floats and
    strings only. The FPR stitching draws from a stream derived from the position (:class:`._setup.BatchTransform`),
    so it has no state to save."""
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_output(cfg: TrainConfig, main: bool = True) -> str:
    """Create ``cfg.output``, check it is writable and agrees with ``--resume``/``--overwrite``; the checkpoint path.

    With ``--overwrite`` the previous run's checkpoint and saved model are removed (by the ``main`` process), so
    that nothing of it can be taken for the new run's (:func:`remove_run_outputs`).
    """
    try:
        os.makedirs(cfg.output, exist_ok=True)
        probe = os.path.join(cfg.output, f".write-test-{os.getpid()}")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output: cannot write to '{cfg.output}' ({error.strerror or error}).") from error
    path = os.path.join(cfg.output, CHECKPOINT)
    if cfg.resume and not os.path.isfile(path):
        raise ConfigError(f"--resume: no checkpoint at '{path}'.")
    if not cfg.resume and not cfg.overwrite and (os.path.isfile(path) or _holds_model(cfg.output)):
        raise ConfigError(
            f"--output '{cfg.output}' already holds a run; pass --resume to continue it, "
            "--overwrite to start again, or choose another --output."
        )
    if cfg.overwrite and not cfg.resume and main:
        remove_run_outputs(cfg.output)
    return path


def _holds_model(run_dir: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, MODEL_DIR))


def remove_run_outputs(run_dir: str) -> None:
    """Delete what a training run wrote into ``run_dir``: its checkpoint and the saved model's files (``model/``
    is removed when nothing else is left in it). Other files, e.g. an MLflow fallback store, stay."""
    for name in (CHECKPOINT, *(os.path.join(MODEL_DIR, n) for n in _MODEL_FILES)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, name))
    model_dir = os.path.join(run_dir, MODEL_DIR)
    if os.path.isdir(model_dir):
        for name in os.listdir(model_dir):  # temporaries of an interrupted save
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(model_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(model_dir)


def current_model_dir(path: str) -> str:
    """The saved model that ``--checkpoint path`` names: ``path`` itself, or ``path/model`` for a run directory
    -- only when that model is the run's final one.

    :raises ConfigError: for a run directory whose training stopped before saving a model, or whose checkpoint
        is newer than its saved model (a resumed run that did not finish): evaluating that model would report
        an older model than the run's. Naming ``path/model`` itself evaluates it anyway.
    """
    checkpoint = os.path.join(path, CHECKPOINT)
    model_dir = os.path.join(path, MODEL_DIR)
    if not os.path.isfile(checkpoint):
        return model_dir if os.path.isdir(model_dir) else path
    where = _position(checkpoint)
    if where is None:
        return model_dir if os.path.isdir(model_dir) else path
    if not os.path.isdir(model_dir):
        raise ConfigError(
            f"--checkpoint: the run '{path}' has no saved model: its training stopped at {where['text']} "
            f"(finish it with dismax train --resume --output {path})."
        )
    from .. import timm as dtimm

    try:
        saved = (dtimm.read_metadata(model_dir).get("metadata") or {}).get("checkpoint")
    except (FileNotFoundError, ValueError, OSError):
        return model_dir  # not readable: the loader says why
    if saved is None and where["finished"]:
        return model_dir  # saved before models recorded their position; the run is at its end
    if saved != {"epoch": where["epoch"], "step": where["step"]}:
        was = f"epoch {saved['epoch']}" if isinstance(saved, dict) and "epoch" in saved else "an earlier run"
        raise ConfigError(
            f"--checkpoint: the model in '{model_dir}' is stale: it was saved after {was}, and the run's checkpoint "
            f"has moved on to {where['text']} (finish it with dismax train --resume --output {path}, or name "
            f"'{model_dir}' to evaluate the older model)."
        )
    return model_dir


def _position(checkpoint: str) -> dict | None:
    """``{"epoch", "step", "text"}`` of a checkpoint (read lazily: the weights stay on disk), ``None`` if unreadable."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        epoch, step, epochs = int(state["epoch"]), int(state["step"]), int(state["config"]["epochs"])
    except Exception:  # not a checkpoint of this engine: nothing to compare with
        return None
    text = f"epoch {epoch} of {epochs}" + (f", step {step}" if step else "")
    return {"epoch": epoch, "step": step, "text": text, "finished": step == 0 and epoch >= epochs}


def save_checkpoint(path: str, cfg: TrainConfig, position: tuple[int, int], parts: dict[str, Any], history, *,
                    world_size: int = 1, tracking_run_id: str | None = None) -> None:  # fmt: skip
    """Write the checkpoint atomically; ``parts`` holds ``model``, ``optimizer``, ``scheduler`` and ``scaler`` (the
    AMP ``GradScaler``). ``tracking_run_id``: the tracked run that wrote it (a resumed run names it)."""
    epoch, step = position
    scheduler = parts["scheduler"]
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(cfg),
        "world_size": world_size,
        "tracking_run_id": tracking_run_id or "",
        "epoch": epoch,
        "step": step,
        "model": parts["model"].state_dict(),
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": parts["scaler"].state_dict(),
        "rng": rng_state(),
        "history": list(history),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """Read a checkpoint without unpickling code and check that ``cfg`` (and ``world_size`` processes) can
    continue it exactly.

    :raises ConfigError: for a file that is not a checkpoint of this engine (tampered, foreign, another
        version), one written with another value of an option that changes the run (every
        :class:`~.config.TrainConfig` option but :data:`~.config.RESUME_MAY_CHANGE`), by another number of
        processes, or one that has trained more epochs than ``cfg.epochs``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--resume: '{path}' is not a checkpoint this engine can load safely ({reason}).") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"--resume: '{path}' is not a dismax training checkpoint (missing its format marker).")
    if state.get("version") != VERSION:
        version = state.get("version")
        raise ConfigError(f"--resume: '{path}' has checkpoint version {version!r}; this engine reads {VERSION}.")
    if any(k not in state for k in _KEYS):
        missing = [k for k in _KEYS if k not in state]
        raise ConfigError(f"--resume: '{path}' is not a complete dismax training checkpoint (no {missing}).")
    check_resumable(state, cfg, world_size)
    return state


def _run_defining(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a saved or new config that define the run, as they act (``loss auto`` -> its loss)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    resolved = TrainConfig(**{k: v for k, v in config.items() if k in known})
    values = {name: getattr(resolved, name) for name in known if name not in RESUME_MAY_CHANGE}
    values.update(loss=resolved.loss_name, fpr=resolved.uses_fpr)
    return values


def check_resumable(state: dict[str, Any], cfg: TrainConfig, world_size: int = 1) -> None:
    """:class:`ConfigError` (one line naming the option) unless ``cfg`` run by ``world_size`` processes continues
    the checkpoint ``state`` exactly; see :func:`load_checkpoint`."""
    where = f"the checkpoint in '{cfg.output}'"
    saved, wanted = _run_defining(state["config"]), _run_defining(dataclasses.asdict(cfg))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in sorted(saved, key=list(fields).index):
        if saved[name] != wanted[name]:
            flag = flag_of(fields[name])
            was, now = (f"{name}={saved[name]!r}", repr(wanted[name])) if flag.startswith("--no-") else \
                (f"{flag} {saved[name]!r}", repr(wanted[name]))  # fmt: skip
            raise ConfigError(
                f"--resume: {where} was trained with {was}, not {now}; only {', '.join(_MAY_CHANGE_FLAGS)} "
                "may change on resume (start a new run with another --output, or --overwrite)."
            )
    if state["world_size"] != world_size:
        raise ConfigError(
            f"--resume: {where} was written by {state['world_size']} process(es) and cannot continue exactly "
            f"with {world_size}: the global batch and the position in the epoch depend on the number of "
            f"processes; resume it with torchrun --nproc_per_node={state['world_size']} (or 1 process: no torchrun)."
        )
    trained = state["epoch"] + (1 if state["step"] else 0)
    if cfg.epochs < trained:
        raise ConfigError(
            f"--resume: --epochs {cfg.epochs} is fewer than the {trained} epochs {where} has already (partly) "
            f"trained; pass --epochs {trained} or more."
        )


def restore(state: dict[str, Any], parts: dict[str, Any], epochs: int) -> None:
    """Load the model, optimizer, scheduler and RNG states of ``state`` into ``parts`` (see :func:`save_checkpoint`).

    A run resumed for another number of ``epochs`` than it was planned for keeps the freshly built scheduler
    (planned for ``epochs``) and sets the lr it gives at the checkpoint's epoch: the remaining epochs follow
    the schedule of a run planned for ``epochs`` from the start.
    """
    parts["model"].load_state_dict(state["model"])
    parts["optimizer"].load_state_dict(state["optimizer"])
    scheduler = parts["scheduler"]
    if scheduler is not None:
        if state["scheduler"] is not None and state["config"]["epochs"] == epochs:
            scheduler.load_state_dict(state["scheduler"])
        else:  # re-planned: timm sets the lr of epoch t from the schedule alone
            scheduler.step(state["epoch"])
    if state["scaler"]:
        parts["scaler"].load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
