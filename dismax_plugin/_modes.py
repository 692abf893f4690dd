"""Evaluation mode for the length of a block, restoring every submodule's own training flag afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in ``eval()`` mode inside the ``with`` block; restore each submodule's flag after it.

    ``model.train(was_training)`` would set every submodule to the top-level flag and so lose mixed modes
    (e.g. a frozen BatchNorm kept in eval while the rest trains); this restores them one by one, also when
    the block raises.

    :param modules: the modules to evaluate (typically one model).
    :raises TypeError: if one of them is not an ``nn.Module``.
    """
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"eval_mode takes torch.nn.Module arguments; got {type(module).__name__}.")
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training
