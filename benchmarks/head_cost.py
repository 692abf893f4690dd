"""Cost of the isotropic heads and losses relative to ``nn.Linear`` and ``F.cross_entropy`` (CPU).

Usage::

    python benchmarks/head_cost.py            # all four configurations (a few minutes on 2 cores)
    python benchmarks/head_cost.py --quick    # fewer repetitions
    python benchmarks/head_cost.py --configs 256,2048,1000 64,2048,21841

What is measured, per configuration (B, D, C):

* **time**: one forward + backward. Heads: ``head(x).backward(g)`` for features ``x`` [B, D] (requires
  grad) and a fixed random upstream gradient ``g`` [B, C], so parameter and input gradients are both
  computed, as in training. Losses: ``loss(z, y).backward()`` for logits ``z`` [B, C]. All variants of
  a configuration run interleaved (the order rotates every repetition) in one process; the ratio is
  ``median(variant) / median(baseline)``. Two passes: (1) **CPU time** of the process with one intra-op
  thread, which other load on the machine barely disturbs: the cost ratio (the targets are judged on
  it); (2) **wall time** with ``--threads`` threads (default: torch's), what a quiet machine shows. On a
  shared, oversubscribed machine pass (2) is unreliable: an op-heavy variant waits for a descheduled
  OpenMP thread at every parallel region, so its wall ratio inflates with the load.
* **peak memory**: measured in a fresh subprocess per (configuration, variant), after one warm-up step
  and with all gradients released: the peak, during one forward + backward, of the bytes held by
  torch's CPU allocator above what was held when the step started (``torch.profiler`` memory events,
  ``Total Allocated``). This counts outputs, saved activations, temporaries and gradients; it excludes
  the inputs and parameters that exist before the step and any scratch memory that MKL/oneDNN allocate
  outside torch. The same subprocess also reports the rise of the process's peak RSS (``VmHWM``, reset
  through ``/proc/self/clear_refs`` after ``malloc_trim``) as a cross-check that includes that scratch;
  RSS is page- and allocator-granular, so it is noisy for small configurations.

Baselines: ``nn.Linear(D, C)`` for the heads; ``F.cross_entropy(10 * z, y)`` (hard targets, the same
entropic scale as the isotropic losses) for the losses. ``dismax_loss fpr`` uses the soft targets of
:func:`dismax_plugin.fpr_mix` (half one-hot, half four-way fractional).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from dismax_plugin import DisMaxHead, IsoMaxHead, IsoMaxPlusHead, dismax_loss, fpr_mix, isomax_loss

CONFIGS = ((256, 512, 10), (256, 512, 100), (256, 2048, 1000), (64, 2048, 21841))
HEAD_VARIANTS = {"nn.Linear": nn.Linear, "IsoMaxHead": IsoMaxHead, "IsoMaxPlusHead": IsoMaxPlusHead,
                 "DisMaxHead": DisMaxHead}
LOSS_VARIANTS = ("F.cross_entropy", "isomax_loss", "dismax_loss", "dismax_loss fpr")
TARGETS = {  # (kind, C): (metric, limit) from the issue
    ("head", 1000): ("time", 1.25),
    ("head", 21841): ("time", 2.0),
    ("loss", 21841): ("memory", 1.2),
}


# ------------------------------------------------------------------------------------------- workloads
def make_step(variant: str, batch: int, dim: int, classes: int, seed: int = 0):
    """Return ``step()`` running one forward+backward of ``variant``, with its inputs built once."""
    generator = torch.Generator().manual_seed(seed)
    if variant in HEAD_VARIANTS:
        torch.manual_seed(seed)
        module = HEAD_VARIANTS[variant](dim, classes)
        if variant == "IsoMaxHead":  # zero prototypes are a degenerate case; use trained-like ones
            nn.init.normal_(module.weight)
        x = torch.randn(batch, dim, generator=generator).requires_grad_(True)
        upstream = torch.randn(batch, classes, generator=generator)

        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(upstream)

        return step
    logits = (-torch.rand(batch, classes, generator=generator) * 2).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    _, soft, stitched = fpr_mix(torch.zeros(batch, 1, 2, 2), labels, classes, generator=generator)
    loss = {
        "F.cross_entropy": lambda: F.cross_entropy(10.0 * logits, labels),
        "isomax_loss": lambda: isomax_loss(logits, labels),
        "dismax_loss": lambda: dismax_loss(logits, labels),
        "dismax_loss fpr": lambda: dismax_loss(logits, soft, stitched=stitched),
    }[variant]

    def step():
        logits.grad = None
        loss().backward()

    return step


def release(step) -> None:
    """Drop the gradients a step left behind (so they are not live when the next one starts)."""
    for cell in step.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, nn.Module):
            value.zero_grad(set_to_none=True)
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None


# ------------------------------------------------------------------------------------------- timing
def time_config(batch: int, dim: int, classes: int, reps: int, clock=time.perf_counter, warmup: int = 3,
                sample_seconds: float = 0.01) -> dict[str, float]:
    """Median ``clock`` seconds per forward+backward of every variant, interleaved in this process."""
    variants = list(HEAD_VARIANTS) + list(LOSS_VARIANTS)
    steps = {v: make_step(v, batch, dim, classes) for v in variants}
    # Repeat small workloads inside one sample so that a sample lasts >= sample_seconds.
    inner = {}
    for v, step in steps.items():
        step()
        start = time.perf_counter()
        step()
        inner[v] = max(1, min(500, int(sample_seconds / max(time.perf_counter() - start, 1e-7))))
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(warmup + reps):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            step, n = steps[v], inner[v]
            start = clock()
            for _ in range(n):
                step()
            elapsed = (clock() - start) / n
            if rep >= warmup:
                samples[v].append(elapsed)
    return {v: statistics.median(s) for v, s in samples.items()}


# ------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure_memory(variant: str, batch: int, dim: int, classes: int) -> dict[str, float]:
    """Peak allocator bytes and peak-RSS rise of one forward+backward (run this in a fresh process)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(variant, batch, dim, classes)
    step()  # warm-up: lazy initialisation of kernels and thread pools
    release(step)
    gc.collect()
    rss_ok = _reset_peak_rss()
    rss_before = _rss_kib("VmRSS")
    step()
    rss_rise = (_rss_kib("VmHWM") - rss_before) * 1024 if rss_ok else float("nan")
    release(step)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return {"peak": 0.0, "rss": rss_rise}
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return {"peak": float(max(m["Total Allocated"] for m in memory) - start), "rss": float(rss_rise)}


def memory_in_subprocess(variant: str, batch: int, dim: int, classes: int, threads: int) -> dict[str, float]:
    command = [sys.executable, os.path.abspath(__file__), "--measure-memory", variant,
               "--configs", f"{batch},{dim},{classes}", "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"memory measurement of {variant} failed:\n{result.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------- report
def _mib(n: float) -> str:
    return "n/a" if n != n else f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="B,D,C triples (default: the four issue sizes)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 15)")
    parser.add_argument("--quick", action="store_true", help="5 repetitions; memory as usual")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--measure-memory", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else list(CONFIGS)

    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, *configs[0])))
        return 0

    reps = args.reps or (5 if args.quick else 15)
    print(f"torch {torch.__version__}; {reps} interleaved repetitions, medians. CPU = process CPU time with 1 "
          f"thread; wall = wall-clock time with {args.threads} threads. Memory: peak torch-allocator bytes "
          f"of one fwd+bwd in a fresh process above the bytes live before it (peak-RSS rise in brackets).\n")
    print("| B, D, C | variant | CPU ms, 1 thread | CPU ratio | wall ms, "
          f"{args.threads} threads | wall ratio | peak MiB [RSS rise] | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    verdicts = []
    for batch, dim, classes in configs:
        torch.set_num_threads(1)
        cpu = time_config(batch, dim, classes, reps, clock=time.process_time)
        torch.set_num_threads(args.threads)
        wall = time_config(batch, dim, classes, reps, clock=time.perf_counter)
        for kind, variants in (("head", list(HEAD_VARIANTS)), ("loss", list(LOSS_VARIANTS))):
            memory = {}
            if not args.no_memory:
                memory = {v: memory_in_subprocess(v, batch, dim, classes, args.threads) for v in variants}
            base = variants[0]
            for v in variants:
                cpu_ratio, wall_ratio = cpu[v] / cpu[base], wall[v] / wall[base]
                if memory:
                    m_ratio = memory[v]["peak"] / memory[base]["peak"]
                    mem_text = f"{_mib(memory[v]['peak'])} [{_mib(memory[v]['rss'])}]"
                    m_ratio_text = f"{m_ratio:.2f}×"
                else:
                    m_ratio, mem_text, m_ratio_text = float("nan"), "-", "-"
                print(f"| {batch}, {dim}, {classes} | {v} | {cpu[v] * 1e3:.2f} | {cpu_ratio:.2f}× | "
                      f"{wall[v] * 1e3:.2f} | {wall_ratio:.2f}× | {mem_text} | {m_ratio_text} |")
                target = TARGETS.get((kind, classes))
                if target and v != base:
                    metric, limit = target
                    value = cpu_ratio if metric == "time" else m_ratio
                    if value == value:
                        ok = "met" if value <= limit else "MISSED"
                        extra = f" (wall, {args.threads} threads: {wall_ratio:.2f}×)" if metric == "time" else ""
                        verdicts.append(f"{v} {metric} at C={classes}: {value:.2f}× (target <= {limit}×) {ok}{extra}")
            sys.stdout.flush()
    if verdicts:
        print("\nTargets:")
        for line in verdicts:
            print(f"- {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
