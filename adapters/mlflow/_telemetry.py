"""MLflow's own usage telemetry: off unless the user opted in.

MLflow 3 (``mlflow/telemetry``) starts a telemetry client when ``mlflow`` is imported, unless
``MLFLOW_DISABLE_TELEMETRY`` is true, ``DO_NOT_TRACK`` is true, or it detects CI/pytest; once active, it
fetches a configuration from, and sends usage records to, a host outside the user's tracking URI. A
tracked ``dismax`` run must talk to the tracking URI only, so before MLflow is first used the tracker
sets ``MLFLOW_DISABLE_TELEMETRY=true`` — **unless the user set ``MLFLOW_DISABLE_TELEMETRY`` themselves**:
an explicit ``MLFLOW_DISABLE_TELEMETRY=false`` is the opt-in (``DO_NOT_TRACK=true`` keeps it off).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["TELEMETRY_ENV", "telemetry_off_unless_opted_in"]

TELEMETRY_ENV = "MLFLOW_DISABLE_TELEMETRY"

log = logging.getLogger(__name__)


def telemetry_off_unless_opted_in() -> bool:
    """Turn MLflow's telemetry off for this process unless the environment already decides it.

    Call it before ``import mlflow``. If MLflow was imported earlier and started its telemetry client,
    that client is stopped without sending anything (MLflow decides at import time).

    :return: ``True`` when telemetry is off after the call, ``False`` when the user opted in.
    """
    if TELEMETRY_ENV in os.environ:  # the user's explicit choice, either way
        return os.environ[TELEMETRY_ENV].strip().lower() in ("true", "1")
    os.environ[TELEMETRY_ENV] = "true"
    if "mlflow.telemetry.client" in sys.modules:
        _stop_running_client()
    return True


def _stop_running_client() -> None:
    """Stop a telemetry client MLflow started at import (drops its queue; sends nothing)."""
    try:
        from mlflow.telemetry import client as telemetry

        running = telemetry.get_telemetry_client()
        if running is not None:
            running._is_stopped = True  # private: the consumers exit and drop what is queued
            running.is_active = False
        telemetry.set_telemetry_client()  # re-reads the environment: now disabled, so None
    except Exception:  # pragma: no cover - other MLflow versions: the variable still applies to new clients
        log.debug("could not stop MLflow's telemetry client", exc_info=True)
