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
call that the server, reachable (``/health`` answers), fails with HTTP >= 500 (e.g. its artifact store
fails) is not an outage: it is logged with the server's answer (one :class:`TrackingRejectedWarning`),
kept and retried with backoff while the calls behind it are sent, and written to the fallback store if it
still fails at the end. A call the server refuses (HTTP 4xx) is logged and dropped. Not thread-safe: the
engine calls it from rank 0 only.

**Registry.** ``MlflowTracker(register_model="NAME", aliases=["champion"])`` registers the served model
and points the aliases at the new version, so ``models:/NAME@champion`` loads and serves it.

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
``mlflow.pyfunc.load_model(uri).predict(images, params={"tpr": 0.99, "score": "mds"})`` takes raw images
(see :func:`preprocess_images`; which axes are which follows explicit rules, an ambiguous shape is refused)
and returns a ``pandas.DataFrame``, one row per image: ``class``, ``class_name``, ``probability``
(calibrated), ``ood_score`` (the native in-distribution score ``score`` at temperature 1; larger = more
in-distribution) and ``is_ood`` (below the threshold at ``tpr``: the order statistic of the model's sorted
calibration scores, exactly ``head.is_ood(logits, tpr, score)``). Both params are in the signature, with
defaults 0.95 and the model's score, so they work over REST too (``"params"`` next to ``"inputs"``); a bad
value is an :class:`InvalidServingInput` (MLflow's ``INVALID_PARAMETER_VALUE``, HTTP 400).
``model_config={"device": "cuda", "batch_size": 64}`` overrides the defaults at load time.

**Evaluator** (``_evaluator.py``, ``_ood_metrics.py``). :class:`DisMaxOODEvaluator`, registered as
``dismax-ood`` through the ``mlflow.model_evaluator`` entry point:
``mlflow.models.evaluate(uri, data=df, model_type="ood", evaluators=["dismax-ood"])`` logs AUROC,
AUPR-IN/-OUT, FPR95TPR and FPR95-ID (pytorch-ood's metrics) overall, per OOD set and per group, accuracy,
a ROC curve and a score histogram; gate with ``mlflow.validate_evaluation_results``.
"""

from __future__ import annotations

from ._connection import TrackingRejectedWarning, TrackingUnavailableWarning
from ._datasets import DATASET_CONTEXTS
from ._images import preprocess_images
from ._models import pip_requirements, stage_code_package
from ._telemetry import telemetry_off_unless_opted_in
from ._tracker import MlflowTracker
from ._uri import HTTP_ENV_DEFAULTS, TrackingURIError, check_tracking_uri

__all__ = [
    "DATASET_CONTEXTS",
    "EVALUATOR_NAME",  # noqa: F822 - imported on first access (with the evaluator, which imports mlflow)
    "HTTP_ENV_DEFAULTS",
    "MODEL_TYPE",  # noqa: F822 - idem
    "DisMaxOODEvaluator",  # noqa: F822 - imported on first access (it subclasses an MLflow class)
    "DisMaxPyfuncModel",  # noqa: F822 - idem
    "InvalidServingInput",  # noqa: F822 - idem
    "MlflowTracker",
    "TrackingRejectedWarning",
    "TrackingURIError",
    "TrackingUnavailableWarning",
    "check_tracking_uri",
    "pip_requirements",
    "preprocess_images",
    "stage_code_package",
    "telemetry_off_unless_opted_in",
]


_LAZY = {"DisMaxPyfuncModel": "._pyfunc", "InvalidServingInput": "._pyfunc", "DisMaxOODEvaluator": "._evaluator",
         "EVALUATOR_NAME": "._evaluator", "MODEL_TYPE": "._evaluator"}  # fmt: skip


def __getattr__(name: str):
    # these subclass MLflow classes: imported on first access so that importing this package does not
    # import mlflow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
