"""The tracker's connection: send now, or queue while the server is away, or keep a call the server keeps
failing, or write to a local fallback.

A :class:`Connection` is shared by a tracker and its child runs. Every call goes through
:meth:`Connection.submit`, which never raises because of the backend. A failed call is one of three things:

* **the server cannot be reached** (connection refused, timeout, ``/health`` does not answer): one
  :class:`TrackingUnavailableWarning`, the connection goes *offline* and queues that call and every later
  one, in order. While offline the server is probed at most every ``retry_interval`` seconds; when it
  answers, the queue is sent.
* **the server answered with an error of its own** (HTTP >= 500, e.g. its artifact store fails) while
  ``/health`` answers: the call is *kept* aside — logged with the server's answer, one
  :class:`TrackingRejectedWarning` — and retried with backoff (after ``retry_interval`` s, then twice as
  long, ...; at most :data:`MAX_ATTEMPTS` tries during the run), while the calls behind it are sent as usual.
* **the server refused the call** (HTTP 4xx: a bad name, a changed parameter): logged and dropped.

At the root run's end :meth:`Connection.finish` retries the queue and the kept calls, then writes what is
still unsent to ``sqlite:///<fallback_dir>/mlflow.db`` (artifacts in ``<fallback_dir>/mlflow-artifacts``),
with the runs' end status.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._store import RunRef, Target, apply
from ._uri import http_env, is_connectivity_error, probe, server_error_status

__all__ = ["MAX_ATTEMPTS", "Connection", "TrackingRejectedWarning", "TrackingUnavailableWarning"]

log = logging.getLogger("dismax_plugin.adapters.mlflow")

#: tries of a call the server fails with HTTP >= 500 during the run (the end of the run tries once more)
MAX_ATTEMPTS = 4


class TrackingUnavailableWarning(RuntimeWarning):
    """The tracking backend went away during a run; logging continues offline (queued / fallback)."""


class TrackingRejectedWarning(RuntimeWarning):
    """The tracking server answered a call with an error of its own (HTTP >= 500); it is retried, and kept
    for the local fallback store if it keeps failing."""


@dataclass
class _Kept:
    """A call the (reachable) server failed with HTTP >= 500: retried at ``due`` (monotonic seconds)."""

    kind: str
    ref: RunRef
    payload: dict
    status: int
    attempts: int = 1
    due: float = 0.0


def _what(kind: str, payload: dict) -> str:
    """A call as the user knows it: ``log_figure 'ood/roc.png'``."""
    name = payload.get("artifact_file") or payload.get("flavor") or payload.get("local_path")
    return f"log_{kind}" + (f" {str(name).rsplit('/', 1)[-1]!r}" if name else "")


def _answer(error: BaseException) -> str:
    """What the server said, short: ``too many 500 error responses from <url>`` (MLflow's client keeps no
    response body once its retries are spent), else the error's first line."""
    text = str(error).strip()
    url, cause = re.search(r"API request to (\S+) failed", text), re.search(r"Caused by \w+\('([^']*)'\)", text)
    if url and cause:
        return f"{cause.group(1)} from {url.group(1)}"
    return text.splitlines()[0][:300] if text else type(error).__name__


class Connection:
    """State shared by a tracker and its children: the primary store, the offline queue, the kept calls."""

    def __init__(self, uri: str, fallback_dir: str, retry_interval: float, register_model: str | None,
                 aliases: tuple[str, ...] = ()):  # fmt: skip
        self.uri = uri
        self.primary = Target(uri)
        self.fallback_dir = fallback_dir
        self.retry_interval = retry_interval
        self.register_model = register_model
        self.aliases = aliases
        self.pending: list[tuple[str, RunRef, dict]] = []
        self.kept: list[_Kept] = []
        self.ended: dict[RunRef, dict] = {}  # the terminate payload of each run, as sent
        self.offline = False
        self.warned = False
        self.warned_rejected = False
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
        """Send now, or queue, or keep; never raises. Returns True when it was sent.

        ``on_offline(payload) -> (kind, payload)`` turns a call into what is kept when it is not sent now.
        """
        if kind == "terminate":
            self.ended[ref] = payload
        if self.offline and time.monotonic() - self.last_probe >= self.retry_interval:
            self.reconnect()
        if self.offline:
            self._queue(kind, ref, payload, on_offline)
            return False
        sent = self._send(kind, ref, payload, on_offline)
        if not self.offline:
            self.retry_kept()
        return sent

    def _send(self, kind: str, ref: RunRef, payload: dict, on_offline) -> bool:
        try:
            with http_env():
                apply(self.primary, kind, ref, payload, self)
            return True
        except Exception as error:
            status = server_error_status(error)
            if is_connectivity_error(error) or not probe(self.uri):
                self._go_offline(error)
                self._queue(kind, ref, payload, on_offline)
            elif status is not None:
                kept = self._transform(kind, ref, payload, on_offline)
                if kept is not None:
                    self._keep(_Kept(*kept, status=status), error)
            else:
                self._rejected(kind, error)
            return False

    def _transform(self, kind: str, ref: RunRef, payload: dict, on_offline) -> tuple[str, RunRef, dict] | None:
        if on_offline is not None:
            try:
                kind, payload = on_offline(payload)
            except Exception:  # e.g. a figure that cannot be rendered: it is lost, say so
                log.warning("MLflow tracker: could not keep %s for later sending", kind, exc_info=True)
                return None
        return kind, ref, payload

    def _queue(self, kind: str, ref: RunRef, payload: dict, on_offline) -> None:
        kept = self._transform(kind, ref, payload, on_offline)
        if kept is not None:
            self.pending.append(kept)

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
            warnings.warn(message, TrackingUnavailableWarning, stacklevel=5)

    def _delay(self, attempts: int) -> float:
        return max(self.retry_interval, 1.0) * 2 ** (attempts - 1)

    def _keep(self, call: _Kept, error: BaseException) -> None:
        call.due = time.monotonic() + self._delay(call.attempts)
        self.kept.append(call)
        message = (
            f"MLflow tracking server {self.uri} answered {_what(call.kind, call.payload)} with HTTP {call.status} "
            f"({_answer(error)}) while it is reachable (/health answers): an error on the server's side (see its log). "
            f"The call is kept and retried in {self._delay(call.attempts):.0f} s, with backoff; the calls after it "
            "are sent as usual, and if it keeps failing it is written to the local fallback store at the end."
        )
        log.warning(message)
        if not self.warned_rejected:
            self.warned_rejected = True
            warnings.warn(message, TrackingRejectedWarning, stacklevel=5)

    def _rejected(self, kind: str, error: BaseException) -> None:
        # The backend answered but refused the call (an MLflow error, or a bug in a model to log): not sent.
        from mlflow.exceptions import MlflowException

        trace = not isinstance(error, MlflowException)
        log.warning("MLflow tracker: %s failed and was dropped: %s", kind, str(error).strip()[:500], exc_info=trace)

    def retry_kept(self, force: bool = False) -> None:
        """Re-send the kept calls that are due (all when ``force``), oldest first; the first that fails
        again ends the round (the server is likely still failing)."""
        now = time.monotonic()
        for call in list(self.kept):
            if not force and (call.due > now or call.attempts >= MAX_ATTEMPTS):
                continue
            call.attempts += 1
            try:
                with http_env():
                    apply(self.primary, call.kind, call.ref, call.payload, self)
            except Exception as error:
                call.status = server_error_status(error) or call.status
                if is_connectivity_error(error) or not probe(self.uri):
                    self._go_offline(error)
                elif server_error_status(error) is None:
                    self.kept.remove(call)
                    self._rejected(call.kind, error)
                    continue
                call.due = time.monotonic() + self._delay(call.attempts)
                log.warning("MLflow tracker: %s failed again (attempt %d, HTTP %s)", _what(call.kind, call.payload),
                            call.attempts, call.status)  # fmt: skip
                return
            self.kept.remove(call)
            log.info("MLflow tracker: %s sent on attempt %d", _what(call.kind, call.payload), call.attempts)

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
                status = server_error_status(error)
                if target is self.primary and (is_connectivity_error(error) or not probe(self.uri)):
                    self.offline = True
                    self.last_probe = time.monotonic()
                    return False
                if target is not self.primary:
                    log.warning("MLflow fallback store rejected %s: %s", kind, str(error).strip()[:500])
                elif status is not None:
                    self._keep(_Kept(kind, ref, payload, status), error)
                else:
                    self._rejected(kind, error)
            self.pending.pop(0)
        return True

    def finish(self, attempts: int, wait: float) -> None:
        """At the root's end: retry the queue and the kept calls, then write what is left to the fallback."""
        for attempt in range(max(1, attempts)):
            if not self.pending and not self.kept:
                break
            if attempt:
                time.sleep(wait)
            if (self.offline or self.pending) and not self.reconnect():
                continue
            self.retry_kept(force=True)
        if self.pending or self.kept:
            self.write_fallback()
        if not self.pending and self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None

    def _fallback_calls(self) -> tuple[int, int]:
        """Move the kept calls into the queue, before the queued ones, with the end status of every run they
        touch (and of its parents) that was sent to the server only. Returns (rejected, unreachable) counts."""
        rejected, unreachable = len(self.kept), len(self.pending)
        calls = [(c.kind, c.ref, c.payload) for c in self.kept] + self.pending
        ending = {ref for kind, ref, _ in calls if kind == "terminate"}
        touched: list[RunRef] = []
        for _, ref, _ in calls:
            while ref is not None and ref not in touched:
                touched.append(ref)
                ref = ref.parent
        calls += [("terminate", ref, self.ended[ref]) for ref in reversed(touched)
                  if ref not in ending and ref in self.ended]  # fmt: skip
        self.pending, self.kept = calls, []
        return rejected, unreachable

    def write_fallback(self) -> None:
        root = Path(self.fallback_dir).resolve()
        uri = f"sqlite:///{root / 'mlflow.db'}"
        rejected, unreachable = self._fallback_calls()
        reason = " and ".join(
            ([f"stayed unreachable ({unreachable} calls)"] if unreachable else [])
            + ([f"kept failing {rejected} calls with HTTP >= 500"] if rejected else [])
        )
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
                f"MLflow tracking server {self.uri} {reason} and the fallback store {uri} failed "
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
            f"MLflow tracking server {self.uri} {reason}: {rejected + unreachable} unsent calls were written to "
            f"the local fallback store {uri} (artifacts in {root / 'mlflow-artifacts'}); browse it with "
            f"`mlflow ui --backend-store-uri {uri}`."
        )
        log.warning(message)
        category = TrackingUnavailableWarning if unreachable else TrackingRejectedWarning
        warnings.warn(message, category, stacklevel=4)
