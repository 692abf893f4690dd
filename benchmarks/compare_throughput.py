"""Throughput of ``dismax compare`` checked against an independent measurement, side by side.

For each architecture: an isotropic model (``--head``, scored with the head's default native score) and the
same backbone with timm's Linear head scored with pytorch-ood's ``MaxSoftmax``. The harness number is the
``images_per_s`` column of :func:`dismax_plugin.adapters.pytorch_ood.compare` (interleaved timing of model
forward + scoring on in-memory batches). The independent number times the deployed call
``detector(x)`` end to end with :class:`torch.utils.benchmark.Timer` (median of ``blocked_autorange``),
alternating the two models. Both use the same 256 images of the digits test set.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_throughput.py [--models resnet10t,resnet18]``
"""

from __future__ import annotations

import argparse

import timm
import torch
from pytorch_ood.detector import MaxSoftmax
from torch.utils.benchmark import Timer
from torch.utils.data import Subset

import dismax_plugin as dp
from dismax_plugin.adapters.pytorch_ood import DigitsBenchmark, DisMaxDetector, compare


def _independent(detector, x: torch.Tensor, seconds: float) -> float:
    with torch.no_grad():
        detector(x)  # warm-up
        timer = Timer("detector(x)", globals={"detector": detector, "x": x}, num_threads=torch.get_num_threads())
        with torch.no_grad():
            median = timer.blocked_autorange(min_run_time=seconds).median
    return len(x) / median


def measure(arch: str, head: str, images: int, seconds: float) -> dict[str, float]:
    torch.manual_seed(0)
    bench = DigitsBenchmark(ood_size=50)
    iso = dp.convert(timm.create_model(arch, num_classes=6), head).eval()
    ce = timm.create_model(arch, num_classes=6).eval()
    default = dp.HEADS[head].default_score
    rows = compare({head: iso, "ce": ce}, bench, fit_data=Subset(bench.train_set(), range(128)),
                   detectors=["MaxSoftmax"], scores=[default], timing_images=images, batch_size=images)  # fmt: skip
    harness = {(r["model"], r["method"]): r["images_per_s"] for r in rows}
    (test_set,) = bench.test_sets(known=True, unknown=False)
    x = torch.stack([test_set[i][0] for i in range(images)])
    detectors = {"iso": DisMaxDetector(iso, score=default), "ce": MaxSoftmax(ce)}
    runs = {"iso": [], "ce": []}
    for _ in range(3):  # alternate, keep the best of each
        for name, detector in detectors.items():
            runs[name].append(_independent(detector, x, seconds))
    return {
        "harness_iso": harness[(head, default.upper())],
        "harness_ce": harness[("ce", "MaxSoftmax")],
        "independent_iso": max(runs["iso"]),
        "independent_ce": max(runs["ce"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet10t", help="comma list of timm architectures")
    parser.add_argument("--head", default="dismax", choices=sorted(dp.HEADS))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.0, help="min run time of each independent timing")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, {args.images} images 32x32, head {args.head}")
    print(f"{'model':<14} {'what':<24} {'harness img/s':>14} {'independent img/s':>18} {'harness/indep.':>15}")
    for arch in args.models.split(","):
        m = measure(arch, args.head, args.images, args.seconds)
        for key, label in (("iso", f"{args.head} + native"), ("ce", "CE + MaxSoftmax")):
            h, i = m[f"harness_{key}"], m[f"independent_{key}"]
            print(f"{arch:<14} {label:<24} {h:>14.0f} {i:>18.0f} {h / i:>15.3f}")
        h_ratio = m["harness_iso"] / m["harness_ce"]
        i_ratio = m["independent_iso"] / m["independent_ce"]
        print(f"{arch:<14} {'ratio to CE+MaxSoftmax':<24} {h_ratio:>14.3f} {i_ratio:>18.3f} {h_ratio / i_ratio:>15.3f}")


if __name__ == "__main__":
    main()
