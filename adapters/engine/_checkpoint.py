"""Run directory and checkpoint: what a run saves to resume exactly, and how it is read back safely.

``<output>/checkpoint.pt`` holds the model, optimizer and scheduler states, every RNG state (Python,
NumPy, torch, CUDA, the FPR generator) as tensors and plain types, the position (epoch, step) and the
history. It is written atomically (temporary name, then ``os.replace``) and read with
``torch.load(weights_only=True)``, so a checkpoint dropped into ``--output`` cannot run code; anything that
is not a checkpoint of this engine is refused with a :class:`~.config.ConfigError` naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from .config import ConfigError, TrainConfig

__all__ = ["CHECKPOINT", "load_checkpoint", "prepare_output", "restore", "rng_state", "save_checkpoint",
           "seed_everything", "set_rng_state"]  # fmt: skip

CHECKPOINT = "checkpoint.pt"
FORMAT = "dismax-checkpoint"
VERSION = 2
_KEYS = ("format", "version", "config", "epoch", "step", "model", "optimizer", "scheduler", "scaler", "rng", "history")
#: a resumed run must agree with the checkpoint on these options
_SAME = ("model", "head", "loss", "data", "seed")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the FPR generator is seeded where it is made)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(fpr_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state the loop draws from, as tensors, ints, floats and strings only."""
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
        "fpr": fpr_generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], fpr_generator: torch.Generator) -> None:
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
    fpr_generator.set_state(state["fpr"])


def prepare_output(cfg: TrainConfig) -> str:
    """Create ``cfg.output``, check it is writable and agrees with ``--resume``/``--overwrite``; the checkpoint path."""
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
    if not cfg.resume and not cfg.overwrite and os.path.isfile(path):
        raise ConfigError(
            f"--output '{cfg.output}' already holds a checkpoint; pass --resume to continue it, "
            "--overwrite to start again, or choose another --output."
        )
    return path


def save_checkpoint(path: str, cfg: TrainConfig, position: tuple[int, int], parts: dict[str, Any], history) -> None:
    """Write the checkpoint atomically; ``parts`` holds ``model``, ``optimizer``, ``scheduler``, ``scaler`` (the
    AMP ``GradScaler``) and ``generator`` (FPR's)."""
    epoch, step = position
    scheduler = parts["scheduler"]
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(cfg),
        "epoch": epoch,
        "step": step,
        "model": parts["model"].state_dict(),
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": parts["scaler"].state_dict(),
        "rng": rng_state(parts["generator"]),
        "history": list(history),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, cfg: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint without unpickling code and check it belongs to a run like ``cfg``.

    :raises ConfigError: for a file that is not a checkpoint of this engine (tampered, foreign, another
        version) or one trained with another model, head, loss, data or seed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--resume: '{path}' is not a checkpoint this engine can load safely ({reason}).") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in _KEYS):
        raise ConfigError(f"--resume: '{path}' is not a dismax training checkpoint (missing its format marker).")
    if state["version"] != VERSION:
        version = state["version"]
        raise ConfigError(f"--resume: '{path}' has checkpoint version {version!r}; this engine reads {VERSION}.")
    for key in _SAME:
        saved = state["config"].get(key)
        if saved != getattr(cfg, key):
            raise ConfigError(
                f"--resume: the checkpoint in '{cfg.output}' was trained with --{key} {saved!r}, "
                f"not {getattr(cfg, key)!r}."
            )
    return state


def restore(state: dict[str, Any], parts: dict[str, Any]) -> None:
    """Load the model, optimizer, scheduler and RNG states of ``state`` into ``parts`` (see :func:`save_checkpoint`)."""
    parts["model"].load_state_dict(state["model"])
    parts["optimizer"].load_state_dict(state["optimizer"])
    if parts["scheduler"] is not None and state["scheduler"] is not None:
        parts["scheduler"].load_state_dict(state["scheduler"])
    if state["scaler"]:
        parts["scaler"].load_state_dict(state["scaler"])
    set_rng_state(state["rng"], parts["generator"])
