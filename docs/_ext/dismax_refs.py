"""Cross-references to re-exported names, private modules, and a check that every public name is documented.

The project's docstrings name objects the way the code reaches them: ``:class:`~.config.TrainConfig```
from a module that imported it, ``:func:`dismax_plugin.scores.ood_score``` for the function documented as
``dismax_plugin.ood_score``, ``:mod:`._checkpoint``` for a private step. Sphinx resolves a reference by the
documented name only; this extension resolves the rest by *importing* the target:

* a target that imports to an object documented under another name links to that documentation;
* a target that imports to a private object (a ``_name`` on its path, or a name its module's ``__all__``
  leaves out) that is not documented renders as plain text, without a warning: private code has no page;
* names are looked up from the module the reference is in and, for a re-exported object's docstring, from the
  module that defines it;
* ``Class.method`` named from outside the class links to the one documented object of that name;
* a target that does not import stays unresolved, so nitpicky mode still reports typos.

A constant re-exported by a package is documented by its ``#:`` comment where it is defined (not by the
docstring of ``dict`` or ``tuple``), and an attribute documented only by another library's base class names
that class instead of copying its text. Every module under ``dismax_public_packages`` (conf.py) whose path has
no ``_private`` part must be documented (an ``automodule`` somewhere), and so must every name of its
``__all__``: a missing one is a warning (an error under ``-W``), so a new public module or name cannot be
left out of the API reference. ``dismax_external_packages`` lists the
top-level names of other libraries, whose references are left to ``nitpick_ignore``.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import pkgutil
import sys
import types

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

_PRIMITIVES = (str, bytes, int, float, bool, type(None))


@functools.cache
def _import(path: str):
    """``(object, module, rest)`` at dotted ``path``, as Python's attribute access finds it (an attribute of a
    package wins over a submodule of the same name: ``dismax_plugin.convert`` is the function), with ``module``
    the last module on the way and ``rest`` the attribute names after it; ``None`` when there is no such object."""
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except Exception:  # noqa: BLE001 - any import failure means "no such object"
        return None
    module, rest = obj, []
    for depth, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, types.ModuleType):
            try:
                obj = importlib.import_module(".".join(parts[:depth]))
            except Exception:  # noqa: BLE001
                return None
        else:
            return None
        if isinstance(obj, types.ModuleType):
            module, rest = obj, []
        else:
            rest.append(part)
    return obj, module, rest


def _is_private(path: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


def _not_public(path: str, found) -> bool:
    """True for a ``_private`` path, an object defined in a private module, or a module attribute that its
    module's ``__all__`` leaves out."""
    obj, module, rest = found
    if _is_private(path):
        return True
    if isinstance(obj, types.ModuleType):
        return _is_private(obj.__name__)
    defined_in = f"{getattr(obj, '__module__', '') or ''}.{getattr(obj, '__qualname__', '') or ''}"
    if _is_private(defined_in):
        return True
    public = getattr(module, "__all__", None)
    return bool(rest) and public is not None and rest[0] not in public


def _candidates(target: str, module: str | None, cls: str | None) -> list[str]:
    """Dotted paths ``target`` may mean, seen from ``module`` (and class ``cls``): the target itself, then
    relative to the module and to each package above it (``.config.X`` and ``config.X`` alike)."""
    target = target.lstrip(".")
    found = []
    if module:
        parts = module.split(".")
        if cls:
            found.append(f"{module}.{cls}.{target}")
        found += [".".join([*parts[:keep], target]) for keep in range(len(parts), 0, -1)]
    found.append(target)
    return found


class _Documented:
    """Map from Python objects to the names under which the Python domain documents them."""

    def __init__(self, env):
        self.by_id: dict[int, list[tuple[str, str]]] = {}
        self.by_last: dict[str, list[str]] = {}
        for name, entry in env.get_domain("py").objects.items():
            if entry.aliased:
                continue
            self.by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
            found = _import(name)
            if found is not None:
                self.by_id.setdefault(id(found[0]), []).append((name, entry.objtype))

    def by_suffix(self, target: str) -> list[str]:
        """Documented names that end with ``.target``."""
        suffix = "." + target
        return [name for name in self.by_last.get(target.rsplit(".", 1)[-1], []) if name.endswith(suffix)]

    def names_of(self, obj, last: str) -> list[tuple[str, str]]:
        names = self.by_id.get(id(obj), [])
        if isinstance(obj, _PRIMITIVES):  # equal small values are shared objects: the names must agree too
            names = [(n, t) for n, t in names if n.rsplit(".", 1)[-1] == last]
        return names


def _documented(app, env) -> _Documented:
    cache = getattr(env, "_dismax_documented", None)
    if cache is None:
        cache = env._dismax_documented = _Documented(env)
    return cache


def _docstring_module(node) -> str | None:
    """The module that defines the docstring ``node`` comes from (autodoc's source ``...:docstring of X``),
    which for a re-exported object is not the module it is documented in."""
    while node is not None and not getattr(node, "source", None):
        node = node.parent
    source = getattr(node, "source", None) or ""
    if ":docstring of " not in source:
        return None
    found = _import(source.rsplit(":docstring of ", 1)[1])
    return found[1].__name__ if found is not None else None


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if target.startswith("~"):
        target = target[1:]
    if target.split(".", 1)[0] in app.config.dismax_external_packages:
        return None  # another library's object: nitpick_ignore decides
    domain = env.get_domain("py")
    if "/" in target and all(isinstance(getattr(builtins, part, None), type) for part in target.split("/")):
        return contnode  # ":raises ValueError/TypeError:": builtin exceptions, as Sphinx leaves them
    paths = _candidates(target, node.get("py:module"), node.get("py:class"))
    defined_in = _docstring_module(node)
    if defined_in and defined_in != node.get("py:module"):  # a re-exported object's docstring
        paths += _candidates(target, defined_in, None)
    for path in paths:
        found = _import(path)
        if found is None:
            continue
        last = path.rsplit(".", 1)[-1]
        for name, _objtype in _documented(app, env).names_of(found[0], last):
            resolved = domain.resolve_any_xref(env, node["refdoc"], app.builder, name, node, contnode)
            if resolved:
                return resolved[0][1]
        if _not_public(path, found):
            return contnode  # private and undocumented: plain text
    # a method or attribute named from outside its class (``PrototypeHead.ood_score``): one documented match
    matches = _documented(app, env).by_suffix(target.lstrip("."))
    if len(matches) == 1:
        resolved = domain.resolve_any_xref(env, node["refdoc"], app.builder, matches[0], node, contnode)
        if resolved:
            return resolved[0][1]
    return None


def public_modules(packages) -> list[str]:
    """Every module under ``packages`` (dotted names) whose path has no ``_private`` part, packages first."""
    found = []
    for package_name in packages:
        package = importlib.import_module(package_name)
        found.append(package_name)  # (walk_packages does not follow a package-dir mapping: list each root)
        for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            if not _is_private(info.name) and not info.name.endswith(".__main__"):
                found.append(info.name)
    return found


def _check_public_names(app, env) -> None:
    documented = _documented(app, env)
    domain = env.get_domain("py")
    for module_name in public_modules(app.config.dismax_public_packages):
        module = importlib.import_module(module_name)
        parent, _, leaf = module_name.rpartition(".")
        shadowed = not isinstance(getattr(sys.modules.get(parent), leaf, module), types.ModuleType)
        if module_name not in domain.modules and not shadowed:  # (a shadowed module has the name of a function)
            logger.warning(
                "public module %s is not documented: add an automodule to an API page (docs/api/)",
                module_name,
                type="dismax",
                subtype="undocumented",
            )
            continue
        for name in getattr(module, "__all__", ()):
            full = f"{module_name}.{name}"
            if full in domain.objects or documented.names_of(getattr(module, name, None), name):
                continue
            logger.warning(
                "public name %s (in %s.__all__) is not documented: add it to an API page (docs/api/)",
                full,
                module_name,
                type="dismax",
                subtype="undocumented",
            )


def _doc_comment(module_name: str, attr: str) -> list[str] | None:
    """The ``#:`` comment of ``attr`` in ``module_name`` or in one of its (private) submodules."""
    for name in sorted(m for m in list(sys.modules) if m == module_name or m.startswith(module_name + ".")):
        try:
            docs = ModuleAnalyzer.for_module(name).find_attr_docs()
        except Exception:  # noqa: BLE001 - no source for this module
            continue
        if ("", attr) in docs:
            return list(docs["", attr])
    return None


def _foreign_attribute_doc(name: str, lines: list[str]) -> bool:
    """An attribute documented only by a base class of another package (pytorch-ood's ``Detector.info``):
    its text refers to that package's pages, so name the base class instead."""
    owner_path, _, attr = name.rpartition(".")
    found = _import(owner_path)
    if found is None or not isinstance(found[0], type):
        return False
    for base in found[0].__mro__:
        if attr not in vars(base):
            continue
        try:
            docs = ModuleAnalyzer.for_module(base.__module__).find_attr_docs()
        except Exception:  # noqa: BLE001 - no source
            docs = {}
        if (base.__qualname__, attr) in docs:
            if base.__module__.split(".")[0] == "dismax_plugin":
                return False
            lines[:] = [f"Documented by ``{base.__module__}.{base.__qualname__}.{attr}``."]
            return True
    return False


def _data_docstring(app, what, name, obj, options, lines) -> None:
    """A re-exported constant is documented by its ``#:`` comment where it is defined, never by the docstring
    of its type (``dict``, ``tuple``...)."""
    if what not in ("data", "attribute"):
        return
    if what == "attribute" and _foreign_attribute_doc(name, lines):
        return
    type_doc = getattr(type(obj), "__doc__", None)
    type_doc = type_doc.strip() if isinstance(type_doc, str) else ""
    if lines and not (type_doc and lines[0].strip() == type_doc.splitlines()[0].strip()):
        return
    module_name, _, attr = name.rpartition(".")
    lines[:] = _doc_comment(module_name, attr) or []


def setup(app):
    app.add_config_value("dismax_public_packages", [], "env")
    app.add_config_value("dismax_external_packages", (), "env")
    app.connect("missing-reference", _missing_reference)
    app.connect("env-check-consistency", _check_public_names)
    app.connect("autodoc-process-docstring", _data_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
