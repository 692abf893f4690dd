"""Argument checks shared by the core (and reused by the adapters): each raises a ValueError/TypeError that
names the argument and the expected form. :func:`check_int` is the one definition of an integer check."""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_choice", "check_class_targets", "check_int", "check_logits", "check_positive", "check_targets"]


def check_int(name: str, value, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (Python or numpy; not a bool) ``>= minimum``.

    :raises TypeError: for anything that is not an integer (floats such as ``4.0`` included).
    :raises ValueError: for an integer below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (an integer); got {value!r}.")
    return int(value)


def check_choice(name: str, value: object, choices) -> str:
    """Return ``value`` lower-cased if it is one of ``choices``, else raise a ValueError listing them."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {sorted(choices)}; got {type(value).__name__}.")
    key = value.lower()
    if key not in choices:
        raise ValueError(f"Unknown {name} '{value}', expected one of {sorted(choices)}.")
    return key


def check_positive(name: str, value, *, integer: bool = False, minimum: float | None = None) -> None:
    """Raise unless ``value`` is a finite number > 0 (or >= ``minimum``); ``integer=True``: :func:`check_int`."""
    if integer:
        check_int(name, value, 1 if minimum is None else minimum)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r}.")
    if minimum is not None:
        if not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {value!r}.")
    elif not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    """Require a floating tensor of shape [B, C] with C >= 2."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C]; got {type(logits).__name__}.")
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"{name} must have shape [B, C] with C >= 2 classes; got {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {logits.dtype}.")
    return logits


def _require(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (a 0-d bool tensor) holds. On the CPU the answer is
    read at once; on an accelerator it is asserted on the device (``torch._assert_async``), so that checking
    a training step's targets costs no host synchronisation (a failed check then stops the process with
    ``message``, as a failed device-side index check of ``F.cross_entropy`` would, without the message)."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def check_class_targets(targets, batch_size: int, num_classes: int, name: str = "targets") -> torch.Tensor:
    """Require integer class indices of shape [B] in ``[0, num_classes)`` (no host sync on accelerators)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(targets).__name__}.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(
            f"{name} of shape [B] must hold integer class indices (torch.long); got {targets.dtype}. "
            f"Soft targets must have shape [B, C]."
        )
    if targets.ndim != 1:
        raise ValueError(f"{name} must have shape [B] (class indices); got {tuple(targets.shape)}.")
    if targets.shape[0] != batch_size:
        raise ValueError(f"{name} has {targets.shape[0]} entries but the batch has {batch_size}.")
    if targets.numel():
        hint = "(Mark OOD samples with a negative label only where the API says so.)"
        if targets.device.type == "cpu":
            lo, hi = (int(v) for v in torch.aminmax(targets))
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{name} must be class indices in [0, {num_classes - 1}]; got values in [{lo}, {hi}]. {hint}"
                )
        else:
            inside = ((targets >= 0) & (targets < num_classes)).all()
            _require(inside, f"{name} must be class indices in [0, {num_classes - 1}]. {hint}")
    return targets


def check_targets(targets, logits: torch.Tensor, name: str = "targets", atol: float = 1e-3) -> torch.Tensor:
    """Accept class indices [B] or soft targets [B, C] whose rows are probability distributions."""
    batch, num_classes = logits.shape
    if isinstance(targets, torch.Tensor) and targets.ndim == 2:
        if not targets.is_floating_point():
            raise TypeError(f"soft {name} of shape [B, C] must be floating point; got {targets.dtype}.")
        if targets.shape != logits.shape:
            raise ValueError(
                f"soft {name} must have the shape of the logits {tuple(logits.shape)}; got {tuple(targets.shape)}."
            )
        if targets.numel():
            # two read-only passes (no B x C temporary): the smallest entry, and each row's sum
            values = targets.detach()
            _require(values.amin() >= -atol, f"soft {name} must be non-negative (rows are probability distributions).")
            deviation = (values.sum(dim=1, dtype=torch.float32) - 1.0).abs().amax()
            if deviation.device.type == "cpu":
                if float(deviation) > atol:
                    raise ValueError(
                        f"each row of soft {name} must sum to 1 (a probability distribution); "
                        f"largest deviation {float(deviation):.3g}."
                    )
            else:
                _require(deviation <= atol, f"each row of soft {name} must sum to 1 (a probability distribution).")
        return targets
    return check_class_targets(targets, batch, num_classes, name)
