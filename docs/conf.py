"""Sphinx configuration of the dismax-plugin documentation.

Build with ``make docs`` (``sphinx-build -W --keep-going -n``: warnings are errors, every cross-reference
must resolve). The build is offline: no intersphinx, MathJax is served from the build's own ``_static``
(``sphinx-mathjax-offline``), and references to the libraries we wrap (torch, timm, pytorch-ood, MLflow,
numpy, pandas) are listed in ``nitpick_ignore_regex`` instead of being fetched.
"""

from __future__ import annotations

import doctest
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import dismax_plugin  # noqa: E402

project = "dismax-plugin"
author = "the dismax-plugin authors"
copyright = "the dismax-plugin authors"
release = version = dismax_plugin.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: math renders without a network
    "myst_parser",  # the engineers' notes (docs/notes/*.md)
    "dismax_cli",  # docs/_ext: the `dismax` reference, generated from the engine's parser
    "dismax_refs",  # docs/_ext: references to re-exported names resolve to the documented ones
]

smartquotes_action = "qe"  # quotes and ellipses only: "--epochs" must not become an en dash
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# ---------------------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"dismax-plugin {release}"
html_show_sourcelink = False
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# ---------------------------------------------------------------------------- autodoc
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False
add_module_names = False
python_use_unqualified_type_names = True
python_display_short_literal_types = True

# ---------------------------------------------------------------------------- doctest
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
"""
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1

# ---------------------------------------------------------------------------- MyST (the notes)
myst_heading_anchors = 3
# The notes are the engineers' Markdown, folded into the reference pages by the lead: their headings may
# start below H1, and their links point at files of the repository, not at pages of this site.
suppress_warnings = ["myst.header", "myst.xref_missing"]

# ---------------------------------------------------------------------------- nitpicky references
nitpicky = True
# the libraries we wrap (also skipped by docs/_ext/dismax_refs.py, which resolves the project's own names)
dismax_external_packages = (
    "torch",
    "timm",
    "pytorch_ood",
    "mlflow",
    "numpy",
    "np",
    "pandas",
    "pd",
    "matplotlib",
    "sklearn",
    "PIL",
    "safetensors",
    "tqdm",
    "nn",
    "F",
)
nitpick_ignore_regex = [
    # the libraries we wrap: their docs are not part of this offline build
    (r"py:.*", "(" + "|".join(dismax_external_packages) + r")(\..*)?"),
    (r"py:.*", r"(Tensor|Dataset|DataLoader|DataFrame|Figure|Module|Generator)(\..*)?"),
    # the standard library (no intersphinx)
    (r"py:.*", r"(argparse|collections|typing|os|pathlib|dataclasses|logging|contextlib|signal|types)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|Path|Namespace|Self)"),
    (r"py:.*", r"(ClassVar|Literal|Optional|Union)"),
    # pytorch-ood's and MLflow's exceptions, named as the docstrings name them
    (r"py:exc", r"(ModelNotSetException|MlflowException)"),
]

# ---------------------------------------------------------------------------- public names (docs/_ext/dismax_refs.py)
# every module under these packages without a _private part must be documented, with every name of its __all__
dismax_public_packages = ["dismax_plugin", "dismax_plugin.adapters"]  # adapters/ ships as dismax_plugin.adapters
