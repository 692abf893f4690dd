"""The tracking interface the training engine talks to; :class:`NullTracker` records nothing.

The engine calls these methods on rank 0 only. :mod:`dismax_plugin.adapters.mlflow` provides the MLflow
implementation. Implementations must never raise into the training loop because a backend is down:
they warn once and keep what could not be sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["NullTracker", "Tracker"]


class Tracker:
    """Base class and no-op implementation of the engine's tracking calls."""

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Open the run (called once before anything else)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Run configuration: architecture, head, loss, optimizer, lr, epochs, seed, data, versions, ..."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalar metrics; per-epoch metrics pass ``step=epoch``."""

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """A results table (list of dicts, one per dataset x method), e.g. ``ood/results.json``."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure, e.g. ``ood/histogram_digits_6_9.png``."""

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A local file or folder (e.g. the checkpoint)."""

    def log_model(self, model_dir: str, model: Any = None, input_example: Any = None) -> None:
        """The saved model (timm adapter format, ``model_dir``) as a servable model."""

    @contextlib.contextmanager
    def child(self, run_name: str) -> Iterator[Tracker]:
        """A nested run (``compare`` logs each model as a child of the parent run)."""
        yield self

    def end(self, status: str = "FINISHED") -> None:
        """Close the run; ``status`` is ``FINISHED``, ``FAILED`` or ``KILLED``."""


NullTracker = Tracker
