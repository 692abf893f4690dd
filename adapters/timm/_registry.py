"""Registration of ``"<arch>_<head>"`` entrypoints in timm's registry, only when the user asks for it.

Importing the adapter registers nothing, so ``timm.list_models()`` is unchanged. After
:func:`register_timm_models` (all architectures, or the ones given), ``timm.create_model("resnet18_dismax")``
and ``timm.create_model("local-dir:PATH", pretrained=True)`` of a saved isotropic model work (timm has no
plugin discovery: the names must be registered in the process that creates the model; importing
:mod:`~dismax_plugin.adapters.timm.register` registers them all, for train.py's ``--device-modules``).

A variant is registered as timm registers its own models: under the family of its architecture (its
entrypoint lives in a module named like the stock one, so ``timm.list_models(module="resnet")`` lists
``resnet18_dismax`` too) and with the architecture's pretrained configurations under the variant's name
(``timm.get_pretrained_cfg("resnet18_dismax.a1_in1k")``: the stock input size, mean, std and hub weights,
whose backbone the variant loads), so timm's own tooling and tests treat the variants like stock models.
"""

from __future__ import annotations

import sys
import types
from collections import deque
from collections.abc import Iterable

import timm
from timm.models import DefaultCfg, register_model

from dismax_plugin._checks import check_choice
from dismax_plugin.heads import HEADS

from ._names import check_architecture, registered_name, split_variant

__all__ = ["register_timm_models"]

_VARIANTS: dict[str, tuple[str, str]] = {}  # registered name -> (timm architecture, head kind)
_REGISTRY_MODULE_NAME = "dismax_plugin.adapters.timm_isotropic"


class _NameList(list):
    """``__all__`` with a set-backed ``in`` (timm's register_model tests membership before each append)."""

    def __init__(self):
        super().__init__()
        self._names: set[str] = set()

    def __contains__(self, name) -> bool:
        return name in self._names

    def append(self, name: str) -> None:
        self._names.add(name)
        super().append(name)


def _registry_module(family: str) -> types.ModuleType:
    # timm's register_model files each entrypoint under sys.modules[fn.__module__] (appends the name to its
    # __all__, reads its default_cfgs, and files the name under the module's last name component), so the
    # entrypoints of a family live in a small module "<_REGISTRY_MODULE_NAME>.<timm family>".
    if _REGISTRY_MODULE_NAME not in sys.modules:
        sys.modules[_REGISTRY_MODULE_NAME] = types.ModuleType(_REGISTRY_MODULE_NAME, "timm isotropic variants.")
    name = f"{_REGISTRY_MODULE_NAME}.{family}"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name, f"timm entrypoints of isotropic-head '{family}' models.")
        module.__all__ = _NameList()
        module.default_cfgs = {}
        sys.modules[name] = module
        setattr(sys.modules[_REGISTRY_MODULE_NAME], family, module)
    return module


def _variant_cfgs(architecture: str) -> DefaultCfg | None:
    """The architecture's pretrained configurations (hub ids resolved, default tag first), for its variants."""
    cfgs = timm.models.get_arch_pretrained_cfgs(architecture)  # {"arch.tag": cfg}, in timm's tag order
    if not cfgs:
        return None
    by_tag = {name.partition(".")[2]: cfg for name, cfg in cfgs.items()}
    return DefaultCfg(tags=deque(by_tag), cfgs=by_tag, is_pretrained=any(c.has_weights for c in by_tag.values()))


def _make_entrypoint(architecture: str, kind: str, module_name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        from ._weights import create_model

        return create_model(architecture, head=kind, pretrained=pretrained, **kwargs)

    name = registered_name(architecture, kind)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module_name
    entrypoint.__doc__ = f"timm '{architecture}' with a {kind} head (dismax_plugin.adapters.timm.create_model)."
    return entrypoint


def register_timm_models(architectures: Iterable[str] | None = None, heads: Iterable[str] | None = None) -> list[str]:
    """Register ``"<arch>_<head>"`` timm entrypoints; returns the names registered by this call.

    Nothing is registered at import. Call it before ``timm.create_model("resnet18_dismax")`` or
    ``timm.create_model("local-dir:PATH")`` of a saved isotropic model; registering adds the names to
    ``timm.list_models()`` (4,113 for all 1,371 architectures of timm 1.0.31, about 1 s with their pretrained
    configurations; three per architecture given).
    Existing names are left alone, so calling it again is harmless.

    :param architectures: timm architecture names (default: all of ``timm.list_models()``).
    :param heads: head kinds (default: ``"dismax"``, ``"isomaxplus"``, ``"isomax"``).
    :return: the names registered by this call.
    :raises ValueError: for an unknown architecture or head.
    """
    kinds = [check_choice("head", h, HEADS) for h in (HEADS if heads is None else heads)]
    if architectures is None:
        names = [a for a in timm.list_models() if a not in _VARIANTS and split_variant(a) is None]
    else:
        names = [check_architecture(a).split(".", 1)[0] for a in architectures]
    added = []
    for arch in names:
        family = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
        module = _registry_module(family)
        cfgs = _variant_cfgs(arch)
        for kind in kinds:
            name = registered_name(arch, kind)
            if name in _VARIANTS or timm.is_model(name):
                continue
            entrypoint = _make_entrypoint(arch, kind, module.__name__)
            setattr(module, name, entrypoint)
            if cfgs is not None:
                module.default_cfgs[name] = cfgs
            register_model(entrypoint)
            _VARIANTS[name] = (arch, kind)
            added.append(name)
    return added
