"""OOD quality on the embedded digits benchmark: DisMax's native scores vs a cross-entropy twin.

Runs ``dismax compare`` (the default recipe of ``make run``) for each seed and prints, per method, the mean
AUROC over the OOD sets, the near-OOD AUROC (``digits_6_9``) and the test accuracy (mean and range over
seeds), then checks the issue's targets: the best native score's mean AUROC at least 4 points above the
twin's MaxSoftmax, its near-OOD AUROC no more than 1.5 points below, accuracy within 1 point.

Usage::

    python benchmarks/digits_quality.py                   # seeds 0 1 2, resnet10t, 10 epochs (~2.5 min)
    python benchmarks/digits_quality.py --seeds 0 --model test_resnet --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_seed(seed: int, args: argparse.Namespace, root: Path) -> list[dict]:
    out = root / f"seed{seed}"
    command = [
        sys.executable, "-m", "dismax_plugin", "compare", "--model", args.model, "--epochs", str(args.epochs),
        "--seed", str(seed), "--output", str(out), "--no-track", "--overwrite",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return _rows(out)


def _rows(out: Path) -> list[dict]:
    """Re-evaluate the two saved models (same code path as the command) and return compare()'s rows."""
    from torch.utils.data import DataLoader

    from dismax_plugin.adapters import timm as dtimm
    from dismax_plugin.adapters.engine.data import build_data
    from dismax_plugin.adapters.pytorch_ood.compare import compare

    iso = dtimm.load_model(out / "isotropic" / "model")
    base = dtimm.load_model(out / "baseline" / "model")
    meta = dtimm.read_metadata(out / "isotropic" / "model")["metadata"]
    data = build_data("digits", meta["preprocessing"], seed=meta["train_config"]["seed"])
    return compare(iso, base, data.benchmark, fit_loader=DataLoader(data.fit, batch_size=256))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            per_seed.append(run_seed(seed, args, Path(tmp)))

    def value(rows, model, method, dataset, key):
        (row,) = [r for r in rows if (r["Model"], r["Method"], r["Dataset"]) == (model, method, dataset)]
        return 100 * row[key]

    methods = sorted({(r["Model"], r["Method"]) for r in per_seed[0]}, key=lambda m: (m[0] != "isotropic", m[1]))
    print(f"digits, {args.model}, {args.epochs} epochs, seeds {args.seeds}: mean [min, max] over seeds\n")
    print("| model / method | mean AUROC | near-OOD AUROC (digits_6_9) | accuracy |\n|---|---|---|---|")
    summary = {}
    for model, method in methods:
        cells = []
        for dataset, key in (("mean", "AUROC"), ("digits_6_9", "AUROC"), ("mean", "ACC")):
            values = [value(rows, model, method, dataset, key) for rows in per_seed]
            summary[(model, method, dataset, key)] = statistics.mean(values)
            cells.append(f"{statistics.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]")
        print(f"| {'DisMax' if model == 'isotropic' else 'CE'} / {method} | " + " | ".join(cells) + " |")

    native = [m for mdl, m in methods if mdl == "isotropic"]
    best = max(native, key=lambda m: summary[("isotropic", m, "mean", "AUROC")])
    msp = ("baseline", "MaxSoftmax")
    gain = summary[("isotropic", best, "mean", "AUROC")] - summary[(*msp, "mean", "AUROC")]
    near = summary[("isotropic", best, "digits_6_9", "AUROC")] - summary[(*msp, "digits_6_9", "AUROC")]
    acc = summary[("isotropic", best, "mean", "ACC")] - summary[(*msp, "mean", "ACC")]
    checks = [
        (f"best native score ({best}) mean AUROC - CE MaxSoftmax = {gain:+.2f} (target >= +4)", gain >= 4),
        (f"near-OOD AUROC difference = {near:+.2f} (target >= -1.5)", near >= -1.5),
        (f"accuracy difference = {acc:+.2f} (target within 1 point)", abs(acc) <= 1),
    ]
    print()
    for text, ok in checks:
        print(f"{'met ' if ok else 'MISSED'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
