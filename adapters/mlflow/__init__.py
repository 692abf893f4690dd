"""MLflow glue: :class:`MlflowTracker` for the training engine and a servable pyfunc model.

``mlflow`` is imported when a tracker starts or a model is logged or loaded, never when this package (or
:mod:`dismax_plugin.adapters`) is imported, so :func:`preprocess_images` can be used without MLflow.

**Tracker** (``_tracker.py``). :class:`MlflowTracker` has the engine's tracker methods (start,
log_params, log_metrics, log_input, log_table, log_dict, log_figure, log_artifact, log_model, child, end)
and uses an :class:`mlflow.MlflowClient` with explicit run ids. ``log_input(name, dataset, context)``
records a torch dataset as an MLflow 3 dataset input (name, digest, size; context ``train``, ``test``,
``ood-near`` or ``ood-far``); metrics named ``<dataset>.<...>`` are linked to that dataset and to the
served model.

**A wrong tracking URI is an error at start** (``_uri.py``). :meth:`MlflowTracker.start` calls
:func:`check_tracking_uri`, which raises :class:`TrackingURIError` (a ``ValueError`` naming the URI) when
the URI has an unknown scheme, its store cannot be opened, or no MLflow server answers there.

**Once started, the tracker never raises because the backend is down** (``_connection.py``). A call that
fails because the server cannot be reached emits one :class:`TrackingUnavailableWarning`, and that call
and every later one are queued and re-sent when the server answers again (probed at most every
``retry_interval`` s); what is still unsent when the root run ends goes to a local fallback store,
``sqlite:///<fallback_dir>/mlflow.db`` (named in the warning, :attr:`MlflowTracker.fallback_uri`). A
call that a reachable server rejects is logged and dropped. Not thread-safe: the engine calls it from
rank 0 only.

**HTTP settings.** MLflow's client defaults (7 retries with backoff, 120 s timeout) are replaced around
the tracker's own calls, for variables the environment does not set, by :data:`HTTP_ENV_DEFAULTS`
(2 retries, backoff 1, 15 s): a dead server costs about 3 s once.

**Telemetry** (``_telemetry.py``). MLflow's own usage telemetry is turned off (``MLFLOW_DISABLE_TELEMETRY
=true``) before MLflow is first used, unless the user set ``MLFLOW_DISABLE_TELEMETRY`` (``false`` opts in):
a tracked run connects to the tracking URI only.

**Models** (``_models.py``, ``_pyfunc.py``, ``_images.py``). The model is logged twice, neither needing
pickle to load: ``pytorch_model`` (``mlflow.pytorch``, ``pt2`` via ``torch.export`` with a dynamic batch;
pickle only where export fails, run tag ``dismax.pytorch_model.serialization``) and ``model``, the
models-from-code pyfunc :class:`DisMaxPyfuncModel` that rebuilds the network from ``model.safetensors``
and its config with :func:`dismax_plugin.adapters.timm.load_model`.
``mlflow.pyfunc.load_model(uri).predict(images)`` takes a batch of raw images (see
:func:`preprocess_images`) and returns a ``pandas.DataFrame``, one row per image: ``class``,
``class_name``, ``probability`` (calibrated), ``ood_score`` (the native in-distribution score at
temperature 1; larger = more in-distribution) and ``is_ood`` (at the threshold stored for TPR 0.95).
``model_config={"device": "cuda", "tpr": 0.99, "batch_size": 64}`` overrides the defaults at load time.
"""

from __future__ import annotations

from ._connection import TrackingUnavailableWarning
from ._datasets import DATASET_CONTEXTS
from ._images import preprocess_images
from ._models import pip_requirements, stage_code_package
from ._telemetry import telemetry_off_unless_opted_in
from ._tracker import MlflowTracker
from ._uri import HTTP_ENV_DEFAULTS, TrackingURIError, check_tracking_uri

__all__ = [
    "DATASET_CONTEXTS",
    "HTTP_ENV_DEFAULTS",
    "DisMaxPyfuncModel",  # noqa: F822 - imported on first access (it subclasses an MLflow class)
    "MlflowTracker",
    "TrackingURIError",
    "TrackingUnavailableWarning",
    "check_tracking_uri",
    "pip_requirements",
    "preprocess_images",
    "stage_code_package",
    "telemetry_off_unless_opted_in",
]


def __getattr__(name: str):
    # DisMaxPyfuncModel subclasses mlflow.pyfunc.PythonModel: imported on first access so that importing
    # this package does not import mlflow.
    if name == "DisMaxPyfuncModel":
        from ._pyfunc import DisMaxPyfuncModel

        return DisMaxPyfuncModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
