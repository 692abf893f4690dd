"""Epoch time of ``dismax train`` vs timm's own ``train.py`` on the same image folder, model, batch size, image size,
augmentation and one CPU thread (issue 18).

timm's ``train.py`` is not in the timm wheel: ``--timm-repo`` is a folder holding it (a checkout of
huggingface/pytorch-image-models, ideally at the installed timm's version). It runs as ``python -P train.py`` so
that the *installed* timm (and this project) is imported, not a ``timm/`` folder next to the script.

The folder is the embedded digits benchmark written to disk (:func:`write_digits_folder`: the benchmark's own
train 650 / val 108 / test 325 images and its OOD validation and test parts, rendered at ``--image-size``), so
``--data DIR`` and ``--data digits`` hold the same pixels.

How an epoch is timed: from each program's own log. Both write one line when an epoch is done (trained,
validated on ``val/``, checkpoint written): ``dismax train`` its ``epoch k/E ...`` line, train.py the ``Current
checkpoints:`` line of timm's ``CheckpointSaver``. At each such line the benchmark reads the child's CPU time
(user + system, ``/proc/<pid>/stat``) and the wall clock; an epoch's time is the difference between two
consecutive lines, so start-up, the first epoch (the reference point, not timed) and what ``dismax train`` does
after training (calibration, evaluation, saving the model) are left out. Runs alternate between the programs
(order flipped each repetition); the medians over every timed epoch of ``--reps`` runs are compared, CPU time
first (one thread: robust to other processes on a shared machine), wall clock next to it, and the spread of
the per-repetition ratios (each repetition's median epochs, the two programs run back to back) is printed
with them. Both run with
``OMP_NUM_THREADS=1`` / ``MKL_NUM_THREADS=1`` (one intra-op thread), ``--workers 0``, on the CPU.

Matched settings: ``resnet10t_dismax`` (train.py, via ``--device-modules dismax_plugin.adapters.timm.register``)
vs ``dismax train --model resnet10t --head dismax --no-fpr`` (the same loss: train.py cannot stitch batches for
FPR); SGD momentum 0.9, weight decay 5e-4, lr 0.05, cosine schedule without warm-up, no label smoothing; the
augmentation of ``dismax train --augment`` (random resized crop, scale 0.7-1, no flip, no colour jitter, bilinear)
given to train.py as ``--scale 0.7 1 --hflip 0 --color-jitter 0 --train-interpolation bilinear``; evaluation
batch 256; ``dismax train`` with ``--detectors MaxSoftmax`` (its after-training comparison, outside the
timed epochs either way, kept short). ``--fpr`` times ``dismax train`` with FPR (its default) as well, for the record.

.. code-block:: bash

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_py_epoch.py --timm-repo /tmp/timm-src --reps 6
    .venv/bin/python benchmarks/train_py_epoch.py --ops   # the operators of one training step of each
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DISMAX = [sys.executable, "-m", "dismax_plugin.adapters.engine.cli"]


def write_digits_folder(root: str | os.PathLike, image_size: int = 32) -> Path:
    """The embedded digits benchmark as an image folder (``train/``, ``val/``, ``test/``, ``ood/near|far/<set>``,
    ``ood/val/near|far/<set>``), RGB PNGs of ``image_size`` pixels; returns ``root``."""
    from dismax_plugin.adapters.pytorch_ood import DigitsBenchmark

    bench, root = DigitsBenchmark(image_size=image_size, channels=3), Path(root)
    parts = {"train": bench.train_in, "val": bench.val_in, "test": bench.test_in}
    for split, dataset in parts.items():
        for i in range(len(dataset)):
            folder = root / split / str(dataset.labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            dataset.render(i).save(folder / f"{i:04d}.png")
    for where, names, sets in (("ood", bench.ood_names, bench.test_oods),
                               ("ood/val", bench.ood_val_names, bench.val_oods)):  # fmt: skip
        for name, dataset in zip(names, sets):
            folder = root / where / bench.ood_groups[name] / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(len(dataset)):
                dataset.render(i).save(folder / f"{i:04d}.png")
    return root


def train_py_command(repo: Path, data: Path, output: Path, epochs: int, args) -> list[str]:
    """timm's train.py on ``data`` (train/ and val/), isotropic DisMax variant, the matched settings."""
    return [sys.executable, "-P", str(repo / "train.py"), "--data-dir", str(data), "--train-split", "train",
            "--val-split", "val", "--model", "resnet10t_dismax", "--num-classes", "6",
            "--device-modules", "dismax_plugin.adapters.timm.register", "--device", "cpu", "--no-prefetcher",
            "--workers", "0", "--img-size", str(args.image_size), "--crop-pct", "1.0",
            "--batch-size", str(args.batch_size), "--validation-batch-size", "256", "--epochs", str(epochs),
            "--warmup-epochs", "0", "--sched", "cosine", "--opt", "sgd", "--lr", "0.05", "--momentum", "0.9",
            "--weight-decay", "5e-4", "--smoothing", "0", "--scale", "0.7", "1", "--hflip", "0",
            "--color-jitter", "0", "--train-interpolation", "bilinear", "--seed", "0", "--log-interval", "1000",
            "--output", str(output), "--experiment", "run"]  # fmt: skip


def dismax_command(data: Path, output: Path, epochs: int, args, fpr: bool = False) -> list[str]:
    """``dismax train`` with the same model, data, batch size, image size, augmentation and optimiser."""
    return [*DISMAX, "train", "--model", "resnet10t", "--head", "dismax", "--data", str(data),
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", str(epochs),
            "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "5e-4", "--scheduler", "cosine",
            "--warmup-epochs", "0", "--augment", "--workers", "0", "--device", "cpu", "--seed", "0",
            "--eval-batch-size", "256", "--detectors", "MaxSoftmax", "--no-track", "--overwrite",
            "--output", str(output), *(() if fpr else ("--no-fpr",))]  # fmt: skip


#: the log line each program writes once an epoch is done (trained, validated on val/, checkpoint written)
EPOCH_DONE = {"train.py": re.compile(r"^Current checkpoints:"), "dismax": re.compile(r"^epoch \d+/\d+ ")}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def epoch_times(command: list[str], done: re.Pattern, log: Path) -> list[tuple[float, float]]:
    """Run ``command``; ``(CPU s, wall s)`` between consecutive epoch-done lines (the first epoch is the
    reference point, so ``E`` epochs give ``E - 1`` times). A failure stops the benchmark."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    marks = []
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for line in process.stdout:
            if done.search(line):
                marks.append((_cpu_seconds(process.pid), time.perf_counter()))
            out.write(line)
        process.wait()
    if process.returncode != 0:
        sys.exit(f"train_py_epoch.py: {command[2]} failed, see {log}:\n" + log.read_text()[-3000:])
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]


def operator_counts(batch_size: int = 50, image_size: int = 32) -> dict[str, dict[str, int]]:
    """Operators of one training step (forward, loss, backward, SGD step) as each program builds it, on the same
    random batch, counted with ``torch.profiler``: train.py's ``resnet10t_dismax`` + ``nn.CrossEntropyLoss`` +
    ``create_optimizer_v2``, and ``dismax train``'s model, loss and optimiser from the engine's own builders with
    the matched settings. Returns ``{program: {operator: calls}}``."""
    import collections

    import timm
    import torch
    from timm.optim import create_optimizer_v2
    from torch.profiler import ProfilerActivity, profile

    import dismax_plugin.adapters.timm.register  # noqa: F401  (train.py's --device-modules)
    from dismax_plugin.adapters.engine import _setup
    from dismax_plugin.adapters.engine.config import TrainConfig

    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, 6, (batch_size,))
    cfg = TrainConfig(model="resnet10t", head="dismax", data="digits", fpr=False, lr=0.05, momentum=0.9,
                      weight_decay=5e-4)  # fmt: skip
    model_a = timm.create_model("resnet10t_dismax", num_classes=6)
    opt_a = create_optimizer_v2(model_a, opt="sgd", lr=0.05, weight_decay=5e-4, momentum=0.9)
    loss_a = torch.nn.CrossEntropyLoss()
    model_b = _setup.build_model(cfg, 6, torch.device("cpu"))
    opt_b, loss_b = _setup.build_optimizer(cfg, model_b), _setup.build_loss(cfg)

    def train_py_step():
        opt_a.zero_grad()
        loss_a(model_a(x), y).backward()
        opt_a.step()

    def dismax_step():
        opt_b.zero_grad(set_to_none=True)
        loss_b(model_b(x), y, None).backward()
        opt_b.step()

    counts = {}
    for name, step, model in (("train.py", train_py_step, model_a), ("dismax", dismax_step, model_b)):
        model.train()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        counts[name] = collections.Counter({e.key: e.count for e in prof.key_averages()})
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-repo", type=Path, help="a folder with timm's train.py (required unless --ops)")
    parser.add_argument("--ops", action="store_true",
                        help="only compare the operators of one training step of each program, and exit")
    parser.add_argument("--data", type=Path, help="the image folder (default: the digits written to a temp folder)")
    parser.add_argument("--image-size", type=int, default=32)
    batch_help = "default 50: it divides the 650 training digits, so neither program has a partial batch"
    parser.add_argument("--batch-size", type=int, default=50, help=batch_help)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (the first is not timed)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fpr", action="store_true", help="also time dismax train with FPR (its default)")
    args = parser.parse_args(argv)
    if args.ops:
        counts = operator_counts(args.batch_size, args.image_size)
        a, b = counts["train.py"], counts["dismax"]
        print(f"one training step: train.py {sum(a.values())} operator calls, dismax train {sum(b.values())}")
        for op in sorted(set(a) | set(b)):
            if a[op] != b[op]:
                print(f"  {op}: train.py {a[op]}, dismax train {b[op]}")
        return 0
    if args.timm_repo is None or not (args.timm_repo / "train.py").is_file():
        parser.error(f"--timm-repo: no train.py in '{args.timm_repo}' (a pytorch-image-models checkout).")
    scratch = Path(tempfile.mkdtemp(prefix="train_py_epoch-"))
    data = args.data or write_digits_folder(scratch / "digits", args.image_size)
    programs = {
        "train.py": lambda out, e: train_py_command(args.timm_repo, data, out, e, args),
        "dismax": lambda out, e: dismax_command(data, out, e, args),
    }
    if args.fpr:
        programs["dismax+fpr"] = lambda out, e: dismax_command(data, out, e, args, fpr=True)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    per_rep: dict[str, list[float]] = {name: [] for name in programs}  # each rep's median epoch CPU time
    load = [os.getloadavg()[0]]
    for rep in range(args.reps):
        order = list(programs) if rep % 2 == 0 else list(reversed(programs))
        for name in order:
            output = scratch / name
            shutil.rmtree(output, ignore_errors=True)
            times = epoch_times(programs[name](output, args.epochs), EPOCH_DONE[name.split("+")[0]],
                                scratch / f"{name}.log")  # fmt: skip
            if len(times) != args.epochs - 1:
                sys.exit(f"train_py_epoch.py: {name} logged {len(times) + 1} of {args.epochs} epochs")
            results[name] += times
            per_rep[name].append(statistics.median(c for c, _ in times))
            print(f"rep {rep + 1} {name:11s} epochs 2-{args.epochs}: CPU "
                  + " ".join(f"{c:.2f}" for c, _ in times) + " s; wall " + " ".join(f"{w:.2f}" for _, w in times),
                  flush=True)  # fmt: skip
        load.append(os.getloadavg()[0])
    print(f"\nfolder {data}, image {args.image_size}, batch {args.batch_size}, one thread, {args.reps} reps x "
          f"{args.epochs - 1} epochs each; 1-min load average {min(load):.2f}-{max(load):.2f} on "
          f"{os.cpu_count()} cores")  # fmt: skip
    medians = {name: [statistics.median(r[i] for r in runs) for i in (0, 1)] for name, runs in results.items()}
    for name, (cpu, wall) in medians.items():
        print(f"{name:11s} median epoch: CPU {cpu:.2f} s, wall {wall:.2f} s")
    base = medians["train.py"]
    for name in programs:
        if name != "train.py":
            ratio_cpu, ratio_wall = medians[name][0] / base[0], medians[name][1] / base[1]
            reps = sorted(a / b for a, b in zip(per_rep[name], per_rep["train.py"]))
            print(f"ratio {name}/train.py: CPU {ratio_cpu:.3f}x, wall {ratio_wall:.3f}x; per rep (CPU, same rep's "
                  f"medians) {statistics.median(reps):.3f}x, range {reps[0]:.3f}-{reps[-1]:.3f}x")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
