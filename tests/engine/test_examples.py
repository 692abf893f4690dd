"""The examples run end to end on the embedded data with a tiny budget, and leave no temporary folder behind."""

from __future__ import annotations

import importlib.util
import pathlib
import tempfile

import pytest
import torch

import dismax_plugin as dp

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """``tempfile``'s folder for the test; :func:`_left` lists what an example left in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _left(folder) -> list[str]:
    """Entries left in ``folder``, except torch's own compile cache (``torchinductor_<user>``)."""
    return [p.name for p in folder.iterdir() if not p.name.startswith("torchinductor_")]


def test_retrain_timm_example(private_tmp, tmp_path):
    result = _load("retrain_timm").main(["--model", "test_resnet", "--epochs", "1", "--max-steps", "3"])
    assert _left(private_tmp) == []  # the temporary model folder was removed
    head = result["model"].get_classifier()
    # the loaded model carries what was calibrated: temperature and calibration scores
    assert float(head.temperature) == pytest.approx(result["temperature"])
    assert head.calibration_size == result["calibration_size"] > 0
    assert {str(t): head.threshold(t) for t in (0.9, 0.95, 0.99)} == pytest.approx(result["thresholds"])
    # thresholds sit at 95% TPR of held-out ID data: ID test digits (325, same distribution) are flagged about
    # 5% of the time (binomial std 1.2%); a flipped score or misapplied temperature would flag ~95% or ~0%.
    assert 0.01 <= result["id_flagged"] <= 0.12, result
    result = _load("retrain_timm").main(["--model", "test_resnet", "--epochs", "1", "--max-steps", "1",
                                         "--output", str(tmp_path / "m")])  # fmt: skip
    assert (tmp_path / "m" / "model.safetensors").is_file()  # kept when asked for


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
def test_pytorch_ood_benchmark_example(capsys, private_tmp):
    rows = _load("pytorch_ood_benchmark").main(
        ["--model", "test_resnet", "--epochs", "1", "--max-train-samples", "64", "--detectors", "MaxSoftmax,KNN"]
    )
    out = capsys.readouterr().out
    assert _left(private_tmp) == []
    assert "Benchmark.evaluate" in out and "KNN" in out
    methods = {(r["model"], r["method"]) for r in rows}
    natives = {(r["model"], r["method"]) for r in rows if r["model"] == "dismax"} - {("dismax", "MaxSoftmax"),
                                                                                     ("dismax", "KNN")}  # fmt: skip
    assert {("ce", "KNN"), ("ce", "MaxSoftmax"), ("dismax", "KNN")} <= methods
    assert {m for _, m in natives} == {s.upper() for s in dp.SCORE_NAMES}  # every native score on DisMax only
    assert not any(r["model"] == "ce" and r["method"].lower() in dp.SCORE_NAMES for r in rows)
    # Benchmark.evaluate with the detector printed the AUROC of each OOD set: the same as compare's row
    printed = {line.split()[2]: float(line.split()[-1]) for line in out.splitlines() if "Benchmark.evaluate" in line}
    default = dp.HEADS["dismax"].default_score
    for row in rows:
        if row["model"] == "dismax" and row["method"] == default.upper() and row["split"] == "test":
            assert printed[row["dataset"]] == pytest.approx(100 * row["AUROC"], abs=0.01)


@pytest.mark.slow  # > 1 minute of work on 2 cores: outside make test's budget (run with -m slow)
def test_mlflow_tracking_example(tmp_path, monkeypatch, private_tmp):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = _load("mlflow_tracking").main(["--model", "test_resnet", "--epochs", "1", "--max-train-samples", "64"])
    frame = result["predictions"]
    assert len(frame) == 8 and {"class", "probability", "ood_score", "is_ood"} <= set(frame.columns)
    assert (tmp_path / "mlflow.db").is_file()  # MLflow's default local store in the working directory
    assert _left(private_tmp) == []
    probabilities = torch.tensor(frame["probability"].to_numpy())
    assert bool(((probabilities >= 1 / 6) & (probabilities <= 1)).all())  # the top class of 6: at least 1/6
