"""Ecosystem glue, shipped as ``dismax_plugin.adapters``: ``timm``, ``pytorch_ood``, ``mlflow``.

Each submodule imports its ecosystem lazily; importing this package imports none of them.
"""

__all__ = ["mlflow", "pytorch_ood", "timm"]
