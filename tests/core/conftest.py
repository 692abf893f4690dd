"""Fixtures of the core tests."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces, forward and backward (custom autograd nodes included):
    ``largest`` in elements, ``largest_bytes`` in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out


@pytest.fixture
def largest_output():
    """A fresh :class:`LargestOutput` recorder (``with recorder: ...``)."""
    return LargestOutput()
