"""benchmarks/gpu_check.sh without CUDA (says what it skipped, exits 0) and its sections' code paths on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU even where one exists


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=NO_CUDA,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def gpu_check(load_benchmark):
    """benchmarks/gpu_check.py imported in this process (benchmarks/ is not a package)."""
    return load_benchmark("gpu_check")


def test_without_cuda_it_says_what_it_skipped_and_exits_0():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout
    assert "skipped: heads, nccl, fp16, compile" in result.stdout


def test_an_unknown_section_is_refused_with_exit_2(gpu_check, capsys):
    assert gpu_check.main(["--sections", "heads,warp"]) == 2
    assert "unknown ['warp']" in capsys.readouterr().err


def test_smoke_mode_runs_the_head_and_process_group_sections(gpu_check, capsys):
    # on the CPU here (gloo); where CUDA exists the same sections run on it with the tiny shapes
    assert gpu_check.main(["--smoke", "--sections", "heads,nccl"]) == 0
    out = capsys.readouterr().out
    for mode in ("float32", "bf16", "fp16"):
        assert f"| 50 | {mode} |" in out
    assert "| floor (fp32) | distance floor (fp32) | normalised floor (fp32) | normalised floor + mean (fp32) |" in out
    assert "float32 | " in out and out.split("| 50 | float32 |")[1].split("\n")[0].rstrip().endswith("× |")
    assert "world size 1: all_reduce [3.0, 3.0, 3.0, 3.0]" in out and "gradients finite: True" in out
    assert "failed: nothing" in out


@pytest.mark.slow
def test_smoke_mode_runs_the_model_sections_on_the_cpu():
    result = run("--smoke", "--sections", "fp16,compile", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "weights and losses finite: True" in result.stdout
    assert "| eval + score images/s" in result.stdout and "failed: nothing" in result.stdout
