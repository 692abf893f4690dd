"""MLflow glue: :class:`MlflowTracker` for the training engine and a servable pyfunc model.

``mlflow`` is imported when a tracker starts or a model is logged or loaded, never when this module (or
:mod:`dismax_plugin.adapters`) is imported, so :func:`preprocess_images` can be used without MLflow.

**Tracker.** :class:`MlflowTracker` implements :class:`dismax_plugin.adapters.engine.tracking.Tracker` with an
:class:`mlflow.MlflowClient` and explicit run ids (no fluent active-run state): parameters, metrics with
steps, tables, figures, artifacts, nested child runs (``with tracker.child("ce") as sub: ...``) and the
model, logged both as a ``pytorch`` flavour (pickled, with this package in ``code_paths``) and as a
pyfunc model (:class:`DisMaxPyfuncModel`) that takes raw images and returns class, probability, native
OOD score and OOD flag.

**A wrong tracking URI is an error at start.** :meth:`MlflowTracker.start` calls
:func:`check_tracking_uri`, which raises :class:`TrackingURIError` (a ``ValueError`` whose message names
the URI) when the URI has an unknown scheme, its store cannot be opened, or no MLflow server answers
there. The CLI maps it to exit code 2. Nothing is retried at start: a run that cannot start is reported
before any training is done.

**Once started, the tracker never raises because the backend is down.** A call that fails because the
server (or store) cannot be reached emits one :class:`TrackingUnavailableWarning` (also logged), switches
the tracker (and its children) to *offline*, and queues that call and every later one in order. While
offline, the server is probed (``GET /health``, 2 s timeout) at most every ``retry_interval`` seconds;
when it answers, the queue is sent and the tracker is online again. :meth:`MlflowTracker.end` of the
root tracker retries the queue (``end_retries`` probes, ``end_retry_wait`` s apart); if the server is
still unreachable, everything queued is written to a **local fallback store**,
``sqlite:///<fallback_dir>/mlflow.db`` with artifacts in ``<fallback_dir>/mlflow-artifacts``
(``fallback_dir`` defaults to ``./mlflow-fallback``; the CLI passes the run's output directory). A fallback
run holds what could not be sent (the server keeps what was sent before, and a run whose end was not sent
stays ``RUNNING`` there); it carries the tags ``dismax.fallback.source_uri`` and
``dismax.fallback.source_run_id``; the warning names the store (``mlflow ui --backend-store-uri ...``),
and :attr:`MlflowTracker.fallback_uri` holds it. Figures are rendered to a temporary spool folder when
queued; files and folders given to ``log_artifact`` are queued by path. A call that a *reachable* server
rejects (e.g. an invalid metric name), or a model that fails to log, is logged and dropped. The tracker
is not thread-safe: call it from one thread (the engine calls it on rank 0 only).

**HTTP settings.** MLflow's client defaults (7 retries with exponential backoff, 120 s timeout: minutes
per call against a dead server) are replaced, only around the tracker's own calls and only for variables
the environment does not already set, by :data:`HTTP_ENV_DEFAULTS`:
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``,
``MLFLOW_HTTP_REQUEST_TIMEOUT=15``. A dead server thus costs about 3 s once, then nothing per call.

**Pyfunc model.** ``mlflow.pyfunc.load_model(uri).predict(images)`` takes a batch of raw images (see
:func:`preprocess_images`) and returns a ``pandas.DataFrame``, one row per image: ``class`` (int),
``class_name`` (str), ``probability`` (float, calibrated softmax of the predicted class), ``ood_score``
(the native in-distribution score; larger = more in-distribution) and ``is_ood`` (bool at the stored
threshold for TPR 0.95, or missing when no thresholds were stored). ``model_config={"device": "cuda",
"tpr": 0.99, "batch_size": 64}`` overrides the defaults (``cpu``, 0.95, 64) at load time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..timm.preprocessing import eval_transform

__all__ = [
    "HTTP_ENV_DEFAULTS",
    "DisMaxPyfuncModel",  # noqa: F822 - built on first access (module __getattr__), see below
    "MlflowTracker",
    "TrackingURIError",
    "TrackingUnavailableWarning",
    "check_tracking_uri",
    "pip_requirements",
    "preprocess_images",
    "stage_code_package",
]

log = logging.getLogger(__name__)

#: MLflow HTTP client settings used around the tracker's calls (unless already set in the environment).
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PYFUNC_MODEL_NAME = "model"
PYTORCH_MODEL_NAME = "pytorch_model"
_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_KNOWN_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "uc")
_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")


class TrackingURIError(ValueError):
    """The MLflow tracking URI cannot be used (bad scheme, store cannot be opened, no server answers)."""


class TrackingUnavailableWarning(RuntimeWarning):
    """The tracking backend went away during a run; logging continues offline (queued / fallback)."""


# ============================================================================ environment helpers
@contextlib.contextmanager
def _http_env(overrides: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set :data:`HTTP_ENV_DEFAULTS` (and ``overrides``, which win) for the duration of the block."""
    wanted = {k: v for k, v in HTTP_ENV_DEFAULTS.items() if k not in os.environ}
    wanted.update(overrides or {})
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent tracking URI at ``uri`` for the block (``log_model`` reads only that)."""
    import mlflow

    try:  # private, but exactly "temporarily use this URI" and restores an unset URI as unset
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - other MLflow versions
        _use_tracking_uri = None
    if _use_tracking_uri is not None:
        with _use_tracking_uri(uri):
            yield
        return
    previous = mlflow.get_tracking_uri()  # pragma: no cover
    mlflow.set_tracking_uri(uri)  # pragma: no cover
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        mlflow.set_tracking_uri(previous)


def _scheme(uri: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    if not match or (len(match.group(1)) == 1 and os.name == "nt"):
        return ""  # a plain path (MLflow's file store)
    return match.group(1).lower().split("+")[0]


def _is_http(uri: str) -> bool:
    return _scheme(uri) in ("http", "https")


def check_tracking_uri(uri: str | None = None, timeout: float = 5.0) -> str:
    """Check that ``uri`` (default: ``MLFLOW_TRACKING_URI`` or MLflow's default store) can be used.

    An ``http(s)`` URI must answer MLflow's REST API (one request, no retries, ``timeout`` seconds); any
    other URI must open as an MLflow store (a ``sqlite:`` database is created if missing, as MLflow does).

    :param uri: the tracking URI, e.g. ``http://127.0.0.1:5000`` or ``sqlite:///runs/mlflow.db``.
    :param timeout: HTTP timeout in seconds.
    :return: the resolved URI.
    :raises TrackingURIError: (a ``ValueError``) naming the URI and the reason.
    :raises TypeError: if ``uri`` is not a string or ``None``.
    """
    import mlflow

    if uri is not None and not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f"tracking_uri must be a string such as 'http://127.0.0.1:5000' or None; got {type(uri)}.")
    uri = os.fspath(uri) if uri is not None else mlflow.get_tracking_uri()
    if not uri.strip():
        raise TrackingURIError("MLflow tracking URI '' is empty; expected e.g. 'http://127.0.0.1:5000'.")
    scheme = _scheme(uri)
    if scheme and scheme not in _KNOWN_SCHEMES:
        raise TrackingURIError(
            f"MLflow tracking URI '{uri}' has an unsupported scheme '{scheme}:'; expected one of "
            f"{', '.join(s + ':' for s in _KNOWN_SCHEMES)} or a local path."
        )
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout)))}
    try:
        with _http_env(overrides), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # any failure means the URI is unusable; say why
        if _is_http(uri) and _is_connectivity_error(error):
            reason = f"no server answers there ({_root_cause(error)})"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = reason if len(reason) <= 300 else reason[:297] + "..."
        hint = (
            "is an MLflow server running there (mlflow server --host 127.0.0.1 --port N)?"
            if _is_http(uri)
            else "can the store be opened (does the folder exist, is the path writable)?"
        )
        raise TrackingURIError(f"Cannot use MLflow tracking URI '{uri}': {reason}; {hint}") from error
    return uri


def _root_cause(error: BaseException) -> str:
    """A short name for what went wrong underneath, e.g. ``connection refused``."""
    text = str(error)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("timed out", "timed out"),
        ("Read timed out", "timed out"),
    ):
        if needle in text:
            return short
    return type(error).__name__


def _probe(uri: str, timeout: float = 2.0) -> bool:
    """Cheap reachability test: ``GET <uri>/health`` for servers, a one-row query for local stores."""
    if _is_http(uri):
        import requests

        try:
            return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200
        except Exception:
            return False
    try:
        import mlflow

        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return True
    except Exception:
        return False


def _is_connectivity_error(error: BaseException) -> bool:
    """True for errors that say the backend could not be reached (rather than that it refused)."""
    seen = 0
    while error is not None and seen < 10:
        seen += 1
        name = type(error).__name__
        if isinstance(error, (ConnectionError, TimeoutError)) or name in (
            "ConnectionError",
            "ConnectTimeout",
            "ReadTimeout",
            "Timeout",
            "MaxRetryError",
            "NewConnectionError",
            "ProtocolError",
            "OperationalError",
        ):
            return True
        text = str(error)
        if "Max retries exceeded" in text or "Connection refused" in text or "failed with exception" in text:
            return True
        status = getattr(error, "get_http_status_code", None)
        if callable(status):
            try:
                if int(status()) >= 500:
                    return True
            except Exception:
                pass
        error = error.__cause__ or error.__context__
    return False


# ============================================================================ value helpers
def _scalar(name: str, value: Any) -> float:
    if hasattr(value, "detach"):
        if value.numel() != 1:
            raise TypeError(f"metric '{name}' must be a scalar; got a tensor of shape {tuple(value.shape)}.")
        value = value.detach().cpu().item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise TypeError(f"metric '{name}' must be a scalar; got an array of shape {value.shape}.")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"metric '{name}' must be a real number; got {type(value).__name__} {value!r}.")
    return float(value)


def _key(name: Any) -> str:
    key = _KEY_BAD_CHARS.sub("_", str(name)).strip() or "_"
    return key[:_MAX_KEY]


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_text(v) for v in value) + "]"
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    return str(value)


def _check_artifact_file(argument: str, artifact_file: Any, suffixes: tuple[str, ...]) -> str:
    if not isinstance(artifact_file, str) or not artifact_file.strip():
        raise TypeError(
            f"{argument} must be a run-relative file path such as 'ood/x{suffixes[0]}'; got {artifact_file!r}."
        )
    path = artifact_file.replace("\\", "/").lstrip("/")
    if ".." in path.split("/"):
        raise ValueError(f"{argument} must stay inside the run's artifacts (no '..'); got '{artifact_file}'.")
    if not path.lower().endswith(suffixes):
        raise ValueError(f"{argument} must end with {' or '.join(suffixes)}; got '{artifact_file}'.")
    return path


def _rows_frame(rows: Any):
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        frame = rows.copy()
    elif isinstance(rows, Mapping):
        frame = pd.DataFrame(dict(rows))
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and all(
        isinstance(r, Mapping) for r in rows
    ):
        frame = pd.DataFrame([{str(k): _plain(v) for k, v in r.items()} for r in rows])
    else:
        raise TypeError(
            "rows must be a list of dicts (one per table row), a dict of columns or a pandas DataFrame; "
            f"got {type(rows).__name__}."
        )
    # text columns as plain objects: MLflow's log_table selects them by the 'object' dtype (pandas 3 'str')
    return frame.astype({c: object for c in frame.columns if pd.api.types.is_string_dtype(frame[c])})


def _plain(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ============================================================================ model code & requirements
def stage_code_package(destination: str) -> str:
    """Copy the ``dismax_plugin`` package, with ``adapters`` as its sub-package, into ``destination``.

    In a source checkout ``dismax_plugin.adapters`` lives in a separate folder; MLflow's ``code_paths``
    needs one importable tree, so this builds it. Returns the path of the staged ``dismax_plugin`` folder.
    """
    import dismax_plugin
    import dismax_plugin.adapters as adapters

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    core = Path(dismax_plugin.__file__).resolve().parent
    target = Path(destination) / "dismax_plugin"
    shutil.copytree(core, target, ignore=ignore, dirs_exist_ok=True)
    adapters_dir = Path(adapters.__file__).resolve().parent
    if adapters_dir != core / "adapters":
        shutil.copytree(adapters_dir, target / "adapters", ignore=ignore, dirs_exist_ok=True)
    return str(target)


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged models (the installed versions of what they import)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


# ============================================================================ preprocessing
def _layout(images: np.ndarray) -> str:
    if images.ndim == 3:
        return "NHW"
    if images.ndim == 4:
        if images.shape[-1] in (1, 3, 4):
            return "NHWC"
        if images.shape[1] in (1, 3, 4):
            return "NCHW"
    raise ValueError(
        "images must be a batch [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3, 4); "
        f"got shape {tuple(images.shape)}."
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    numeric = np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    if image.dtype == np.bool_ or not numeric:
        raise TypeError(f"images must hold uint8 (or integer 0..255) or float [0, 1] values; got dtype {image.dtype}.")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("float images must be finite values in [0, 1]; got NaN or inf.")
        low, high = float(image.min()), float(image.max())
        if low < -1e-6 or high > 1.0 + 1e-6:
            raise ValueError(
                f"float images must be in [0, 1] (uint8 images in 0..255); got range [{low:.4g}, {high:.4g}]."
            )
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.dtype != np.uint8:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"integer images must be in 0..255; got range [{low}, {high}].")
        image = image.astype(np.uint8)
    return image


def _check_preprocessing(preprocessing: Any) -> dict:
    if not isinstance(preprocessing, Mapping):
        raise TypeError(
            "preprocessing must be a dict {'input_size': [C, H, W], 'mean': [...], 'std': [...]}; "
            f"got {type(preprocessing).__name__}."
        )
    missing = [k for k in ("input_size", "mean", "std") if k not in preprocessing]
    size = preprocessing.get("input_size")
    if missing or not isinstance(size, Sequence) or len(size) != 3 or int(size[0]) not in (1, 3):
        raise ValueError(
            "preprocessing must hold 'input_size' [C, H, W] with C in (1, 3), 'mean' and 'std'; "
            f"got {dict(preprocessing)} (missing: {missing})."
        )
    return dict(preprocessing)


def preprocess_images(images: Any, preprocessing: Mapping[str, Any], transform=None):
    """Raw images to the model's input tensor, exactly as evaluation does it.

    Each image goes through PIL and timm's evaluation transform (``create_transform(is_training=False,
    input_size, interpolation, mean, std, crop_pct)``: resize of the shorter edge, centre crop, scaling to
    [0, 1], normalisation), after conversion to ``RGB`` or ``L`` to match ``input_size[0]`` (grey
    images are replicated to three channels, colour images reduced to luminance, alpha is dropped) —
    the transform ``dismax_plugin.adapters.engine.data`` applies to image files.

    :param images: a batch as a numpy array (or anything ``np.asarray`` accepts): ``[N, H, W]`` (grey),
        ``[N, H, W, C]`` or ``[N, C, H, W]`` with ``C`` in 1, 3, 4 (channels-last wins when both fit), or a
        list of single images ``[H, W]`` / ``[H, W, C]`` of any sizes. Values are uint8 (or integers in
        0..255) or floats in [0, 1] (quantised to 8 bits, as an image file would be).
    :param preprocessing: ``{"input_size": [C, H, W], "mean": [...], "std": [...]}`` plus optional
        ``"interpolation"`` (default ``"bilinear"``) and ``"crop_pct"`` (default 1.0).
    :param transform: a prebuilt transform (from the same ``preprocessing``) to reuse.
    :return: float32 tensor :math:`N \\times C \\times H \\times W`.
    :raises TypeError: for an unsupported container or dtype.
    :raises ValueError: for an unsupported shape or out-of-range values.
    """
    preprocessing = _check_preprocessing(preprocessing)
    if hasattr(images, "iloc"):
        raise TypeError("images must be a numpy array of images, not a pandas DataFrame.")
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if isinstance(images, (list, tuple)) and images:
        singles = [np.asarray(im) for im in images]
        if all(im.ndim in (2, 3) for im in singles) and len({im.shape for im in singles}) > 1:
            return _stack([_single_hwc(im) for im in singles], preprocessing, transform)  # sizes differ
    try:
        batch = np.asarray(images)
    except (TypeError, ValueError) as error:
        raise TypeError(f"images must be a numpy array batch of images; got {type(images).__name__}.") from error
    if batch.dtype == object:
        raise TypeError("images must be a numeric array (uint8 or float); got dtype object.")
    layout = _layout(batch)
    if batch.shape[0] == 0:
        raise ValueError("images must hold at least one image; got an empty batch.")
    if layout == "NCHW":
        batch = batch.transpose(0, 2, 3, 1)
    return _stack([_single_hwc(im) for im in batch], preprocessing, transform)


def _single_hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a single image must be [H, W] or [H, W, C] with C in (1, 3, 4); got {image.shape}.")
    if image.ndim not in (2, 3):
        raise ValueError(f"a single image must be [H, W] or [H, W, C]; got shape {image.shape}.")
    image = _to_uint8(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return np.ascontiguousarray(image)


def _stack(images: list[np.ndarray], preprocessing: dict, transform):
    import torch
    from PIL import Image

    transform = transform or eval_transform(preprocessing)
    mode = "RGB" if int(preprocessing["input_size"][0]) == 3 else "L"
    tensors = []
    for image in images:
        pil = Image.fromarray(image)  # 2-D: L, 3 channels: RGB, 4: RGBA
        if pil.mode != mode:
            pil = pil.convert(mode)
        tensors.append(transform(pil))
    return torch.stack(tensors).float()


# ============================================================================ pyfunc model
class _PyfuncMethods:
    """The methods of :class:`DisMaxPyfuncModel` (the class itself needs MLflow, so it is built lazily)."""

    def load_context(self, context) -> None:
        """Load the model once (``dismax_plugin.adapters.timm.load_model``) on ``model_config['device']``.

        The OOD score is the one the head's thresholds were stored for; without stored thresholds, the
        metadata's ``score`` (else the head's default score, or ``mps`` for a linear head). A linear head
        keeps its calibration in the metadata (``temperature``, ``thresholds``), which is applied here.
        """
        from dismax_plugin.adapters.timm import get_head, load_model, read_metadata

        config = dict(getattr(context, "model_config", None) or {})
        model_dir = context.artifacts["model_dir"]
        self.device = str(config.get("device", "cpu"))
        self.tpr = float(config.get("tpr", 0.95))
        self.batch_size = int(config.get("batch_size", 64))
        self.model = load_model(model_dir, device=self.device).eval()
        saved = getattr(self.model, "dismax_metadata", None) or read_metadata(model_dir)
        self.metadata = dict(saved.get("metadata") or {})
        self.preprocessing = _check_preprocessing(self.metadata.get("preprocessing"))
        self.transform = eval_transform(self.preprocessing)
        self.head = get_head(self.model)
        names = self.metadata.get("class_names")
        self.class_names = [str(n) for n in names] if names else None
        self.temperature = 1.0
        if self.head is not None and self.head.stored_score is not None:
            self.score_name, thresholds = self.head.stored_score, self.head.stored_thresholds
        else:
            self.score_name = self.metadata.get("score") or (self.head.default_score if self.head else "mps")
            thresholds = {round(float(t), 6): float(v) for t, v in (self.metadata.get("thresholds") or {}).items()}
            if self.head is None:  # a linear head: the calibrated temperature is not inside the model
                self.temperature = float(self.metadata.get("temperature") or 1.0)
        self.threshold = thresholds.get(round(self.tpr, 6))

    def predict(self, context, model_input, params=None):
        """One row per image: ``class``, ``class_name``, ``probability``, ``ood_score``, ``is_ood``."""
        import pandas as pd
        import torch

        from dismax_plugin import score

        x = preprocess_images(model_input, self.preprocessing, self.transform)
        chunks = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                chunks.append(self.model(x[start : start + self.batch_size].to(self.device)).double().cpu())
        logits = torch.cat(chunks) / self.temperature
        probability, predicted = torch.softmax(logits, dim=1).max(dim=1)
        scores = score(logits, self.score_name)
        classes = predicted.tolist()
        frame = pd.DataFrame(
            {
                "class": np.asarray(classes, dtype=np.int64),
                "class_name": [self.class_names[c] if self.class_names else str(c) for c in classes],
                "probability": probability.numpy().astype(np.float64),
                "ood_score": scores.numpy().astype(np.float64),
            }
        )
        if self.threshold is None:
            frame["is_ood"] = pd.array([pd.NA] * len(frame), dtype="boolean")
        else:
            frame["is_ood"] = (scores < self.threshold).numpy().astype(bool)
        return frame


def _pyfunc_class():
    """:class:`DisMaxPyfuncModel`, built once (it subclasses ``mlflow.pyfunc.PythonModel``)."""
    cls = globals().get("DisMaxPyfuncModel")
    if cls is not None:
        return cls
    import mlflow.pyfunc

    cls = type(
        "DisMaxPyfuncModel",
        (_PyfuncMethods, mlflow.pyfunc.PythonModel),
        {
            "__module__": __name__,
            "__qualname__": "DisMaxPyfuncModel",
            "__doc__": (
                "MLflow pyfunc model: raw images in, one row per image out (class, class_name, probability, "
                "ood_score, is_ood). Log it with ``artifacts={'model_dir': <timm adapter model folder>}``."
            ),
        },
    )
    globals()["DisMaxPyfuncModel"] = cls  # pickled by reference: the module must hold this very class
    return cls


def __getattr__(name: str):
    # DisMaxPyfuncModel subclasses mlflow.pyfunc.PythonModel: built on first access so that importing this
    # module does not import mlflow.
    if name == "DisMaxPyfuncModel":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _output_schema():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=None,  # raw images of several layouts/dtypes: a tensor spec would reject all but one
        outputs=Schema(
            [
                ColSpec("long", "class"),
                ColSpec("string", "class_name"),
                ColSpec("double", "probability"),
                ColSpec("double", "ood_score"),
                ColSpec("boolean", "is_ood", required=False),
            ]
        ),
    )


def _is_model_input(example: Any, preprocessing: dict) -> bool:
    """A float batch shaped like the model input, ``[N, *input_size]``: already preprocessed."""
    shape, dtype = getattr(example, "shape", None), getattr(example, "dtype", None)
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != tuple(int(v) for v in preprocessing["input_size"]):
        return False
    return bool(getattr(example, "is_floating_point", lambda: False)()) or (
        isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating)
    )


def _examples(input_example: Any, preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(raw images, model input)`` examples (2 items each) for the pyfunc and the pytorch model.

    ``input_example`` is either raw images (anything :func:`preprocess_images` takes) or a preprocessed
    float batch ``[N, C, H, W]`` (then the raw example is that batch un-normalised to uint8 images);
    without a usable one, mid-grey images are used.
    """
    import torch

    channels, height, width = (int(v) for v in preprocessing["input_size"])
    if input_example is not None:
        try:
            if _is_model_input(input_example, preprocessing):
                model_input = torch.as_tensor(np.asarray(input_example[:2], dtype=np.float32))
                x = model_input.double().numpy() * np.asarray(preprocessing["std"]).reshape(1, -1, 1, 1)
                x = x + np.asarray(preprocessing["mean"]).reshape(1, -1, 1, 1)
                raw = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
                raw = raw if channels == 3 else raw[..., 0]
            else:
                raw = input_example[:2]
                raw = raw.detach().cpu().numpy() if hasattr(raw, "detach") else np.asarray(raw)
                model_input = preprocess_images(raw, preprocessing)
            return raw, model_input.numpy()
        except Exception:  # an odd example must not stop the model from being logged
            log.warning("MLflow tracker: input_example not usable (see the log_model docstring); using grey images")
    raw = np.full((2, height, width, 3) if channels == 3 else (2, height, width), 128, dtype=np.uint8)
    return raw, preprocess_images(raw, preprocessing).numpy()


# ============================================================================ tracker internals
class _RunRef:
    """A run known by its creation info; its id is resolved per target store (created lazily offline)."""

    def __init__(self, experiment: str | None, run_name: str | None, tags: dict, parent: _RunRef | None):
        self.experiment, self.run_name, self.tags, self.parent = experiment, run_name, tags, parent
        self.start_time = int(time.time() * 1000)


class _Target:
    """One MLflow store (the primary URI or the fallback) with the run ids created in it."""

    def __init__(self, uri: str, artifact_root: str | None = None, extra_tags: dict | None = None):
        import mlflow

        self.uri, self.artifact_root, self.extra_tags = uri, artifact_root, extra_tags or {}
        if artifact_root is not None:  # a new sqlite store: its Default experiment keeps artifacts here too
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, Path(artifact_root).resolve().as_uri())
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.ids: dict[_RunRef, str] = {}
        self.experiment_ids: dict[str | None, str] = {}
        self.source_ids: dict[_RunRef, str] = {}  # for the fallback: the run's id in the primary store

    def experiment_id(self, name: str | None) -> str:
        if name in self.experiment_ids:
            return self.experiment_ids[name]
        if name is None:  # MLflow's default experiment (the fallback store has its own "0")
            experiment_id = (self.artifact_root is None and os.environ.get("MLFLOW_EXPERIMENT_ID")) or "0"
        else:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                raise ValueError(
                    f"experiment '{name}' is deleted in {self.uri}; restore it or choose another --experiment name."
                )
            experiment_id = experiment.experiment_id if experiment is not None else self._create(name)
        self.experiment_ids[name] = experiment_id
        return experiment_id

    def _create(self, name: str) -> str:
        location = None
        if self.artifact_root is not None:
            location = Path(self.artifact_root).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            existing = self.client.get_experiment_by_name(name)  # created concurrently
            if existing is None:
                raise
            return existing.experiment_id

    def run_id(self, ref: _RunRef) -> str:
        if ref in self.ids:
            return self.ids[ref]
        tags = dict(ref.tags)
        if ref.parent is not None:
            tags["mlflow.parentRunId"] = self.run_id(ref.parent)
        tags.update(self.extra_tags)
        if ref in self.source_ids:
            tags["dismax.fallback.source_run_id"] = self.source_ids[ref]
        run = self.client.create_run(
            self.experiment_id(ref.experiment), start_time=ref.start_time, tags=tags, run_name=ref.run_name
        )
        self.ids[ref] = run.info.run_id
        return run.info.run_id


class _Connection:
    """State shared by a tracker and its children: the primary store, the offline queue, the warning."""

    def __init__(self, uri: str, fallback_dir: str, retry_interval: float, register_model: str | None):
        self.uri = uri
        self.primary = _Target(uri)
        self.fallback_dir = fallback_dir
        self.retry_interval = retry_interval
        self.register_model = register_model
        self.pending: list[tuple[str, _RunRef, dict]] = []
        self.offline = False
        self.warned = False
        self.last_probe = 0.0
        self.spool: str | None = None
        self.fallback_uri: str | None = None
        self.logged_models: dict[str, dict[str, Any]] = {}

    def spool_dir(self) -> str:
        if self.spool is None:
            self.spool = tempfile.mkdtemp(prefix="dismax-mlflow-spool-")
        return self.spool

    # ------------------------------------------------------------------ sending
    def submit(self, kind: str, ref: _RunRef, payload: dict, on_offline=None) -> bool:
        """Send now, or queue; never raises. Returns True when it was sent.

        ``on_offline(payload) -> (kind, payload)`` turns a call into what is kept when it is queued.
        """
        if self.offline and time.monotonic() - self.last_probe >= self.retry_interval:
            self.reconnect()
        if self.offline:
            self._queue(kind, ref, payload, on_offline)
            return False
        try:
            with _http_env():
                _apply(self.primary, kind, ref, payload, self)
            return True
        except Exception as error:
            if _is_connectivity_error(error) or not _probe(self.uri):
                self._go_offline(error)
                self._queue(kind, ref, payload, on_offline)
                return False
            self._rejected(kind, error)
            return False

    def _queue(self, kind: str, ref: _RunRef, payload: dict, on_offline) -> None:
        if on_offline is not None:
            try:
                kind, payload = on_offline(payload)
            except Exception:  # e.g. a figure that cannot be rendered: it is lost, say so
                log.warning("MLflow tracker: could not keep %s for later sending", kind, exc_info=True)
                return
        self.pending.append((kind, ref, payload))

    def _go_offline(self, error: BaseException) -> None:
        self.offline = True
        self.last_probe = time.monotonic()
        if not self.warned:
            self.warned = True
            message = (
                f"MLflow tracking server {self.uri} is unreachable ({type(error).__name__}: "
                f"{str(error).strip()[:200]}); training continues, and what cannot be sent is kept and "
                "retried, or written to a local fallback store when the run ends."
            )
            log.warning(message)
            warnings.warn(message, TrackingUnavailableWarning, stacklevel=4)

    def _rejected(self, kind: str, error: BaseException) -> None:
        # The backend answered but the call failed (an MLflow error, or a bug in a model to log): not sent.
        from mlflow.exceptions import MlflowException

        trace = not isinstance(error, MlflowException)
        log.warning("MLflow tracker: %s failed and was dropped: %s", kind, str(error).strip()[:500], exc_info=trace)

    def reconnect(self) -> bool:
        """Probe the server; when it answers, send the queue in order. Returns True when all was sent."""
        self.last_probe = time.monotonic()
        if not _probe(self.uri):
            return False
        log.info("MLflow tracking server %s is reachable again; sending %d queued calls", self.uri, len(self.pending))
        self.offline = False
        return self.flush(self.primary)

    def flush(self, target: _Target) -> bool:
        while self.pending:
            kind, ref, payload = self.pending[0]
            try:
                with _http_env():
                    _apply(target, kind, ref, payload, self)
            except Exception as error:
                if target is self.primary and (_is_connectivity_error(error) or not _probe(self.uri)):
                    self.offline = True
                    self.last_probe = time.monotonic()
                    return False
                if target is not self.primary:
                    log.warning("MLflow fallback store rejected %s: %s", kind, str(error).strip()[:500])
                else:
                    self._rejected(kind, error)
            self.pending.pop(0)
        return True

    def finish(self, attempts: int, wait: float) -> None:
        """At the root's end: retry the queue, then write what is left to the fallback store."""
        for attempt in range(max(1, attempts)):
            if not self.pending:
                break
            if attempt:
                time.sleep(wait)
            if self.reconnect():
                break
        if self.pending:
            self.write_fallback()
        if not self.pending and self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None

    def write_fallback(self) -> None:
        root = Path(self.fallback_dir).resolve()
        uri = f"sqlite:///{root / 'mlflow.db'}"
        count = len(self.pending)
        try:
            root.mkdir(parents=True, exist_ok=True)
            source = {"dismax.fallback.source_uri": self.uri}
            target = _Target(uri, artifact_root=str(root / "mlflow-artifacts"), extra_tags=source)
            target.source_ids = dict(self.primary.ids)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.flush(target)
        except Exception as error:
            message = (
                f"MLflow tracking server {self.uri} stayed unreachable and the fallback store {uri} failed "
                f"({type(error).__name__}: {error}); {len(self.pending)} calls are lost"
                + (f" (figures kept in {self.spool})" if self.spool else "")
                + "."
            )
            log.error(message)
            warnings.warn(message, TrackingUnavailableWarning, stacklevel=4)
            self.spool = None  # keep the spooled files for the user
            return
        self.fallback_uri = uri
        message = (
            f"MLflow tracking server {self.uri} stayed unreachable: {count} unsent calls were written to the "
            f"local fallback store {uri} (artifacts in {root / 'mlflow-artifacts'}); browse it with "
            f"`mlflow ui --backend-store-uri {uri}`."
        )
        log.warning(message)
        warnings.warn(message, TrackingUnavailableWarning, stacklevel=4)


def _apply(target: _Target, kind: str, ref: _RunRef, payload: dict, conn: _Connection) -> None:
    """Perform one tracker call against ``target`` (creating the run there first if needed)."""
    from mlflow.entities import Metric, Param

    run_id = target.run_id(ref)
    client = target.client
    if kind == "create":
        return
    if kind == "params":
        items = [Param(k, v) for k, v in payload["params"].items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
    elif kind == "metrics":
        step, stamp = payload["step"], payload["timestamp"]
        items = [Metric(k, v, stamp, step) for k, v in payload["metrics"].items()]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])
    elif kind == "table":
        client.log_table(run_id, payload["frame"], payload["artifact_file"])
    elif kind == "dict":
        client.log_dict(run_id, payload["dictionary"], payload["artifact_file"])
    elif kind == "figure":
        client.log_figure(run_id, payload["figure"], payload["artifact_file"])
    elif kind == "artifact":
        path, artifact_path = payload["local_path"], payload["artifact_path"]
        if os.path.isdir(path):
            client.log_artifacts(run_id, path, artifact_path)
        else:
            client.log_artifact(run_id, path, artifact_path)
    elif kind == "model":
        _log_model(target, run_id, payload, conn)
    elif kind == "terminate":
        client.set_terminated(run_id, payload["status"], end_time=payload["end_time"])
    else:  # pragma: no cover - internal
        raise AssertionError(kind)


class _KnownNotices(logging.Filter):
    """Drops MLflow's notices about pickled models: the choice is deliberate and documented here."""

    PREFIXES = ("Saving pytorch model by Pickle", "Passing a Python object as `python_model`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextlib.contextmanager
def _quiet_pickle_notices() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("mlflow.pytorch", "mlflow.pyfunc")]
    notice = _KnownNotices()
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)


def _log_model(target: _Target, run_id: str, payload: dict, conn: _Connection) -> None:
    """Log one flavour (``payload["flavor"]``: ``pytorch`` or ``pyfunc``) of the model in ``target``."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from dismax_plugin.adapters.timm import read_metadata

    model_dir, input_example = payload["model_dir"], payload["input_example"]
    name = PYTORCH_MODEL_NAME if payload["flavor"] == "pytorch" else PYFUNC_MODEL_NAME
    experiment_id = target.client.get_run(run_id).info.experiment_id
    with (
        tempfile.TemporaryDirectory(prefix="dismax-mlflow-code-") as staging,
        _fluent_tracking_uri(target.uri),
        _quiet_pickle_notices(),
    ):
        common = {"code_paths": [stage_code_package(staging)], "pip_requirements": pip_requirements()}
        logged = target.client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
        metadata = read_metadata(model_dir).get("metadata") or {}
        raw, model_input = _examples(input_example, _check_preprocessing(metadata.get("preprocessing")))
        if payload["flavor"] == "pytorch":
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            model = payload["model"]
            with torch.inference_mode():
                signature = infer_signature(model_input, model(torch.from_numpy(model_input)).float().numpy())
            info = mlflow.pytorch.log_model(
                model, name=name, serialization_format="pickle", signature=signature, input_example=model_input,
                model_id=logged.model_id, **common,
            )  # fmt: skip
            result = {"model_uri": info.model_uri, "model_id": logged.model_id}
        else:
            import mlflow.pyfunc

            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=_pyfunc_class()(),
                artifacts={"model_dir": str(model_dir)},
                signature=_output_schema(),
                input_example=raw,
                registered_model_name=conn.register_model,
                model_id=logged.model_id,
                **common,
            )
            result = {
                "model_uri": info.model_uri,
                "model_id": logged.model_id,
                "registered_model_version": getattr(info, "registered_model_version", None),
            }
            target.client.set_tag(run_id, "dismax.pyfunc_model_uri", info.model_uri)
        target.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    if target is conn.primary:
        conn.logged_models[name] = result


# ============================================================================ the tracker
class MlflowTracker:
    """:class:`~dismax_plugin.adapters.engine.tracking.Tracker` that logs to MLflow (see the module docstring).

    :param tracking_uri: MLflow tracking URI; ``None`` uses ``MLFLOW_TRACKING_URI`` or MLflow's default
        store (``sqlite:///<cwd>/mlflow.db`` in MLflow 3).
    :param experiment: experiment name (created if missing); ``None`` uses ``MLFLOW_EXPERIMENT_NAME`` /
        ``MLFLOW_EXPERIMENT_ID`` or MLflow's ``Default`` experiment.
    :param run_name: run name (``start(run_name=...)`` overrides it).
    :param register_model: register the pyfunc model under this name in the model registry.
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
        self._conn: _Connection | None = None
        self._ref: _RunRef | None = None
        self._is_child = False
        self._ended = False
        self._params: dict[str, str] = {}

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
        conn = _Connection(uri, fallback, self._retry_interval, self._register_model)
        all_tags = _context_tags()
        all_tags.update({_key(k): str(v)[:8000] for k, v in (tags or {}).items()})
        ref = _RunRef(self._experiment, run_name or self._run_name, all_tags, None)
        try:
            with _http_env():
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
        sub._ref = _RunRef(self._ref.experiment, run_name, _context_tags(), self._ref)
        sub._is_child, sub._ended, sub._params = True, False, {}
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
        for name, value in _flatten(params).items():
            key, text = _key(name), _param_text(value)
            if len(text) > _MAX_PARAM_VALUE:
                truncated[key] = text
                text = text[: _MAX_PARAM_VALUE - 15] + "...[truncated]"
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

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (numbers, 0-d tensors/arrays) at ``step`` (default 0); ``None`` values are skipped."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping {{name: number}}; got {type(metrics).__name__}.")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
            raise TypeError(f"step must be an integer or None; got {step!r}.")
        self._require_started()
        values = {_key(k): _scalar(str(k), v) for k, v in _flatten(metrics).items() if v is not None}
        if values:
            payload = {"metrics": values, "step": int(step or 0), "timestamp": int(time.time() * 1000)}
            self._conn.submit("metrics", self._ref, payload)

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Log a table (list of dicts, dict of columns or DataFrame) as an MLflow table artifact (``.json``)."""
        artifact_file = _check_artifact_file("artifact_file", artifact_file, (".json",))
        frame = _rows_frame(rows)
        self._require_started()
        self._conn.submit("table", self._ref, {"frame": frame, "artifact_file": artifact_file})

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Log a JSON/YAML-serialisable mapping as an artifact (``.json``, ``.yaml`` or ``.yml``)."""
        if not isinstance(dictionary, Mapping):
            raise TypeError(f"dictionary must be a mapping; got {type(dictionary).__name__}.")
        artifact_file = _check_artifact_file("artifact_file", artifact_file, (".json", ".yaml", ".yml"))
        self._require_started()
        self._conn.submit("dict", self._ref, {"dictionary": dict(dictionary), "artifact_file": artifact_file})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure (``.png``, ``.svg``, ``.pdf``, ``.jpg``) and close it."""
        if not hasattr(figure, "savefig"):
            raise TypeError(f"figure must be a matplotlib Figure; got {type(figure).__name__}.")
        artifact_file = _check_artifact_file("artifact_file", artifact_file, (".png", ".svg", ".pdf", ".jpg", ".jpeg"))
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
        :param model: the ``nn.Module`` (a CPU copy is pickled with this package in ``code_paths``).
        :param input_example: a few raw images (what the pyfunc model takes, see :func:`preprocess_images`;
            preprocessed, they are the pytorch model's example), or a preprocessed float batch
            :math:`N \\times C \\times H \\times W` (un-normalised to uint8 images for the pyfunc model).
            The first two items are used; without one, mid-grey images.

        The pyfunc model is registered under ``register_model`` when given. URIs: :attr:`logged_models`
        and the run tag ``dismax.pyfunc_model_uri``.
        """
        if not isinstance(model_dir, (str, os.PathLike)) or not os.path.isdir(model_dir):
            raise ValueError(f"model_dir must be an existing folder written by save_model(); got {model_dir!r}.")
        self._require_started()
        from dismax_plugin.adapters.timm import read_metadata

        saved = read_metadata(model_dir).get("metadata") or {}
        try:
            _check_preprocessing(saved.get("preprocessing"))
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
        self._conn.submit("model", self._ref, dict(payload, flavor="pyfunc"))

    # ------------------------------------------------------------------ helpers
    def _require_started(self) -> None:
        if self._conn is None:
            raise RuntimeError("call MlflowTracker.start() before logging.")
        if self._ended:
            raise RuntimeError("this MlflowTracker run has ended; start a new tracker.")


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

