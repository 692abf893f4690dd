r"""Conversion of timm models: the classifier(s) named by ``pretrained_cfg["classifier"]`` become heads.

Every declared path must hold an ``nn.Linear(D, C)`` (replaced by a head :math:`B \times D \to B \times C`)
or a 1x1 ``nn.Conv2d`` (replaced by a conv-form head). Models with several classifiers (distilled
DeiT/LeViT/PiT/RepViT, VOLO's ``aux_head``, EfficientViM's ``heads.*``) get all of them converted; a declared
path that the configuration leaves out is skipped. A converted model keeps its class (it becomes a
subclass, so ``isinstance`` holds); its ``reset_classifier(n)`` builds heads of the same kind, and
``reset_classifier(0)`` gives timm's feature model while remembering the kind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from dismax_plugin._checks import check_choice, check_positive
from dismax_plugin.convert import replace_module
from dismax_plugin.heads import HEADS, PrototypeHead

from ._conv_heads import CONV_HEADS, is_conv_head
from ._names import (
    HEAD_KINDS,
    HEAD_OPTIONS,
    KIND_ATTR,
    OPTIONS_ATTR,
    architecture_of,
    check_timm_model,
    registered_name,
    unwrap,
)

__all__ = ["check_head_options", "classifier_paths", "convert_timm_model", "get_head", "head_kind", "head_options",
           "mark_converted"]

_logger = logging.getLogger(__name__)


class _ConvertedModelMixin:
    """Mixed into a timm model's class by :func:`convert_timm_model`: keeps ``reset_classifier`` isotropic."""

    _dismax_base: type[nn.Module]

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """timm's ``reset_classifier``, then the new classifier(s) become heads of the model's kind.

        :param num_classes: new number of classes, ``>= 2``, or 0 for timm's feature model (no classifier).
        """
        if num_classes != 0:
            check_positive("num_classes", num_classes, integer=True, minimum=2)
        super().reset_classifier(num_classes, *args, **kwargs)
        if num_classes > 0:
            _swap_classifiers(self, getattr(self, KIND_ATTR), head_options(self))

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


def classifier_paths(model: nn.Module) -> tuple[str, ...]:
    """Dotted paths of the classifier layer(s) of a timm model, from ``pretrained_cfg["classifier"]``.

    :raises TypeError: if ``model`` is not a timm model.
    :raises ValueError: if the model declares no classifier.
    """
    model = check_timm_model(model)
    declared = model.pretrained_cfg.get("classifier")
    if not declared:
        raise ValueError(
            f"timm model '{architecture_of(model)}' declares no classifier (pretrained_cfg['classifier'] is "
            f"{declared!r}); it is an encoder without a classification head and cannot be converted."
        )
    return (declared,) if isinstance(declared, str) else tuple(declared)


def _layer_sizes(old: nn.Module, path: str, arch: str) -> tuple[int, int, nn.Parameter, bool]:
    """``(in_features, num_classes, reference parameter, conv form)`` of a classifier layer."""
    if isinstance(old, PrototypeHead):
        return old.in_features, old.num_classes, old.weight, is_conv_head(old)
    if isinstance(old, nn.Linear):
        return old.in_features, old.out_features, old.weight, False
    if isinstance(old, nn.Conv2d):
        if old.kernel_size != (1, 1) or old.groups != 1 or old.stride != (1, 1) or old.padding not in ((0, 0), 0):
            raise TypeError(
                f"classifier '{path}' of '{arch}' is a Conv2d with kernel {old.kernel_size}, stride "
                f"{old.stride}, groups {old.groups}; only 1x1 convolutions can be replaced by a head."
            )
        return old.in_channels, old.out_channels, old.weight, True
    if isinstance(old, nn.Identity):
        raise ValueError(
            f"'{arch}' has no classifier at '{path}' (num_classes=0); create it with num_classes >= 2 or call "
            "model.reset_classifier(num_classes) first."
        )
    raise TypeError(
        f"classifier '{path}' of '{arch}' is a {type(old).__name__}; expected an nn.Linear or a 1x1 "
        "nn.Conv2d. Use dismax_plugin.convert(model, head, classifier='path.to.linear') instead."
    )


def _new_classifier(old: nn.Module, kind: str, path: str, arch: str, options: dict) -> nn.Module:
    in_features, num_classes, ref, conv = _layer_sizes(old, path, arch)
    if kind == "linear" and isinstance(old, (nn.Linear, nn.Conv2d)):
        return old
    if kind == getattr(old, "kind", None):
        for name, value in options.items():  # same kind: keep the weights, adopt the options
            setattr(old, name, float(value))
        return old
    if num_classes < 2:
        raise ValueError(f"'{arch}' has {num_classes} output at '{path}'; an isotropic head needs num_classes >= 2.")
    dd = {"device": ref.device, "dtype": ref.dtype}
    if kind == "linear":
        new = nn.Conv2d(in_features, num_classes, 1, **dd) if conv else nn.Linear(in_features, num_classes, **dd)
    else:
        new = (CONV_HEADS if conv else HEADS)[kind](in_features, num_classes, **options, **dd)
    return new.train(old.training)


def _plan_swap(model: nn.Module, kind: str, options: dict) -> list[tuple[str, nn.Module]]:
    """The new layer for every classifier path, all checked before any is changed."""
    # A declared path may be absent by configuration (e.g. repvit/levit built or reset without the
    # distillation head): the paths that exist are converted; none existing means there is no classifier.
    arch = architecture_of(model)
    paths = classifier_paths(model)
    plan = []
    for path in paths:
        try:
            old = model.get_submodule(path)
        except AttributeError:
            _logger.debug("'%s' has no classifier at '%s' in this configuration.", arch, path)
            continue
        plan.append((path, _new_classifier(old, kind, path, arch, options)))
    if not plan:
        raise ValueError(
            f"pretrained_cfg['classifier'] of '{arch}' names {list(paths)}, which are not submodules of "
            f"{type(model).__name__} (num_classes={getattr(model, 'num_classes', None)!r}); it is an encoder "
            "without a classification head and cannot be converted."
        )
    return plan


def _swap_classifiers(model: nn.Module, kind: str, options: dict) -> None:
    for path, new in _plan_swap(model, kind, options):
        replace_module(model, path, new)


def check_head_options(options: dict) -> dict:
    """The isotropic heads' keyword options (:data:`~._names.HEAD_OPTIONS`), checked; ``None`` values dropped."""
    unknown = sorted(set(options) - set(HEAD_OPTIONS))
    if unknown:
        raise TypeError(f"unknown head option(s) {unknown}; the isotropic heads take {list(HEAD_OPTIONS)}.")
    checked = {}
    for name, value in options.items():
        if value is None:
            continue
        check_positive(name, value)
        checked[name] = float(value)
    return checked


def head_options(model: nn.Module) -> dict:
    """The isotropic heads' keyword options (``{"entropic_scale": ...}``): read from the model's head, else
    those it was converted with (a feature model); ``{}`` for a linear model."""
    head = get_head(model)
    if head is not None:
        return {name: float(getattr(head, name)) for name in HEAD_OPTIONS}
    return dict(getattr(unwrap(model), OPTIONS_ATTR, None) or {})


def mark_converted(model: nn.Module, kind: str, options: dict | None = None) -> nn.Module:
    """Give ``model`` the class, head kind and registered architecture name of ``kind`` (no layer swap).

    Used for timm's feature model (``num_classes=0``): no classifier now, and a later
    ``reset_classifier(n >= 2)`` brings back heads of ``kind``.
    """
    target = unwrap(model)
    arch = architecture_of(target)
    base = getattr(type(target), "_dismax_base", type(target))
    cfg = dict(target.pretrained_cfg)
    if kind == "linear":
        target.__class__ = base
        target.__dict__.pop(KIND_ATTR, None)
        target.__dict__.pop(OPTIONS_ATTR, None)
        cfg["architecture"] = arch
    else:
        if not hasattr(base, "reset_classifier"):
            raise ValueError(
                f"'{arch}' ({base.__name__}) has no reset_classifier(); it is an encoder without a classification "
                "head and cannot be converted."
            )
        target.__class__ = _converted_class(base)
        setattr(target, KIND_ATTR, kind)
        setattr(target, OPTIONS_ATTR, check_head_options(options or {}))
        cfg["architecture"] = registered_name(arch, kind)
    target.pretrained_cfg = target.default_cfg = cfg
    return model


def convert_timm_model(model: nn.Module, head: str = "dismax", **options) -> nn.Module:
    """Replace the classifier(s) of a timm model by ``head`` layers of the same sizes, in place.

    The heads are created on the device and dtype of the replaced layers. Converting to the kind the model
    already has is a no-op; converting to another kind (or to ``"linear"``) builds fresh layers;
    ``pretrained_cfg["architecture"]`` becomes ``"<arch>_<head>"`` (the stock name for ``"linear"``).
    Returns ``model``.

    :param model: a model from ``timm.create_model`` (or a ``torch.compile`` wrapper of one).
    :param head: ``"dismax"``, ``"isomaxplus"``, ``"isomax"`` or ``"linear"``.
    :param options: head options (``entropic_scale``, default :data:`dismax_plugin.ENTROPIC_SCALE`).
    :raises TypeError: if ``model`` is not a timm model, or a classifier is neither ``nn.Linear`` nor 1x1
        ``nn.Conv2d``.
    :raises ValueError: for an unknown head, a model without a classifier, or fewer than 2 classes.
    """
    kind = check_choice("head", head, HEAD_KINDS)
    target = check_timm_model(model)
    if kind == "linear" and any(v is not None for v in options.values()):
        raise TypeError(f"head options {sorted(options)} apply to isotropic heads, not to head='linear'.")
    options = check_head_options(options) if kind != "linear" else {}
    plan = _plan_swap(target, kind, options)
    base = getattr(type(target), "_dismax_base", type(target))
    if kind != "linear" and not hasattr(base, "reset_classifier"):
        raise TypeError(
            f"'{architecture_of(target)}' ({base.__name__}) has no reset_classifier(); it is not a timm classifier."
        )
    for path, new in plan:
        replace_module(target, path, new)
    mark_converted(target, kind, options)
    return model


def get_head(model: nn.Module) -> PrototypeHead | None:
    """The isotropic head of ``model`` (the first classifier path for multi-classifier models), or ``None``.

    For a model that is not from timm, the last :class:`~dismax_plugin.PrototypeHead` in the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    model = unwrap(model)
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
    return getattr(unwrap(model), KIND_ATTR, None) or "linear"
