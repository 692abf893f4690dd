"""Cost of the isotropic losses relative to ``F.cross_entropy`` (CPU, one intra-op thread), side by side.

Usage::

    python benchmarks/loss_cost.py            # the table of the docs (about a minute)
    python benchmarks/loss_cost.py --quick    # fewer rounds

What is measured, at (B, C) = (64, 21841): one forward + backward of the loss on logits ``z`` [B, C] that
require grad (their gradient released before each step), with class-index targets and with an FPR batch
(the soft targets and ``stitched`` mask of :func:`dismax_plugin.fpr_mix`: half the rows stitched).

* **issue baseline** ``F.cross_entropy(10 * z, targets)``: the cross-entropy of the entropically scaled
  logits, the cost the losses had to match when they applied the scale themselves;
* **floor** ``F.cross_entropy(z, targets)``: since the head applies the entropic scale in training mode, the
  losses take ``E z`` as given, so plain cross-entropy on the same tensor is what they cannot beat;
* ``isomax_loss`` / ``dismax_loss`` of the library on ``z`` (the head's training output): the same
  cross-entropy plus the checks of the targets (class range; rows of soft targets non-negative, summing
  to 1) and, for stitched rows, the KL's target-entropy term :math:`\\sum_j t_j \\log t_j`.

Time: process CPU time (``time.process_time``), variants interleaved in one process (the order rotates
every round); the ratio is the median over rounds of ``t(variant) / t(baseline)`` of the same round
[interquartile range], and the ratio of the fastest rounds (less disturbed by other load). Memory: the peak
of torch's CPU allocator during one step above what it held before (``head_cost.measure_memory``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from head_cost import interleaved, measure_memory, paired  # noqa: E402

import dismax_plugin as dp  # noqa: E402

SHAPE = (64, 21841)
TARGET = 1.05


def _step(z: torch.Tensor, loss):
    def step():
        z.grad = None
        loss().backward()

    return step


def variants(batch: int, classes: int) -> dict[str, dict]:
    """``{"class indices": {name: step}, "FPR batch": {name: step}}``, the baselines first."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(batch, classes, generator=generator).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    images = torch.randn(batch, 1, 4, 4, generator=generator)
    _, soft, stitched = dp.fpr_mix(images, labels, classes, generator=torch.Generator().manual_seed(1))
    hard = {
        "F.cross_entropy(10 z) (issue baseline)": _step(z, lambda: F.cross_entropy(10.0 * z, labels)),
        "F.cross_entropy(z) (floor)": _step(z, lambda: F.cross_entropy(z, labels)),
        "isomax_loss(z)": _step(z, lambda: dp.isomax_loss(z, labels)),
        "dismax_loss(z)": _step(z, lambda: dp.dismax_loss(z, labels)),
    }
    fpr = {
        "F.cross_entropy(10 z) (issue baseline)": _step(z, lambda: F.cross_entropy(10.0 * z, soft)),
        "F.cross_entropy(z) (floor)": _step(z, lambda: F.cross_entropy(z, soft)),
        "dismax_loss(z, stitched)": _step(z, lambda: dp.dismax_loss(z, soft, stitched=stitched)),
    }
    return {"class indices": hard, "FPR batch (soft targets, half the rows stitched)": fpr}


def report(title: str, steps: dict, rounds: int, memory: bool, verdicts: list) -> None:
    samples = interleaved(steps, rounds)
    names = list(steps)
    base, floor = names[0], names[1]
    print(f"\n{title}, (B, C) = {SHAPE}: {base} fwd+bwd {min(samples[base]) * 1e3:.1f} ms CPU (fastest round); "
          f"median of {rounds} interleaved rounds [IQR]")
    header = "| loss | vs issue baseline | fastest-round ratio | vs floor |" + (" peak MiB | memory vs baseline |"
                                                                               if memory else "")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    peaks = {name: measure_memory(step) for name, step in steps.items()} if memory else {}
    for name in names:
        ratio, low, high = paired(samples[name], samples[base])
        fastest = min(samples[name]) / min(samples[base])
        to_floor = paired(samples[name], samples[floor])[0]
        row = f"| {name} | {ratio:.3f}× [{low:.2f}–{high:.2f}] | {fastest:.3f}× | {to_floor:.3f}× |"
        if memory:
            row += f" {peaks[name] / 2**20:.1f} | {peaks[name] / peaks[base]:.3f}× |"
        print(row)
        if name not in (base, floor):
            verdicts.append((f"{title}: {name} time", ratio))
            if memory:
                verdicts.append((f"{title}: {name} peak memory", peaks[name] / peaks[base]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 intra-op thread, process CPU time")
    verdicts: list = []
    for title, steps in variants(*SHAPE).items():
        report(title, steps, 21 if args.quick else 81, not args.no_memory, verdicts)
    print(f"\nTargets (≤ {TARGET}× F.cross_entropy(10 z) in time and peak memory):")
    for label, value in verdicts:
        print(f"- {label}: {value:.3f}× {'met' if value <= TARGET else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
