"""The examples run end to end on the embedded data with a tiny budget."""

from __future__ import annotations

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrain_timm_example(tmp_path):
    result = _load("retrain_timm").main(
        ["--model", "test_resnet", "--epochs", "1", "--max-steps", "3", "--output", str(tmp_path / "m")]
    )
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert 0.0 <= result["id_flagged"] <= 1.0 and 0.0 <= result["ood_flagged"] <= 1.0
    assert result["temperature"] > 0


def test_pytorch_ood_benchmark_example(capsys):
    rows = _load("pytorch_ood_benchmark").main(
        ["--model", "test_resnet", "--epochs", "1", "--max-train-samples", "64", "--detectors", "MaxSoftmax,KNN"]
    )
    out = capsys.readouterr().out
    assert "Benchmark.evaluate" in out and "MMLES" in out and "KNN" in out
    methods = {(r["Model"], r["Method"]) for r in rows}
    assert ("isotropic", "MPS") in methods and ("baseline", "KNN") in methods


def test_mlflow_tracking_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = _load("mlflow_tracking").main(["--model", "test_resnet", "--epochs", "1", "--max-train-samples", "64"])
    frame = result["predictions"]
    assert len(frame) == 8 and {"class", "probability", "ood_score", "is_ood"} <= set(frame.columns)
    assert (tmp_path / "mlflow.db").is_file()  # MLflow's default local store in the working directory
