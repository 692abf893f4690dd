"""Fixed malloc thresholds for the ``dismax`` process (glibc only), so that freed memory is reused, not faulted back.

glibc's ``malloc`` gives the free memory at the top of its heap back to the system once more than
``M_TRIM_THRESHOLD`` of it is free, and serves requests above ``M_MMAP_THRESHOLD`` with fresh mappings;
by default both thresholds move with the allocation history. A training step frees and allocates the same
activations and gradients every step, so with moving thresholds some steps return their buffers to the
system and page-fault them in again on the next step (zeroed by the kernel first). Measured with ``dismax
train`` on the digits folder (resnet10t, 32 px, batch 50, one thread): about 97 000 minor page faults per
epoch with glibc's defaults, and no more per epoch with the thresholds fixed (runs of 2 and 8 epochs took the
same number); its epoch time against timm's ``train.py`` went from 1.028x to 0.971x on stop 24's machine
(``benchmarks/train_py_epoch.py``; README has the current figure).

:func:`keep_freed_memory` fixes them: trim threshold 256 MiB, mmap threshold 32 MiB (glibc's largest).
That keeps up to 256 MiB of freed memory in the process for reuse, much as PyTorch's caching allocator
keeps freed device memory on an accelerator; requests above 32 MiB still get their own mappings and go
back to the system when freed. It changes nothing when the user has chosen (``MALLOC_TRIM_THRESHOLD_``
or ``MALLOC_MMAP_THRESHOLD_`` in the environment, or ``DISMAX_SYSTEM_MALLOC`` set to a non-empty value)
and nothing off glibc. Another allocator preloaded (jemalloc, tcmalloc) is unaffected: ``mallopt`` only
tunes glibc's own.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["TRIM_THRESHOLD", "MMAP_THRESHOLD", "keep_freed_memory", "on_glibc"]

TRIM_THRESHOLD = 256 << 20
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # the parameter numbers of <malloc.h>
_USER_CHOICES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "DISMAX_SYSTEM_MALLOC")


def on_glibc() -> bool:
    """Whether this process runs on glibc (``confstr``, no file read)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        return False


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process (see the module documentation); returns whether
    they were set (False off glibc or when the environment makes the choice)."""
    if any(os.environ.get(name) for name in _USER_CHOICES) or not on_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
