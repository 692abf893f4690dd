"""Steps per second of the engine's training loop (``training.run_epoch``): this checkout vs another one.

Usage::

    git worktree add /tmp/dismax-before <commit>             # the code to compare with (e.g. main)
    python benchmarks/train_loop.py --against /tmp/dismax-before
    python benchmarks/train_loop.py --against /tmp/dismax-before --reps 7 --arch resnet10t --batch 32

Each repetition runs one worker process per checkout (the order alternates every repetition, so drift in the
machine's load hits both alike). A worker imports the package from its checkout, builds a run with the
engine's own ``setup`` (timm ``--arch``, DisMax head, SGD, digits at ``--size`` px), trains one untimed
epoch, then ``--epochs`` timed epochs, and reports steps per second of process CPU time (one intra-op
thread); the parent prints the medians and their ratio. FPR is off unless ``--fpr``: checkouts that draw
other FPR stitchings train other weights, and the head's work depends on them (its exact recompute near a
prototype), so only without FPR do both checkouts do the same arithmetic and differ in the loop alone. On a
CPU the loop's host syncs cost next to nothing, so the ratio shows that removing them did not slow the loop
down; on an accelerator they are what stalls it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _use_checkout(root: str) -> None:
    """Import ``dismax_plugin`` (and its ``adapters``) from ``root`` instead of the installed one."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path.insert(0, root)
    import dismax_plugin

    assert os.path.dirname(dismax_plugin.__file__) == os.path.join(root, "dismax_plugin"), dismax_plugin.__file__
    dismax_plugin.__path__.append(root)  # dismax_plugin.adapters is <root>/adapters


def _worker(args) -> None:
    _use_checkout(os.path.abspath(args.root))
    import torch

    torch.set_num_threads(1)
    from dismax_plugin.adapters.engine import _signals, training
    from dismax_plugin.adapters.engine.config import TrainConfig
    from dismax_plugin.adapters.engine.tracking import Tracker

    stop_block = getattr(_signals, "polling", None) or _signals.StopFlag
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=args.arch, epochs=args.epochs + 1, batch_size=args.batch, image_size=args.size,
                          max_train_samples=args.batch * args.steps, device="cpu", output=out,
                          fpr=args.fpr).validate()  # fmt: skip
        run = training.setup(cfg, Tracker())
        rates = []
        with stop_block() as stop:
            for epoch in range(args.epochs + 1):
                cpu = time.process_time()
                training.run_epoch(run, epoch, 0, stop)
                if epoch:  # the first epoch warms up
                    rates.append(run.steps_per_epoch / (time.process_time() - cpu))
    print(json.dumps({"steps_per_s": statistics.median(rates)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", help="the other checkout (a git worktree of the code to compare with)")
    parser.add_argument("--arch", default="resnet10t")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per worker")
    parser.add_argument("--reps", type=int, default=5, help="workers per checkout")
    parser.add_argument("--fpr", action="store_true", help="DisMax with FPR (the checkouts may train apart)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if not args.against:
        parser.error("--against DIR is required (e.g. `git worktree add /tmp/dismax-before main`)")
    roots = {"this checkout": HERE, "against": os.path.abspath(args.against)}
    rates: dict[str, list[float]] = {name: [] for name in roots}
    common = ["--arch", args.arch, "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
              "--epochs", str(args.epochs), *(["--fpr"] if args.fpr else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for rep in range(args.reps):
        for name in roots if rep % 2 == 0 else reversed(list(roots)):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--root", roots[name],
                                   *common], capture_output=True, text=True, env=env)  # fmt: skip
            if proc.returncode:
                raise SystemExit(f"worker for {roots[name]} failed:\n{proc.stderr[-3000:]}")
            rates[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["steps_per_s"])
    fpr = "with" if args.fpr else "without"
    print(f"timm {args.arch}, DisMax {fpr} FPR, batch {args.batch}, {args.size}x{args.size}, {args.steps} steps x "
          f"{args.epochs} epochs per worker, {args.reps} workers per checkout, 1 thread, process CPU time\n")
    print("| checkout | steps/s (median) | min-max |")
    print("|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} ({roots[name]}) | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")
    ratio = statistics.median(rates["this checkout"]) / statistics.median(rates["against"])
    print(f"\nratio (this checkout / against): {ratio:.3f}x  (> 1: this checkout is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
