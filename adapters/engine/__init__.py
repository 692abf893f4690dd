"""The ``dismax`` command: configuration, data, the training loop, commands, figures, progress.

The only package that composes the timm, pytorch-ood and MLflow adapters.
"""

__all__ = ["cli", "commands", "data", "figures", "progress", "tracking", "training"]
