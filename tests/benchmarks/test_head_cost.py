"""benchmarks/head_cost.py: its floor step computes what it claims, and a tiny run prints the tables and verdicts."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def head_cost(load_benchmark):
    """benchmarks/head_cost.py imported in this process (benchmarks/ is not a package)."""
    return load_benchmark("head_cost")


@pytest.mark.parametrize("name", ["floor", "distance floor"])
def test_floor_steps_have_the_documented_outputs_and_gradients(head_cost, name):
    # floor: Linear's output; distance floor: its absolute value, and H = g / out in place of g backward
    assert set(head_cost.FLOORS) == {"floor", "distance floor", "normalised floor", "normalised floor + mean"}
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, dtype=torch.float64)
    out = head_cost.FLOORS[name](x, w)
    product = x.detach() @ w.detach().t()
    torch.testing.assert_close(out, product if name == "floor" else product.abs())
    out.backward(g)
    h = g if name == "floor" else g / out.detach()
    torch.testing.assert_close(x.grad, h.sum(1, keepdim=True) * x.detach() + h @ w.detach())
    torch.testing.assert_close(w.grad, h.sum(0).unsqueeze(1) * w.detach() + h.t() @ x.detach())


@pytest.mark.parametrize("classes", [3, 40])  # 40 >= 3 D: the tangent projection for the rows, as the heads
@pytest.mark.parametrize("add_mean", [False, True])
def test_normalised_floors_are_the_heads_formula_with_its_gradients(head_cost, add_mean, classes):
    # the normalised floors compute what the heads compute (before their scale): u = |x^ - p^| [+ rowmean u]
    name = "normalised floor + mean" if add_mean else "normalised floor"
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(classes, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, classes, dtype=torch.float64)
    out = head_cost.FLOORS[name](x, w)
    out.backward(g)
    grads = x.grad, w.grad
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    u = torch.cdist(torch.nn.functional.normalize(xr, dim=1), torch.nn.functional.normalize(wr, dim=1))
    ref = u + u.mean(dim=1, keepdim=True) if add_mean else u
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, (xr.grad, wr.grad))
    assert head_cost.HEAD_FLOORS == {"IsoMax": "distance floor", "IsoMax+": "normalised floor",
                                     "DisMax": "normalised floor + mean"}


def test_the_verdict_names_the_strictest_floor_met(head_cost):
    floors = {"floor": 1.08, "distance floor": 1.09, "normalised floor": 1.13, "normalised floor + mean": 1.14}

    def line(linear, distance, own):
        ratios = {"Linear": linear, "floor": linear / 1.08, "distance floor": distance, "normalised floor": own}
        return head_cost.verdict(("head", "IsoMax+ realistic at C=1000", "realistic", ratios, floors,
                                  "normalised floor"))

    assert line(1.04, 0.95, 0.92).endswith(" met")
    assert line(1.13, 1.04, 1.00).endswith(" at the distance floor (distance floor 1.090× Linear)")
    assert line(1.16, 1.06, 1.02).endswith(" at its floor (normalised floor 1.130× Linear)")
    assert line(1.20, 1.10, 1.06).endswith(" MISSED")
    assert "1.020× the normalised floor" in line(1.16, 1.06, 1.02)


def test_every_head_shares_linears_weight(head_cost):
    linear, heads = head_cost.build(16, 10)
    assert set(heads) == {"IsoMax", "IsoMax+", "DisMax"}
    for head in heads.values():
        assert head.training and getattr(head, head_cost._weight_name(head)) is linear.weight


def test_a_tiny_run_prints_floor_heads_and_verdicts(head_cost, capsys):
    assert head_cost.main(["--configs", "8,16,10", "--no-large", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "floor (Linear's 3 products" in out and "distance floor (the floor plus" in out
    assert "freed memory kept in the process" in out
    assert "normalised floor (the normalised formula in the fewest eager operations" in out
    assert "normalised floor + mean (the normalised formula with the row mean" in out
    assert ("| head | realistic vs Linear | realistic vs floor | realistic vs distance floor | "
            "realistic vs its floor | worst vs Linear | worst vs floor | worst vs distance floor | "
            "worst vs its floor |") in out
    for name in ("IsoMax", "IsoMax+", "DisMax"):
        line = next(line for line in out.splitlines() if line.startswith(f"- {name} realistic at C=10: "))
        assert "× the distance floor" in line and " (≤ 1.05×) " in line
        assert ("× the normalised floor" in line) == (name != "IsoMax")
        assert line.endswith((" met", " MISSED")) or " at the distance floor (distance floor " in line \
            or " at its floor (" in line
        assert f"- {name} worst at C=10: " in out and "no target" in out


def test_system_malloc_is_reported(head_cost, capsys):
    assert head_cost.main(["--configs", "8,16,10", "--no-large", "--quick", "--system-malloc"]) == 0
    assert "system malloc thresholds" in capsys.readouterr().out


def test_split_times_forward_and_backward_against_the_floor(head_cost, capsys):
    assert head_cost.main(["--split", "8,16,10"]) == 0
    out = capsys.readouterr().out
    assert "| floor | " in out and "| 1.000× |" in out
    for name in ("distance floor", "normalised floor", "normalised floor + mean", "Linear", "IsoMax", "IsoMax+",
                 "DisMax"):
        assert f"| {name} | " in out
