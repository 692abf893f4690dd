"""Isotropic heads: formulas vs float64 transcriptions, parameters, buffers, state_dict, AMP, bad input."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from dismax_plugin import (
    ENTROPIC_SCALE,
    HEADS,
    SCORE_NAMES,
    DisMaxHead,
    DisMaxLoss,
    IsoMaxHead,
    IsoMaxLoss,
    IsoMaxPlusHead,
    PrototypeHead,
    calibrate_temperature,
    create_head,
    dismax_loss,
    expected_calibration_error,
    fpr_mix,
    scores,
)

HEAD_CLASSES = [IsoMaxHead, IsoMaxPlusHead, DisMaxHead]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_logits(head, features):
    """Float64 transcription of the papers' formulas (explicit differences, F.normalize)."""
    f = features.detach().double()
    p = head.weight.detach().double()
    t = float(head.temperature)
    if isinstance(head, IsoMaxPlusHead):
        s = abs(float(head.distance_scale.detach()))
        d = (F.normalize(f)[:, None, :] - F.normalize(p)[None, :, :]).norm(dim=-1)
        if isinstance(head, DisMaxHead):
            d = s * d / math.sqrt(2.0)
            return -(d + d.mean(dim=1, keepdim=True)) / t
        return -s * d / t
    return -(f[:, None, :] - p[None, :, :]).norm(dim=-1) / t


def make_head(cls, in_features=24, num_classes=7, seed=0, dtype=torch.float32):
    """A head with random prototypes, in eval mode (its output: the calibrated logits z / T)."""
    torch.manual_seed(seed)
    head = cls(in_features, num_classes, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(randn(num_classes, in_features, seed=seed + 1, dtype=dtype))
        if isinstance(head, IsoMaxPlusHead):
            head.distance_scale.fill_(-2.5)  # the sign must not matter: |s|
    return head.eval()


# ----------------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_logits_match_float64_transcription(cls, temperature):
    head = make_head(cls)
    head.set_temperature(temperature)
    features = randn(33, 24, seed=2)
    logits = head(features)
    assert logits.shape == (33, 7) and logits.dtype == torch.float32
    want = reference_logits(head, features)
    assert (logits.double() - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(head(features), logits.detach())


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_float64_head_matches_transcription_tightly(cls):
    head = make_head(cls, dtype=torch.float64)
    features = randn(9, 24, seed=3, dtype=torch.float64)
    torch.testing.assert_close(head(features), reference_logits(head, features), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_logits_are_non_positive_and_largest_at_the_nearest_prototype(cls):
    head = make_head(cls)
    features = head.weight.detach()[[4, 1, 6]] * 3.0  # same direction as prototypes 4, 1, 6
    if cls is IsoMaxHead:
        features = head.weight.detach()[[4, 1, 6]] + 0.01
    logits = head(features)
    assert logits.argmax(dim=1).tolist() == [4, 1, 6]
    assert (logits <= 1e-6).all()


def test_dismax_logits_are_distance_plus_mean_distance():
    head = make_head(DisMaxHead)
    features = randn(5, 24, seed=4)
    d = head.scaled_distances(features) / math.sqrt(2.0)
    torch.testing.assert_close(head(features), -(d + d.mean(dim=1, keepdim=True)))


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_gradients_reach_features_prototypes_and_scale(cls):
    head = make_head(cls).train()
    features = randn(10, 24, seed=5).requires_grad_(True)
    loss = dismax_loss(head(features), torch.arange(10) % 7)
    loss.backward()
    params = dict(head.named_parameters())
    assert set(params) == ({"weight", "distance_scale"} if cls is not IsoMaxHead else {"weight"})
    for tensor in [features, *params.values()]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_finite_gradient_when_a_feature_sits_on_a_prototype(cls):
    head = make_head(cls)
    features = head.weight.detach()[:3].clone().requires_grad_(True)
    logits = head(features)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(head.weight.grad).all()


# ----------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_attributes_and_initialisation(cls):
    torch.manual_seed(0)
    head = cls(200, 60)
    assert (head.in_features, head.num_classes) == (200, 60)
    assert isinstance(head, PrototypeHead) and head.weight.shape == (60, 200)
    assert isinstance(head.weight, torch.nn.Parameter)
    if cls is IsoMaxHead:
        assert torch.count_nonzero(head.weight) == 0
        assert not hasattr(head, "distance_scale")
    else:  # N(0, 1): 12 000 draws
        p = head.weight.detach()
        assert abs(float(p.mean())) < 0.05 and abs(float(p.std()) - 1.0) < 0.05
        assert isinstance(head.distance_scale, torch.nn.Parameter) and head.distance_scale.tolist() == [1.0]
    buffers = dict(head.named_buffers())
    assert float(buffers["temperature"]) == 1.0 and "temperature" not in dict(head.named_parameters())
    assert buffers["calibration_scores"].shape == (len(SCORE_NAMES), 0) and head.calibration_size == 0
    assert head.score == cls.default_score and int(buffers["score_index"]) == -1
    assert head.entropic_scale == ENTROPIC_SCALE == 10.0 and head.training  # nn.Module's default mode


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_device_and_dtype_are_honoured(cls):
    head = cls(6, 3, device="meta", dtype=torch.float64)
    for name, tensor in [*head.named_parameters(), *head.named_buffers()]:
        assert tensor.device.type == "meta", name
    assert head.weight.dtype == torch.float64 and head.temperature.dtype == torch.float64
    cpu = cls(6, 3, dtype=torch.float64)
    assert cpu(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64
    materialised = head.to_empty(device="cpu")  # meta-device initialisation flow
    scores_buffer = materialised.calibration_scores
    assert scores_buffer.device.type == "cpu" and scores_buffer.dtype == torch.float64


def test_isomax_zero_init_gives_uniform_logits_and_can_learn():
    head = IsoMaxHead(5, 4)
    features = randn(3, 5, seed=6)
    logits = head(features)  # training mode: E z
    torch.testing.assert_close(logits, -10.0 * features.norm(dim=1, keepdim=True).expand(3, 4))
    dismax_loss(logits, torch.tensor([0, 1, 2])).backward()
    assert head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_temperature_divides_the_logits(cls):
    head = make_head(cls)
    features = randn(4, 24, seed=7)
    base = head(features).detach()
    head.set_temperature(4.0)
    torch.testing.assert_close(head(features), base / 4.0)
    torch.testing.assert_close(head.distance_logits(features), base)
    assert "temperature=4" in repr(head)


# The defaults chosen by benchmarks/digits_quality.py's rule (README "OOD quality on the digits benchmark").
@pytest.mark.parametrize("name, cls, default_score", [
    ("isomax", IsoMaxHead, "mps"), ("isomaxplus", IsoMaxPlusHead, "mps"), ("dismax", DisMaxHead, "mps")])
def test_registry_and_default_scores(name, cls, default_score):
    assert HEADS[name] is cls and cls.default_score == default_score
    head = create_head(name.upper(), 4, 3)
    assert type(head) is cls
    logits = randn(5, 3, seed=8)
    torch.testing.assert_close(head.ood_score(logits), getattr(scores, default_score)(logits))
    torch.testing.assert_close(head.ood_score(logits, "mps"), scores.mps(logits))


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_ood_scores_rankings_and_flags_do_not_depend_on_the_temperature(cls):
    head = make_head(cls, in_features=16, num_classes=4)
    val, test = randn(200, 16, seed=20), randn(300, 16, seed=21) * 3
    with torch.no_grad():
        head.calibrate_scores(head(val))
        at_one = {name: head.ood_score(head(test), name) for name in SCORE_NAMES}
        flags = head.is_ood(head(test))
        for temperature in (0.03, 0.4, 25.0):  # ECE calibration on ~100% accurate data drives T towards 0
            head.set_temperature(temperature)
            head.calibrate_scores(head(val))
            calibrated = head(test)
            for name in SCORE_NAMES:
                got = head.ood_score(calibrated, name)
                torch.testing.assert_close(got, at_one[name], rtol=1e-5, atol=1e-6)
            # the same decisions, up to a sample within a rounding error of the threshold
            assert int((head.is_ood(calibrated) != flags).sum()) <= 1
        # Scoring the calibrated logits directly would rank the inputs differently (MPS saturates at T = 0.03).
        head.set_temperature(0.03)
        assert not torch.equal(scores.mps(head(test)).argsort(), at_one["mps"].argsort())


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_probabilities_of_the_output_stay_calibrated(cls):
    head = make_head(cls, in_features=16, num_classes=4)
    features = randn(400, 16, seed=22)
    with torch.no_grad():
        raw = head(features)
        # labels: the nearest prototype, with 30% flipped, so that T = 1 is over-confident
        labels = raw.argmax(dim=1)
        flip = torch.rand(400, generator=torch.Generator().manual_seed(23)) < 0.3
        labels[flip] = (labels[flip] + 1) % 4
        temperature = calibrate_temperature(raw, labels, objective="nll")
        head.set_temperature(temperature)
        calibrated = head(features)
    torch.testing.assert_close(calibrated.softmax(dim=1), (raw / temperature).softmax(dim=1))
    before, after = expected_calibration_error(raw, labels), expected_calibration_error(calibrated, labels)
    assert temperature != 1.0 and after < before
    assert F.cross_entropy(calibrated, labels) < F.cross_entropy(raw, labels)


@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_and_tiny_feature_rows_in_half_precision(cls, dtype):
    # float16 used to floor the norm at 1e-12 (= 0 in float16): NaN hidden as distance 0, NaN gradients.
    head = make_head(cls, in_features=8, num_classes=3).to(dtype)
    features = randn(4, 8, seed=24).to(dtype)
    features[0] = 0.0
    features[1] = 1e-3 * features[1]
    features.requires_grad_(True)
    logits = head(features)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    f, p = features.detach().double(), head.weight.detach().double()
    eps = 2.0**-8 if dtype == torch.float16 else 1e-12  # the documented normalisation floors
    if cls is IsoMaxHead:
        want = -(f[:, None] - p[None]).norm(dim=-1)
    else:
        d = (F.normalize(f, eps=eps)[:, None] - F.normalize(p, eps=eps)[None]).norm(dim=-1)
        s = abs(float(head.distance_scale.detach().double()))
        want = -s * d if cls is IsoMaxPlusHead else -(s * d + (s * d).mean(dim=1, keepdim=True)) / math.sqrt(2.0)
    torch.testing.assert_close(logits.double(), want, rtol=2e-2, atol=2e-2)
    dismax_loss(logits, torch.tensor([0, 1, 2, 0])).backward()
    for tensor in (features, *head.parameters()):
        assert torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_extra_repr_is_readable(cls):
    head = make_head(cls)
    text = repr(head)
    assert text.startswith(cls.__name__ + "(") and "in_features=24, num_classes=7" in text
    if cls is not IsoMaxHead:
        assert "distance_scale=2.5" in text
    head.calibrate_scores(head(randn(5, 24)))
    assert f"score='{cls.default_score}', calibration_size=5" in repr(head)
    assert "entropic_scale" not in text and "entropic_scale=3" in repr(cls(4, 3, entropic_scale=3.0))


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_pre_logits_returns_the_features(cls):
    head = make_head(cls)
    features = randn(2, 24)
    assert head(features, pre_logits=True) is features


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_reset_changes_the_class_count_and_clears_the_calibration(cls):
    head = make_head(cls)
    head.calibrate_scores(head(randn(5, 24)))
    head.reset(11)
    assert head.num_classes == 11 and head.weight.shape == (11, 24) and head.calibration_size == 0
    assert head(randn(3, 24)).shape == (3, 11)
    if cls is not IsoMaxHead:
        assert head.distance_scale.tolist() == [1.0]  # a fresh head: the scale is re-initialised too


# ----------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_state_dict_round_trip_into_a_fresh_head(cls):
    head = make_head(cls)
    head.set_temperature(1.3)
    head.calibrate_scores(head(randn(11, 24, seed=3)))
    head.set_score("mds")
    expected_keys = {"weight", "temperature", "calibration_scores", "score_index"}
    if cls is not IsoMaxHead:
        expected_keys.add("distance_scale")
    state = head.state_dict()
    assert set(state) == expected_keys
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = cls(24, 7).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    features = randn(6, 24, seed=9)
    torch.testing.assert_close(fresh(features), head(features))
    assert float(fresh.temperature) == pytest.approx(1.3) and fresh.score == "mds"
    logits = head(features)
    assert torch.equal(fresh.is_ood(logits, tpr=0.9), head.is_ood(logits, tpr=0.9))


@pytest.mark.parametrize("cls", HEAD_CLASSES)
def test_state_dicts_of_the_earlier_format_load(cls):
    """``prototypes`` (now ``weight``) and three stored thresholds (now calibration scores: dropped, warned)."""
    head = make_head(cls)
    old = {("prototypes" if k == "weight" else k): v for k, v in head.state_dict().items()}
    for key in ("calibration_scores", "score_index"):
        del old[key]
    old.update(thresholds=torch.tensor([-1.0, -2.0], dtype=torch.float64),
               threshold_tprs=torch.tensor([0.9, 0.95], dtype=torch.float64), threshold_score=torch.tensor(0))
    fresh = cls(24, 7).eval()
    with pytest.warns(UserWarning, match="calibrate the model again"):
        fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.weight, head.weight) and fresh.calibration_size == 0
    torch.testing.assert_close(fresh(randn(3, 24)), head(randn(3, 24)))
    model = torch.nn.Sequential(cls(24, 7))  # under a prefix, without thresholds: no warning
    model.load_state_dict({f"0.{k}": v for k, v in old.items() if "threshold" not in k})
    assert torch.equal(model[0].weight, head.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_conversion_keeps_the_calibration_scores_exact(dtype):
    head = make_head(DisMaxHead)
    head.calibrate_scores(head(randn(20, 24, seed=10)))
    stored = head.calibration_scores.clone()
    head = head.to(dtype)
    assert head.weight.dtype == dtype and head.calibration_scores.dtype == torch.float64
    assert torch.equal(head.calibration_scores, stored)
    logits = head(randn(4, 24, seed=10).to(dtype))
    flags = head.is_ood(logits, tpr=0.95)
    assert torch.equal(flags, head.ood_score(logits) < float(stored[SCORE_NAMES.index("mps")][1]))


# ----------------------------------------------------------------------------------------------- training mode
@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("entropic_scale", [10.0, 3.5])
def test_training_mode_returns_the_entropically_scaled_logits_at_t1(cls, entropic_scale):
    head = make_head(cls)
    head.entropic_scale = entropic_scale
    head.set_temperature(0.2)  # a calibrated temperature is not applied in training mode
    features = randn(9, 24, seed=13)
    z = head.distance_logits(features)
    torch.testing.assert_close(head.train()(features), z * entropic_scale)  # E folded into the node: 1 rounding
    torch.testing.assert_close(head.eval()(features), z / 0.2)
    built = create_head(cls.kind, 24, 7, entropic_scale=entropic_scale)
    assert built.entropic_scale == entropic_scale


@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_plain_cross_entropy_of_the_training_output_is_the_isotropic_loss(cls, smoothing):
    """What makes stock training code (timm's train.py and its losses) train the isotropic loss."""
    labels = torch.arange(12) % 7
    grads = []
    for use_torch in (True, False):
        head = make_head(cls).train()
        features = randn(12, 24, seed=14).requires_grad_(True)
        if use_torch:
            loss = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(head(features), labels)
        else:
            loss = IsoMaxLoss(label_smoothing=smoothing)(head(features), labels)
            reference = F.cross_entropy(10.0 * head.distance_logits(features), labels, label_smoothing=smoothing)
            torch.testing.assert_close(loss, reference)
        loss.backward()
        grads.append([features.grad, *[p.grad for p in head.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_training_output_of_half_precision_heads_is_float32():
    head = make_head(DisMaxHead).to(torch.bfloat16).train()
    out = head(randn(3, 24).to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------- AMP
@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("loss_fn", [IsoMaxLoss(), DisMaxLoss()])
@pytest.mark.parametrize("soft", [False, True])
def test_bfloat16_autocast_gives_finite_loss_and_gradients(cls, loss_fn, soft):
    head = make_head(cls, in_features=32, num_classes=6)
    images = randn(8, 2, 4, 4, seed=11)
    labels = torch.arange(8) % 6
    targets = fpr_mix(images, labels, 6, generator=torch.Generator().manual_seed(0))[1] if soft else labels
    features = randn(8, 32, seed=12).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
        loss = loss_fn(logits, targets)
    reference = reference_logits(head, features)
    assert (logits.double() - reference).abs().max() <= 2e-2 * max(1.0, float(reference.abs().max()))
    assert torch.isfinite(loss)
    loss.backward()
    for tensor in [features, *head.parameters()]:
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", HEAD_CLASSES)
@pytest.mark.parametrize("args, error, argument", [
    ((0, 3), ValueError, "in_features"),
    ((4.0, 3), TypeError, "in_features"),
    ((4, 1), ValueError, "num_classes"),
    ((4, True), TypeError, "num_classes"),
])
def test_bad_constructor_arguments(cls, args, error, argument):
    with pytest.raises(error, match=argument):
        cls(*args)


@pytest.mark.parametrize("features, error", [
    (torch.zeros(3, 5), ValueError),     # wrong width
    (torch.zeros(3, 1, 4), ValueError),  # wrong rank
    (torch.zeros(4), ValueError),
    ([[0.0] * 4], TypeError),
])
def test_bad_features(features, error):
    head = DisMaxHead(4, 3)
    with pytest.raises(error, match=r"features must .*\[B, 4\]"):
        head(features)


@pytest.mark.parametrize("call, error, argument", [
    (lambda h: h.set_temperature(0.0), ValueError, "temperature"),
    (lambda h: h.set_score("energy"), ValueError, "score"),
    (lambda h: h.threshold(0.95), RuntimeError, "no calibration scores"),
    (lambda h: DisMaxHead(4, 3, entropic_scale=0.0), ValueError, "entropic_scale"),
    (lambda h: h.reset(1), ValueError, "num_classes"),
    (lambda h: create_head("softmax", 4, 3), ValueError, "head"),
])
def test_bad_head_arguments(call, error, argument):
    with pytest.raises(error, match=argument):
        call(DisMaxHead(4, 3))


def test_unknown_head_name_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        create_head("softmax", 4, 3)
    for name in HEADS:
        assert name in str(info.value)
