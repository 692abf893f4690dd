r"""timm adapter: timm models whose final classifier is an IsoMax, IsoMax+ or DisMax head.

.. code-block:: python

    from dismax_plugin.adapters import timm as dtimm

    model = dtimm.create_model("convnext_atto", head="dismax", num_classes=10)
    model = dtimm.convert_timm_model(timm_model, head="isomaxplus")
    dtimm.save_model(model, "runs/m", metadata={"class_names": [...]})
    model = dtimm.load_model("runs/m", device="cpu")

**Generic swap.** The layers to replace are read from timm's own metadata, ``pretrained_cfg["classifier"]``
(a path or a tuple of paths). Every path must hold an ``nn.Linear(D, C)`` (replaced by a head
:math:`B \times D \to B \times C`) or a 1x1 ``nn.Conv2d`` (``resnetv2_*``, ``dla*``, ``dpn*``; replaced by a
head that maps :math:`B \times D \times H \times W \to B \times C \times H \times W`). Models with several
classifiers (distilled DeiT/LeViT/PiT/RepViT, VOLO's ``aux_head``, EfficientViM's ``heads.*``) get all of
them converted; the model combines their logits as timm does (e.g. the mean of ``head`` and ``head_dist``),
and :func:`get_head` returns the first one. A declared path that the configuration leaves out (e.g. no
distillation head) is skipped. Encoder-only models without a classifier raise a ValueError.

**timm protocol.** A converted model keeps its class (it becomes a subclass, so ``isinstance`` still holds)
and its behaviour: ``forward_features`` is unchanged, ``forward_head(x, pre_logits=True)`` returns the
pooled features, ``get_classifier()`` returns the head, ``reset_classifier(n)`` builds a fresh head of the
same kind with ``n`` classes, and ``pretrained_cfg["architecture"]`` becomes the registered name
``"<arch>_<head>"``.

**Registry.** Importing this module registers ``"<arch>_dismax"``, ``"<arch>_isomaxplus"`` and
``"<arch>_isomax"`` for every timm architecture (about 4100 names, ~0.03 s), so
``timm.create_model("resnet18_dismax", num_classes=10)`` works once the adapter has been imported
(timm has no plugin discovery). Via ``timm.create_model`` a ``checkpoint_path`` must hold a checkpoint of
the converted model (timm loads it strictly); :func:`create_model` also accepts stock timm checkpoints.

**Saved format** (:func:`save_model`): a directory with ``model.safetensors`` (the full ``state_dict``,
temperature and thresholds included) and ``dismax_model.json`` (architecture, timm arguments, head kind,
number of classes, temperature, thresholds, data config, versions and the caller's ``metadata``).

Nothing is ever downloaded: ``pretrained=True`` needs local weights
(``pretrained_cfg_overlay=dict(file=...)``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import tempfile
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError
from timm.models import get_model_args, load_state_dict, parse_model_name, register_model, resolve_pretrained_cfg
from torch import nn

from dismax_plugin import __version__ as _plugin_version
from dismax_plugin._checks import check_choice, check_positive
from dismax_plugin.convert import replace_module
from dismax_plugin.heads import HEADS, DisMaxHead, IsoMaxHead, IsoMaxPlusHead, PrototypeHead

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "HEAD_KINDS",
    "WEIGHTS_NAME",
    "Conv2dDisMaxHead",
    "Conv2dIsoMaxHead",
    "Conv2dIsoMaxPlusHead",
    "classifier_paths",
    "convert_timm_model",
    "create_model",
    "get_head",
    "head_kind",
    "load_model",
    "read_metadata",
    "register_timm_models",
    "registered_name",
    "save_model",
]

_logger = logging.getLogger(__name__)

HEAD_KINDS: tuple[str, ...] = (*HEADS, "linear")
"""Head kinds accepted by :func:`create_model`: the isotropic heads and ``"linear"`` (the stock timm model)."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "dismax_model.json"
FORMAT = "dismax-plugin/timm"
_FORMAT_VERSION = 1
_KIND_ATTR = "_dismax_head_kind"


# --------------------------------------------------------------------------- heads for 1x1-conv classifiers
class _Conv2dHeadMixin:
    """Applies the head at every position of a :math:`B \\times D \\times H \\times W` map (1x1-conv form)."""

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            return super().forward(features, pre_logits)
        if pre_logits:
            return features
        batch, _, height, width = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(batch * height * width, features.shape[1])
        logits = super().forward(flat)
        return logits.reshape(batch, height, width, logits.shape[1]).permute(0, 3, 1, 2)


class Conv2dIsoMaxHead(_Conv2dHeadMixin, IsoMaxHead):
    """:class:`~dismax_plugin.IsoMaxHead` in place of a 1x1 ``nn.Conv2d``: :math:`B \\times D \\times H
    \\times W \\to B \\times C \\times H \\times W` (also accepts :math:`B \\times D`)."""


class Conv2dIsoMaxPlusHead(_Conv2dHeadMixin, IsoMaxPlusHead):
    """:class:`~dismax_plugin.IsoMaxPlusHead` in place of a 1x1 ``nn.Conv2d`` (see :class:`Conv2dIsoMaxHead`)."""


class Conv2dDisMaxHead(_Conv2dHeadMixin, DisMaxHead):
    """:class:`~dismax_plugin.DisMaxHead` in place of a 1x1 ``nn.Conv2d`` (see :class:`Conv2dIsoMaxHead`)."""


_CONV_HEADS: dict[str, type[PrototypeHead]] = {
    cls.kind: cls for cls in (Conv2dIsoMaxHead, Conv2dIsoMaxPlusHead, Conv2dDisMaxHead)
}


# --------------------------------------------------------------------------- converted model classes
class _ConvertedModelMixin:
    """Mixed into a timm model's class by :func:`convert_timm_model`: keeps ``reset_classifier`` isotropic."""

    _dismax_base: type[nn.Module]

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """timm's ``reset_classifier``, then the new classifier(s) become heads of the model's kind.

        :param num_classes: new number of classes, ``>= 2`` (or 0 to remove the classifier, as in timm).
        """
        if num_classes != 0:
            check_positive("num_classes", num_classes, integer=True, minimum=2)
        super().reset_classifier(num_classes, *args, **kwargs)
        if num_classes > 0:
            _swap_classifiers(self, getattr(self, _KIND_ATTR))

    def __reduce_ex__(self, protocol):
        # The class is made at run time; pickle (torch.save, deepcopy) rebuilds it from the timm base class.
        reduced = super().__reduce_ex__(protocol)
        return (_new_converted, (type(self)._dismax_base,), *reduced[2:])


_CONVERTED_CLASSES: dict[type, type] = {}


def _converted_class(base: type[nn.Module]) -> type[nn.Module]:
    cls = _CONVERTED_CLASSES.get(base)
    if cls is None:
        namespace = {"__module__": base.__module__, "__qualname__": base.__qualname__, "_dismax_base": base}
        cls = type(base.__name__, (_ConvertedModelMixin, base), namespace)
        _CONVERTED_CLASSES[base] = cls
    return cls


def _new_converted(base: type[nn.Module]) -> nn.Module:
    """Unpickling helper: an empty instance of the converted class of ``base``."""
    return object.__new__(_converted_class(base))


# --------------------------------------------------------------------------- registry
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


def _registry_module() -> types.ModuleType:
    # timm's register_model files each entrypoint under sys.modules[fn.__module__] (and appends the name to
    # its __all__), so the ~4k entrypoints live in their own small module rather than in this one.
    module = sys.modules.get(_REGISTRY_MODULE_NAME)
    if module is None:
        module = types.ModuleType(_REGISTRY_MODULE_NAME, "timm entrypoints of isotropic-head models.")
        module.__all__ = _NameList()
        sys.modules[_REGISTRY_MODULE_NAME] = module
    return module


def registered_name(architecture: str, head: str) -> str:
    """timm registry name of ``architecture`` with an isotropic ``head``: ``"<architecture>_<head>"``."""
    kind = check_choice("head", head, HEADS)
    return f"{architecture}_{kind}"


def _make_entrypoint(architecture: str, kind: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return create_model(architecture, head=kind, pretrained=pretrained, **kwargs)

    name = registered_name(architecture, kind)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = _REGISTRY_MODULE_NAME
    entrypoint.__doc__ = f"timm '{architecture}' with a {kind} head (dismax_plugin.adapters.timm.create_model)."
    return entrypoint


def register_timm_models(
    architectures: Iterable[str] | None = None, heads: Iterable[str] | None = None
) -> list[str]:
    """Register ``"<arch>_<head>"`` timm entrypoints; returns the names registered by this call.

    Runs at import for every architecture that ``timm.list_models()`` returns; call it
    again for architectures registered later (e.g. your own ``@register_model`` models). Existing names are
    left alone.

    :param architectures: timm architecture names (default: all of ``timm.list_models()``).
    :param heads: head kinds (default: ``"dismax"``, ``"isomaxplus"``, ``"isomax"``).
    :raises ValueError: for an unknown architecture or head.
    """
    kinds = [check_choice("head", h, HEADS) for h in (HEADS if heads is None else heads)]
    if architectures is None:
        names = [a for a in timm.list_models() if a not in _VARIANTS]
    else:
        names = [_check_architecture(a) for a in architectures]
    module = _registry_module()
    added = []
    for arch in names:
        for kind in kinds:
            name = registered_name(arch, kind)
            if name in _VARIANTS or timm.is_model(name):
                continue
            entrypoint = _make_entrypoint(arch, kind)
            setattr(module, name, entrypoint)
            register_model(entrypoint)
            _VARIANTS[name] = (arch, kind)
            added.append(name)
    return added


# --------------------------------------------------------------------------- checks
def _check_architecture(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model_name must be a timm architecture name such as 'resnet18'; got {name!r}.")
    if name in _VARIANTS:
        arch, kind = _VARIANTS[name]
        raise ValueError(
            f"'{name}' is a registered isotropic model; pass the timm architecture instead: "
            f"create_model('{arch}', head='{kind}')."
        )
    if not timm.is_model(name):
        known = [n for n in timm.list_models() if n not in _VARIANTS]
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean one of {close}?" if close else " See timm.list_models()."
        raise ValueError(f"Unknown timm architecture '{name}'.{hint}")
    return name


def _check_num_classes(num_classes) -> None:
    if num_classes is not None:
        check_positive("num_classes", num_classes, integer=True, minimum=2)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module in an OptimizedModule whose weights live in ``_orig_mod``.
    return getattr(model, "_orig_mod", model)


def _check_timm_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a timm model (torch.nn.Module); got {type(model).__name__}.")
    model = _unwrap(model)
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise TypeError(
            f"{name} ({type(model).__name__}) is not a timm model: it has no pretrained_cfg. Use "
            "dismax_plugin.convert(model, head, classifier='path.to.linear') for other models."
        )
    return model


def _architecture(model: nn.Module) -> str:
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    return _VARIANTS.get(arch, (arch, None))[0]


def classifier_paths(model: nn.Module) -> tuple[str, ...]:
    """Dotted paths of the classifier layer(s) of a timm model, from ``pretrained_cfg["classifier"]``.

    :raises TypeError: if ``model`` is not a timm model.
    :raises ValueError: if the model declares no classifier.
    """
    model = _check_timm_model(model)
    declared = model.pretrained_cfg.get("classifier")
    if not declared:
        raise ValueError(
            f"timm model '{_architecture(model)}' declares no classifier (pretrained_cfg['classifier'] is "
            f"{declared!r}); it is an encoder without a classification head and cannot be converted."
        )
    return (declared,) if isinstance(declared, str) else tuple(declared)


# --------------------------------------------------------------------------- conversion
def _new_classifier(old: nn.Module, kind: str, path: str, arch: str) -> nn.Module:
    conv = False
    if isinstance(old, PrototypeHead):
        in_features, num_classes, ref = old.in_features, old.num_classes, old.prototypes
        conv = isinstance(old, _Conv2dHeadMixin)
        if kind == old.kind:
            return old
    elif isinstance(old, nn.Linear):
        if kind == "linear":
            return old
        in_features, num_classes, ref = old.in_features, old.out_features, old.weight
    elif isinstance(old, nn.Conv2d):
        if old.kernel_size != (1, 1) or old.groups != 1 or old.stride != (1, 1) or old.padding not in ((0, 0), 0):
            raise TypeError(
                f"classifier '{path}' of '{arch}' is a Conv2d with kernel {old.kernel_size}, stride "
                f"{old.stride}, groups {old.groups}; only 1x1 convolutions can be replaced by a head."
            )
        if kind == "linear":
            return old
        in_features, num_classes, ref, conv = old.in_channels, old.out_channels, old.weight, True
    elif isinstance(old, nn.Identity):
        raise ValueError(
            f"'{arch}' has no classifier at '{path}' (num_classes=0); create it with num_classes >= 2 or call "
            "model.reset_classifier(num_classes) first."
        )
    else:
        raise TypeError(
            f"classifier '{path}' of '{arch}' is a {type(old).__name__}; expected an nn.Linear or a 1x1 "
            "nn.Conv2d. Use dismax_plugin.convert(model, head, classifier='path.to.linear') instead."
        )
    if num_classes < 2:
        raise ValueError(f"'{arch}' has {num_classes} output at '{path}'; an isotropic head needs num_classes >= 2.")
    dd = {"device": ref.device, "dtype": ref.dtype}
    if kind == "linear":
        new = nn.Conv2d(in_features, num_classes, 1, **dd) if conv else nn.Linear(in_features, num_classes, **dd)
    else:
        new = (_CONV_HEADS if conv else HEADS)[kind](in_features, num_classes, **dd)
    return new.train(old.training)


def _swap_classifiers(model: nn.Module, kind: str) -> None:
    for path, new in _plan_swap(model, kind):
        replace_module(model, path, new)


def _plan_swap(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    """The new layer for every classifier path, all checked before any is changed."""
    # A declared path may be absent by configuration (e.g. repvit/levit built or reset without the
    # distillation head): the paths that exist are converted; none existing means there is no classifier.
    arch = _architecture(model)
    paths = classifier_paths(model)
    plan = []
    for path in paths:
        try:
            old = model.get_submodule(path)
        except AttributeError:
            _logger.debug("'%s' has no classifier at '%s' in this configuration.", arch, path)
            continue
        plan.append((path, _new_classifier(old, kind, path, arch)))
    if not plan:
        raise ValueError(
            f"pretrained_cfg['classifier'] of '{arch}' names {list(paths)}, which are not submodules of "
            f"{type(model).__name__} (num_classes={getattr(model, 'num_classes', None)!r}); it is an encoder "
            "without a classification head and cannot be converted."
        )
    return plan


def convert_timm_model(model: nn.Module, head: str = "dismax") -> nn.Module:
    """Replace the classifier(s) of a timm model by ``head`` layers of the same sizes, in place.

    The heads are created on the device and dtype of the replaced layers. Converting to the kind the model
    already has is a no-op; converting to another kind (or to ``"linear"``) builds fresh layers. Returns
    ``model``.

    :param model: a model from ``timm.create_model`` (or a ``torch.compile`` wrapper of one).
    :param head: ``"dismax"``, ``"isomaxplus"``, ``"isomax"`` or ``"linear"``.
    :raises TypeError: if ``model`` is not a timm model, or a classifier is neither ``nn.Linear`` nor 1x1
        ``nn.Conv2d``.
    :raises ValueError: for an unknown head, a model without a classifier, or fewer than 2 classes.
    """
    kind = check_choice("head", head, HEAD_KINDS)
    target = _check_timm_model(model)
    arch = _architecture(target)
    base = getattr(type(target), "_dismax_base", type(target))
    plan = _plan_swap(target, kind)
    if kind != "linear" and not hasattr(base, "reset_classifier"):
        raise TypeError(f"'{arch}' ({base.__name__}) has no reset_classifier(); it is not a timm classifier.")
    for path, new in plan:
        replace_module(target, path, new)
    cfg = dict(target.pretrained_cfg)
    if kind == "linear":
        target.__class__ = base
        target.__dict__.pop(_KIND_ATTR, None)
        cfg["architecture"] = arch
    else:
        target.__class__ = _converted_class(base)
        setattr(target, _KIND_ATTR, kind)
        name = registered_name(arch, kind)
        if name not in _VARIANTS and timm.is_model(arch) and arch not in _VARIANTS:
            register_timm_models([arch], [kind])  # an architecture registered after this module's import
        if name in _VARIANTS:
            cfg["architecture"] = name
    target.pretrained_cfg = target.default_cfg = cfg
    return model


def get_head(model: nn.Module) -> PrototypeHead | None:
    """The isotropic head of ``model`` (the first classifier path for multi-classifier models), or ``None``.

    For a model that is not from timm, the last :class:`~dismax_plugin.PrototypeHead` in the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    model = _unwrap(model)
    if isinstance(getattr(model, "pretrained_cfg", None), Mapping) and model.pretrained_cfg.get("classifier"):
        for path in classifier_paths(model):
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, PrototypeHead):
                return module
        return None
    heads = [m for m in model.modules() if isinstance(m, PrototypeHead)]
    return heads[-1] if heads else None


def head_kind(model: nn.Module) -> str:
    """``"dismax"``, ``"isomaxplus"``, ``"isomax"`` or ``"linear"`` (no isotropic head)."""
    head = get_head(model)
    if head is not None:
        return head.kind
    return getattr(_unwrap(model), _KIND_ATTR, None) or "linear"


# --------------------------------------------------------------------------- creation
def _local_weights(cfg: Mapping[str, Any]) -> tuple[str, Any] | None:
    """``(description, state_dict | path)`` of the local weights named by a resolved pretrained cfg."""
    if cfg.get("source") == "local-dir":
        directory = Path(cfg.get("file") or "")
        if not directory.is_dir():
            raise FileNotFoundError(f"local-dir weights: '{directory}' is not a directory.")
        return f"local directory '{directory}'", timm.models._hub.load_state_dict_from_path(directory)
    if isinstance(cfg.get("state_dict"), Mapping):
        return "pretrained_cfg state_dict", dict(cfg["state_dict"])
    file = cfg.get("file")
    if file:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"pretrained_cfg_overlay file '{file}' does not exist.")
        if str(file).endswith((".npz", ".npy")):
            return f"file '{file}'", str(file)  # foreign format: timm's model-specific loader reads it
        return f"file '{file}'", _read_state_dict(file, "pretrained_cfg_overlay file")
    return None


def _read_state_dict(path, what: str) -> dict[str, Any]:
    try:
        return load_state_dict(str(path))
    except Exception as error:  # torch/safetensors raise many types for unreadable files
        raise ValueError(
            f"{what} '{path}' could not be read as a checkpoint (.safetensors, .pth or .pth.tar): {error}"
        ) from error


def _has_head_weights(state_dict: Mapping[str, Any]) -> bool:
    return any(key.endswith(".prototypes") for key in state_dict)


def _load_weights(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """Load a stock checkpoint (classifier dropped unless it fits) or one of the converted model (whole)."""
    paths = classifier_paths(model)
    state_dict = dict(state_dict)
    whole = _has_head_weights(state_dict)
    if not whole:
        current = model.state_dict()
        head_keys = [k for k in state_dict if k.startswith(tuple(p + "." for p in paths))]
        fits = all(k in current and current[k].shape == state_dict[k].shape for k in head_keys)
        if head_kind(model) == "linear" and head_keys and fits:
            whole = True
        else:
            for key in head_keys:
                del state_dict[key]
    try:
        result = model.load_state_dict(state_dict, strict=whole)
    except RuntimeError as error:
        raise ValueError(f"The weights in {where} do not fit '{_architecture(model)}': {error}") from error
    if not whole:
        missing = [k for k in result.missing_keys if not k.startswith(tuple(p + "." for p in paths))]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The weights in {where} do not fit '{_architecture(model)}': missing {missing[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}."
            )
        _logger.info("Loaded backbone weights from %s; the classifier was re-initialised.", where)


def _classes_in(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    declared = cfg.get("classifier")
    if not declared:
        return None
    first = declared if isinstance(declared, str) else declared[0]
    weight = state_dict.get(first + ".weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 1 else None


def create_model(
    model_name: str,
    head: str = "dismax",
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with the final classifier replaced by an isotropic head.

    Everything else goes to ``timm.create_model`` (``in_chans``, ``img_size``, ``drop_rate``,
    ``pretrained_cfg``, ``pretrained_cfg_overlay``, ...). Weights only ever come from local files:

    * ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file="w.safetensors")`` (or ``.pth``, or
      ``dict(state_dict=...)``): a stock timm checkpoint loads through timm (its checkpoint filters, input
      channel adaptation and, when the class count differs, a dropped classifier), then the classifier is
      replaced. A checkpoint of the converted model itself (it holds ``*.prototypes``) is loaded whole.
    * ``checkpoint_path``: loaded after the conversion, the same two ways (the classifier of a stock
      checkpoint is dropped unless ``head="linear"`` and the shapes match).

    :param model_name: a timm architecture, optionally with a pretrained tag (``"resnet18.a1_in1k"``).
    :param head: ``"dismax"``, ``"isomaxplus"``, ``"isomax"`` or ``"linear"`` (the stock timm model).
    :param num_classes: number of classes :math:`C \\ge 2` (default: timm's, usually 1000).
    :return: the model, with logits :math:`B \\times C`.
    :raises ValueError: unknown architecture or head, ``num_classes < 2``, ``pretrained=True`` without a local
        file, or weights that do not fit.
    :raises FileNotFoundError: a weights file or ``checkpoint_path`` that does not exist.
    """
    kind = check_choice("head", head, HEAD_KINDS)
    _check_num_classes(num_classes)
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a timm architecture name such as 'resnet18'; got {model_name!r}.")
    source, _ = parse_model_name(model_name)
    if source is not None:
        raise ValueError(
            f"model_name '{model_name}': '{source}:' sources are not supported (nothing is downloaded); pass the "
            "architecture name with pretrained_cfg_overlay=dict(file=...), or use load_model() for a saved model."
        )
    arch, name_tag = model_name.split(".", 1) if "." in model_name else (model_name, "")
    _check_architecture(arch)
    if timm_kwargs.get("features_only"):
        raise ValueError("features_only=True builds a feature extractor without a classifier; use timm directly.")
    if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"checkpoint_path '{checkpoint_path}' does not exist.")
    kwargs = dict(timm_kwargs)
    if name_tag and not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = name_tag
    if num_classes is not None:
        kwargs["num_classes"] = num_classes

    tag = kwargs.get("pretrained_cfg") if isinstance(kwargs.get("pretrained_cfg"), str) else ""
    try:  # the registered cfg (None when the architecture registers none), to fail before building
        registered = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError as error:  # an unknown pretrained tag
        raise ValueError(f"model_name '{model_name}': {error} See timm.list_pretrained('{arch}*').") from error
    if kind != "linear" and registered is not None and not registered.classifier and not kwargs.get("pretrained_cfg"):
        raise ValueError(
            f"timm model '{arch}' declares no classifier (pretrained_cfg['classifier'] is None); it is an "
            "encoder without a classification head and cannot be converted."
        )
    whole_weights = None
    if pretrained:
        cfg = resolve_pretrained_cfg(arch, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        weights = _local_weights(cfg.to_dict())
        if weights is None:
            raise ValueError(
                f"pretrained=True for '{model_name}' would download weights; nothing is downloaded by "
                "dismax_plugin. Point at a local file instead: pretrained_cfg_overlay=dict(file='/path/to/"
                "weights.safetensors') (a timm state_dict, .safetensors or .pth), or pass checkpoint_path=..."
            )
        where, loaded = weights
        if isinstance(loaded, dict) and _has_head_weights(loaded):
            whole_weights, pretrained = (where, loaded), False
        elif isinstance(loaded, dict):
            overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, state_dict=loaded)
            file_classes = _classes_in(loaded, cfg.to_dict())
            if file_classes is not None and "num_classes" not in (kwargs.get("pretrained_cfg_overlay") or {}):
                overlay["num_classes"] = file_classes  # timm then drops a classifier of another size
            kwargs["pretrained_cfg_overlay"] = overlay
        if isinstance(kwargs.get("pretrained_cfg"), Mapping) and kwargs["pretrained_cfg"].get("source"):
            # a local-dir cfg (timm.create_model("local-dir:...")): its weights were read above
            kwargs["pretrained_cfg"] = {k: v for k, v in kwargs["pretrained_cfg"].items() if k != "source"}
    elif any(k in (kwargs.get("pretrained_cfg_overlay") or {}) for k in ("file", "state_dict")):
        _logger.warning("pretrained_cfg_overlay weights are ignored because pretrained=False.")

    model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    model.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    if kind != "linear":
        convert_timm_model(model, kind)
    if whole_weights is not None:
        _load_weights(model, whole_weights[1], whole_weights[0])
    if checkpoint_path is not None:
        state_dict = _read_state_dict(checkpoint_path, "checkpoint_path")
        _load_weights(model, state_dict, f"checkpoint_path '{checkpoint_path}'")
    return model


# --------------------------------------------------------------------------- save / load
def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serializable (str, numbers, lists, dicts); {error}.") from error


def _data_config(model: nn.Module) -> dict[str, Any]:
    try:
        config = timm.data.resolve_model_data_config(model)
    except Exception as error:  # optional information only
        _logger.debug("No timm data config for %s: %s", type(model).__name__, error)
        return {}
    return _jsonable(config, "the timm data config")


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` to the directory ``path`` (created): ``model.safetensors`` and ``dismax_model.json``.

    The JSON file holds what :func:`load_model` needs to rebuild the model without the training code
    (``architecture``, ``model_args`` for ``timm.create_model``, ``head``, ``num_classes``), the head's
    ``temperature`` and stored ``thresholds``, timm's ``data_config``, ``versions``, and the caller's
    ``metadata`` dict under ``"metadata"``.

    :param model: a timm model, converted or stock (``head="linear"``), or a ``torch.compile`` wrapper of one.
    :param metadata: free-form JSON-serializable information (preprocessing, class names, score, ...).
    :return: the directory.
    :raises TypeError: if ``model`` is not a timm model or ``metadata`` is not a dict.
    :raises ValueError: if the model has no classifier, or something is not JSON-serializable.
    """
    model = _check_timm_model(model)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict (JSON-serializable) or None; got {type(metadata).__name__}.")
    arch = _architecture(model)
    kind = head_kind(model)
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"model has num_classes={num_classes!r}; only classifiers with >= 2 classes can be saved.")
    model_args = dict(get_model_args(model))
    model_args.pop("num_classes", None)
    model_args = _jsonable(model_args, f"the timm arguments of '{arch}' ({sorted(model_args)})")
    head = get_head(model)
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": _FORMAT_VERSION,
        "architecture": arch,
        "model_args": model_args,
        "head": kind,
        "num_classes": num_classes,
        "temperature": float(head.temperature) if head is not None else 1.0,
        "threshold_score": head.stored_score if head is not None else None,
        "thresholds": {str(t): v for t, v in head.stored_thresholds.items()} if head is not None else {},
        "data_config": _data_config(model),
        "versions": {"dismax_plugin": _plugin_version, "timm": timm.__version__, "torch": torch.__version__},
        "metadata": _jsonable(dict(metadata or {}), "metadata"),
    }
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path must be a directory (it is created if needed); '{directory}' is a file.")
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "head": kind})
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        json.dump(config, tmp, indent=2)
    os.replace(tmp.name, directory / CONFIG_NAME)
    _logger.info("Saved %s (%s head, %d classes) to %s", arch, kind, num_classes, directory)
    return directory


def _model_dir(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory written by save_model); got {path!r}.")
    directory = Path(path)
    if directory.is_file() and directory.name in (CONFIG_NAME, WEIGHTS_NAME):
        directory = directory.parent
    if not directory.exists():
        raise FileNotFoundError(f"path '{directory}' does not exist; expected a directory written by save_model().")
    if not directory.is_dir():
        raise ValueError(f"path '{directory}' is a file; expected a directory written by save_model().")
    return directory


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The whole ``dismax_model.json`` of a directory written by :func:`save_model`.

    :raises FileNotFoundError: if the directory or its JSON file is missing.
    :raises ValueError: if the JSON file is corrupt or was not written by :func:`save_model`.
    """
    file = _model_dir(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"'{file}' is missing; expected a directory written by save_model().")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"'{file}' is not valid JSON (corrupt or truncated): {error}.") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"'{file}' was not written by dismax_plugin.adapters.timm.save_model (format != {FORMAT!r}).")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in eval mode, with one call.

    The timm architecture is built with the saved arguments, converted to the saved head, and the weights
    (temperature and thresholds included) are loaded strictly. ``model.dismax_metadata`` holds
    :func:`read_metadata`.

    :param device: where to put the model (default: CPU).
    :raises FileNotFoundError: if the directory, its JSON file or its weights file is missing.
    :raises ValueError: for a corrupt file, an unknown head or architecture, or weights that do not fit.
    """
    config = read_metadata(path)
    directory = _model_dir(path)
    where = directory / CONFIG_NAME
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
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"'{weights}' is missing; expected a directory written by save_model().")
    model = timm.create_model(arch, pretrained=False, **dict(model_args, num_classes=num_classes))
    if kind != "linear":
        convert_timm_model(model, kind)
    try:
        safetensors.torch.load_model(model, str(weights), strict=True)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"'{weights}' is not a readable safetensors file (corrupt or truncated): {error}") from error
    except RuntimeError as error:
        raise ValueError(f"The weights in '{weights}' do not fit {arch} with a {kind} head: {error}") from error
    model.dismax_metadata = config
    return model.to(device if device is not None else "cpu").eval()


def _registration() -> None:
    import time

    start = time.perf_counter()
    added = register_timm_models()
    _logger.debug("Registered %d isotropic timm models in %.3f s.", len(added), time.perf_counter() - start)


_registration()
