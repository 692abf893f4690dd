"""benchmarks/train_py_epoch.py without timm's repository: its operator comparison and its argument check."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    """benchmarks/train_py_epoch.py imported in this process (benchmarks/ is not a package)."""
    return load_benchmark("train_py_epoch")


def test_one_step_of_each_program_runs_the_same_model_and_nearly_the_same_operators(bench):
    counts = bench.operator_counts(batch_size=4, image_size=16)
    train_py, dismax = counts["train.py"], counts["dismax"]
    assert train_py["aten::convolution"] == dismax["aten::convolution"] > 0
    assert train_py["aten::mm"] == dismax["aten::mm"]
    extra = sum(dismax.values()) - sum(train_py.values())
    assert 0 <= extra <= 0.05 * sum(train_py.values()), extra  # the loss's target check and mean only


def test_without_a_timm_checkout_it_exits_2_naming_the_option(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--timm-repo", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--timm-repo" in capsys.readouterr().err
