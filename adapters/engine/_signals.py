"""Stopping a run cleanly: SIGINT/SIGTERM become a flag checked between steps, then :class:`Interrupted`.

The training loop writes a checkpoint at the current step before raising :class:`Interrupted`; a second
signal gives up at once (``KeyboardInterrupt``). Under DDP the flag is shared (max over the ranks), so every
rank stops at the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from ._distributed import Dist, all_reduce_max

__all__ = ["Interrupted", "StopFlag"]


class Interrupted(RuntimeError):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, checkpoint: str, signum: int):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {checkpoint} (continue with --resume)")
        self.checkpoint, self.signum = checkpoint, signum


class StopFlag:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` (handlers restored on exit; main thread only)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def requested(self, ddp: Dist, device: torch.device) -> bool:
        """Whether any rank was signalled (a collective call under DDP: every rank must call it)."""
        if ddp.enabled:
            self.signum = int(all_reduce_max(float(self.signum), device))
        return bool(self.signum)
