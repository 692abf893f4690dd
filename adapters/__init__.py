"""Ecosystem glue, shipped as ``dismax_plugin.adapters``; importing this package imports none of them.

* ``timm``: isotropic heads on any timm model, registered model names, save/load.
* ``pytorch_ood``, ``benchmarks``, ``compare``: the native score as a detector, losses with metadata,
  the offline digits benchmark and the standard ones by name, the comparison with post-hoc detectors.
* ``mlflow``, ``figures``, ``tracking``: run tracking, plots and the servable model.
* ``data``, ``preprocessing``, ``training``, ``commands``, ``progress``: the engine behind ``dismax``.
"""

__all__ = [
    "benchmarks",
    "commands",
    "compare",
    "data",
    "figures",
    "mlflow",
    "preprocessing",
    "progress",
    "pytorch_ood",
    "timm",
    "tracking",
    "training",
]
