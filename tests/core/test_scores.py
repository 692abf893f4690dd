"""Native OOD scores: float64 transcriptions, sign, extreme logits in every float dtype, name dispatch."""

import pytest
import torch

from dismax_plugin import SCORE_NAMES, score, scores
from dismax_plugin.scores import SCORES, ood_score

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def softmax64(z):
    z = z.double()
    e = (z - z.max(dim=1, keepdim=True).values).exp()
    return e / e.sum(dim=1, keepdim=True)


def negative_entropy64(z):
    p = softmax64(z)
    return torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=1)


REFERENCE = {  # the papers' definitions, in float64
    "mps": lambda z: softmax64(z).max(dim=1).values,
    "es": negative_entropy64,
    "mds": lambda z: z.double().max(dim=1).values,
    "mmls": lambda z: z.double().max(dim=1).values + z.double().mean(dim=1),
    "mmles": lambda z: z.double().max(dim=1).values + z.double().mean(dim=1) + negative_entropy64(z),
    "mmleps": lambda z: (z.double().max(dim=1).values + z.double().mean(dim=1) + negative_entropy64(z)
                         + softmax64(z).max(dim=1).values),
}


def test_score_names():
    assert SCORE_NAMES == ("mps", "es", "mds", "mmls", "mmles", "mmleps")
    assert set(SCORES) == set(REFERENCE)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_scores_match_float64_transcription(name):
    logits = torch.randn(20, 7, generator=torch.Generator().manual_seed(0)) * 3 - 2
    got = getattr(scores, name)(logits)
    assert got.shape == (20,)
    torch.testing.assert_close(got, REFERENCE[name](logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(score(logits, name), got)
    torch.testing.assert_close(score(logits, name.upper()), got)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_scores_are_larger_for_confident_logits(name):
    confident = torch.tensor([[-0.1, -3.0, -3.0, -3.0]])
    flat = torch.tensor([[-1.5, -1.6, -1.5, -1.6]])
    assert float(score(confident, name)) > float(score(flat, name))


def test_known_values():
    uniform = torch.zeros(2, 4)
    torch.testing.assert_close(scores.mps(uniform), torch.full((2,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(scores.es(uniform), torch.full((2,), -torch.log(torch.tensor(4.0)).item(),
                                                             dtype=torch.float64))
    logits = torch.tensor([[-1.0, -2.0, -6.0]])
    assert float(scores.mds(logits)) == -1.0
    assert float(scores.mmls(logits)) == -1.0 - 3.0


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_give_finite_scores(name, dtype):
    big = torch.finfo(dtype).max
    rows = [
        [0.0, -1e4, -1e4],            # huge gap
        [0.0, -0.99 * big, -0.99 * big],  # gap near the dtype's max
        [0.99 * big, 0.99 * big, -0.99 * big],
        [-0.99 * big, -0.99 * big, -0.99 * big],
        [0.99 * big, 0.0, 0.0],
    ]
    logits = torch.tensor(rows, dtype=dtype)
    assert torch.isfinite(logits).all()
    got = score(logits, name)
    assert got.shape == (5,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, REFERENCE[name](logits), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_gap_entropy_is_zero_and_mps_is_one(dtype):
    logits = torch.tensor([[0.0, -30000.0, -30000.0]], dtype=dtype)
    assert float(scores.es(logits)) == 0.0
    assert float(scores.mps(logits)) == 1.0


def test_scores_do_not_track_gradients_and_do_not_modify_logits():
    logits = torch.randn(3, 4, requires_grad=True)
    before = logits.detach().clone()
    for name in SCORE_NAMES:
        out = score(logits, name)
        assert not out.requires_grad
    assert torch.equal(logits.detach(), before)


def test_empty_batch():
    assert score(torch.zeros(0, 3), "mmles").shape == (0,)


# ----------------------------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("temperature", [0.03, 1.0, 7.5, torch.tensor(0.2), torch.tensor(0.2, dtype=torch.float64)])
def test_ood_score_undoes_the_temperature(name, temperature):
    raw = torch.randn(30, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 3
    calibrated = raw / temperature
    got = ood_score(calibrated.float(), temperature, name)
    assert got.dtype == torch.float64 and got.shape == (30,)
    torch.testing.assert_close(got, REFERENCE[name](raw.float()), rtol=1e-6, atol=1e-6)


def test_scoring_calibrated_logits_directly_would_lose_the_ranking():
    # Why ood_score exists: at T = 0.03 the max probability of calibrated logits saturates at 1.
    raw = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.8, -3.0], [-1.0, -1.6, -3.0]], dtype=torch.float64)
    assert float(scores.mps(raw / 0.03).max() - scores.mps(raw / 0.03).min()) < 1e-6
    ranked = ood_score(raw / 0.03, 0.03, "mps")
    assert ranked[0] > ranked[1] > ranked[2]


@pytest.mark.parametrize("temperature, error, match", [
    (0.0, ValueError, "temperature"),
    (-1.0, ValueError, "temperature"),
    (float("inf"), ValueError, "temperature"),
    ("1", TypeError, "temperature"),
    (torch.ones(2), ValueError, "temperature must be a number or a 0-d tensor"),
])
def test_bad_temperature(temperature, error, match):
    with pytest.raises(error, match=match):
        ood_score(torch.zeros(2, 3), temperature, "mps")


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_score_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="score") as info:
        score(torch.zeros(2, 3), "energy")
    for name in SCORE_NAMES:
        assert f"'{name}'" in str(info.value)


@pytest.mark.parametrize("logits, name, error, argument", [
    (torch.zeros(2, 3), 3, TypeError, "score must be a string"),
    (torch.zeros(3), "mps", ValueError, r"logits must have shape \[B, C\]"),
    (torch.zeros(2, 1), "mds", ValueError, "logits must have shape .*C >= 2"),
    (torch.zeros(2, 3, dtype=torch.long), "es", TypeError, "logits must be a floating-point"),
    ([[0.0, 1.0]], "mps", TypeError, "logits must be a torch.Tensor"),
])
def test_bad_score_arguments(logits, name, error, argument):
    with pytest.raises(error, match=argument):
        score(logits, name)
