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
    assert set(head_cost.FLOORS) == {"floor", "distance floor"}
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, dtype=torch.float64)
    out = head_cost.FLOORS[name].apply(x, w)
    product = x.detach() @ w.detach().t()
    torch.testing.assert_close(out, product if name == "floor" else product.abs())
    out.backward(g)
    h = g if name == "floor" else g / out.detach()
    torch.testing.assert_close(x.grad, h.sum(1, keepdim=True) * x.detach() + h @ w.detach())
    torch.testing.assert_close(w.grad, h.sum(0).unsqueeze(1) * w.detach() + h.t() @ x.detach())


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
    assert ("| head | realistic vs Linear | realistic vs floor | realistic vs distance floor | worst vs Linear | "
            "worst vs floor | worst vs distance floor |") in out
    for name in ("IsoMax", "IsoMax+", "DisMax"):
        line = next(line for line in out.splitlines() if line.startswith(f"- {name} realistic at C=10: "))
        assert "× the distance floor (≤ 1.05×) " in line
        assert line.endswith((" met", " MISSED")) or " at the floor (distance floor " in line
        assert f"- {name} worst at C=10: " in out and "no target" in out


def test_system_malloc_is_reported(head_cost, capsys):
    assert head_cost.main(["--configs", "8,16,10", "--no-large", "--quick", "--system-malloc"]) == 0
    assert "system malloc thresholds" in capsys.readouterr().out


def test_split_times_forward_and_backward_against_the_floor(head_cost, capsys):
    assert head_cost.main(["--split", "8,16,10"]) == 0
    out = capsys.readouterr().out
    assert "| floor | " in out and "| 1.000× |" in out
    for name in ("distance floor", "Linear", "IsoMax", "IsoMax+", "DisMax"):
        assert f"| {name} | " in out
