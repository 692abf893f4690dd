"""Ecosystem glue, shipped as ``dismax_plugin.adapters``; importing this package imports none of them.

* ``timm``: isotropic heads inside timm models, registered names, weights, save/load, preprocessing.
* ``pytorch_ood``: the native score as a detector, losses with ``LossInfo``, benchmarks, the comparison.
* ``mlflow``: tracking (queue + local fallback) and the logged, servable models.
* ``engine``: the ``dismax`` command, which composes the three.
"""

__all__ = ["engine", "mlflow", "pytorch_ood", "timm"]
