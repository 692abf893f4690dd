"""OOD thresholds at in-distribution TPRs, storage in the head, is_ood and the state_dict round trip."""

import io
import math

import pytest
import torch

from dismax_plugin import DEFAULT_TPRS, DisMaxHead, IsoMaxHead, IsoMaxPlusHead, compute_thresholds, score


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_default_tprs():
    assert DEFAULT_TPRS == (0.90, 0.95, 0.99)


@pytest.mark.parametrize("n", [1, 7, 100, 1001])
@pytest.mark.parametrize("ties", [False, True])
def test_at_least_tpr_of_id_scores_pass_and_the_threshold_is_exact(n, ties):
    scores = torch.randn(n, generator=gen(n))
    if ties:
        scores = scores.round()
    thresholds = compute_thresholds(scores)
    assert set(thresholds) == set(DEFAULT_TPRS)
    for tpr, threshold in thresholds.items():
        assert isinstance(threshold, float) and threshold in scores.double().tolist()
        kept = int((scores.double() >= threshold).sum())
        assert kept >= tpr * n
        if not ties:  # exactly floor(n * (1 - tpr)) samples flagged: one more kept would be one too many
            assert n - kept == math.floor(n * (1 - tpr) + 1e-9)
        # the next larger sample value would keep fewer than tpr
        larger = scores.double()[scores.double() > threshold]
        if larger.numel():
            assert int((scores.double() >= larger.min()).sum()) < tpr * n


def test_tpr_095_on_100_distinct_scores_flags_exactly_5():
    scores = torch.randperm(100, generator=gen(0)).double() / 7.0
    threshold = compute_thresholds(scores, tprs=(0.95,))[0.95]
    assert threshold == 5 / 7.0  # the 6th smallest value
    assert int((scores < threshold).sum()) == 5


def test_thresholds_decrease_with_the_tpr():
    scores = torch.rand(500, generator=gen(1), dtype=torch.float64)
    thresholds = compute_thresholds(scores, tprs=(0.5, 0.9, 0.95, 0.99, 1.0))
    values = [thresholds[t] for t in (0.5, 0.9, 0.95, 0.99, 1.0)]
    assert values == sorted(values, reverse=True)
    assert thresholds[1.0] == float(scores.min())


def test_accepts_lists_and_integer_scores():
    assert compute_thresholds([3.0, 1.0, 2.0, 4.0], tprs=(0.5,)) == {0.5: 3.0}  # keeps 3 and 4
    assert compute_thresholds(torch.tensor([3, 1, 2, 4]), tprs=(1.0,)) == {1.0: 1.0}


@pytest.mark.parametrize("cls", [IsoMaxHead, IsoMaxPlusHead, DisMaxHead])
def test_set_thresholds_and_is_ood(cls):
    torch.manual_seed(0)
    head = cls(8, 4)
    id_logits = head(torch.randn(400, 8, generator=gen(2))).detach()
    id_scores = head.ood_score(id_logits)
    head.set_thresholds(compute_thresholds(id_scores))
    assert head.stored_score == cls.default_score
    for tpr in DEFAULT_TPRS:
        flags = head.is_ood(id_logits, tpr=tpr)
        assert flags.dtype == torch.bool and flags.shape == (400,)
        assert float((~flags).double().mean()) >= tpr
        torch.testing.assert_close(flags, id_scores < head.stored_thresholds[tpr])
    assert head.is_ood(id_logits).sum() == head.is_ood(id_logits, tpr=0.95).sum()


def test_thresholds_for_another_score():
    head = DisMaxHead(8, 4)
    logits = torch.randn(50, 4, generator=gen(3))
    head.set_thresholds(compute_thresholds(score(logits, "mps"), tprs=(0.8,)), score_name="MPS")
    assert head.stored_score == "mps"
    torch.testing.assert_close(head.is_ood(logits, tpr=0.8), score(logits, "mps") < head.stored_thresholds[0.8])


@pytest.mark.parametrize("cls", [IsoMaxHead, IsoMaxPlusHead, DisMaxHead])
def test_thresholds_round_trip_through_state_dict_into_a_fresh_head(cls):
    torch.manual_seed(1)
    head = cls(8, 4)
    logits = head(torch.randn(64, 8, generator=gen(4))).detach()
    head.set_thresholds(compute_thresholds(head.ood_score(logits)))
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(8, 4)
    assert fresh.stored_score is None
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.stored_score == head.stored_score and fresh.stored_thresholds == head.stored_thresholds
    for tpr in DEFAULT_TPRS:
        assert torch.equal(fresh.is_ood(logits, tpr=tpr), head.is_ood(logits, tpr=tpr))
    # Inside a model, under a prefix, too.
    model, fresh_model = torch.nn.Sequential(head), torch.nn.Sequential(cls(8, 4))
    fresh_model.load_state_dict(model.state_dict())
    assert fresh_model[0].stored_thresholds == head.stored_thresholds


def test_clear_thresholds():
    head = DisMaxHead(4, 3)
    head.set_thresholds({0.95: -1.0})
    head.clear_thresholds()
    assert head.stored_score is None and head.stored_thresholds == {}
    with pytest.raises(RuntimeError, match="No OOD thresholds"):
        head.is_ood(torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, error, argument", [
    (lambda: compute_thresholds(torch.tensor([])), ValueError, "id_scores"),
    (lambda: compute_thresholds(torch.zeros(3, 2)), ValueError, "id_scores"),
    (lambda: compute_thresholds(torch.tensor([0.0, float("nan")])), ValueError, "id_scores must be finite"),
    (lambda: compute_thresholds(torch.zeros(3), tprs=(0.0,)), ValueError, "tpr"),
    (lambda: compute_thresholds(torch.zeros(3), tprs=(1.5,)), ValueError, "tpr"),
    (lambda: compute_thresholds(torch.zeros(3), tprs=("0.9",)), ValueError, "tpr"),
    (lambda: compute_thresholds(torch.zeros(3), tprs=()), ValueError, "tprs"),
])
def test_bad_threshold_arguments(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


@pytest.mark.parametrize("tpr, error, match", [
    (0.5, ValueError, r"tpr=0.5 has no stored threshold; stored tprs: \[0.9, 0.95\]"),
    (2.0, ValueError, "tpr must be a number in"),
])
def test_is_ood_with_an_unstored_tpr(tpr, error, match):
    head = DisMaxHead(4, 3)
    head.set_thresholds({0.9: -1.0, 0.95: -2.0})
    with pytest.raises(error, match=match):
        head.is_ood(torch.zeros(2, 3), tpr=tpr)
