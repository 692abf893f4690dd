"""OOD thresholds at in-distribution TPRs: threshold_at, the calibration scores in the head, is_ood at any
TPR and score (exact counts on the deployed path), and the state_dict round trip."""

import io
import math

import pytest
import torch

from dismax_plugin import (
    DEFAULT_TPRS,
    SCORE_NAMES,
    DisMaxHead,
    IsoMaxHead,
    IsoMaxPlusHead,
    compute_thresholds,
    flagged_count,
    score,
    threshold_at,
)


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


HEAD_CLASSES = [IsoMaxHead, IsoMaxPlusHead, DisMaxHead]


def calibrated_head(cls, seed, temperature, n=400, in_features=8, num_classes=4):
    """A random head in eval mode, at ``temperature``, calibrated on ``n`` random features; returns the
    head and the calibration logits (its deployed output)."""
    torch.manual_seed(seed)
    head = cls(in_features, num_classes).eval()
    if cls is IsoMaxHead:
        with torch.no_grad():
            head.weight.normal_()
    head.set_temperature(temperature)
    with torch.no_grad():
        logits = head(torch.randn(n, in_features, generator=gen(seed + 1)) * 2)
    head.calibrate_scores(logits)
    return head, logits


def test_threshold_at_is_the_order_statistic_of_flagged_count():
    ordered = torch.arange(100, dtype=torch.float64)
    assert flagged_count(100, 0.95) == 5 and threshold_at(ordered, 0.95) == 5.0
    assert flagged_count(100, 1.0) == 0 and threshold_at(ordered, 1.0) == 0.0
    assert flagged_count(3, 0.01) == 2  # never all of them
    assert threshold_at(torch.tensor([2.0]), 0.5) == 2.0
    with pytest.raises(ValueError, match="sorted"):
        threshold_at(torch.tensor([2.0, 1.0]), 0.5)


# Many random heads of every kind, T != 1, every score, any tpr: the deployed path (is_ood re-scoring the
# head's output) flags exactly floor(N (1 - tpr)) of the calibration images.
@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("seed", range(12))
def test_is_ood_flags_exactly_floor_n_one_minus_tpr_of_the_calibration_set(cls, seed):
    temperature = [0.031, 0.4, 3.3, 22.7][seed % 4]
    n = [100, 101, 257][seed % 3]
    head, logits = calibrated_head(cls, seed, temperature, n=n)
    assert head.calibration_size == n
    for name in SCORE_NAMES:
        stored = head.stored_scores(name)
        if stored.unique().numel() != n:
            continue  # ties: at most k flagged (checked below)
        for tpr in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0):
            flags = head.is_ood(logits, tpr=tpr, score=name)
            assert int(flags.sum()) == math.floor(n * (1 - tpr) + 1e-9), (name, tpr)


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_raising_the_tpr_flags_fewer_and_any_tpr_works(cls):
    head, logits = calibrated_head(cls, 3, 0.5)
    counts = [int(head.is_ood(logits, tpr=t).sum()) for t in (0.6, 0.7, 0.83, 0.9, 0.97, 0.99)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    thresholds = [head.threshold(t) for t in (0.6, 0.9, 0.99)]
    assert thresholds == sorted(thresholds, reverse=True)
    assert head.is_ood(logits).sum() == head.is_ood(logits, tpr=0.95).sum()


def test_the_score_argument_and_the_chosen_score():
    head, logits = calibrated_head(DisMaxHead, 5, 2.0)
    assert head.score == DisMaxHead.default_score
    torch.testing.assert_close(head.is_ood(logits, score="mds"), head.ood_score(logits, "mds") < head.threshold(
        0.95, "mds"))
    head.set_score("MMLES")
    assert head.score == "mmles"
    assert torch.equal(head.is_ood(logits), head.is_ood(logits, score="mmles"))
    torch.testing.assert_close(head.ood_score(logits), score(logits * 2.0, "mmles"))
    head.set_score(None)
    assert head.score == DisMaxHead.default_score


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_calibration_scores_round_trip_through_state_dict_into_a_fresh_head(cls):
    head, logits = calibrated_head(cls, 1, 1.7, n=64)
    head.set_score("es")
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(8, 4).eval()
    assert fresh.calibration_size == 0
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.calibration_size == 64 and fresh.score == "es"
    assert torch.equal(fresh.calibration_scores, head.calibration_scores)
    for tpr in DEFAULT_TPRS:
        assert torch.equal(fresh.is_ood(logits, tpr=tpr), head.is_ood(logits, tpr=tpr))
    # Inside a model, under a prefix, too; and into a head calibrated on another number of images.
    other, _ = calibrated_head(cls, 2, 1.0, n=7)
    model, fresh_model = torch.nn.Sequential(head), torch.nn.Sequential(other)
    fresh_model.load_state_dict(model.state_dict())
    assert torch.equal(fresh_model[0].calibration_scores, head.calibration_scores)


def test_clear_calibration():
    head, logits = calibrated_head(DisMaxHead, 4, 1.0)
    head.clear_calibration()
    assert head.calibration_size == 0
    with pytest.raises(RuntimeError, match="no calibration scores"):
        head.is_ood(logits)


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


@pytest.mark.parametrize("call, error, match", [
    (lambda h, z: h.is_ood(z, tpr=0.0), ValueError, "tpr must be a number in"),
    (lambda h, z: h.is_ood(z, tpr=2.0), ValueError, "tpr must be a number in"),
    (lambda h, z: h.is_ood(z, score="energy"), ValueError, "score"),
    (lambda h, z: h.threshold(0.9, score="energy"), ValueError, "score"),
    (lambda h, z: h.set_score("energy"), ValueError, "score"),
    (lambda h, z: h.calibrate_scores(z[:, :2]), ValueError, r"\[N, 4\]"),
    (lambda h, z: h.calibrate_scores(z[:0]), ValueError, "N >= 1"),
    (lambda h, z: h.calibrate_scores(torch.full_like(z, float("nan"))), ValueError, "finite"),
])
def test_bad_calibration_arguments(call, error, match):
    head, logits = calibrated_head(DisMaxHead, 6, 1.0, n=20)
    with pytest.raises(error, match=match):
        call(head, logits)
