"""Interrupted training resumes exactly: Ctrl-C/SIGTERM (checkpoint mid-epoch, at the current step) and SIGKILL
(the last end-of-epoch checkpoint); checkpoints load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = [
    "train", "--model", "test_resnet", "--head", "dismax", "--epochs", "3", "--batch-size", "16",
    "--max-train-samples", "160", "--no-track", "--seed", "3",
]  # fmt: skip
STEPS_PER_EPOCH = 10  # 160 samples / batch 16


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


def _state(output):
    return torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)


def _weights(output):
    state = _state(output)
    assert state["epoch"] == 3 and state["step"] == 0
    return state["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    _train(out)
    return _weights(out)


def _start_and_stop(output, signum):
    """Start a run, wait for the end of epoch 1, then signal it about half-way through epoch 2."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dismax_plugin", *ARGS, "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # "epoch 1/3 ... (1.2s)" is logged right after the end-of-epoch checkpoint
        assert time.monotonic() < deadline
        match = re.search(r"epoch 1/3 .*\(([\d.]+)s\)", line)
        if match:
            time.sleep(float(match.group(1)) / 4)  # early in epoch 2 (epoch 1 includes warm-up)
            break
    else:
        pytest.fail(proc.communicate()[1][-3000:])
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow  # three full runs and a resume each (~6 minutes on 2 cores); tests/engine/test_loop.py and
# test_signals.py cover exact resume from any step and SIGTERM + resume inside make test
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopped_run_resumes_to_the_same_weights(uninterrupted, tmp_path, signum):
    code, err = _start_and_stop(tmp_path, signum)
    if code == 0:
        pytest.fail("the run finished before the signal arrived; make it longer")
    state = _state(tmp_path)
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert 1 <= state["epoch"] < 3 and state["step"] == 0  # the last end-of-epoch checkpoint
    else:
        assert code == 128 + signum, err[-2000:]
        assert "checkpoint saved" in err and "--resume" in err
        # at the step where it stopped: mid-epoch 2, or (a loaded machine) at an epoch boundary or in epoch 3
        assert 1 <= state["epoch"] < 3 and 0 <= state["step"] < STEPS_PER_EPOCH, state
    _train(tmp_path, "--resume")
    resumed = _weights(tmp_path)
    for key, value in uninterrupted.items():
        assert torch.equal(value, resumed[key]), key
