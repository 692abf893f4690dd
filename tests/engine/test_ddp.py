"""Real torchrun DDP (gloo, CPU): two processes equal one process on the combined batch."""

from __future__ import annotations

import subprocess
import sys

import torch

COMMON = [
    "train",
    "--model",
    "test_vit",
    "--head",
    "isomaxplus",
    "--epochs",
    "1",
    "--max-train-samples",
    "32",
    "--scheduler",
    "none",
    "--optimizer",
    "sgd",
    "--lr",
    "0.1",
    "--no-track",
    "--seed",
    "5",
    "--device",
    "cpu",
]


def _final_weights(output):
    return torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def test_two_process_ddp_matches_single_process(tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "dismax_plugin",
            *COMMON,
            "--batch-size",
            "4",
            "--output",
            str(ddp_out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = subprocess.run(
        [sys.executable, "-m", "dismax_plugin", *COMMON, "--batch-size", "8", "--output", str(single_out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    a, b = _final_weights(ddp_out), _final_weights(single_out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-4), key
    history = torch.load(ddp_out / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]
    assert len(history) == 1  # one epoch, recorded once (rank 0)
