"""Interrupted training resumes exactly: Ctrl-C (checkpoint at the current step) and SIGKILL (last epoch)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = [
    "train", "--model", "test_resnet", "--head", "dismax", "--epochs", "5", "--batch-size", "16",
    "--max-train-samples", "160", "--no-track", "--seed", "3",
]  # fmt: skip


def _train(output, *extra, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "dismax_plugin", *ARGS, "--output", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(output):
    state = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 5 and state["step"] == 0
    return state["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    _train(out)
    return _weights(out)


def _start_and_stop(output, signum):
    proc = subprocess.Popen(
        [sys.executable, "-m", "dismax_plugin", *ARGS, "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (output / "checkpoint.pt").exists():  # the end of epoch 1
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopped_run_resumes_to_the_same_weights(uninterrupted, tmp_path, signum):
    code, err = _start_and_stop(tmp_path, signum)
    if code == 0:
        pytest.fail("the run finished before the signal arrived; make it longer")
    if signum != signal.SIGKILL:
        assert code == 128 + signum, err[-2000:]
        assert "checkpoint saved" in err and "--resume" in err
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] < 5
    _train(tmp_path, "--resume")
    resumed = _weights(tmp_path)
    for key, value in uninterrupted.items():
        assert torch.equal(value, resumed[key]), key
