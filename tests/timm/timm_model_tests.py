"""Run timm's own ``tests/test_models.py`` on the registered isotropic variants and on their stock architectures,
and say which variant fails a test its stock architecture passes (issue 16: every variant passes what its stock
architecture passes).

timm's tests are not in the wheel: give the folder holding ``test_models.py`` (the ``tests/`` folder of the timm
sdist or of a pytorch-image-models checkout, at the installed timm's version). ``-p
dismax_plugin.adapters.timm.register`` registers the variants before timm's module collects its parameter lists
(``list_models()`` at import), and a collection filter keeps the items whose ``model_name`` is one of the chosen
architectures or its ``_dismax`` / ``_isomaxplus`` / ``_isomax`` variant (a ``-k`` expression would also match
test function names such as ``test_resnet...``). Not collected by our own suite (no ``test_`` prefix)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/timm/timm_model_tests.py /tmp/timm-sdist/timm-1.0.31/tests

Extra arguments after ``--`` go to pytest (e.g. ``-- -x``); ``--archs a,b`` replaces the default list.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import pytest

KINDS = ("dismax", "isomaxplus", "isomax")
#: tiny test_* models and small real ones with different classifier layouts (1x1 conv, distillation heads, ...)
ARCHS = ("test_resnet", "test_convnext", "test_efficientnet", "test_byobnet", "test_nfnet", "test_vit",
         "test_mambaout", "resnet10t", "mobilenetv3_small_050", "resnetv2_18", "dla46_c", "regnetx_002",
         "deit_tiny_distilled_patch16_224")  # fmt: skip


class _Select:
    """Keeps timm's items of the chosen models; records every outcome as ``{(test, model): outcome}``."""

    def __init__(self, archs: tuple[str, ...]):
        self.variants = {f"{a}_{k}": a for a in archs for k in KINDS}
        self.names = set(archs) | set(self.variants)
        self.outcomes: dict[tuple[str, str], str] = {}
        self._keys: dict[str, tuple[str, str]] = {}  # node id -> (test function, model_name)

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            name = getattr(getattr(item, "callspec", None), "params", {}).get("model_name")
            (keep if name in self.names else drop).append(item)
            if name in self.names:
                self._keys[item.nodeid] = (item.originalname, name)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_runtest_logreport(self, report):
        key = self._keys.get(report.nodeid)
        if key is None:
            return
        # a failure or skip in setup or call decides; several batch sizes of one (test, model): the worst one
        if report.when == "call" or report.outcome != "passed":
            rank = {"passed": 0, "skipped": 1, "failed": 2}
            if rank[report.outcome] >= rank.get(self.outcomes.get(key, "passed"), 0):
                self.outcomes[key] = report.outcome


def summarise(select: _Select) -> list[str]:
    """Counts for the stock models and the variants, and each variant failure its stock architecture passes."""
    counts = {"stock": collections.Counter(), "variants": collections.Counter()}
    regressions = []
    for (test, model), outcome in sorted(select.outcomes.items()):
        stock = select.variants.get(model)
        counts["variants" if stock else "stock"][outcome] += 1
        if stock and outcome == "failed" and select.outcomes.get((test, stock)) == "passed":
            regressions.append(f"  {test}[{model}] fails, {test}[{stock}] passes")
    lines = [f"{who}: " + ", ".join(f"{n} {o}" for o, n in sorted(c.items())) for who, c in counts.items()]
    return [*lines, f"variant failures where the stock architecture passes: {len(regressions)}", *regressions]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", type=Path, help="the folder holding timm's test_models.py")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated stock architectures")
    args = parser.parse_args(argv)
    target = args.tests / "test_models.py"
    if not target.is_file():
        parser.error(f"no test_models.py in '{args.tests}'")
    select = _Select(tuple(a for a in args.archs.split(",") if a))
    ini = args.tests.parent / "pyproject.toml"
    options = ["-c", str(ini)] if ini.is_file() else []
    code = pytest.main([str(target), "-q", "-p", "no:cacheprovider", "-p", "dismax_plugin.adapters.timm.register",
                        "--rootdir", str(args.tests.parent), *options, *extra], plugins=[select])  # fmt: skip
    print("\n".join(summarise(select)))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
