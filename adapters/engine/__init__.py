"""The ``dismax`` command: configuration, data, the training loop, commands, figures, progress.

The only package that composes the timm, pytorch-ood and MLflow adapters. Public modules: :mod:`.config`
(``TrainConfig`` and the other option groups; the CLI is generated from them), :mod:`.cli` (``main``),
:mod:`.commands`, :mod:`.training` (``train``, ``TrainResult``, ``calibrate_model``, ``collect_logits``),
:mod:`.data`, :mod:`.tracking`, :mod:`.figures`, :mod:`.progress`. The ``_``-modules are private steps
of the training loop (set-up, checkpoint, distributed, signals, calibration) and of the report.
"""

__all__ = ["cli", "commands", "config", "data", "figures", "progress", "tracking", "training"]
