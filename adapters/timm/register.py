"""Importing this module registers the isotropic variants of every timm architecture in timm's registry.

It is the one import with that side effect (importing :mod:`dismax_plugin.adapters.timm` registers
nothing): it calls :func:`~dismax_plugin.adapters.timm.register_timm_models` for all architectures, so
``<arch>_dismax``, ``<arch>_isomaxplus`` and ``<arch>_isomax`` resolve in ``timm.create_model`` and
``timm.list_models``. Made for timm's ``train.py``, whose only import hook is ``--device-modules``:

.. code-block:: bash

    python train.py DATA --model resnet10t_dismax --num-classes 6 \\
        --device-modules dismax_plugin.adapters.timm.register --model-kwargs entropic_scale=10

In training mode the heads return the logits times the entropic scale, so train.py's stock losses
(``nn.CrossEntropyLoss``, ``LabelSmoothingCrossEntropy``, ``SoftTargetCrossEntropy``) train the
IsoMax/DisMax loss without FPR (FPR stitches batches, which train.py cannot do: use ``dismax train``).
``dismax import`` turns the checkpoint train.py writes into a calibrated model folder.
"""

from __future__ import annotations

from ._registry import register_timm_models

__all__ = ["REGISTERED"]

REGISTERED: tuple[str, ...] = tuple(register_timm_models())
"""The names this import added to timm's registry (empty if they were registered before)."""
