r"""Model creation and weights: :func:`create_model` = ``timm.create_model`` + conversion + weights loading.

Pretrained weights come the way timm gets them: ``pretrained=True`` loads from the Hugging Face hub through
timm (its cache, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``; also for ``"hf-hub:<repo>"`` names), or from a local
file given as
``pretrained_cfg_overlay=dict(file=...)`` (``.safetensors``/``.pth``) or ``dict(state_dict=...)``. A stock
checkpoint goes through timm's ``load_pretrained`` into the stock model (which drops a classifier of another
size) before the classifier is replaced by a fresh head, so only the backbone weights are kept: a stock
``nn.Linear``'s ``<classifier>.weight`` never becomes prototypes, even though the head's matrix has that
name. A checkpoint of a converted model (its classifier holds ``calibration_scores``; earlier versions
``*.prototypes``) is loaded whole when its class count is the one asked for; for another class count (or
train.py's ``--pretrained-path``, which forces a new head) its backbone is kept and the head starts afresh,
as timm does for a stock classifier. ``checkpoint_path`` loads strictly (as timm's ``load_checkpoint``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from timm.models import load_state_dict, parse_model_name, resolve_pretrained_cfg
from torch import nn

from dismax_plugin._checks import check_choice

from ._convert import check_head_options, classifier_paths, convert_timm_model, head_kind, mark_converted
from ._names import HEAD_KINDS, HEAD_OPTIONS, architecture_of, check_architecture, check_num_classes

__all__ = ["create_model"]

_logger = logging.getLogger(__name__)


def _read_state_dict(path, what: str) -> dict[str, Any]:
    try:
        return load_state_dict(str(path))
    except Exception as error:  # torch/safetensors raise many types for unreadable files
        raise ValueError(
            f"{what} '{path}' could not be read as a checkpoint (.safetensors, .pth or .pth.tar): {error}"
        ) from error


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


def _has_head_weights(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is a converted model's (an isotropic head's buffers, or the earlier ``prototypes``)."""
    return any(key.endswith((".prototypes", ".calibration_scores")) for key in state_dict)


def _declared_classifiers(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    declared = cfg.get("classifier")
    return () if not declared else (declared,) if isinstance(declared, str) else tuple(declared)


def _classes_in(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    declared = _declared_classifiers(cfg)
    if not declared:
        return None
    first = declared[0]
    weight = state_dict.get(first + ".weight")
    return int(weight.shape[0]) if getattr(weight, "ndim", 0) >= 1 else None


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """Load a stock checkpoint (classifier dropped unless it fits) or one of the converted model (whole)."""
    paths = classifier_paths(model)
    prefixes = tuple(p + "." for p in paths)
    state_dict = dict(state_dict)
    whole = _has_head_weights(state_dict)
    if not whole:
        current = model.state_dict()
        head_keys = [k for k in state_dict if k.startswith(prefixes)]
        fits = all(k in current and current[k].shape == state_dict[k].shape for k in head_keys)
        if head_kind(model) == "linear" and head_keys and fits:
            whole = True
        else:
            for key in head_keys:
                del state_dict[key]
    try:
        result = model.load_state_dict(state_dict, strict=whole)
    except RuntimeError as error:
        raise ValueError(f"The weights in {where} do not fit '{architecture_of(model)}': {error}") from error
    if not whole:
        missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The weights in {where} do not fit '{architecture_of(model)}': missing {missing[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}."
            )
        _logger.info("Loaded backbone weights from %s; the classifier was re-initialised.", where)


def _timm_kwargs(model_name: str, num_classes: int | None, timm_kwargs: dict[str, Any]) -> tuple[str, dict, bool]:
    """``(architecture, kwargs for timm.create_model, whether it declares a classifier)``; checks the name and
    its pretrained tag. An ``"hf-hub:<repo>"`` name is passed to timm as it is."""
    source = parse_model_name(model_name)[0] if isinstance(model_name, str) else None
    if source == "hf-hub":
        return model_name, dict(timm_kwargs, **({} if num_classes is None else {"num_classes": num_classes})), True
    if source is not None:
        raise ValueError(
            f"model_name '{model_name}': '{source}:' names are not supported here; use load_model() for a folder "
            "written by save_model(), or convert_timm_model(timm.create_model(...)) for another timm folder."
        )
    check_architecture(model_name)
    arch, name_tag = model_name.split(".", 1) if "." in model_name else (model_name, "")
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
    declared = registered is None or bool(registered.classifier) or bool(kwargs.get("pretrained_cfg"))
    return arch, kwargs, declared


def _local_pretrained(arch: str, kwargs: dict[str, Any]) -> tuple[str, dict] | None:
    """Resolve local weights for ``pretrained=True``: returns whole-model weights, or puts a stock
    checkpoint into ``kwargs["pretrained_cfg_overlay"]`` for timm (then ``None``)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(arch, kwargs.get("pretrained_cfg"), overlay).to_dict()
    weights = _local_weights(cfg)
    if isinstance(kwargs.get("pretrained_cfg"), Mapping) and kwargs["pretrained_cfg"].get("source"):
        # a local-dir cfg (timm.create_model("local-dir:...")): its weights were read above
        kwargs["pretrained_cfg"] = {k: v for k, v in kwargs["pretrained_cfg"].items() if k != "source"}
    if weights is None or not isinstance(weights[1], dict):
        return None
    where, loaded = weights
    file_classes = _classes_in(loaded, cfg)
    given = kwargs.get("pretrained_cfg_overlay") or {}
    if _has_head_weights(loaded):
        wanted = kwargs.get("num_classes", cfg.get("num_classes"))
        if file_classes is None or (wanted == file_classes and given.get("num_classes") in (None, file_classes)):
            kwargs["pretrained"] = False
            return where, loaded
        # a converted model's weights for another class count (or train.py's --pretrained-path, which forces a
        # new head with num_classes=-1): as timm does with a classifier of another size, the backbone is kept and
        # the head starts afresh (its prototypes, temperature and calibration belong to other classes)
        prefixes = tuple(f"{p}." for p in _declared_classifiers(cfg))
        loaded = {k: v for k, v in loaded.items() if not k.startswith(prefixes)}
    overlay["state_dict"] = loaded
    if file_classes is not None and "num_classes" not in given:
        overlay["num_classes"] = file_classes  # timm then drops a classifier of another size
    kwargs["pretrained_cfg_overlay"] = overlay
    return None


def _hub_error(model_name: str, arch: str, kwargs: dict[str, Any], error: Exception) -> RuntimeError:
    if arch.startswith("hf-hub:"):
        repo, url = arch[len("hf-hub:") :], None
    else:
        cfg = resolve_pretrained_cfg(arch, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        repo, url = cfg.hf_hub_id, cfg.url
    where = f"Hugging Face hub repository '{repo}'" if repo else f"URL '{url}'"
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true") else ""
    return RuntimeError(
        f"pretrained=True for '{model_name}': timm could not get the weights from the {where}{offline}: "
        f"{type(error).__name__}: {error}. Download them once with network access (e.g. "
        f"`timm.create_model('{model_name}', pretrained=True)` or `hf download {repo}`; they go to the "
        "Hugging Face cache, HF_HUB_CACHE), or pass a local file: "
        "pretrained_cfg_overlay=dict(file='/path/to/weights.safetensors')."
    )


def _build(model_name: str, arch: str, kind: str, kwargs: dict[str, Any], options: dict) -> nn.Module:
    """``timm.create_model`` with ``kwargs``; hub failures become a RuntimeError saying what to do."""
    local = any(k in (kwargs.get("pretrained_cfg_overlay") or {}) for k in ("file", "state_dict"))
    from_hub = arch.startswith("hf-hub:") or (bool(kwargs.get("pretrained")) and not local)
    try:
        model = timm.create_model(arch, **kwargs)
    except OSError as error:  # huggingface_hub's errors (offline, not cached, no network) are all OSErrors
        if from_hub:
            raise _hub_error(model_name, arch, kwargs, error) from error
        raise
    if kwargs.get("features_only"):
        return model  # timm's feature extractor: no classifier to convert
    model.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    if kind == "linear":
        return model
    if kwargs.get("num_classes") == 0:
        return mark_converted(model, kind, options)  # timm's feature model; reset_classifier(n) brings the head
    return convert_timm_model(model, kind, **options)


def _head_options(kind: str, timm_kwargs: dict[str, Any]) -> dict:
    """Take the head options (:data:`~._names.HEAD_OPTIONS`) out of ``timm_kwargs``, checked."""
    options = {name: timm_kwargs.pop(name) for name in HEAD_OPTIONS if name in timm_kwargs}
    if kind == "linear" and any(v is not None for v in options.values()):
        raise TypeError(f"head options {sorted(options)} apply to isotropic heads, not to head='linear'.")
    return check_head_options(options) if kind != "linear" else {}


def create_model(
    model_name: str,
    head: str = "dismax",
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with the final classifier replaced by an isotropic head.

    Head options (``entropic_scale``) go to the isotropic heads; everything else goes to
    ``timm.create_model`` (``in_chans``, ``img_size``, ``global_pool``,
    ``features_only``, ``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ...).

    * ``pretrained=True``: timm's weights (Hugging Face hub and its cache, or the local file of
      ``pretrained_cfg_overlay=dict(file=...)``); the old classifier is dropped, the backbone kept.
    * ``checkpoint_path``: loaded after the conversion (the classifier of a stock checkpoint is dropped
      unless ``head="linear"`` and the shapes match; a checkpoint of the converted model loads whole).
    * ``num_classes=0``: timm's feature model (no classifier); ``reset_classifier(n)`` with ``n >= 2``
      brings back a head of this kind. ``features_only=True`` returns timm's feature extractor.

    :param model_name: a timm architecture, optionally with a pretrained tag (``"resnet18.a1_in1k"``), or
        ``"hf-hub:<repo>"`` (timm reads the repository's config and, with ``pretrained=True``, its weights).
    :param head: ``"dismax"``, ``"isomaxplus"``, ``"isomax"`` or ``"linear"`` (the stock timm model).
    :param num_classes: number of classes :math:`C \\ge 2`, or 0 (default: timm's, usually 1000).
    :return: the model, with logits :math:`B \\times C`.
    :raises ValueError: unknown architecture or head, ``num_classes`` 1 or negative, weights that do not fit.
    :raises RuntimeError: ``pretrained=True`` and the weights cannot be fetched (e.g. offline, not cached).
    :raises FileNotFoundError: a weights file or ``checkpoint_path`` that does not exist.
    """
    kind = check_choice("head", head, HEAD_KINDS)
    check_num_classes(num_classes)
    options = _head_options(kind, timm_kwargs)
    arch, kwargs, declares_classifier = _timm_kwargs(model_name, num_classes, timm_kwargs)
    if kind != "linear" and not declares_classifier and not kwargs.get("features_only"):
        raise ValueError(
            f"timm model '{arch}' declares no classifier (pretrained_cfg['classifier'] is None); it is an "
            "encoder without a classification head and cannot be converted."
        )
    if checkpoint_path is not None and not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"checkpoint_path '{checkpoint_path}' does not exist.")
    kwargs["pretrained"] = bool(pretrained)
    from_hub_name = arch.startswith("hf-hub:")
    whole_weights = _local_pretrained(arch, kwargs) if pretrained and not from_hub_name else None
    if not pretrained and any(k in (kwargs.get("pretrained_cfg_overlay") or {}) for k in ("file", "state_dict")):
        _logger.warning("pretrained_cfg_overlay weights are ignored because pretrained=False.")
    if kwargs.get("features_only") and (checkpoint_path is not None or whole_weights is not None):
        raise ValueError(
            "features_only=True takes backbone weights from pretrained=True (timm's or a stock file); load a "
            "checkpoint of a converted model into create_model(...) without features_only."
        )
    model = _build(model_name, arch, kind, kwargs, options)
    if kwargs.get("features_only"):
        return model
    if whole_weights is not None:
        load_weights(model, whole_weights[1], whole_weights[0])
    if checkpoint_path is not None:
        where = f"checkpoint_path '{checkpoint_path}'"
        load_weights(model, _read_state_dict(checkpoint_path, "checkpoint_path"), where)
    return model
