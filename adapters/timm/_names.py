"""Names and checks of the timm adapter: head kinds, registered names, the architecture check, timm models.

One definition of each: :data:`HEAD_KINDS` is the core's :data:`dismax_plugin.HEADS` plus ``"linear"``;
``"<arch>_<head>"`` is the one naming rule of isotropic variants; :func:`check_architecture` is the one
check of a timm architecture name (the engine's ``--model`` uses it too).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import timm
from torch import nn

from dismax_plugin import HEADS
from dismax_plugin._checks import check_choice, check_positive

HEAD_KINDS: tuple[str, ...] = (*HEADS, "linear")
"""Head kinds accepted by ``create_model``: the isotropic heads and ``"linear"`` (the stock timm model)."""

KIND_ATTR = "_dismax_head_kind"
"""Instance attribute of a converted model: its head kind (kept while ``num_classes == 0``)."""

OPTIONS_ATTR = "_dismax_head_options"
"""Instance attribute of a converted model: the keyword options of its heads (``entropic_scale``), reused by
``reset_classifier`` and saved with the model."""

HEAD_OPTIONS: tuple[str, ...] = ("entropic_scale",)
"""Keyword options of the isotropic heads that ``create_model``/``convert_timm_model`` accept."""


def registered_name(architecture: str, head: str) -> str:
    """timm registry name of ``architecture`` with an isotropic ``head``: ``"<architecture>_<head>"``."""
    kind = check_choice("head", head, HEADS)
    return f"{architecture}_{kind}"


def split_variant(name: str) -> tuple[str, str] | None:
    """``(architecture, head)`` if ``name`` is ``"<timm architecture>_<head>"``, else ``None``."""
    for kind in HEADS:
        suffix = f"_{kind}"
        if name.endswith(suffix) and timm.is_model(name[: -len(suffix)]):
            return name[: -len(suffix)], kind
    return None


def split_registered_name(name: str) -> tuple[str, str]:
    """``(architecture, head)`` of a model name as timm's ``create_model`` takes it once the variants are
    registered: ``"resnet10t_dismax"`` gives ``("resnet10t", "dismax")``, a stock architecture ``(name,
    "linear")``; a pretrained tag stays on the architecture (``"resnet10t_isomax.c3_in1k"`` gives
    ``("resnet10t.c3_in1k", "isomax")``).

    :raises TypeError: if ``name`` is not a string.
    :raises ValueError: for a name that is neither a timm architecture nor one of its variants.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string such as 'resnet10t_dismax' or 'resnet10t'; got {name!r}.")
    base, dot, tag = name.partition(".")
    variant = split_variant(base)
    if variant is not None:
        return variant[0] + dot + tag, variant[1]
    return check_architecture(name), "linear"


def check_architecture(name: str) -> str:
    """Return ``name`` if it is a timm architecture (optionally ``"arch.tag"``); the one architecture check.

    :param name: e.g. ``"resnet18"`` or ``"resnet18.a1_in1k"``.
    :return: ``name`` unchanged.
    :raises TypeError: if ``name`` is not a string.
    :raises ValueError: for an unknown architecture (with close matches), or an isotropic variant name such
        as ``"resnet18_dismax"`` (naming the architecture and head to pass instead).
    """
    if not isinstance(name, str):
        raise TypeError(f"model_name must be a timm architecture name such as 'resnet18'; got {name!r}.")
    arch = name.split(".", 1)[0]
    variant = split_variant(arch)
    if variant is not None:
        raise ValueError(
            f"'{name}' is an isotropic variant name; pass the timm architecture instead: "
            f"create_model('{variant[0]}', head='{variant[1]}')."
        )
    if not timm.is_model(arch):
        known = [n for n in timm.list_models() if split_variant(n) is None]
        close = difflib.get_close_matches(arch, known, n=5)
        hint = f" Did you mean one of {close}?" if close else " See timm.list_models()."
        raise ValueError(f"Unknown timm architecture '{arch}'.{hint}")
    return name


def check_num_classes(num_classes, allow_zero: bool = True) -> None:
    """``None``, ``0`` (timm's feature model, when allowed) or an integer ``>= 2``."""
    if num_classes is None or (allow_zero and num_classes == 0 and type(num_classes) is int):
        return
    check_positive("num_classes", num_classes, integer=True, minimum=2)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself for a ``torch.compile`` wrapper (whose weights live in ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def check_timm_model(model, name: str = "model") -> nn.Module:
    """Return the (unwrapped) timm model, or raise a TypeError naming ``name``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a timm model (torch.nn.Module); got {type(model).__name__}.")
    model = unwrap(model)
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise TypeError(
            f"{name} ({type(model).__name__}) is not a timm model: it has no pretrained_cfg. Use "
            "dismax_plugin.convert(model, head, classifier='path.to.linear') for other models."
        )
    return model


def architecture_of(model: nn.Module) -> str:
    """The stock timm architecture of a (converted) timm model."""
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    kind = getattr(model, KIND_ATTR, None)
    if kind and arch.endswith(f"_{kind}"):
        return arch[: -len(kind) - 1]
    return arch
