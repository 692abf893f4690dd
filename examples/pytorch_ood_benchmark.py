"""Evaluate a DisMax model with pytorch-ood: its Benchmark API with the native score as a detector, and
the side-by-side comparison with pytorch-ood's post-hoc detectors on a cross-entropy twin.

Runs offline on the embedded digits benchmark::

    python examples/pytorch_ood_benchmark.py --epochs 10
"""

from __future__ import annotations

import argparse
import tempfile

from dismax_plugin.adapters.engine.training import TrainConfig, train
from dismax_plugin.adapters.pytorch_ood import DisMaxDetector, compare, format_summary, summarize


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--detectors", default=None, help="comma-separated pytorch-ood detectors, or 'all'")
    args = parser.parse_args(argv)

    # 1. Train a DisMax model and its cross-entropy twin with the same recipe (the engine behind `dismax train`);
    #    their run folders (checkpoints, saved models) are temporary here.
    common = dict(model=args.model, data="digits", epochs=args.epochs, max_train_samples=args.max_train_samples)
    with tempfile.TemporaryDirectory(prefix="dismax-ood-example-") as workdir:
        dismax = train(TrainConfig(head="dismax", output=f"{workdir}/dismax", **common))
        twin = train(TrainConfig(head="linear", output=f"{workdir}/linear", **common))
    benchmark = dismax.data.benchmark  # a pytorch_ood.benchmark.Benchmark (DigitsBenchmark)

    # 2. pytorch-ood's own evaluation: the native score is a LogitsDetector (larger = more OOD).
    detector = DisMaxDetector(dismax.model.eval())  # the head's default score
    for row in benchmark.evaluate(detector, loader_kwargs={"batch_size": 256}):
        print(f"pytorch-ood Benchmark.evaluate  {row['Dataset']:>15}  AUROC {100 * row['AUROC']:.2f}")

    # 3. Every native score and the post-hoc detectors on both models, summarised per near/far group.
    rows = compare({"dismax": dismax.model, "ce": twin.model}, benchmark, fit_data=dismax.data.fit,
                   val_data=dismax.data.val, detectors=args.detectors)  # fmt: skip
    print(format_summary(summarize(rows)))
    return rows


if __name__ == "__main__":
    main()
