"""Tracking URIs: which ones can be used, and how to tell an unreachable backend from a refusal.

:func:`check_tracking_uri` is the start-time check (an unusable URI is a :class:`TrackingURIError`, a
``ValueError`` naming it); :func:`probe`, :func:`is_connectivity_error` and :func:`server_error_status` let
the connection decide whether a failed call means "the server is gone" (queue it), "the server answered
with an error of its own, HTTP >= 500" (retry it later, keep it) or "the server said no" (drop it).
MLflow's HTTP client settings are shortened around the tracker's own calls by :func:`http_env`.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator, Mapping

from ._telemetry import telemetry_off_unless_opted_in

__all__ = [
    "HTTP_ENV_DEFAULTS",
    "TrackingURIError",
    "check_tracking_uri",
    "fluent_tracking_uri",
    "http_env",
    "is_connectivity_error",
    "is_http",
    "probe",
    "server_error_status",
]

#: MLflow HTTP client settings used around the tracker's calls (unless already set in the environment).
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
_KNOWN_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "uc")


class TrackingURIError(ValueError):
    """The MLflow tracking URI cannot be used (bad scheme, store cannot be opened, no server answers)."""


@contextlib.contextmanager
def http_env(overrides: Mapping[str, str] | None = None) -> Iterator[None]:
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
def fluent_tracking_uri(uri: str) -> Iterator[None]:
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


def is_http(uri: str) -> bool:
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
    telemetry_off_unless_opted_in()  # before MLflow's first import: it decides on telemetry then
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
        with http_env(overrides), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # any failure means the URI is unusable; say why
        if is_http(uri) and is_connectivity_error(error):
            reason = f"no server answers there ({_root_cause(error)})"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = reason if len(reason) <= 300 else reason[:297] + "..."
        hint = (
            "is an MLflow server running there (mlflow server --host 127.0.0.1 --port N)?"
            if is_http(uri)
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


def probe(uri: str, timeout: float = 2.0) -> bool:
    """Cheap reachability test: ``GET <uri>/health`` for servers, a one-row query for local stores."""
    if is_http(uri):
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


def _chain(error: BaseException | None, limit: int = 10) -> Iterator[BaseException]:
    seen = 0
    while error is not None and seen < limit:
        seen += 1
        yield error
        error = error.__cause__ or error.__context__


_TOO_MANY = re.compile(r"too many (5\d\d) error responses")


def server_error_status(error: BaseException) -> int | None:
    """The HTTP status (>= 500) a server *answered* the failed call with, or ``None``.

    MLflow's client retries 5xx answers and then raises "... (Caused by ResponseError('too many 500 error
    responses'))"; a REST error body or an HTTP error with a 5xx status counts too. (A connection that
    failed is not an answer: ``None``.)
    """
    from mlflow.exceptions import RestException

    for item in _chain(error):
        match = _TOO_MANY.search(str(item))
        if match:
            return int(match.group(1))
        response = getattr(item, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int) and status >= 500:
            return status
        if isinstance(item, RestException):
            code = int(item.get_http_status_code())
            return code if code >= 500 else None
    return None


def is_connectivity_error(error: BaseException) -> bool:
    """True for errors that say the backend could not be reached (rather than that it answered)."""
    if server_error_status(error) is not None:
        return False  # the server answered, with an error of its own
    for item in _chain(error):
        name = type(item).__name__
        if isinstance(item, (ConnectionError, TimeoutError)) or name in (
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
        text = str(item)
        if "Max retries exceeded" in text or "Connection refused" in text or "failed with exception" in text:
            return True
    return False
