r"""Cost of the isotropic heads relative to ``nn.Linear`` (CPU, one intra-op thread), side by side.

Usage::

    python benchmarks/head_cost.py             # the table of docs/notes/perf.md (a few minutes on 2 cores)
    python benchmarks/head_cost.py --quick     # fewer rounds, no worst case at C = 21841
    python benchmarks/head_cost.py --profile 256,2048,1000   # where the time goes, per head
    python benchmarks/head_cost.py --split 256,2048,1000     # forward and backward apart, vs the floor

What is measured:

* **heads** at (B, D, C) = (256, 2048, 1000) and (64, 2048, 21841): one forward + backward,
  ``head(x).backward(g)`` with features ``x`` [B, D] that require grad and a fixed random upstream
  gradient ``g`` [B, C], parameter gradients set to None before each step (as ``optimizer.zero_grad()``
  does, so every step allocates its C x D gradient, for Linear too). Two cases: **realistic** — features
  and prototypes drawn independently from N(0, 1), so no feature is near a prototype and no pair is
  recomputed — and **worst** — every feature sits on a prototype (the first B prototypes; times 3 for the
  normalised heads), so B pairs per step are flagged and recomputed exactly (values and gradients). The
  heads are called as shipped, ``head(x)`` in training mode (the entropic scale folded into the distance
  node). Next to them, the **floor**: a synthetic step of exactly the work no exact distance head can avoid
  beyond Linear's (:class:`FloorStep`): Linear's three matrix products (without the bias) plus one pass over
  each operand in each direction — the norms of the features and of the prototypes in the forward, and the
  parts of both gradients along the operands themselves (``beta_b x_b``, ``gamma_c p_c``, added in place to
  the gradients the products wrote) in the backward. And the **distance floor**
  (:class:`DistanceFloorStep`): the floor plus the :math:`B \times C` work the gradient of any distance
  implies — one in-place pass over the product forward, :math:`H = g / \mathrm{out}` in a new buffer and its
  row and column sums backward. And the **normalised floors** (:class:`NormalizedFloorStep`, with and without
  DisMax's row mean): the normalised formula itself in the fewest eager operations found — the cosine's row
  and column scalings of the product in both directions, the sums of :math:`U = g d` and :math:`T = g / d`
  for the gradients' parts along :math:`x` and :math:`P` — with no exactness, eps floor or scale. Each head is
  reported against Linear, the floor, the distance floor and the floor of its own formula
  (:data:`HEAD_FLOORS`) of the same rounds; the verdict (realistic case) is "met" at ≤ 1.05× Linear, "at the
  distance floor" at ≤ 1.05× the distance floor, "at its floor" at ≤ 1.05× its own floor.
* **100k classes**: head + loss at (64, 2048, 100000) vs ``nn.Linear`` + ``F.cross_entropy``: time as above
  and the **peak memory** of one step, after a warm-up step and with every gradient released: the peak,
  during the step, of the bytes held by torch's CPU allocator above what was held when it started
  (``torch.profiler`` memory events carry the allocator's running total, so the variants can be measured one
  after the other in one process). It counts outputs, saved tensors, temporaries and gradients, not the
  parameters or the inputs, nor scratch memory MKL allocates outside torch. The loss is
  ``F.cross_entropy`` on the head's training output, which carries the entropic scale: the loss the heads
  train with.

Timing: process CPU time (``time.process_time``) with ``torch.set_num_threads(1)``, which other load on a
shared machine disturbs far less than wall time; all variants of a shape run in one process, interleaved
(the order rotates every round); the ratio is the median over rounds of ``t(variant) / t(Linear)`` in the
same round, with the interquartile range of those per-round ratios. All variants share one prototype
matrix (Linear's weight), so memory stays at one C x D parameter and one gradient. glibc's malloc thresholds
are fixed first, as the ``dismax`` command fixes them (``dismax_plugin/adapters/engine/_memory.py``), so no
variant's step page-faults its buffers back in depending on what ran before it (``--system-malloc``: leave
them; with glibc's moving defaults a step's backward was seen at 0 to ~1500 minor faults, run to run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from dismax_plugin import DisMaxHead, IsoMaxHead, IsoMaxPlusHead
from dismax_plugin.adapters.engine._memory import keep_freed_memory

CONFIGS = ((256, 2048, 1000), (64, 2048, 21841))
LARGE = (64, 2048, 100000)
HEADS = {"IsoMax": IsoMaxHead, "IsoMax+": IsoMaxPlusHead, "DisMax": DisMaxHead}
TARGETS = {"head": 1.05, "large time": 1.10, "large memory": 1.05}


# ------------------------------------------------------------------------------------------- workloads
def _weight_name(head: nn.Module) -> str:
    return "weight" if isinstance(getattr(head, "weight", None), nn.Parameter) else "prototypes"


class FloorStep(torch.autograd.Function):
    r"""The floor of an exact distance head: ``x @ W^T`` with the passes over both operands that a distance's
    gradient needs and Linear's does not, and no :math:`B \times C` epilogue.

    A distance :math:`d_{bc} = \lVert x_b - p_c \rVert` (or of the normalised vectors) has, with
    :math:`H = \partial L / \partial d \,/\, d`, the gradients :math:`\nabla_x = \mathrm{rowsum}(H)\,x - H P`
    and :math:`\nabla_P = \mathrm{colsum}(H)\,P - H^\top x` (the normalised heads: the same two products plus
    a per-row multiple of :math:`x` and of :math:`P`, their tangent projections). So beyond Linear's three
    products: the norms of the rows of :math:`x` and of :math:`P` (forward, one read each) and the parts of
    both gradients along the operands themselves (backward, one in-place pass each over the gradient the
    product wrote). Here the per-row factors are the row and column sums of the upstream gradient
    (Linear takes the column sums for its bias anyway). A real head needs at least one :math:`B \times C`
    pass in each direction on top (the distance from the product, and :math:`H` from the upstream
    gradient), so it costs a little more than this.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.norms = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(weight, dim=1)
        ctx.save_for_backward(x, weight)
        return torch.mm(x, weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.mm(grad, weight).addcmul_(x, grad.sum(dim=1, keepdim=True))
        grad_w = torch.mm(grad.t(), x).addcmul_(weight, grad.sum(dim=0).unsqueeze(1))
        return grad_x, grad_w



class DistanceFloorStep(torch.autograd.Function):
    r""":class:`FloorStep` plus the :math:`B \times C` work that the gradient of any distance implies, done the
    cheapest way eager PyTorch allows: one in-place pass over the product in the forward (standing for the
    square root that turns it into a distance), and in the backward :math:`H = g / \mathrm{out}` in a new
    buffer (the upstream gradient is not the node's to overwrite), whose row and column sums and products
    replace the upstream gradient's. A real head does at least this (its forward also adds the norms, its
    backward also scales :math:`H` per row and column for the normalised distances), so its excess over
    this floor is what a better eager implementation could still remove.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.norms = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(weight, dim=1)
        out = torch.mm(x, weight.t()).abs_()
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, out = ctx.saved_tensors
        h = torch.div(grad, out)
        grad_x = torch.mm(h, weight).addcmul_(x, h.sum(dim=1, keepdim=True))
        grad_w = torch.mm(h.t(), x).addcmul_(weight, h.sum(dim=0).unsqueeze(1))
        return grad_x, grad_w


class NormalizedFloorStep(torch.autograd.Function):
    r""":class:`DistanceFloorStep` for distances between normalised vectors (IsoMax+, DisMax with ``add_mean``):
    the same formula as :func:`dismax_plugin.distances.normalized_distances` in the fewest eager operations found,
    and nothing else — no exactness near a prototype, no eps floor (every row above it), no scale, no checks.

    The normalised formula needs, beyond any distance, the cosine's row and column scalings of the product
    (:math:`d^2 = 2 - 2\,a_b q_c\,x_b \cdot p_c`, :math:`a = 1/|x|`, :math:`q = 1/|p|`) in both directions
    and the gradients' parts along :math:`x` and :math:`P` from the sums of :math:`U = g\,d` and :math:`T = g/d`:
    :math:`\nabla_x = K P + \beta x`, :math:`\nabla_P = K^\top x + \gamma P` with :math:`K = -a\,T\,q`,
    :math:`\beta = a^2 (\mathrm{rowsum}\,T - \mathrm{rowsum}\,U / 2)`, :math:`\gamma` the same per column
    (for :math:`C \ge 3D`, :math:`\beta` from the tangent projection of :math:`K P`, as the heads do); DisMax's
    mean adds :math:`V = g + \mathrm{rowmean}(g)` in place of :math:`g`. Not cheaper at (256, 2048, 1000), timed
    once each: the sums of :math:`U` without forming it (``bmm``, ``einsum``, ``linalg.vecdot``: 1.6–4.6× the
    time of ``g * d`` and two sums), the output scaled in place and kept for the backward instead of :math:`d`
    (the same step time). Scaling the operands instead of the product, or the tangent projection for the part
    along :math:`P`, would pass over :math:`B \times D` or :math:`C \times D` matrices, larger than the
    :math:`B \times C` one there (not timed). A head does this plus its scale, its exactness and its eps-floor
    handling.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, add_mean: bool = False) -> torch.Tensor:
        a = torch.linalg.vector_norm(x, dim=1).reciprocal_()
        q = torch.linalg.vector_norm(weight, dim=1).reciprocal_()
        d = torch.mm(x, weight.t()).mul_(q).mul_(a.mul(-2.0).unsqueeze(1)).add_(2.0).sqrt_()
        out = torch.add(d, d.mean(dim=1, keepdim=True)) if add_mean else d
        ctx.add_mean = add_mean
        ctx.save_for_backward(x, weight, a, q, d)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, a, q, d = ctx.saved_tensors
        v = torch.add(grad, grad.mean(dim=1, keepdim=True)) if ctx.add_mean else grad
        u = v.mul_(d) if ctx.add_mean else torch.mul(v, d)
        colsum_u, rowsum_u = u.sum(dim=0), u.sum(dim=1)
        if ctx.add_mean:  # V again, and T in the buffer of d (the node's own when the output is d + mean)
            t = torch.div(u.div_(d), d, out=d)
        else:  # d is the output: T in a new buffer
            t = torch.div(v, d)
        del u
        colsum_t, rowsum_t = t.sum(dim=0), t.sum(dim=1)
        gamma = torch.add(colsum_t, colsum_u, alpha=-0.5).mul_(q.square())
        k = t.mul_(a.neg().unsqueeze(1)).mul_(q)
        grad_x = torch.mm(k, weight)
        if weight.shape[0] < 3 * weight.shape[1]:
            beta = torch.add(rowsum_t, rowsum_u, alpha=-0.5).mul_(a.square())
        else:  # the tangent projection of K P, as the heads take it there
            beta = (x * grad_x).sum(dim=1).mul_(a.square()).neg_()
        grad_x.addcmul_(x, beta.unsqueeze(1))
        grad_w = torch.mm(k.t(), x).addcmul_(weight, gamma.unsqueeze(1))
        return grad_x, grad_w, None


FLOORS = {
    "floor": FloorStep.apply,
    "distance floor": DistanceFloorStep.apply,
    "normalised floor": NormalizedFloorStep.apply,
    "normalised floor + mean": lambda x, weight: NormalizedFloorStep.apply(x, weight, True),
}
"""The reference steps, each called as ``FLOORS[name](x, weight)``."""
HEAD_FLOORS = {"IsoMax": "distance floor", "IsoMax+": "normalised floor", "DisMax": "normalised floor + mean"}
"""The floor of each head's own formula: the verdict's "at its floor"."""

def build(dim: int, classes: int, names=tuple(HEADS), seed: int = 0) -> tuple[nn.Linear, dict[str, nn.Module]]:
    """``nn.Linear`` and the heads ``names``, all sharing Linear's weight (drawn from N(0, 1)) as prototypes.

    Nothing else of C x D size is initialised: the heads are built on the meta device and get their small
    state (scales, temperature, calibration buffers) from a two-class twin."""
    torch.manual_seed(seed)
    linear = torch.nn.utils.skip_init(nn.Linear, dim, classes)
    with torch.no_grad():
        linear.weight.normal_()
        linear.bias.zero_()
    heads = {}
    for name in names:
        head = HEADS[name](dim, classes, device="meta").to_empty(device="cpu").train()
        twin = HEADS[name](dim, 2).state_dict()
        weight = _weight_name(head)
        head.load_state_dict({k: v for k, v in twin.items() if not k.endswith(weight)}, strict=False)
        setattr(head, weight, linear.weight)
        heads[name] = head
    return linear, heads


def features(batch: int, dim: int, weight: torch.Tensor, case: str, name: str, seed: int = 1) -> torch.Tensor:
    """Realistic: independent N(0, 1) features; worst: each feature on a prototype (x3 when normalised)."""
    if case == "realistic":
        x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
    else:
        x = weight.detach()[:batch].clone() * (1.0 if name == "IsoMax" else 3.0)
    return x.requires_grad_(True)


def head_step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, call: str = "module"):
    """One forward + backward of ``module(x)`` (``call`` a name of :data:`FLOORS`: that step on its weight)."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x) if call == "module" else FLOORS[call](x, module.weight)).backward(upstream)

    return step


def loss_step(module: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    """One forward + backward of ``F.cross_entropy(module(x), labels)`` (a head's training output carries
    the entropic scale, so this is the loss it trains with)."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        F.cross_entropy(module(x), labels).backward()

    return step


# ------------------------------------------------------------------------------------------- timing
def interleaved(steps: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Process CPU seconds of each step, ``rounds`` times, the order rotating every round."""
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.process_time()
            steps[name]()
            elapsed = time.process_time() - start
            if r >= warmup:
                samples[name].append(elapsed)
    return samples


def paired(samples: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range of the per-round ratios ``samples[r] / base[r]``."""
    ratios = sorted(s / b for s, b in zip(samples, base))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def head_variants(batch: int, dim: int, classes: int, cases) -> dict:
    """Linear, the floor and every head in every case, one step function each, sharing one weight."""
    linear, heads = build(dim, classes)
    upstream = torch.randn(batch, classes, generator=torch.Generator().manual_seed(2))
    x = features(batch, dim, linear.weight, "realistic", "")
    steps = {"Linear": head_step(linear, x, upstream)}
    steps.update({name: head_step(linear, x, upstream, name) for name in FLOORS})
    for case in cases:
        for name, head in heads.items():
            xc = x if case == "realistic" else features(batch, dim, linear.weight, case, name)
            steps[f"{name}|{case}"] = head_step(head, xc, upstream)
    return steps


def large_variants(batch: int, dim: int, classes: int, names=tuple(HEADS)) -> dict:
    linear, heads = build(dim, classes, names)
    x = features(batch, dim, linear.weight, "realistic", "")
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(3))
    steps = {"Linear": loss_step(linear, x, labels)}
    for name, head in heads.items():
        steps[name] = loss_step(head, x, labels)
    return steps


# ------------------------------------------------------------------------------------------- memory
def measure_memory(step) -> float:
    """Peak torch-allocator bytes of one ``step`` above those held when it starts, its gradients released
    before (``torch.profiler`` memory events carry the allocator's running total)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: lazy initialisation
    _release(step)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return float(max(m["Total Allocated"] for m in memory) - start)


def _release(step) -> None:
    """Drop the gradients a step left (module parameters and the features)."""
    for cell in step.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, nn.Module):
            value.zero_grad(set_to_none=True)
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None


# ------------------------------------------------------------------------------------------- profile
def _category(name: str, shapes: list, batch: int, dim: int, classes: int) -> str:
    sizes = {math.prod(s) for s in shapes if s}
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul"):
        return "3 matrix products (Linear's floor)"
    if name in ("aten::amin", "aten::count_nonzero", "aten::nonzero_static", "aten::index_put_", "aten::index"):
        return "near-pair scan / recompute"
    if classes * dim in sizes:
        return "norm of the prototypes (C x D)" if "norm" in name else "other C x D passes"
    if batch * classes in sizes:
        return "B x C element passes and reductions"
    if batch * dim in sizes:
        return "B x D passes (feature norms, tangent projection)"
    return "the rest (small vectors, autograd bookkeeping)"


def profile_breakdown(config: tuple[int, int, int], steps: dict, rounds: int = 7) -> None:
    """Self time per category of op and variant: one profiled step per variant and round, interleaved (the
    order rotates), median over the rounds (the profiler's times are wall clock: load shows up)."""
    from torch.profiler import ProfilerActivity, profile

    batch, dim, classes = config
    print(f"\nWhere the time goes at (B, D, C) = {config}: self ms per step by category of op (torch.profiler, "
          f"1 thread, median of {rounds} interleaved rounds)\n")
    names = list(steps)
    runs: dict[str, dict[str, list[float]]] = {}
    for step in steps.values():
        step()
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                steps[name]()
            totals: dict[str, float] = {}
            for event in prof.key_averages(group_by_input_shape=True):
                category = _category(event.key, event.input_shapes or [], batch, dim, classes)
                totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e3
            for category, value in totals.items():
                runs.setdefault(category, {}).setdefault(name, []).append(value)
    table = {c: {n: statistics.median(v + [0.0] * (rounds - len(v))) for n, v in row.items()}
             for c, row in runs.items()}
    print("| category | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for category in sorted(table, key=lambda c: -table[c].get(names[-1], 0.0)):
        print(f"| {category} | " + " | ".join(f"{table[category].get(n, 0.0):.2f}" for n in names) + " |")
    totals = [sum(table[c].get(n, 0.0) for c in table) for n in names]
    print("| **sum of the medians** | " + " | ".join(f"{t:.2f}" for t in totals) + " |")


def split_forward_backward(config: tuple[int, int, int], rounds: int = 61, warmup: int = 3) -> None:
    """Forward and backward timed apart (process CPU time, interleaved, order rotating), each against the floor's
    forward and backward of the same round: which half of a head's step is above the floor."""
    batch, dim, classes = config
    linear, heads = build(dim, classes)
    upstream = torch.randn(batch, classes, generator=torch.Generator().manual_seed(2))
    x = features(batch, dim, linear.weight, "realistic", "")
    calls = {**{name: (lambda step=step: step(x, linear.weight)) for name, step in FLOORS.items()},
             "Linear": lambda: linear(x), **{name: (lambda head=head: head(x)) for name, head in heads.items()}}
    names, times = list(calls), {name: ([], []) for name in calls}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for module in (linear, *heads.values()):
                module.zero_grad(set_to_none=True)
            x.grad = None
            start = time.process_time()
            out = calls[name]()
            middle = time.process_time()
            out.backward(upstream)
            end = time.process_time()
            del out  # as in head_step: nothing of this step stays alive into the next one
            if r >= warmup:
                times[name][0].append(middle - start)
                times[name][1].append(end - middle)
    print(f"\nForward and backward apart at (B, D, C) = {config}, realistic case, median of {rounds} interleaved "
          "rounds; ratios to the floor's forward / backward of the same round\n")
    print("| variant | forward ms | forward vs floor | backward ms | backward vs floor | both vs floor | "
          "both vs distance floor | both vs its floor |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {name: [f + b for f, b in zip(*times[name])] for name in names}
    for name in names:
        cells = []
        for half in (0, 1):
            ratio = statistics.median(a / b for a, b in zip(times[name][half], times["floor"][half]))
            cells += [f"{statistics.median(times[name][half]) * 1e3:.2f}", f"{ratio:.3f}×"]
        for base in ("floor", "distance floor", HEAD_FLOORS.get(name)):  # no floor of its own: "—"
            cells.append(f"{statistics.median(a / b for a, b in zip(totals[name], totals[base])):.3f}×" if base
                         else "—")
        print(f"| {name} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------- report
def _ratio_text(samples: dict, name: str, base: str = "Linear") -> str:
    median, q1, q3 = paired(samples[name], samples[base])
    return f"{median:.3f}× [{q1:.2f}–{q3:.2f}]"


def report_heads(config, rounds: int, cases, verdicts: list) -> None:
    samples = interleaved(head_variants(*config, cases), rounds)
    linear_ms = statistics.median(samples["Linear"]) * 1e3
    floors = {name: paired(samples[name], samples["Linear"])[0] for name in FLOORS}
    print(f"\n(B, D, C) = {config}: nn.Linear fwd+bwd {linear_ms:.1f} ms CPU; median of {rounds} interleaved "
          f"rounds [interquartile range] of the per-round ratios\n")
    print(f"floor (Linear's 3 products, the norms of x and P, the gradients' parts along x and P) vs Linear: "
          f"{_ratio_text(samples, 'floor')}")
    print(f"distance floor (the floor plus one in-place B x C pass forward, H = g / out and its sums backward) vs "
          f"Linear: {_ratio_text(samples, 'distance floor')}")
    for name in ("normalised floor", "normalised floor + mean"):
        print(f"{name} (the normalised formula{' with the row mean' if 'mean' in name else ''} in the fewest eager "
              f"operations, no exactness, eps floor or scale) vs Linear: {_ratio_text(samples, name)}, vs the "
              f"distance floor: {_ratio_text(samples, name, 'distance floor')}")
    print()
    columns = ("Linear", "floor", "distance floor", "its floor")
    print("| head | " + " | ".join(f"{case} vs {base}" for case in cases for base in columns) + " |")
    print("|---" * (len(columns) * len(cases) + 1) + "|")
    for name in HEADS:
        cells = []
        for case in cases:
            key = f"{name}|{case}"
            bases = {base: HEAD_FLOORS[name] if base == "its floor" else base for base in columns}
            cells += [_ratio_text(samples, key, base) for base in bases.values()]
            ratios = {base: paired(samples[key], samples[base])[0] for base in bases.values()}
            verdicts.append(("head", f"{name} {case} at C={config[2]}", case, ratios, floors, HEAD_FLOORS[name]))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n(its floor: " + ", ".join(f"{head}: the {floor}" for head, floor in HEAD_FLOORS.items()) + ")")
    sys.stdout.flush()


def report_large(config, rounds: int, memory: bool, verdicts: list) -> None:
    steps = large_variants(*config)
    samples = interleaved(steps, rounds)
    for step in steps.values():
        _release(step)
    peaks = {name: measure_memory(step) for name, step in steps.items()} if memory else {}
    linear_ms = statistics.median(samples["Linear"]) * 1e3
    print(f"\n(B, D, C) = {config}, head + loss: nn.Linear + F.cross_entropy fwd+bwd {linear_ms:.0f} ms CPU; "
          f"median of {rounds} interleaved rounds [IQR]; peak = torch-allocator peak of one step above the bytes "
          "held before it (gradients released)\n")
    print("| variant | time ratio | peak MiB | memory ratio |")
    print("|---|---|---|---|")
    for name in samples:
        label = "nn.Linear + F.cross_entropy" if name == "Linear" else f"{name} + F.cross_entropy"
        peak = peaks.get(name, float("nan"))
        ratio = peak / peaks["Linear"] if peaks else float("nan")
        print(f"| {label} | {_ratio_text(samples, name)} | {peak / 2**20:.1f} | {ratio:.3f}× |")
        if name != "Linear":
            verdicts.append(("limit", f"{label} time at C={config[2]}", paired(samples[name], samples["Linear"])[0],
                             TARGETS["large time"]))
            if peaks:
                verdicts.append(("limit", f"{label} peak memory at C={config[2]}", ratio, TARGETS["large memory"]))


def verdict(entry: tuple) -> str:
    """A line per target: a head in the realistic case is **met** at ≤ 1.05× Linear, **at the distance floor** at
    ≤ 1.05× the distance floor of the same rounds (when that floor itself is above 1.05× Linear), **at its
    floor** at ≤ 1.05× the floor of its own formula (:data:`HEAD_FLOORS`: the normalised floors for IsoMax+ and
    DisMax), else MISSED; the worst case is printed for the record."""
    if entry[0] == "limit":  # ("limit", label, value, limit)
        _, label, value, limit = entry
        return f"- {label}: {value:.3f}× (≤ {limit}×) {'met' if value <= limit else 'MISSED'}"
    _, label, case, ratios, floors, own = entry  # ("head", label, case, {base: ratio}, {floor: vs Linear}, floor)
    limit = TARGETS["head"]
    text = (f"- {label}: {ratios['Linear']:.3f}× Linear, {ratios['floor']:.3f}× the floor, "
            f"{ratios['distance floor']:.3f}× the distance floor")
    if own != "distance floor":
        text += f", {ratios[own]:.3f}× the {own}"
    if case == "worst":  # every feature on a prototype: B pairs recomputed exactly, reported for the record
        return text + " (B pairs recomputed exactly; no target)"
    if ratios["Linear"] <= limit:
        state = "met"
    elif floors["distance floor"] > limit and ratios["distance floor"] <= limit:
        state = f"at the distance floor (distance floor {floors['distance floor']:.3f}× Linear)"
    elif ratios[own] <= limit:
        state = f"at its floor ({own} {floors[own]:.3f}× Linear)"
    else:
        state = "MISSED"
    return text + f" (≤ {limit}×) {state}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; no worst case at C=21841")
    parser.add_argument("--configs", nargs="+", default=None, help="B,D,C triples for the head table")
    parser.add_argument("--no-large", action="store_true", help="skip the 100k-class head + loss table")
    parser.add_argument("--no-heads", action="store_true", help="skip the head tables (only the 100k classes)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--profile", metavar="B,D,C", help="print where the time goes at this shape and exit")
    parser.add_argument("--split", metavar="B,D,C", help="time forward and backward apart at this shape and exit")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc thresholds as they are (by default they are fixed, as the dismax "
                             "command does: dismax_plugin/adapters/engine/_memory.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kept = False if args.system_malloc else keep_freed_memory()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else list(CONFIGS)
    if args.split:
        split_forward_backward(tuple(int(v) for v in args.split.split(",")))
        return 0
    if args.profile:
        config = tuple(int(v) for v in args.profile.split(","))
        steps = head_variants(*config, ("realistic",))
        profile_breakdown(config, {k.replace("|realistic", ""): v for k, v in steps.items()})
        return 0
    print(f"torch {torch.__version__}, 1 intra-op thread, process CPU time; "
          f"realistic = features independent of the prototypes, worst = every feature on a prototype; "
          f"{'freed memory kept in the process (fixed malloc thresholds)' if kept else 'system malloc thresholds'}.")
    verdicts: list = []
    for config in [] if args.no_heads else configs:
        small = config[2] <= 5000
        cases = ("realistic", "worst") if small or not args.quick else ("realistic",)
        report_heads(config, (7 if args.quick else 61) if small else (3 if args.quick else 9), cases, verdicts)
    if not args.no_large:
        report_large(LARGE, 3 if args.quick else 5, not args.no_memory, verdicts)
    print("\nTargets (≤ 1.05× Linear per head, or ≤ 1.05× the distance floor where that is above it, or ≤ 1.05× the "
          "floor of the head's own formula; 100k classes ≤ 1.10× time, ≤ 1.05× peak memory):")
    for entry in verdicts:
        print(verdict(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
