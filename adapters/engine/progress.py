"""Progress bars for the command line: tqdm on a terminal, nothing otherwise (CI logs get plain lines)."""

from __future__ import annotations

import sys

__all__ = ["progress"]


def progress(iterable, **kwargs):
    """``tqdm(iterable, **kwargs)``, disabled (plain iteration) when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True, **kwargs)
