"""Shared pytest fixtures.

MLflow: :class:`MlflowServer` runs a real ``mlflow server`` (sqlite store, local artifact root) on
127.0.0.1 in its own process group. The session fixture ``mlflow_server`` gives the URI of one server for the
whole session (started in the background right after collection when a selected test needs it: it boots, ~15 s,
while the tests before it run) (``mlflow_server_process`` gives the server itself, for a test that
stops and restarts it); ``mlflow_server_factory`` makes more on demand. Every server is stopped by the
test session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store under ``root``; restartable on its port.

    ``start()`` launches it without waiting; ``wait()`` blocks until ``/health`` answers; ``stop()`` kills the
    whole process group (the uvicorn workers too) with SIGKILL and waits until the port is closed.
    """

    def __init__(self, root: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.root = Path(root)
        self.extra_args = tuple(extra_args)  # more `mlflow server` options, e.g. ("--artifacts-destination", ..)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> MlflowServer:
        if self.process is not None and self.process.poll() is None:
            return self
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        command = [
            str(mlflow_bin), "server",
            "--backend-store-uri", self.db_uri,
            "--default-artifact-root", str(self.root / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            *self.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # nothing leaves this machine
        # no job runner: MLflow 3 would start seven huey consumer processes (GenAI jobs, unused here) per server,
        # each importing MLflow, which costs a 2-core machine ~20 s of CPU at every start
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self._log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
        )
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def warm(self) -> MlflowServer:
        """One REST call: a fresh server's first answer can take longer than a client's start check waits."""
        request = urllib.request.Request(self.uri + "/api/2.0/mlflow/experiments/search", method="POST",
                                         data=b'{"max_results": 1}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120):
            return self

    def wait(self, timeout: float = 60.0) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return self.warm()
            if self.process is None or self.process.poll() is not None:
                break
            time.sleep(0.25)
        log = (self.root / "server.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"mlflow server on port {self.port} did not become healthy in {timeout} s:\n{log}")

    def stop(self) -> None:
        """Kill the server's process group at once (as a crash would) and wait until the port is closed."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not time out in practice
                pass
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.healthy():
            time.sleep(0.1)


#: the session's server, started in the background as soon as the collected tests are known to need it
_SESSION_SERVER: list[MlflowServer] = []


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    """Start the session's ``mlflow server`` now if a selected test uses it: it boots (~15 s) while the tests
    before the first MLflow test run, instead of in that test's setup."""
    if any("mlflow_server_process" in getattr(item, "fixturenames", ()) for item in items):
        root = config._tmp_path_factory.mktemp("mlflow_server")  # the tmp_path_factory fixture's own factory
        _SESSION_SERVER.append(MlflowServer(root).start())


def pytest_sessionfinish(session, exitstatus):
    for server in _SESSION_SERVER:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory):
    """The session's :class:`MlflowServer` (started, healthy). A test that stops it must restart it."""
    server = _SESSION_SERVER[0] if _SESSION_SERVER else MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        server.wait(240)  # a loaded machine starts it slowly
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process):
    """URI of a real MLflow server (sqlite store, local artifacts) shared by the session."""
    return mlflow_server_process.uri


@pytest.fixture
def mlflow_server_factory(tmp_path):
    """``make(name) -> MlflowServer`` (not started) for tests that stop/restart servers; all are stopped after."""
    servers: list[MlflowServer] = []

    def make(name: str = "server", port: int | None = None, extra_args: tuple[str, ...] = ()) -> MlflowServer:
        server = MlflowServer(tmp_path / name, port, extra_args)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network (a connection attempt fails the test) and a private torch.hub dir; yields ``tmp_path``."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path
    torch.hub.set_dir(previous)


@pytest.fixture(name="free_port")
def free_port_fixture():
    """:func:`free_port` itself, for tests in sub-folders (their own ``conftest`` shadows this module's name)."""
    return free_port


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (the test machines are small and shared), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
