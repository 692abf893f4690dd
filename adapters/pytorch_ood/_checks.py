"""Argument checks shared by this package's benchmarks and comparison (each error names the argument)."""

from __future__ import annotations

from collections.abc import Sequence

from dismax_plugin._checks import check_positive

__all__ = ["check_channels", "check_names", "check_positive", "check_transform"]


def check_transform(transform) -> None:
    """Raise a TypeError unless ``transform`` is ``None`` or callable."""
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be a callable taking a PIL image, or None; got {type(transform).__name__}.")


def check_channels(channels) -> None:
    """Raise a ValueError unless ``channels`` is 1 or 3."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}.")


def check_names(argument: str, names, known: Sequence[str]) -> list[str]:
    """Canonical spelling of each name in ``names`` (case-insensitive, duplicates dropped, order kept).

    :param argument: the argument's name, for the messages (e.g. ``"detectors"``)
    :param names: a list of names, or ``None`` for every name in ``known``
    :param known: the accepted names
    :raises TypeError: if ``names`` is not a list of strings
    :raises ValueError: for an unknown name (the message lists ``known``) or an empty list
    """
    if names is None:
        return list(known)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a list of names from {list(known)} or None; got {names!r}.")
    lookup = {k.lower(): k for k in known}
    chosen: list[str] = []
    for name in names:
        if not isinstance(name, str) or name.strip().lower() not in lookup:
            raise ValueError(f"{argument}: unknown name {name!r}, expected names from {list(known)}.")
        canonical = lookup[name.strip().lower()]
        if canonical not in chosen:
            chosen.append(canonical)
    if not chosen:
        raise ValueError(f"{argument} must name at least one of {list(known)}.")
    return chosen
