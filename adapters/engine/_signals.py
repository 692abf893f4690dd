"""One signal policy for a whole ``dismax`` command: what SIGINT/SIGTERM do, in every phase.

:class:`SignalPolicy` is installed by the command line for the whole command (and by :func:`polling` for the
training loop when :func:`~.training.train` is called from Python without one). The first signal:

- while training (inside :func:`polling`) sets a flag that the loop reads at a step boundary; it writes a
  checkpoint there and raises :class:`Interrupted` (``--resume`` continues exactly). A signal during an
  epoch's validation is seen right after it, once the end-of-epoch checkpoint is written -- after the last
  epoch too, so the run does not "finish" without calibration;
- anywhere else (set-up, calibration, evaluation, logging) raises :class:`Interrupted` at once, except inside
  :func:`deferred` (writing the checkpoint or the model), which completes first;

then :func:`~.tracking.tracked` marks the tracked run ``KILLED`` and flushes what is queued (to the server or
its local fallback), and the command exits with ``128 + signal``. A second signal gives up at once
(:class:`GaveUp`, a ``KeyboardInterrupt``) -- unless it repeats the first within :data:`REPEAT_WINDOW_S`
(``torchrun`` forwards the SIGTERM or Ctrl-C its workers already got from the scheduler or the terminal).
:class:`Interrupted` is a ``BaseException`` like ``KeyboardInterrupt``: no ``except Exception`` (in a
tracker, in a library) can swallow it.

Under DDP the flag is shared at the step boundaries where the loop checks it (the max over the ranks, every
:data:`STOP_CHECK_EVERY` steps), so every rank stops at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch

from ._distributed import Dist

__all__ = ["REPEAT_WINDOW_S", "STOP_CHECK_EVERY", "GaveUp", "Interrupted", "SignalPolicy", "active_policy", "deferred",
           "polling"]  # fmt: skip

#: under DDP the ranks agree on a pending stop every this many steps (and at the end of every epoch)
STOP_CHECK_EVERY = 16
#: the same signal again within this many seconds is the same request (a launcher forwarding it)
REPEAT_WINDOW_S = 2.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: SignalPolicy | None = None


class Interrupted(BaseException):
    """The command stopped on SIGINT/SIGTERM; ``checkpoint``: where training saved its state (else ``None``)."""

    def __init__(self, checkpoint: str | None, signum: int):
        if checkpoint:
            text = f"interrupted by signal {signum}; checkpoint saved to {checkpoint} (continue with --resume)"
        else:
            text = f"interrupted by signal {signum}"
        super().__init__(text)
        self.checkpoint, self.signum = checkpoint, signum


class GaveUp(KeyboardInterrupt):
    """A second signal: stop at once, without a checkpoint or a flush."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} again: stopped at once")
        self.signum = signum


class SignalPolicy:
    """Context manager installing the policy of the module docstring (main thread only; handlers restored)."""

    def __init__(self):
        self.signum = 0
        self._when = 0.0
        self._polled = 0
        self._deferred = 0
        self._raised = False
        self._previous: dict[int, Any] = {}
        self._outer: SignalPolicy | None = None

    def __enter__(self) -> SignalPolicy:
        global _active
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc) -> bool:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        _active = self._outer
        return False

    def _handle(self, signum, _frame) -> None:
        if self.signum:
            if signum == self.signum and time.monotonic() - self._when < REPEAT_WINDOW_S:
                return
            raise GaveUp(signum)
        self.signum, self._when = signum, time.monotonic()
        if not (self._polled or self._deferred):
            raise self.interrupt(None)

    def interrupt(self, checkpoint: str | None) -> Interrupted:
        """The :class:`Interrupted` to raise for the pending signal (raised once per command)."""
        self._raised = True
        return Interrupted(checkpoint, self.signum)

    def _leave(self, exc_type) -> None:
        if exc_type is None and self.signum and not self._raised and not (self._polled or self._deferred):
            raise self.interrupt(None)

    def requested(self, ddp: Dist, device: torch.device) -> bool:
        """Whether any rank was signalled (a collective call under DDP: every rank must call it)."""
        if ddp.enabled:
            import torch.distributed as dist

            flag = torch.tensor([self.signum], device=device, dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item())
        return bool(self.signum) and not self._raised


class _Region:
    """``with`` block of a policy in which a signal only sets the flag (``polled``) or waits (``deferred``)."""

    def __init__(self, policy: SignalPolicy, kind: str, raise_after: bool = True):
        self.policy, self.kind, self.raise_after = policy, kind, raise_after

    def __enter__(self) -> SignalPolicy:
        setattr(self.policy, self.kind, getattr(self.policy, self.kind) + 1)
        return self.policy

    def __exit__(self, exc_type, *_) -> bool:
        setattr(self.policy, self.kind, getattr(self.policy, self.kind) - 1)
        if self.raise_after:
            self.policy._leave(exc_type)
        elif self.policy.signum and not (self.policy._polled or self.policy._deferred):
            self.policy._raised = True  # the block was the command's last step: the signal changes nothing
        return False


class _Own:
    """:func:`polling` without a command's policy: a policy of its own for the block."""

    def __init__(self):
        self.policy = SignalPolicy()

    def __enter__(self) -> SignalPolicy:
        self.policy.__enter__()
        self.policy._polled += 1
        return self.policy

    def __exit__(self, exc_type, *exc) -> bool:
        self.policy._polled -= 1
        try:
            self.policy._leave(exc_type)  # a signal after the loop's last check still stops the caller
        finally:
            self.policy.__exit__(exc_type, *exc)
        return False


def active_policy() -> SignalPolicy | None:
    """The command's policy, or ``None`` (e.g. :func:`~.training.train` called from Python)."""
    return _active


def polling():
    """Block in which a signal sets the flag for the training loop to read (``with polling() as stop``); outside
    a command, a policy of its own for the block only."""
    return _Region(_active, "_polled") if _active is not None else _Own()


def deferred(raise_after: bool = True):
    """Block that a signal does not interrupt (a checkpoint or model being written): it completes, then the
    signal acts (``raise_after=False``: it is the command's last step, the outcome stands). No-op outside a
    command."""
    import contextlib

    return _Region(_active, "_deferred", raise_after) if _active is not None else contextlib.nullcontext()
