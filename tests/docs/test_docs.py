"""The documentation builds as ``make docs`` builds it, and a broken reference or example fails the build.

One subprocess (module-scoped; about 40 s of CPU) builds ``docs/`` with ``docs/build.py``, as ``make docs``
does: ``sphinx-build -W --keep-going -n -b html`` and then ``-b doctest`` (every ``testcode``/``doctest``
block), into a temporary folder. A third, tiny build of a throwaway project shows that the checks bite: an unresolvable
reference and an undocumented public name are errors, while references to re-exported and private names are not.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sphinx", minversion="9.0", reason="the docs need Sphinx 9 (Python >= 3.11, dev extras)")

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_BUILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import build  # docs/build.py: what `make docs` runs
tmp, probe = sys.argv[2], sys.argv[3]
codes = build.build(tmp, logs=True)
codes["probe"] = build.run("html", probe, tmp + "/probe-html", tmp + "/probe-doctrees", tmp + "/probe.log")
print("RESULTS " + json.dumps(codes))
"""


def _probe_project(folder: pathlib.Path) -> pathlib.Path:
    """A one-page project with our reference extension: two references that must resolve, one that cannot, and
    public modules and names left undocumented."""
    folder.mkdir()
    (folder / "conf.py").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(DOCS / "_ext")!r})
        extensions = ["sphinx.ext.autodoc", "dismax_refs"]
        nitpicky = True
        dismax_public_packages = ["dismax_plugin"]
        """)
    )
    (folder / "index.rst").write_text(
        textwrap.dedent("""
        Probe
        =====

        .. autofunction:: dismax_plugin.ood_score

        .. automodule:: dismax_plugin.scores
           :no-members:

        Re-exported: :func:`dismax_plugin.scores.ood_score`. Private: :func:`dismax_plugin._checks.check_logits`.
        Missing: :func:`dismax_plugin.no_such_function`.
        """)
    )
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Run the three builds in one Python process (imports are shared); their exit codes and warnings."""
    tmp = tmp_path_factory.mktemp("docs")
    probe = _probe_project(tmp / "probe")
    command = [sys.executable, "-c", _BUILD, str(DOCS), str(tmp), str(probe)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"the build process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    codes = json.loads(lines[-1][len("RESULTS ") :])
    logs = {name: (tmp / f"{name}.log").read_text() for name in codes}
    return argparse.Namespace(tmp=tmp, codes=codes, logs=logs, stderr=proc.stderr)


def test_html_builds_without_a_warning(built):
    assert built.codes["html"] == 0, built.logs["html"] or built.stderr[-3000:]
    assert built.logs["html"].strip() == ""
    html = built.tmp / "html"
    for page in ("index", "getting-started", "method", "cli", "results", "development", "notes/index",
                 "guides/timm", "guides/pytorch-ood", "guides/mlflow",
                 "api/core", "api/timm", "api/pytorch_ood", "api/mlflow", "api/engine"):  # fmt: skip
        assert (html / f"{page}.html").is_file(), page


def test_every_example_runs(built):
    assert built.codes["doctest"] == 0, built.logs["doctest"] or built.stderr[-3000:]
    summary = (built.tmp / "doctest" / "output.txt").read_text()
    totals = re.search(r"(\d+) tests?\s*\n\s*(\d+) failures? in tests", summary)
    assert totals, summary[-2000:]
    tests, failures = int(totals.group(1)), int(totals.group(2))
    assert failures == 0 and tests >= 20, summary[-2000:]  # the pages hold 23 examples: they did run


def test_cli_reference_is_generated_from_the_parser(built):
    from dismax_plugin.adapters.engine.cli import build_parser

    page = (built.tmp / "html" / "cli.html").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f'id="cmdoption-dismax-{name}-' in page, name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f'id="cmdoption-dismax-{name}-{flag.lstrip("-")}"' in page, (name, flag)


def test_public_names_are_documented(built):
    import dismax_plugin
    from dismax_plugin.adapters import mlflow, pytorch_ood, timm

    pages = {"core": dismax_plugin, "timm": timm, "pytorch_ood": pytorch_ood, "mlflow": mlflow}
    for page, module in pages.items():
        html = (built.tmp / "html" / "api" / f"{page}.html").read_text()
        for name in module.__all__:
            ids = [f'id="{module.__name__}.{name}"']
            if module is dismax_plugin:  # the score functions and names are documented once, in .scores
                ids += [f'id="dismax_plugin.scores.{name}"', 'id="module-dismax_plugin.scores"' * (name == "scores")]
            assert any(i and i in html for i in ids), (page, name)


def test_math_is_served_locally(built):
    html = built.tmp / "html"
    page = (html / "method.html").read_text()
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', page)
    assert any(src.endswith("_static/mathjax/tex-chtml.js") for src in scripts), scripts
    assert not [src for src in scripts if src.startswith(("http:", "https:", "//"))], scripts
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_a_broken_reference_fails_the_build(built):
    log = built.logs["probe"]
    assert built.codes["probe"] != 0
    assert "dismax_plugin.no_such_function" in log
    assert "public name dismax_plugin.scores.mps" in log  # in the __all__ of a documented module, on no page
    assert "public module dismax_plugin.heads is not documented" in log
    # re-exported and private names resolve (to the documented object, or to plain text): no warning
    assert "target not found: dismax_plugin.scores.ood_score" not in log
    assert "target not found: dismax_plugin._checks" not in log
