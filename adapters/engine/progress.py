"""Progress bars for the command line: tqdm on a terminal, nothing otherwise (CI logs get plain lines); under
``torchrun`` on rank 0 only."""

from __future__ import annotations

import os
import sys

__all__ = ["progress"]


def progress(iterable, **kwargs):
    """``tqdm(iterable, **kwargs)``, disabled (plain iteration) when stderr is not a terminal or on a rank > 0;
    the bar's ``disable`` attribute says which."""
    from tqdm.auto import tqdm

    quiet = not sys.stderr.isatty() or int(os.environ.get("RANK", "0")) != 0
    return tqdm(iterable, disable=quiet, leave=False, dynamic_ncols=True, **kwargs)
