"""The ``dismax`` command reference, generated from the parser the command itself uses.

``.. argparse-reference:: dismax_plugin.adapters.engine.cli:build_parser`` builds that parser (which the
engine generates from its config dataclasses, :mod:`dismax_plugin.adapters.engine.config`) and writes one
section per subcommand: its help, its usage line, and every option as a Sphinx ``.. option::`` (so pages can
link ``:option:`dismax train --epochs```) with its help, default, choices and the config field it sets.
Nothing about an option is written in the docs by hand, so the reference cannot disagree with ``--help``;
and the config's dataclass fields, on the API page, are documented by the same ``metadata["help"]``.

Options of the directive: ``:config:`` a module whose dataclasses the options come from (each option is
matched to the field of the same name whose ``help`` its help text starts with); ``:subcommands:`` a comma
list to render (default: all, in the parser's order); ``:levels:`` the two section adornments, for the
subcommands and their option groups (default ``~^``: place the directive in a ``-`` section of a ``=`` page).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

_RST_SPECIAL = re.compile(r"([\\`*_|\[\]])")
_USAGE_WIDTH = 96


def _text(value: str) -> str:
    """``value`` as inline reStructuredText that renders literally."""
    return _RST_SPECIAL.sub(r"\\\1", value)


def _literal(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return "``" + text.replace("``", "` `") + "``"


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=_USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _config_fields(module_name: str | None) -> list[tuple[str, dataclasses.Field]]:
    if not module_name:
        return []
    module = importlib.import_module(module_name)
    found = []
    for name in getattr(module, "__all__", dir(module)):
        obj = getattr(module, name)
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            found += [(f"{module_name}.{obj.__name__}", f) for f in dataclasses.fields(obj)]
    return found


def _field_of(action: argparse.Action, fields) -> str | None:
    for owner, f in fields:
        help_text = f.metadata.get("help")
        if f.name == action.dest and help_text and (action.help or "").startswith(help_text):
            return f"{owner}.{f.name}"
    return None


def _option_lines(action: argparse.Action, fields) -> list[str]:
    flags = ", ".join(action.option_strings)
    takes_value = action.nargs != 0
    metavar = action.metavar or action.dest.upper()
    signature = ", ".join(f"{flag} {metavar}" if takes_value else flag for flag in action.option_strings)
    lines = [f".. option:: {signature or flags}", ""]
    help_text = action.help or ""
    suffix = f" (default: {action.default})"
    if takes_value and help_text.endswith(suffix):  # the parser adds the default to the help; listed below
        help_text = help_text[: -len(suffix)]
    lines.append("   " + (_text(help_text) or "(no help)"))
    lines.append("")
    facts = []
    if action.required:
        facts.append("required")
    elif takes_value:
        facts.append(f"default {_literal(action.default)}")
    else:
        facts.append("a flag (default: off)")
    if action.choices is not None:
        facts.append("choices " + ", ".join(_literal(c) for c in action.choices))
    if takes_value and action.type is not None and getattr(action.type, "__name__", None):
        facts.append(f"type ``{action.type.__name__}``")
    field = _field_of(action, fields)
    if field is not None:
        owner, name = field.rsplit(".", 1)
        facts.append(f"config field :attr:`{owner.rsplit('.', 1)[-1]}.{name} <{field}>`")
    lines += ["   " + "; ".join(facts) + ".", ""]
    return lines


def _command_lines(name: str, help_text: str, parser: argparse.ArgumentParser, fields, levels: str) -> list[str]:
    title = f"``{parser.prog}``"
    lines = [title, levels[0] * len(title), "", _text(help_text[:1].upper() + help_text[1:]) + ".", ""]
    lines += ["::", ""] + ["   " + line for line in _usage(parser).splitlines()] + [""]
    lines += [f".. program:: {parser.prog}", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        heading = (group.title or "options")[:1].upper() + (group.title or "options")[1:]
        lines += [_text(heading), levels[1] * len(_text(heading)), ""]
        for action in actions:
            lines += _option_lines(action, fields)
    return lines


class ArgparseReference(SphinxDirective):
    """``.. argparse-reference:: module:function`` (a function returning an ``ArgumentParser``)."""

    required_arguments = 1
    option_spec = {"config": directives.unchanged, "subcommands": directives.unchanged, "levels": directives.unchanged}

    def run(self):
        parser = _load(self.arguments[0])()
        fields = _config_fields(self.options.get("config"))
        wanted = [s.strip() for s in self.options.get("subcommands", "").split(",") if s.strip()]
        lines: list[str] = []
        for name, help_text, sub in _subcommands(parser):
            if not wanted or name in wanted:
                lines += _command_lines(name, help_text, sub, fields, self.options.get("levels", "~^"))
        self.env.note_dependency(importlib.import_module(self.arguments[0].partition(":")[0]).__file__)
        if fields:
            self.env.note_dependency(importlib.import_module(self.options["config"]).__file__)
        container = StringList(lines, source=f"<argparse-reference {self.arguments[0]}>")
        section = nodes.section()
        nested_parse_with_titles(self.state, container, section)
        return section.children


def _field_help(app, domain: str, objtype: str, content) -> None:
    """A documented dataclass field of the config gets its ``metadata["help"]`` (the text of ``--help``)."""
    if domain != "py" or objtype != "attribute" or len(content):
        return
    signature = content.parent[0]
    owner_path, _, field_name = signature.get("fullname", "").rpartition(".")
    try:
        owner = getattr(importlib.import_module(signature.get("module", "")), owner_path)
    except (ImportError, AttributeError, ValueError):
        return
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
        return
    for f in dataclasses.fields(owner):
        if f.name == field_name and f.metadata.get("help"):
            text = f.metadata["help"] + "."  # as --help says it
            content += nodes.paragraph(text, text)


def setup(app):
    app.add_directive("argparse-reference", ArgparseReference)
    app.connect("object-description-transform", _field_help)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
