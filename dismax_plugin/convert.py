"""Swap the final ``nn.Linear`` of any model for an isotropic head."""

from __future__ import annotations

from torch import nn

from ._checks import check_choice
from .heads import HEADS, PrototypeHead

__all__ = ["convert", "find_classifier", "heads_of", "replace_module"]


def find_classifier(model: nn.Module, classifier: str | None = None) -> tuple[str, nn.Linear]:
    """Return ``(path, linear)``: the module at ``classifier`` or, if ``None``, the last ``nn.Linear``.

    :raises TypeError: if ``model`` is not an ``nn.Module`` or the module at the path is not an ``nn.Linear``.
    :raises ValueError: if the path does not exist or the model holds no ``nn.Linear``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if classifier is None:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"model ({type(model).__name__}) has no nn.Linear to replace; pass classifier='path.to.linear' "
                "or build the head yourself with dismax_plugin.create_head()."
            )
        return linears[-1]
    if not isinstance(classifier, str):
        raise TypeError(f"classifier must be a dotted attribute path such as 'classifier.4'; got {classifier!r}.")
    try:
        module = model.get_submodule(classifier)
    except AttributeError as error:
        raise ValueError(f"classifier='{classifier}' is not a submodule of {type(model).__name__}.") from error
    if not isinstance(module, nn.Linear):
        raise TypeError(f"classifier='{classifier}' must name an nn.Linear; it is a {type(module).__name__}.")
    return classifier, module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted attribute ``path`` of ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def convert(model: nn.Module, head: str = "dismax", classifier: str | None = None) -> nn.Module:
    """Replace the final ``nn.Linear(D, C)`` of ``model`` by an isotropic head of the same sizes, in place.

    The head is created on the device and dtype of the replaced layer. Returns ``model`` (or the new head
    if ``model`` itself is the ``nn.Linear``).

    :param head: ``"dismax"``, ``"isomaxplus"`` or ``"isomax"``.
    :param classifier: dotted path of the layer to replace (e.g. ``"classifier.4"``); default: the last
        ``nn.Linear`` in ``model.named_modules()`` order.
    """
    kind = check_choice("head", head, HEADS)
    path, linear = find_classifier(model, classifier)
    new = HEADS[kind](
        linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype
    )
    if path == "":
        return new
    replace_module(model, path, new)
    return model


def heads_of(model: nn.Module) -> list[tuple[str, PrototypeHead]]:
    """All isotropic heads inside ``model`` as ``(path, head)``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PrototypeHead)]
