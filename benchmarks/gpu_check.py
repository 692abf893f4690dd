"""One prepared GPU check of the isotropic heads (run by ``benchmarks/gpu_check.sh``; <= 5 minutes on one H200).

Sections, each printing ratios measured side by side (interleaved rounds, medians of per-round ratios):

1. **heads**: forward + backward of IsoMax, IsoMax+ and DisMax heads vs ``nn.Linear`` at B = 256, D = 2048,
   C = 1000 / 21841 / 100000, in float32 (with the floors of ``head_cost.py``, measured side by side) and
   under bfloat16 and float16 autocast; peak CUDA memory of one step vs Linear's.
2. **nccl**: ``init_process_group("nccl")`` with world size 1 (a file store), an ``all_reduce`` and one DDP step
   of a DisMax head.
3. **fp16**: a few float16-autocast + ``GradScaler`` training steps of a DisMax resnet50: losses, gradients
   and weights finite.
4. **compile**: ``torch.compile``d timm resnet50 with a DisMax head vs the stock model at 224 px, bfloat16
   autocast, channels-last: train step (forward, backward, SGD) time and eval throughput, peak memory of a
   train step; then **DisMax + its native score** vs **Linear + MaxSoftmax** eval throughput.

The models come from ``dismax_plugin.adapters.timm.create_model(arch, head=..., num_classes=...)`` and the
loss is ``F.cross_entropy(model(x), y)``: after the core API change a head's training-mode output already
carries the entropic scale. Without CUDA the script says what it skipped and exits 0; ``--smoke`` runs every
section on the CPU with tiny shapes (gloo instead of nccl, no compile) to check the code paths. Sections run
in the order above against a deadline (``--budget-s``); what does not fit is reported as skipped. Exit status:
1 if a section failed, else 0.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from head_cost import FLOORS, HEADS  # noqa: E402  (benchmarks/ is not a package)

SECTIONS = ("heads", "nccl", "fp16", "compile")
FULL = {"batch": 256, "dim": 2048, "classes": (1000, 21841, 100000), "arch": "resnet50", "image": 224,
        "model_batch": 128, "rounds": 10, "fp16_steps": 5}
SMOKE = {"batch": 8, "dim": 16, "classes": (50,), "arch": "test_resnet", "image": 32, "model_batch": 4,
         "rounds": 2, "fp16_steps": 2}


# ------------------------------------------------------------------------------------------- measuring
class Clock:
    """Seconds of ``fn()`` (CUDA events on a GPU, wall clock on the CPU) and the peak memory it adds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def peak(self, fn) -> float:
        """Bytes above those allocated before ``fn()`` at its peak (NaN on the CPU)."""
        if not self.cuda:
            fn()
            return float("nan")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)


def interleaved(clock: Clock, steps: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = clock.time(steps[name])
            if r >= warmup:
                samples[name].append(elapsed)
    return samples


def ratio(samples: dict, name: str, base: str) -> float:
    return statistics.median(s / b for s, b in zip(samples[name], samples[base]))


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}×"


# ------------------------------------------------------------------------------------------- 1. heads
def _head_steps(device, batch, dim, classes, mode):
    torch.manual_seed(0)
    linear = nn.Linear(dim, classes, device=device)
    nn.init.normal_(linear.weight)
    x = torch.randn(batch, dim, device=device, requires_grad=True)
    upstream = torch.randn(batch, classes, device=device)
    autocast = {"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    modules = {"Linear": linear}
    for name, cls in HEADS.items():
        head = cls(dim, classes, device=device).train()
        weight = "weight" if isinstance(getattr(head, "weight", None), nn.Parameter) else "prototypes"
        setattr(head, weight, linear.weight)  # one shared C x D matrix: memory for one
        modules[name] = head

    def step_of(module, floor=None):
        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = FLOORS[floor](x, module.weight) if floor else module(x)
            out.float().backward(upstream)

        return step

    steps = {name: step_of(module) for name, module in modules.items()}
    if mode == "float32":  # the floors: Linear's products plus the passes a distance's gradient needs
        steps.update({name: step_of(linear, floor=name) for name in FLOORS})
    return steps


def section_heads(device, sizes, deadline) -> None:
    clock = Clock(device)
    print("\n## 1. Heads: forward + backward vs nn.Linear (B, D = "
          f"{sizes['batch']}, {sizes['dim']}); time ratio, peak-memory ratio\n")
    columns = [f"{name} time | {name} memory" for name in HEADS] + [f"{name} (fp32)" for name in FLOORS]
    print("| C | mode | " + " | ".join(columns) + " |")
    print("|---" * (2 * len(HEADS) + 4) + "|")
    for classes in sizes["classes"]:
        for mode in ("float32", "bf16", "fp16"):
            if time.monotonic() > deadline:
                print(f"| {classes} | {mode} | skipped: time budget |")
                continue
            steps = _head_steps(device, sizes["batch"], sizes["dim"], classes, mode)
            samples = interleaved(clock, steps, sizes["rounds"])
            peaks = {name: clock.peak(steps[name]) for name in ("Linear", *HEADS)}
            cells = [f"{_fmt(ratio(samples, n, 'Linear'))} | {_fmt(peaks[n] / peaks['Linear'])}" for n in HEADS]
            floors = [_fmt(ratio(samples, name, "Linear")) if name in samples else "-" for name in FLOORS]
            print(f"| {classes} | {mode} | " + " | ".join(cells + floors) + " |")
            sys.stdout.flush()
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- 2. nccl
def section_nccl(device, sizes, deadline) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    print(f"\n## 2. {backend}: init_process_group with world size 1 (file store)\n")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            value = torch.full((4,), 3.0, device=device)
            dist.all_reduce(value)
            head = HEADS["DisMax"](sizes["dim"], 10, device=device).train()
            ddp = DistributedDataParallel(head, device_ids=[device.index or 0] if device.type == "cuda" else None)
            x = torch.randn(sizes["batch"], sizes["dim"], device=device)
            loss = F.cross_entropy(ddp(x), torch.arange(sizes["batch"], device=device) % 10)
            loss.backward()
            grads = [p.grad for p in head.parameters()]
            ok = bool((value == 3.0).all()) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
            print(f"- backend {dist.get_backend()}, world size {dist.get_world_size()}: all_reduce "
                  f"{value.tolist()}, DDP DisMax step loss {float(loss.detach()):.4f}, gradients finite: {ok}")
            if not ok:
                raise RuntimeError(f"{backend} check failed")
        finally:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- 3. fp16
def _create(arch: str, head: str, device, image: int):
    from dismax_plugin.adapters.timm import create_model

    model = create_model(arch, head=head, num_classes=1000).to(device)
    return model.to(memory_format=torch.channels_last) if image >= 64 else model


def section_fp16(device, sizes, deadline) -> None:
    print(f"\n## 3. float16 autocast + GradScaler: {sizes['fp16_steps']} training steps of {sizes['arch']} "
          "with a DisMax head\n")
    model = _create(sizes["arch"], "dismax", device, sizes["image"]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type)
    batch = min(sizes["model_batch"], 32)
    x = torch.randn(batch, 3, sizes["image"], sizes["image"], device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    losses = []
    for _ in range(sizes["fp16_steps"]):
        with torch.autocast(device.type, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    finite = all(math.isfinite(v) for v in losses) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(f"- losses {[round(v, 4) for v in losses]}, final scale {scaler.get_scale():.0f}, "
          f"weights and losses finite: {finite}")
    if not finite:
        raise RuntimeError("float16 + GradScaler produced a non-finite loss or weight")


# ------------------------------------------------------------------------------------------- 4. compile
def _model_steps(model, x, y, compiled):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train():
        model.train()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def evaluate():
        model.eval()
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            return compiled(x)

    return train, evaluate


def _scored(evaluate, model, native: bool):
    from dismax_plugin.adapters.timm import get_head

    head = get_head(model) if native else None

    def run():
        logits = evaluate()
        if head is not None:
            return head.ood_score(logits.float())  # the head's native default score
        return torch.softmax(logits.float(), dim=1).amax(dim=1)  # MaxSoftmax

    return run


def section_compile(device, sizes, deadline) -> None:
    use_compile = device.type == "cuda"
    if use_compile and deadline - time.monotonic() < 150:
        print("\n## 4. compile: skipped (time budget: compiling two resnet50s needs ~2 minutes)")
        return
    arch, image, batch = sizes["arch"], sizes["image"], sizes["model_batch"]
    print(f"\n## 4. {'torch.compile' if use_compile else 'eager (no compile on the CPU)'}: {arch} at {image} px, "
          f"batch {batch}, bfloat16 autocast, DisMax head vs stock\n")
    x = torch.randn(batch, 3, image, image, device=device)
    if image >= 64:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    clock, steps, evals, models = Clock(device), {}, {}, {}
    for head in ("dismax", "linear"):
        torch.manual_seed(0)
        model = models[head] = _create(arch, head, device, image)
        compiled = torch.compile(model) if use_compile else model
        steps[head], evals[head] = _model_steps(model, x, y, compiled)
        start = time.monotonic()
        for _ in range(2):
            steps[head]()
            evals[head]()
        warmup = time.monotonic() - start
        print(f"- {head}: warm-up (compile) {warmup:.1f} s")
        if head == "dismax" and use_compile and deadline + 15 - time.monotonic() < warmup + 30:
            print("- stock model: skipped (time budget: its compile would overrun the 5 minutes)")
            return
    train = interleaved(clock, steps, sizes["rounds"])
    peaks = {head: clock.peak(steps[head]) for head in steps}
    evaluated = interleaved(clock, evals, sizes["rounds"])
    scored = interleaved(clock, {"dismax": _scored(evals["dismax"], models["dismax"], True),
                                 "linear": _scored(evals["linear"], models["linear"], False)}, sizes["rounds"])
    rows = [("train step ms", [1e3 * statistics.median(train[h]) for h in steps], ratio(train, "dismax", "linear")),
            ("eval images/s", [batch / statistics.median(evaluated[h]) for h in steps],
             1 / ratio(evaluated, "dismax", "linear")),
            ("eval + score images/s (DisMax native score / Linear MaxSoftmax)",
             [batch / statistics.median(scored[h]) for h in steps], 1 / ratio(scored, "dismax", "linear")),
            ("peak memory of a train step, MiB", [peaks[h] / 2**20 for h in steps], peaks["dismax"] / peaks["linear"])]
    print("\n| measurement | DisMax | stock | DisMax / stock |\n|---|---|---|---|")
    for label, (dismax, stock), value in rows:
        print(f"| {label} | {dismax:.1f} | {stock:.1f} | {_fmt(value)} |")


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU (checks the code paths)")
    parser.add_argument("--budget-s", type=float, default=285.0, help="deadline for starting sections (seconds)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    chosen = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        print(f"--sections: unknown {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    print(f"# GPU check {time.strftime('%Y-%m-%d %H:%M')}: torch {torch.__version__}, {name}"
          f"{', smoke mode (tiny shapes)' if args.smoke else ''}")
    if not cuda and not args.smoke:
        print(f"\nskipped: {', '.join(chosen)} (no CUDA device; `--smoke` runs them on the CPU with tiny shapes)")
        return 0
    if cuda:
        torch.backends.cudnn.benchmark = True
    sizes = SMOKE if args.smoke else FULL
    functions = {"heads": section_heads, "nccl": section_nccl, "fp16": section_fp16, "compile": section_compile}
    failed, skipped = [], []
    for section in chosen:
        if time.monotonic() > deadline:
            skipped.append(section)
            continue
        try:
            functions[section](device, sizes, deadline)
        except Exception:  # report and go on: one broken section must not hide the others' figures
            failed.append(section)
            print(f"\n{section}: FAILED\n{traceback.format_exc()}")
        sys.stdout.flush()
    if not cuda:
        skipped.append("CUDA itself (smoke mode ran on the CPU: no torch.compile, gloo instead of nccl)")
    print(f"\nskipped: {', '.join(skipped) or 'nothing'}; failed: {', '.join(failed) or 'nothing'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
