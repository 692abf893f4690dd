"""The `dismax-ood` evaluator through `mlflow.models.evaluate` on a local store: scores computed elsewhere
(``predictions=``), the metric definitions against scikit-learn and pytorch-ood, and its one-line errors.
(The evaluator on a served model, with gates, is in test_mlflow_cli.py.)"""

from __future__ import annotations

import re

import numpy as np
import pytest


@pytest.fixture()
def local_store(tmp_path, monkeypatch):
    """MLflow's fluent API on a fresh sqlite store (artifacts in ``tmp_path/mlruns``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return tmp_path


def _scores_table():
    """Scores (larger = more ID) of 30 ID rows, a near set that overlaps them and a far set that does not."""
    import pandas as pd

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(2.0, 1.0, 30), rng.normal(1.0, 1.0, 20), rng.normal(-3.0, 0.5, 10)])
    return pd.DataFrame({
        "ood": [False] * 30 + [True] * 30, "dataset": ["id"] * 30 + ["close"] * 20 + ["noise"] * 10,
        "group": [None] * 30 + ["near"] * 20 + ["far"] * 10, "ood_score": scores,
    })  # fmt: skip


def _evaluate(data, **kwargs):
    import mlflow

    with mlflow.start_run():
        return mlflow.models.evaluate(data=data, predictions="ood_score", model_type="ood",
                                      evaluators=["dismax-ood"], **kwargs)  # fmt: skip


def test_static_scores_give_pytorch_ood_metrics_per_set_and_group(local_store):
    import mlflow
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

    def aupr(positive, scores):  # pytorch-ood's: the trapezoidal area under the PR curve
        precision, recall, _ = precision_recall_curve(positive, scores)
        return auc(recall, precision)

    data = _scores_table()
    result = _evaluate(data)
    metrics, scores, ood = result.metrics, data["ood_score"].to_numpy(), data["ood"].to_numpy()
    close = ~ood | (data["dataset"] == "close").to_numpy()
    assert metrics["AUROC"] == pytest.approx(roc_auc_score(ood, -scores))
    assert metrics["close/AUROC"] == pytest.approx(roc_auc_score(ood[close], -scores[close]))
    assert metrics["near/AUROC"] == metrics["close/AUROC"] and metrics["far/AUROC"] == metrics["noise/AUROC"] == 1.0
    assert metrics["close/AUPR-IN"] == pytest.approx(aupr(~ood[close], scores[close]))
    assert metrics["close/AUPR-OUT"] == pytest.approx(aupr(ood[close], -scores[close]))
    # FPR95-ID: the OOD fraction kept at the threshold that keeps 95 % of the ID rows (29 of 30 here)
    threshold = np.sort(scores[~ood])[1]
    assert metrics["close/FPR95-ID"] == pytest.approx(np.mean(scores[ood & close] >= threshold))
    assert metrics["noise/FPR95TPR"] == 0.0 and 0 < metrics["close/FPR95TPR"] < 1  # OOD positive
    assert not any(key in metrics for key in ("ACC", "ID-flagged"))  # no labels, no decisions
    run = mlflow.last_active_run()
    assert run.data.metrics == pytest.approx(metrics)
    paths = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "dismax-ood")}
    assert paths == {"dismax-ood/roc_curve.png", "dismax-ood/score_histogram.png", "dismax-ood/metrics.json"}
    assert [row["dataset"] for row in result.artifacts["ood_metrics"].content["rows"]] == ["close", "noise"]


def test_bad_data_and_config_are_one_line_invalid_parameter_errors(local_store):
    from mlflow.exceptions import MlflowException

    data = _scores_table()
    for bad, config, words in (
        (data.drop(columns="dataset"), None, "must have a column 'dataset'"),
        (data.assign(ood=["x"] * len(data)), None, "column 'ood' must be bools"),
        (data.assign(ood=False), None, "in-distribution rows (ood False) and OOD rows (ood True)"),
        (data.assign(group=["near"] * 40 + ["far"] * 20), None, "OOD set 'close' one group"),
        (data.assign(dataset=data["dataset"].replace("noise", "far")), None, "have the name of a group"),
        (data, {"threshold": 0.5}, "unknown evaluator_config keys ['threshold']"),
        (data, {"tpr": 2}, "'tpr' must be a number in (0, 1]"),
    ):  # fmt: skip
        with pytest.raises(MlflowException, match=f"^dismax-ood: .*{re.escape(words)}") as error:
            _evaluate(bad, evaluator_config={"dismax-ood": config} if config else None)
        assert error.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in error.value.message
