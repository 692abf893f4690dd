"""The tracking interface the training engine talks to, and how a command gets and runs its tracker.

:class:`Tracker` (alias :data:`NullTracker`) records nothing; :class:`dismax_plugin.adapters.mlflow.MlflowTracker`
has the same methods (duck typing: the MLflow package does not import the engine). Implementations must
never raise into the training loop because a backend is down: they warn once and keep what could not be
sent. The engine calls them on rank 0 only: :func:`make_tracker` gives every other rank a no-op tracker.
:func:`tracked` starts the run (an unusable tracking URI is a usage error, exit code 2) and ends it with
the command's outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["NullTracker", "Tracker", "make_tracker", "tracked"]


class Tracker:
    """Base class and no-op implementation of the engine's tracking calls."""

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Open the run (called once before anything else)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Run configuration: architecture, head, loss, optimizer, lr, epochs, seed, data, versions, ..."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, dataset: str | None = None) -> None:
        """Scalar metrics; per-epoch metrics pass ``step=epoch``.

        Metrics of one dataset logged with :meth:`log_input` pass its name as ``dataset``, or are named
        ``"<dataset>.<...>"``; a tracker may link them to that dataset and to the logged model.
        """

    def log_input(self, name: str, dataset: Any, context: str) -> None:
        """A dataset the run used: ``name``, a map-style torch ``Dataset`` and its ``context``: ``"train"``,
        ``"test"`` (in-distribution test set), ``"ood-near"`` or ``"ood-far"`` (an OOD set and its group;
        ``dismax_plugin.adapters.mlflow.DATASET_CONTEXTS``)."""

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """A results table (list of dicts, one per dataset x method), e.g. ``ood/results.json``."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure, e.g. ``ood/histogram_digits_6_9.png``."""

    @property
    def keeps_figures(self) -> bool:
        """Whether :meth:`log_figure` keeps its figures: ``False`` for this no-op tracker (the engine then draws
        none for it), ``True`` for a subclass that overrides :meth:`log_figure`. A duck-typed tracker without
        this property counts as keeping them."""
        return type(self).log_figure is not Tracker.log_figure

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


def make_tracker(args: argparse.Namespace, fallback_dir: str) -> Tracker:
    """The tracker of a command: MLflow on rank 0 unless ``--no-track``, a no-op :class:`Tracker` otherwise.

    :param args: the parsed options (``track``, ``tracking_uri``, ``experiment``, ``run_name``,
        ``register_model``, ``alias``; missing ones count as not given).
    :param fallback_dir: where the MLflow tracker writes what it could not send (the run's output folder).
    :raises ConfigError: for ``--alias`` without ``--register-model``, or an alias MLflow does not accept.
    """
    from .config import ConfigError

    aliases = list(getattr(args, "alias", None) or [])
    if aliases and not getattr(args, "register_model", None):
        raise ConfigError(f"--alias {aliases[0]} needs --register-model NAME (the registered model to set it on).")
    if not getattr(args, "track", False) or int(os.environ.get("RANK", "0")) != 0:
        return Tracker()
    from ..mlflow import MlflowTracker

    try:
        return MlflowTracker(
            tracking_uri=getattr(args, "tracking_uri", None),
            experiment=getattr(args, "experiment", None) or "dismax",
            run_name=getattr(args, "run_name", None),
            register_model=getattr(args, "register_model", None),
            aliases=aliases,
            fallback_dir=fallback_dir,
        )
    except ValueError as error:
        raise ConfigError(f"--alias: {error}") from error


@contextlib.contextmanager
def tracked(tracker: Tracker, run_name: str | None, tags: Mapping[str, str]) -> Iterator[Tracker]:
    """Start the run and end it with the outcome: ``FINISHED``, ``FAILED`` (an exception) or ``KILLED``
    (Ctrl-C, SIGTERM in any phase: the engine's ``Interrupted``; a second signal too). Ending sends what the
    tracker queued, or writes it to its local fallback. A signal while the finished run is being ended lets
    it end (``FINISHED``: the command's work is done).

    :raises ConfigError: (the engine's usage error, exit code 2) when the run cannot start, e.g. an
        unreachable tracking URI; the message starts with ``--tracking-uri:``.
    """
    from ._signals import Interrupted, deferred
    from .config import ConfigError

    try:
        tracker.start(run_name=run_name, tags=dict(tags))
    except (ValueError, ConnectionError, OSError) as error:
        raise ConfigError(f"--tracking-uri: {error}") from error
    try:
        yield tracker
    except (Interrupted, KeyboardInterrupt):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    with deferred(raise_after=False):
        tracker.end("FINISHED")
