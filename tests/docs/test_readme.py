"""README.md stays a front door that cannot drift from the code or from the documentation's numbers.

Cheap checks (no Sphinx build): its length, its links, its Python snippets (they compile, their imports
work, every ``dtimm.<name>`` they call exists), every ``dismax ...`` command line in it and in the docs'
shell blocks parses with the real parser, and every measured figure it quotes is in ``docs/results.rst``.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "docs" / "results.rst").read_text()


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _rst_blocks(text: str, language: str) -> list[str]:
    found = []
    for match in re.finditer(rf"^\.\. code-block:: {language}\n\n((?:   .*\n|\n)+)", text, flags=re.M):
        found.append("\n".join(line[3:] for line in match.group(1).splitlines()))
    return found


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith(("http:", "https:")):
            assert (ROOT / target).exists(), target


def test_readme_python_snippets_name_real_things():
    import dismax_plugin as dp
    from dismax_plugin.adapters import timm as dtimm

    snippets = _blocks(README, "python")
    assert len(snippets) >= 2
    for code in snippets:
        compile(code, "README.md", "exec")
        for statement in re.findall(r"^(?:from \S+ )?import .+$", code, flags=re.M):
            exec(statement, {})  # noqa: S102 - the snippet's own imports must work
        for module, alias in ((dtimm, "dtimm"), (dp, "dp")):
            for name in re.findall(rf"\b{alias}\.(\w+)", code):
                assert hasattr(module, name), f"{alias}.{name}"


def _dismax_lines(text: str) -> list[list[str]]:
    lines = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip()
        for prefix in ("dismax ", "python -m dismax_plugin "):
            if line.startswith(prefix):
                lines.append(shlex.split(line[len(prefix) :]))
    return lines


@pytest.mark.parametrize("source", ["README.md", "docs/cli.rst", "docs/getting-started.rst"])
def test_command_lines_parse(source):
    from dismax_plugin.adapters.engine.cli import build_parser

    text = (ROOT / source).read_text()
    blocks = _blocks(text, "bash") if source.endswith(".md") else _rst_blocks(text, "bash")
    commands = [args for block in blocks for args in _dismax_lines(block)]
    assert commands or source.endswith("getting-started.rst"), source
    for args in commands:
        build_parser().parse_args(args)  # exits 2 (SystemExit) on an unknown option or a bad choice


def test_readme_numbers_are_the_measured_ones():
    section = README.split("## Measured results", 1)[1].split("\n## ", 1)[0]
    figures = set(re.findall(r"\d+\.\d+(?: ± \d+\.\d+|–\d+\.\d+)?×?", section))
    assert len(figures) >= 30
    missing = sorted(f for f in figures if f not in RESULTS)
    assert not missing, f"README quotes figures that docs/results.rst does not hold: {missing}"
