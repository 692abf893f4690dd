"""Expected calibration error and temperature calibration."""

import pytest
import torch
import torch.nn.functional as F

from dismax_plugin import calibrate_temperature, calibration_bins, expected_calibration_error


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_ece(logits, labels, n_bins):
    """Float64 transcription of the standard ECE (Guo et al. 2017): equal-width bins (lo, hi]."""
    probabilities = F.softmax(logits.double(), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    accuracy = (predicted == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.double().mean() * (confidence[in_bin].mean() - accuracy[in_bin].mean()).abs()
    return float(ece)


@pytest.mark.parametrize("n_bins", [1, 4, 15])
def test_calibration_bins_match_a_per_bin_transcription(n_bins):
    logits = torch.randn(300, 5, generator=gen(40)) * 2.0
    labels = torch.randint(0, 5, (300,), generator=gen(41))
    labels[:150] = logits[:150].argmax(dim=1)
    probabilities = F.softmax(logits.double(), dim=1)
    bins = calibration_bins(probabilities, labels, n_bins)
    confidence, predicted = probabilities.max(dim=1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    for m, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (confidence > lo) & (confidence <= hi)
        assert float(bins.count[m]) == float(in_bin.sum())
        if in_bin.any():
            assert abs(float(bins.confidence[m]) - float(confidence[in_bin].mean())) < 1e-12
            assert abs(float(bins.accuracy[m]) - float((predicted == labels)[in_bin].double().mean())) < 1e-12
        else:
            assert float(bins.confidence[m]) == float(bins.accuracy[m]) == 0.0
    # the ECE is the count-weighted gap of these very bins
    ece = float(((bins.confidence - bins.accuracy).abs() * bins.count).sum() / 300)
    assert abs(ece - expected_calibration_error(logits, labels, n_bins)) < 1e-12


@pytest.mark.parametrize("call, error, match", [
    (lambda: calibration_bins(torch.full((3, 2), 0.7), torch.tensor([0, 1, 0])), ValueError, "probabilities must"),
    (lambda: calibration_bins(torch.full((3, 2), 0.5), torch.tensor([0, 2, 0])), ValueError, "labels"),
    (lambda: calibration_bins(torch.full((3, 2), 0.5), torch.tensor([0, 1, 0]), 0), ValueError, "n_bins"),
    (lambda: calibration_bins(torch.full((3,), 0.5), torch.tensor([0, 1, 0])), ValueError, "probabilities"),
])
def test_bad_calibration_bins_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def sample(n, classes, true_temperature, seed):
    """Logits whose calibrated temperature is known: labels drawn from softmax(z), logits z * T."""
    z = torch.randn(n, classes, generator=gen(seed), dtype=torch.float64) * 2.0
    labels = torch.multinomial(F.softmax(z, dim=1), 1, generator=gen(seed + 1)).squeeze(1)
    return (z * true_temperature).float(), labels


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_float64_transcription(n_bins, seed):
    logits = torch.randn(500, 6, generator=gen(seed)) * 2.5
    labels = torch.randint(0, 6, (500,), generator=gen(seed + 10))
    labels[:250] = logits[:250].argmax(dim=1)  # mix of right and wrong predictions
    got = expected_calibration_error(logits, labels, n_bins=n_bins)
    assert isinstance(got, float) and 0.0 <= got <= 1.0
    assert got == pytest.approx(reference_ece(logits, labels, n_bins), abs=1e-12)


def test_ece_on_confidences_at_bin_edges():
    # Two classes with p = m/10 exactly representable edges: confidence 0.6 belongs to bin (0.5, 0.6].
    p = torch.tensor([0.6, 0.7, 0.75, 0.9, 1.0 - 1e-9], dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1)
    labels = torch.tensor([0, 1, 0, 0, 0])
    got = expected_calibration_error(logits, labels, n_bins=10)
    assert got == pytest.approx(reference_ece(logits, labels, 10), abs=1e-12)


def test_ece_of_perfectly_confident_correct_predictions_is_zero():
    logits = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
    assert expected_calibration_error(logits, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-12)
    # ... and of confidently wrong ones, one.
    assert expected_calibration_error(logits, torch.tensor([1, 0])) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_nll_calibration_recovers_a_known_temperature(true_temperature):
    logits, labels = sample(2500, 5, true_temperature, seed=2)
    temperature = calibrate_temperature(logits, labels, objective="nll")
    assert isinstance(temperature, float)
    assert temperature == pytest.approx(true_temperature, rel=0.15)
    before = F.cross_entropy(logits.double(), labels)
    after = F.cross_entropy(logits.double() / temperature, labels)
    assert after < before


@pytest.mark.parametrize("objective", ["ece", "nll"])
def test_calibration_reduces_the_objective_on_over_confident_logits(objective):
    logits, labels = sample(2000, 10, true_temperature=4.0, seed=3)
    temperature = calibrate_temperature(logits, labels, objective=objective)
    assert temperature > 1.5  # over-confident logits must be softened
    ece_before = expected_calibration_error(logits, labels)
    ece_after = expected_calibration_error(logits / temperature, labels)
    nll_before = float(F.cross_entropy(logits.double(), labels))
    nll_after = float(F.cross_entropy(logits.double() / temperature, labels))
    assert ece_after < 0.5 * ece_before
    assert nll_after < nll_before


def test_calibration_is_deterministic_and_respects_bounds():
    logits, labels = sample(1000, 4, true_temperature=50.0, seed=4)
    first = calibrate_temperature(logits, labels, objective="nll", bounds=(0.5, 8.0))
    assert first == calibrate_temperature(logits, labels, objective="nll", bounds=(0.5, 8.0))
    assert 0.5 <= first <= 8.0 and first == pytest.approx(8.0, rel=1e-6)


def test_calibration_of_a_calibrated_model_stays_near_one():
    logits, labels = sample(2500, 5, true_temperature=1.0, seed=5)
    assert calibrate_temperature(logits, labels, objective="nll") == pytest.approx(1.0, rel=0.15)


# ----------------------------------------------------------------------------------------------- bad input
LOGITS = torch.zeros(4, 3)
LABELS = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("call, error, argument", [
    (lambda: expected_calibration_error(LOGITS, LABELS, n_bins=0), ValueError, "n_bins"),
    (lambda: expected_calibration_error(LOGITS, LABELS, n_bins=2.5), TypeError, "n_bins"),
    (lambda: calibrate_temperature(LOGITS, LABELS, n_bins=0), ValueError, "n_bins"),
    (lambda: expected_calibration_error(LOGITS, torch.tensor([0, 1, 2])), ValueError,
     "labels has 3 entries but the batch has 4"),
    (lambda: calibrate_temperature(LOGITS, torch.tensor([0, 1, 2, 0, 1])), ValueError,
     "labels has 5 entries but the batch has 4"),
    (lambda: expected_calibration_error(LOGITS, torch.tensor([0, 1, 3, 0])), ValueError, "labels must be class"),
    (lambda: expected_calibration_error(LOGITS, torch.tensor([0, -1, 2, 0])), ValueError, "labels must be class"),
    (lambda: expected_calibration_error(LOGITS, LABELS.float()), TypeError, "labels"),
    (lambda: expected_calibration_error(torch.zeros(4), LABELS), ValueError, "logits must have shape"),
    (lambda: expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), ValueError,
     "logits must hold at least one sample"),
    (lambda: calibrate_temperature(LOGITS, LABELS, objective="brier"), ValueError, "objective"),
    (lambda: calibrate_temperature(LOGITS, LABELS, bounds=(2.0, 1.0)), ValueError, "bounds"),
    (lambda: calibrate_temperature(LOGITS, LABELS, bounds=(0.0, 1.0)), ValueError, "bounds"),
])
def test_bad_calibration_arguments(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


@pytest.mark.parametrize("objective", ["ece", "nll"])
def test_perfectly_separated_data_does_not_drive_the_temperature_to_the_bound(objective):
    # Every sample is classified correctly with a modest margin: both objectives keep falling as T -> 0.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    logits = 0.3 * torch.randn(200, 4, generator=generator)
    logits[torch.arange(200), labels] += 2.0
    assert bool((logits.argmax(1) == labels).all())
    temperature = calibrate_temperature(logits, labels, objective=objective)
    assert 0.05 < temperature < 1.0  # sharpened, yet well inside the default bounds (0.01, 100)
    assert expected_calibration_error(logits / temperature, labels) < 0.01
