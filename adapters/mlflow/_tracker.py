"""MLflow tracker of the training engine: :class:`MlflowTracker`.

It has the engine's tracker methods (duck typing; this package does not import the engine): ``start``,
``log_params``, ``log_metrics``, ``log_input``, ``log_table``, ``log_dict``, ``log_figure``,
``log_artifact``, ``log_model``, ``child``, ``end``. It uses an :class:`mlflow.MlflowClient` with explicit
run ids (no fluent active-run state); every call is checked here, then handed to the
:class:`~dismax_plugin.adapters.mlflow._connection.Connection`, which never raises because the backend
is down.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ._connection import Connection
from ._datasets import DATASET_CONTEXTS, describe_dataset
from ._images import check_preprocessing
from ._store import RunRef
from ._telemetry import telemetry_off_unless_opted_in
from ._uri import TrackingURIError, check_tracking_uri, http_env
from ._values import MAX_PARAM_VALUE, check_artifact_file, clean_key, flatten, param_text, rows_frame, scalar

__all__ = ["RUN_STATUSES", "MlflowTracker"]

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

log = logging.getLogger("dismax_plugin.adapters.mlflow")


class MlflowTracker:
    """The engine's tracker, logging to MLflow (see the module docstring and the package's).

    :param tracking_uri: MLflow tracking URI; ``None`` uses ``MLFLOW_TRACKING_URI`` or MLflow's default
        store (``sqlite:///<cwd>/mlflow.db`` in MLflow 3).
    :param experiment: experiment name (created if missing); ``None`` uses ``MLFLOW_EXPERIMENT_NAME`` /
        ``MLFLOW_EXPERIMENT_ID`` or MLflow's ``Default`` experiment.
    :param run_name: run name (``start(run_name=...)`` overrides it).
    :param register_model: register the pyfunc model under this name in the model registry.
    :param aliases: registry aliases (e.g. ``["champion"]``) set on the version :meth:`log_model` registers
        (an alias that named an older version moves to it); needs ``register_model``.
    :param fallback_dir: folder of the local fallback store (default ``./mlflow-fallback``).
    :param retry_interval: seconds between reachability probes while offline.
    :param end_retries: probes of the server at :meth:`end` (at least one) before falling back.
    :param end_retry_wait: seconds between those probes.

    After :meth:`start`: :attr:`run_id`, :attr:`tracking_uri`, :attr:`experiment_id`; after
    :meth:`log_model`: :attr:`logged_models` (``{"model": {"model_uri": ...}, "pytorch_model": ...}``);
    after an :meth:`end` that had to fall back: :attr:`fallback_uri`.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        register_model: str | None = None,
        *,
        aliases: Sequence[str] = (),
        fallback_dir: str | os.PathLike | None = None,
        retry_interval: float = 30.0,
        end_retries: int = 2,
        end_retry_wait: float = 2.0,
    ):
        for name, value in (("tracking_uri", tracking_uri), ("experiment", experiment), ("run_name", run_name)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a string or None; got {type(value).__name__}.")
        if register_model is not None and (not isinstance(register_model, str) or not register_model.strip()):
            raise TypeError(f"register_model must be a non-empty model name or None; got {register_model!r}.")
        self._aliases = _check_aliases(aliases, register_model)
        if isinstance(retry_interval, bool) or not isinstance(retry_interval, (int, float)) or retry_interval < 0:
            raise ValueError(f"retry_interval must be a number of seconds >= 0; got {retry_interval!r}.")
        if isinstance(end_retries, bool) or not isinstance(end_retries, int) or end_retries < 0:
            raise ValueError(f"end_retries must be an integer >= 0; got {end_retries!r}.")
        self._uri = os.fspath(tracking_uri) if tracking_uri is not None else None
        self._experiment = experiment if experiment is not None else os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
        self._run_name = run_name
        self._register_model = register_model
        self._fallback_dir = os.fspath(fallback_dir) if fallback_dir is not None else None
        self._retry_interval = float(retry_interval)
        self._end_retries, self._end_retry_wait = end_retries, float(end_retry_wait)
        self._conn: Connection | None = None
        self._ref: RunRef | None = None
        self._is_child = False
        self._ended = False
        self._params: dict[str, str] = {}
        self._inputs: dict[str, str] = {}  # dataset name -> digest, as logged by log_input
        self._linked: list[dict] = []  # metrics linked to a logged dataset (re-linked to the served model)

    # ------------------------------------------------------------------ properties
    @property
    def tracking_uri(self) -> str | None:
        """The resolved tracking URI (after :meth:`start`)."""
        return self._conn.uri if self._conn else self._uri

    @property
    def run_id(self) -> str | None:
        """The run's id in the tracking store; ``None`` before start or while the run waits to be created."""
        if self._conn is None or self._ref is None:
            return None
        return self._conn.primary.ids.get(self._ref)

    @property
    def experiment_id(self) -> str | None:
        """The experiment id (after :meth:`start`)."""
        if self._conn is None or self._ref is None:
            return None
        return self._conn.primary.experiment_ids.get(self._ref.experiment)

    @property
    def logged_models(self) -> dict[str, dict[str, Any]]:
        """``{name: {"model_uri", "model_id", ...}}`` of the models this tracker family logged."""
        return dict(self._conn.logged_models) if self._conn else {}

    @property
    def fallback_uri(self) -> str | None:
        """The local fallback store written by :meth:`end`, or ``None``."""
        return self._conn.fallback_uri if self._conn else None

    @property
    def offline(self) -> bool:
        """True while the server is unreachable and calls are being queued."""
        return bool(self._conn and self._conn.offline)

    @property
    def pending(self) -> int:
        """Number of calls queued for sending."""
        return len(self._conn.pending) if self._conn else 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        """Check the tracking URI and open the run.

        :raises TrackingURIError: (a ``ValueError``) when the URI cannot be used; the message names it.
        :raises RuntimeError: if called twice.
        """
        if self._conn is not None:
            raise RuntimeError("MlflowTracker.start() was already called for this tracker.")
        if tags is not None and not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a mapping {{name: value}} or None; got {type(tags).__name__}.")
        uri = check_tracking_uri(self._uri)
        fallback = self._fallback_dir or os.path.join(os.getcwd(), "mlflow-fallback")
        conn = Connection(uri, fallback, self._retry_interval, self._register_model, self._aliases)
        all_tags = _context_tags()
        all_tags.update({clean_key(k): str(v)[:8000] for k, v in (tags or {}).items()})
        ref = RunRef(self._experiment, run_name or self._run_name, all_tags, None)
        try:
            with http_env():
                conn.primary.run_id(ref)
        except ValueError:
            raise
        except Exception as error:
            raise TrackingURIError(f"Cannot start an MLflow run at tracking URI '{uri}': {error}") from error
        self._conn, self._ref = conn, ref
        log.info("MLflow run %s at %s (experiment %s)", self.run_id, uri, self.experiment_id)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status``; the root tracker then sends what is queued or falls back.

        Ending twice is a no-op. Never raises because of the backend.

        :raises ValueError: for a status other than ``FINISHED``, ``FAILED``, ``KILLED``.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}; got {status!r}.")
        if self._conn is None or self._ended:
            return
        self._ended = True
        self._conn.submit("terminate", self._ref, {"status": status, "end_time": int(time.time() * 1000)})
        if not self._is_child:
            try:
                self._conn.finish(self._end_retries, self._end_retry_wait)
            except Exception:  # pragma: no cover - last line of defence: never raise from end()
                log.exception("MLflow tracker: sending the queued calls failed")

    @contextlib.contextmanager
    def child(self, run_name: str) -> Iterator[MlflowTracker]:
        """A tracker bound to a nested run (tag ``mlflow.parentRunId``), ended when the block exits.

        The child shares this tracker's connection, offline queue and warning; it ends ``FINISHED``, or
        ``FAILED`` when the block raises (the exception propagates).
        """
        if not isinstance(run_name, str) or not run_name:
            raise TypeError(f"run_name must be a non-empty string; got {run_name!r}.")
        self._require_started()
        sub = MlflowTracker.__new__(MlflowTracker)
        sub.__dict__.update(self.__dict__)
        sub._ref = RunRef(self._ref.experiment, run_name, _context_tags(), self._ref)
        sub._is_child, sub._ended, sub._params, sub._inputs, sub._linked = True, False, {}, {}, []
        self._conn.submit("create", sub._ref, {})
        try:
            yield sub
        except Exception:
            sub.end("FAILED")
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit
            sub.end("KILLED")
            raise
        sub.end("FINISHED")

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters: nested mappings are flattened (``a.b``), values stringified, keys sanitised.

        Values longer than MLflow's 6000-character limit are truncated (the full text goes to the artifact
        ``params/truncated.json``); re-logging a key with a different value is skipped with a warning
        (MLflow forbids changing a parameter).
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping {{name: value}}; got {type(params).__name__}.")
        self._require_started()
        fresh: dict[str, str] = {}
        truncated: dict[str, str] = {}
        for name, value in flatten(params).items():
            key, text = clean_key(name), param_text(value)
            if len(text) > MAX_PARAM_VALUE:
                truncated[key] = text
                text = text[: MAX_PARAM_VALUE - 15] + "...[truncated]"
            if key in self._params:
                if self._params[key] != text:
                    log.warning(
                        "MLflow param '%s' already logged as %r; new value %r not logged", key, self._params[key], text
                    )
                continue
            self._params[key] = fresh[key] = text
        if fresh:
            self._conn.submit("params", self._ref, {"params": fresh})
        if truncated:
            self._conn.submit("dict", self._ref, {"dictionary": truncated, "artifact_file": "params/truncated.json"})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, dataset: str | None = None) -> None:
        """Log scalar metrics (numbers, 0-d tensors/arrays) at ``step`` (default 0); ``None`` values are skipped.

        A metric belongs to a dataset logged with :meth:`log_input` when ``dataset`` names it, or when its
        key starts with ``"<that dataset's name>."`` (the engine's ``<dataset>.<method>.<metric>``); such
        metrics are also recorded as metrics of the served model (with the dataset's name and digest)
        once :meth:`log_model` has logged it, whichever comes first.

        :raises ValueError: if ``dataset`` was not logged with :meth:`log_input` on this run.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping {{name: number}}; got {type(metrics).__name__}.")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
            raise TypeError(f"step must be an integer or None; got {step!r}.")
        if dataset is not None and dataset not in self._inputs:
            raise ValueError(f"dataset must name a dataset logged with log_input(); got {dataset!r}, "
                             f"logged: {sorted(self._inputs)}.")  # fmt: skip
        self._require_started()
        values = {clean_key(k): scalar(str(k), v) for k, v in flatten(metrics).items() if v is not None}
        groups: dict[str | None, dict[str, float]] = {}
        for name, value in values.items():
            groups.setdefault(dataset or self._dataset_of(name), {})[name] = value
        stamp = int(time.time() * 1000)
        for name, group in groups.items():
            payload = {"metrics": group, "step": int(step or 0), "timestamp": stamp}
            if name is not None:
                payload["dataset"] = (name, self._inputs[name])
                self._linked.append(payload)
            self._conn.submit("metrics", self._ref, payload)

    def _dataset_of(self, key: str) -> str | None:
        matches = [name for name in self._inputs if key.startswith(clean_key(name) + ".")]
        return max(matches, key=len) if matches else None

    def log_input(self, name: str, dataset: Any, context: str) -> None:
        """Log ``dataset`` as an input of the run (MLflow 3 data lineage: name, digest, size, profile).

        :param name: the dataset's name (use the same name as the metric prefix of its results).
        :param dataset: a map-style torch ``Dataset`` (see
            :func:`~dismax_plugin.adapters.mlflow._datasets.describe_dataset` for the digest).
        :param context: ``"train"``, ``"test"``, ``"ood-near"`` or ``"ood-far"`` (tag ``mlflow.data.context``).
        :raises ValueError: for another context or an empty name; TypeError for a non-dataset.
        """
        if context not in DATASET_CONTEXTS:
            raise ValueError(f"context must be one of {DATASET_CONTEXTS}; got {context!r}.")
        described = describe_dataset(name, dataset)
        self._require_started()
        self._inputs[name] = described["digest"]
        self._conn.submit("input", self._ref, {"dataset": described, "context": context})

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Log a table (list of dicts, dict of columns or DataFrame) as an MLflow table artifact (``.json``)."""
        artifact_file = check_artifact_file("artifact_file", artifact_file, (".json",))
        frame = rows_frame(rows)
        self._require_started()
        self._conn.submit("table", self._ref, {"frame": frame, "artifact_file": artifact_file})

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Log a JSON/YAML-serialisable mapping as an artifact (``.json``, ``.yaml`` or ``.yml``)."""
        if not isinstance(dictionary, Mapping):
            raise TypeError(f"dictionary must be a mapping; got {type(dictionary).__name__}.")
        artifact_file = check_artifact_file("artifact_file", artifact_file, (".json", ".yaml", ".yml"))
        self._require_started()
        self._conn.submit("dict", self._ref, {"dictionary": dict(dictionary), "artifact_file": artifact_file})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure (``.png``, ``.svg``, ``.pdf``, ``.jpg``) and close it."""
        if not hasattr(figure, "savefig"):
            raise TypeError(f"figure must be a matplotlib Figure; got {type(figure).__name__}.")
        artifact_file = check_artifact_file("artifact_file", artifact_file, (".png", ".svg", ".pdf", ".jpg", ".jpeg"))
        self._require_started()
        conn = self._conn

        def to_file(payload: dict) -> tuple[str, dict]:  # queued: render now, the figure is closed below
            folder = tempfile.mkdtemp(dir=conn.spool_dir())
            path = os.path.join(folder, os.path.basename(artifact_file))
            payload["figure"].savefig(path)
            return "artifact", {"local_path": path, "artifact_path": os.path.dirname(artifact_file) or None}

        try:
            conn.submit("figure", self._ref, {"figure": figure, "artifact_file": artifact_file}, on_offline=to_file)
        finally:
            pyplot = sys.modules.get("matplotlib.pyplot")  # figures made without pyplot need no closing
            if pyplot is not None:
                pyplot.close(figure)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Log a local file or folder (under ``artifact_path``); queued by path while offline."""
        if not isinstance(local_path, (str, os.PathLike)) or not os.path.exists(local_path):
            raise ValueError(f"local_path must be an existing file or folder; got {local_path!r}.")
        if artifact_path is not None and not isinstance(artifact_path, str):
            raise TypeError(f"artifact_path must be a string or None; got {artifact_path!r}.")
        self._require_started()
        self._conn.submit(
            "artifact", self._ref, {"local_path": os.path.abspath(local_path), "artifact_path": artifact_path}
        )

    def log_model(self, model_dir: str, model: Any = None, input_example: Any = None) -> None:
        """Log the saved model as a pyfunc model (``model``) and, given ``model``, a pytorch one.

        :param model_dir: folder written by :func:`dismax_plugin.adapters.timm.save_model`; its metadata
            must hold ``preprocessing``.
        :param model: the ``nn.Module``: a CPU copy is logged as the ``pytorch`` flavour, exported with
            ``torch.export`` (``pt2``), pickled only when the architecture does not export (run tag
            ``dismax.pytorch_model.serialization``).
        :param input_example: a few raw images (what the pyfunc model takes, see
            :func:`~dismax_plugin.adapters.mlflow.preprocess_images`;
            preprocessed, they are the pytorch model's example), or a preprocessed float batch
            :math:`N \\times C \\times H \\times W` (un-normalised to uint8 images for the pyfunc model).
            The first two items are used; without one, mid-grey images.

        The pyfunc model is registered under ``register_model`` when given, with the tracker's ``aliases``
        on the new version. URIs: :attr:`logged_models` and the run tag ``dismax.pyfunc_model_uri``.
        """
        if not isinstance(model_dir, (str, os.PathLike)) or not os.path.isdir(model_dir):
            raise ValueError(f"model_dir must be an existing folder written by save_model(); got {model_dir!r}.")
        self._require_started()
        from dismax_plugin.adapters.timm import read_metadata

        saved = read_metadata(model_dir).get("metadata") or {}
        try:
            check_preprocessing(saved.get("preprocessing"))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"model_dir '{model_dir}' must be saved with save_model(model, dir, metadata={{'preprocessing': "
                f"{{'input_size': [C, H, W], 'mean': [...], 'std': [...]}}, ...}}): {error}"
            ) from error
        cpu_model = None
        if model is not None:
            import torch

            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model must be a torch.nn.Module or None; got {type(model).__name__}.")
            cpu_model = copy.deepcopy(model).cpu().eval()
        if hasattr(input_example, "detach"):  # keep the example as it is now, on the CPU
            input_example = input_example[:2].detach().cpu().clone()
        elif isinstance(input_example, np.ndarray):
            input_example = input_example[:2].copy()
        payload = {"model_dir": os.path.abspath(model_dir), "input_example": input_example}
        if cpu_model is not None:
            self._conn.submit("model", self._ref, dict(payload, flavor="pytorch", model=cpu_model))
        linked = [dict(m) for m in self._linked]  # the evaluation so far belongs to this model
        self._conn.submit("model", self._ref, dict(payload, flavor="pyfunc", linked_metrics=linked))

    # ------------------------------------------------------------------ helpers
    def _require_started(self) -> None:
        if self._conn is None:
            raise RuntimeError("call MlflowTracker.start() before logging.")
        if self._ended:
            raise RuntimeError("this MlflowTracker run has ended; start a new tracker.")


def _check_aliases(aliases: Sequence[str], register_model: str | None) -> tuple[str, ...]:
    """``aliases`` as a tuple of valid MLflow registry alias names (MLflow's own rules), else an error."""
    if isinstance(aliases, str) or not isinstance(aliases, Sequence):
        raise TypeError(f"aliases must be a list of alias names such as ['champion']; got {aliases!r}.")
    aliases = tuple(aliases)
    if not aliases:
        return ()
    if register_model is None:
        raise ValueError(f"aliases {list(aliases)} need register_model (the registered model to set them on).")
    telemetry_off_unless_opted_in()  # before MLflow's first import: it decides on telemetry then
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    for alias in aliases:
        if not isinstance(alias, str):
            raise TypeError(f"aliases must be strings; got {alias!r}.")
        try:
            _validate_model_alias_name(alias)
            _validate_model_alias_name_reserved(alias)
        except MlflowException as error:
            raise ValueError(f"alias {alias!r} cannot be used: {error.message}") from error
    return tuple(dict.fromkeys(aliases))


def _context_tags() -> dict[str, str]:
    """The run context tags MLflow's fluent API adds (user, source, git commit), plus the plugin version."""
    tags: dict[str, str] = {}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags.update(resolve_tags())
    except Exception:  # optional context
        pass
    try:
        import dismax_plugin

        tags["dismax.version"] = dismax_plugin.__version__
    except Exception:  # pragma: no cover
        pass
    return tags
