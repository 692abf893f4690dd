"""benchmarks/head_cost.py: its floor step computes what it claims, and a tiny run prints the tables and verdicts."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def head_cost(load_benchmark):
    """benchmarks/head_cost.py imported in this process (benchmarks/ is not a package)."""
    return load_benchmark("head_cost")


def test_floor_step_has_linears_output_and_the_documented_gradients(head_cost):
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, dtype=torch.float64)
    out = head_cost.FloorStep.apply(x, w)
    torch.testing.assert_close(out, x.detach() @ w.detach().t())
    out.backward(g)
    torch.testing.assert_close(x.grad, g.sum(1, keepdim=True) * x.detach() + g @ w.detach())
    torch.testing.assert_close(w.grad, g.sum(0).unsqueeze(1) * w.detach() + g.t() @ x.detach())


def test_distance_floor_step_divides_the_upstream_gradient_by_its_output(head_cost):
    torch.manual_seed(1)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, dtype=torch.float64)
    out = head_cost.DistanceFloorStep.apply(x, w)
    torch.testing.assert_close(out, (x.detach() @ w.detach().t()).abs())
    out.backward(g)
    h = g / out.detach()
    torch.testing.assert_close(x.grad, h.sum(1, keepdim=True) * x.detach() + h @ w.detach())
    torch.testing.assert_close(w.grad, h.sum(0).unsqueeze(1) * w.detach() + h.t() @ x.detach())
    assert head_cost.FLOORS == {"floor": head_cost.FloorStep, "distance floor": head_cost.DistanceFloorStep}


def test_freed_memory_is_kept_on_glibc(head_cost):
    import platform

    applied = head_cost.keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


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


def test_system_malloc_leaves_the_thresholds(head_cost, capsys):
    assert head_cost.main(["--configs", "8,16,10", "--no-large", "--quick", "--system-malloc"]) == 0
    assert "system malloc thresholds" in capsys.readouterr().out


def test_split_times_forward_and_backward_against_the_floor(head_cost, capsys):
    assert head_cost.main(["--split", "8,16,10"]) == 0
    out = capsys.readouterr().out
    assert "| floor | " in out and "| 1.000× |" in out
    for name in ("distance floor", "Linear", "IsoMax", "IsoMax+", "DisMax"):
        assert f"| {name} | " in out
