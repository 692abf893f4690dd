"""Build the documentation the one way ``make docs`` and ``tests/docs`` build it, in one process.

    python docs/build.py [OUT]          # default docs/_build: OUT/html, then OUT/doctest (every example)

Each build runs with warnings as errors (``-W --keep-going``) and nitpicky references (``-n``); the doctest
build reuses the HTML build's environment (``OUT/doctrees``) and the modules it imported, so the two cost
little more than one. Exit code 0 when both pass.
"""

from __future__ import annotations

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
FLAGS = ("-W", "--keep-going", "-n", "-q")
BUILDERS = ("html", "doctest")


def run(builder: str, source, out, doctrees, warnings=None) -> int:
    """One ``sphinx-build`` of ``source`` into ``out`` (warnings also written to the file ``warnings``)."""
    from sphinx.cmd.build import build_main

    args = [*FLAGS, "-b", builder, "-d", str(doctrees), str(source), str(out)]
    if warnings is not None:
        args[:0] = ["-w", str(warnings)]
    return build_main(args)


def build(out, builders=BUILDERS, logs: bool = False) -> dict[str, int]:
    """Build ``docs/`` with each of ``builders`` into ``out/<builder>``; ``logs``: warnings to
    ``out/<builder>.log``. Returns ``{builder: exit code}``."""
    out = pathlib.Path(out)
    return {
        builder: run(builder, DOCS, out / builder, out / "doctrees", out / f"{builder}.log" if logs else None)
        for builder in builders
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    codes = build(argv[0] if argv else DOCS / "_build")
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main())
