"""Track a DisMax training run with MLflow and serve the logged model on raw images.

Uses MLflow's default local store (``MLFLOW_TRACKING_URI`` if set, else ``./mlflow.db`` and ``./mlruns``)::

    python examples/mlflow_tracking.py --epochs 5
    mlflow ui --backend-store-uri sqlite:///mlflow.db      # then open the run
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from sklearn.datasets import load_digits

from dismax_plugin.adapters.engine.commands import evaluate_model
from dismax_plugin.adapters.engine.tracking import tracked
from dismax_plugin.adapters.engine.training import TrainConfig, train
from dismax_plugin.adapters.mlflow import MlflowTracker


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-train-samples", type=int, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dismax-mlflow-example-") as output:  # the run's local files
        run_id, tracking_uri = _train_tracked(args, output)
    print(f"run {run_id} in {tracking_uri}")

    # 3. Load the logged pyfunc model and score raw 8x8 digit images (uint8, any layout).
    import mlflow

    digits = load_digits()
    images = (digits.images[:8] * 255 / 16).astype(np.uint8)  # digits 0-7: 6 and 7 were never seen
    with tempfile.TemporaryDirectory(prefix="dismax-mlflow-download-") as download:
        served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", dst_path=download)
        predictions = served.predict(images)
    predictions["true"] = digits.target[:8]
    print(predictions[["true", "class", "probability", "ood_score", "is_ood"]].to_string(index=False))
    return {"run_id": run_id, "predictions": predictions}


def _train_tracked(args, output: str) -> tuple[str, str]:
    """Train in ``output`` with every step tracked; returns the run id and the tracking URI."""
    # 1. Every call of the engine goes to the tracker: params, inputs, per-epoch metrics, calibration.
    tracker = MlflowTracker(experiment="dismax-examples", run_name="digits-dismax")
    config = TrainConfig(model=args.model, head="dismax", epochs=args.epochs, output=output,
                         max_train_samples=args.max_train_samples)  # fmt: skip
    with tracked(tracker, "digits-dismax", {"example": "mlflow_tracking"}):  # ends FINISHED, FAILED or KILLED
        result = train(config, tracker)
        # 2. The OOD results as metrics and a table, and the model (pytorch flavour + servable pyfunc).
        evaluation = evaluate_model(result.model, result.data)
        tracker.log_table(evaluation["rows"], "ood/results.json")
        tracker.log_metrics({f"{r['dataset']}.{r['method']}.AUROC": r["AUROC"] for r in evaluation["rows"]})
        tracker.log_model(result.model_dir, model=result.model)
    return tracker.run_id, tracker.tracking_uri


if __name__ == "__main__":
    main()
