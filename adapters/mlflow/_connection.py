"""The tracker's connection: send now, or queue while the server is away, or write to a local fallback.

A :class:`Connection` is shared by a tracker and its child runs. Every call goes through
:meth:`Connection.submit`, which never raises because of the backend: a call that fails because the
server (or store) cannot be reached emits one :class:`TrackingUnavailableWarning`, switches the
connection *offline* and queues that call and every later one, in order. While offline the server is
probed at most every ``retry_interval`` seconds; when it answers, the queue is sent. At the root run's end
:meth:`Connection.finish` retries, then writes what is still unsent to ``sqlite:///<fallback_dir>/mlflow.db``
(artifacts in ``<fallback_dir>/mlflow-artifacts``). A call that a *reachable* backend rejects is logged
and dropped.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from ._store import RunRef, Target, apply
from ._uri import http_env, is_connectivity_error, probe

__all__ = ["Connection", "TrackingUnavailableWarning"]

log = logging.getLogger("dismax_plugin.adapters.mlflow")


class TrackingUnavailableWarning(RuntimeWarning):
    """The tracking backend went away during a run; logging continues offline (queued / fallback)."""


class Connection:
    """State shared by a tracker and its children: the primary store, the offline queue, the warning."""

    def __init__(self, uri: str, fallback_dir: str, retry_interval: float, register_model: str | None):
        self.uri = uri
        self.primary = Target(uri)
        self.fallback_dir = fallback_dir
        self.retry_interval = retry_interval
        self.register_model = register_model
        self.pending: list[tuple[str, RunRef, dict]] = []
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
    def submit(self, kind: str, ref: RunRef, payload: dict, on_offline=None) -> bool:
        """Send now, or queue; never raises. Returns True when it was sent.

        ``on_offline(payload) -> (kind, payload)`` turns a call into what is kept when it is queued.
        """
        if self.offline and time.monotonic() - self.last_probe >= self.retry_interval:
            self.reconnect()
        if self.offline:
            self._queue(kind, ref, payload, on_offline)
            return False
        try:
            with http_env():
                apply(self.primary, kind, ref, payload, self)
            return True
        except Exception as error:
            if is_connectivity_error(error) or not probe(self.uri):
                self._go_offline(error)
                self._queue(kind, ref, payload, on_offline)
                return False
            self._rejected(kind, error)
            return False

    def _queue(self, kind: str, ref: RunRef, payload: dict, on_offline) -> None:
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
        if not probe(self.uri):
            return False
        log.info("MLflow tracking server %s is reachable again; sending %d queued calls", self.uri, len(self.pending))
        self.offline = False
        return self.flush(self.primary)

    def flush(self, target: Target) -> bool:
        while self.pending:
            kind, ref, payload = self.pending[0]
            try:
                with http_env():
                    apply(target, kind, ref, payload, self)
            except Exception as error:
                if target is self.primary and (is_connectivity_error(error) or not probe(self.uri)):
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
            target = Target(uri, artifact_root=str(root / "mlflow-artifacts"), extra_tags=source)
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
