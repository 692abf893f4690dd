"""IsoMax and DisMax losses vs float64 transcriptions; targets; stability at large logit gaps; bad input.

The losses take a head's training-mode output, the logits already multiplied by the entropic scale E (the
head applies it): the transcriptions below are written for such inputs, ``E z`` with E = 10 where it matters.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from dismax_plugin import DisMaxLoss, IsoMaxLoss, dismax_loss, isomax_loss

LOSS_FUNCTIONS = [isomax_loss, dismax_loss]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def log_softmax64(z):
    """Float64 log-softmax written out: z - max - log(sum(exp(z - max)))."""
    z = z.double()
    shifted = z - z.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def reduce(per_sample, reduction):
    return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]


def soft_targets(batch, classes, seed):
    raw = torch.rand(batch, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raw[raw < 0.5] = 0.0
    raw[:, 0] += 1e-3
    return raw / raw.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [10.0, 1.0, 3.5])
def test_isomax_loss_is_cross_entropy_of_the_scaled_logits_it_is_given(reduction, scale):
    z, labels = -randn(12, 5, seed=1).abs(), torch.arange(12) % 5
    got = isomax_loss(scale * z, labels, reduction=reduction)  # the head's training output, E z
    per_sample = -log_softmax64(scale * z.double())[torch.arange(12), labels]
    torch.testing.assert_close(got.double(), reduce(per_sample, reduction), rtol=1e-6, atol=1e-6)
    module = IsoMaxLoss(reduction=reduction)
    torch.testing.assert_close(module(scale * z, labels), got)
    torch.testing.assert_close(got, F.cross_entropy(scale * z, labels, reduction=reduction))  # nothing more


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_isomax_loss_with_soft_targets(reduction):
    logits, targets = randn(9, 6, seed=2), soft_targets(9, 6, seed=3)
    got = isomax_loss(logits, targets.float(), reduction=reduction)
    per_sample = -(targets * log_softmax64(logits.double())).sum(dim=1)
    torch.testing.assert_close(got.double(), reduce(per_sample, reduction), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dismax_loss_ce_on_one_hot_rows_and_alpha_kl_on_fractional_rows(alpha, reduction):
    logits = randn(10, 4, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    targets = torch.nn.functional.one_hot(labels, 4).double()
    targets[6:] = torch.tensor([[0.25, 0.25, 0.5, 0.0], [0.0, 0.75, 0.0, 0.25],
                                [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    stitched = torch.arange(10) >= 6
    got = dismax_loss(logits, targets.float(), alpha=alpha, reduction=reduction, stitched=stitched)
    log_p = log_softmax64(logits)
    ce = -(targets * log_p).sum(dim=1)
    kl = (torch.special.xlogy(targets, targets) - targets * log_p).sum(dim=1)
    per_sample = torch.cat([ce[:6], alpha * kl[6:]])
    # "mean" is the paper's (mean CE over clean rows + alpha * mean KL over mixed rows) / 2, here 6 vs 4 rows
    want = (ce[:6].mean() + alpha * kl[6:].mean()) / 2 if reduction == "mean" else reduce(per_sample, reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(DisMaxLoss(alpha=alpha, reduction=reduction)(logits, targets, stitched), got)
    # Without the mask every row is clean: plain soft-target cross-entropy, whatever alpha is.
    plain = dismax_loss(logits, targets.float(), alpha=alpha, reduction=reduction)
    torch.testing.assert_close(plain.double(), reduce(ce, reduction), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_label_smoothing_is_cross_entropy_with_smoothed_targets(fn, soft):
    logits, labels = randn(7, 5, seed=12, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    one_hot = F.one_hot(labels, 5).double()
    targets = one_hot if soft else labels
    smoothed = one_hot * (1 - 0.2) + 0.2 / 5
    want = -(smoothed * log_softmax64(logits)).sum(dim=1)
    torch.testing.assert_close(fn(logits, targets, label_smoothing=0.2, reduction="none"), want)
    module = IsoMaxLoss(label_smoothing=0.2) if fn is isomax_loss else DisMaxLoss(label_smoothing=0.2)
    torch.testing.assert_close(module(logits, targets), want.mean())


def test_dismax_loss_mean_of_one_group_only():
    logits, labels = randn(5, 4, seed=8), torch.tensor([0, 1, 2, 3, 0])
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    torch.testing.assert_close(dismax_loss(logits, one_hot), dismax_loss(logits, labels))
    mixed = torch.full((5, 4), 0.25, dtype=torch.float64)
    log_p = log_softmax64(logits)
    kl = (torch.special.xlogy(mixed, mixed) - mixed * log_p).sum(dim=1)
    got = dismax_loss(logits, mixed.float(), alpha=0.3, stitched=torch.ones(5, dtype=torch.bool)).double()
    torch.testing.assert_close(got, 0.3 * kl.mean(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_one_hot_targets_equal_hard_targets(fn, reduction):
    logits, labels = randn(8, 7, seed=5), torch.tensor([6, 0, 3, 3, 1, 2, 5, 4])
    for dtype in (torch.float32, torch.float64, torch.float16):
        one_hot = torch.nn.functional.one_hot(labels, 7).to(dtype)
        torch.testing.assert_close(fn(logits, one_hot, reduction=reduction), fn(logits, labels, reduction=reduction))


def test_dismax_loss_with_hard_targets_equals_isomax_loss():
    logits, labels = randn(16, 10, seed=6), torch.arange(16) % 10
    torch.testing.assert_close(dismax_loss(logits, labels, alpha=0.3), isomax_loss(logits, labels))


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
def test_gradients_match_finite_differences(fn):
    logits = randn(5, 4, seed=7, dtype=torch.float64).requires_grad_(True)
    targets = soft_targets(5, 4, seed=8)
    targets[0] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert gradcheck(lambda z: fn(2.0 * z, targets), (logits,))
    assert gradcheck(lambda z: fn(z, torch.tensor([3, 0, 1, 2, 2])), (logits,))


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
@pytest.mark.parametrize("gap", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True])
def test_large_logit_gaps_stay_finite(fn, gap, dtype, soft):
    # log(softmax) underflows to log(0) = -inf here; the exact loss of the wrong class is the gap.
    logits = torch.tensor([[0.0, -gap, -gap], [-gap, 0.0, -gap]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([1, 1])
    targets = torch.nn.functional.one_hot(labels, 3).to(dtype) if soft else labels
    loss = fn(logits, targets, reduction="none")
    gap_in_dtype = float(torch.tensor(gap, dtype=dtype))
    torch.testing.assert_close(loss.double(), torch.tensor([gap_in_dtype, 0.0], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
def test_fractional_targets_at_large_gaps_stay_finite(fn):
    logits = torch.tensor([[0.0, -1e4, -1e4, -1e4]], requires_grad=True)
    targets = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    loss = fn(logits, targets)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
@pytest.mark.parametrize("targets_kind", ["indices", "one_hot", "stitched", "smoothed"])
def test_no_class_by_class_matrix_is_built(fn, targets_kind, largest_output):
    batch, classes = 4, 20_000  # a C x C float32 matrix would be 1.6 GB
    logits = randn(batch, classes, seed=9).requires_grad_(True)
    labels = torch.tensor([0, classes - 1, 7, 123])
    targets = labels if targets_kind in ("indices", "smoothed") else F.one_hot(labels, classes).float()
    kwargs = {"label_smoothing": 0.1} if targets_kind == "smoothed" else {}
    if targets_kind == "stitched":
        targets[2:] = 0.25 * F.one_hot(labels[:4], classes).float().sum(dim=0)
        if fn is dismax_loss:
            kwargs["stitched"] = torch.tensor([False, False, True, True])
    recorder = largest_output
    with recorder:
        loss = fn(logits, targets, **kwargs)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # The largest allocation is a B x C float64 at most: 4 * 20000 * 8 bytes, far below C * C * 4.
    assert recorder.largest_bytes <= batch * classes * 8 < classes * classes * 4 // 1000


def test_losses_compute_on_the_inputs_device_and_return_float():
    logits, labels = randn(3, 4, seed=10, dtype=torch.float64), torch.tensor([0, 1, 2])
    assert isomax_loss(logits, labels).dtype == torch.float64
    assert dismax_loss(logits.half(), labels).dtype == torch.float32
    assert isomax_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_module_repr_and_defaults():
    assert repr(IsoMaxLoss()) == "IsoMaxLoss(label_smoothing=0.0, reduction='mean')"
    assert repr(DisMaxLoss(alpha=0.5)) == "DisMaxLoss(alpha=0.5, label_smoothing=0.0, reduction='mean')"
    logits, labels = randn(6, 3, seed=11), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(IsoMaxLoss()(logits, labels), isomax_loss(logits, labels))
    with pytest.raises(TypeError, match="entropic_scale"):  # the scale belongs to the head now
        IsoMaxLoss(entropic_scale=10.0)


# ----------------------------------------------------------------------------------------------- bad input
LOGITS = torch.zeros(4, 3)
LABELS = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("fn", LOSS_FUNCTIONS)
@pytest.mark.parametrize("kwargs, error, argument", [
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ({"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
    ({"targets": torch.tensor([0, 1, 3, 0])}, ValueError, r"targets must be class indices in \[0, 2\]"),
    ({"targets": torch.tensor([0, -1, 2, 0])}, ValueError, r"targets must be class indices in \[0, 2\]"),
    ({"targets": torch.tensor([0, 1, 2])}, ValueError, "targets has 3 entries but the batch has 4"),
    ({"targets": torch.full((4, 2), 0.5)}, ValueError, r"soft targets must have the shape of the logits \(4, 3\)"),
    ({"targets": torch.full((4, 3), 0.5)}, ValueError, "each row of soft targets must sum to 1"),
    ({"targets": torch.tensor([[1.5, -0.5, 0.0]] * 4)}, ValueError, "soft targets must be non-negative"),
    ({"targets": torch.tensor([0.0, 1.0, 2.0, 0.0])}, TypeError, r"targets of shape \[B\] must hold integer"),
    ({"targets": torch.ones(4, 3, dtype=torch.long)}, TypeError, "soft targets of shape"),
    ({"targets": [0, 1, 2, 0]}, TypeError, "targets must be a torch.Tensor"),
    ({"logits": torch.zeros(4)}, ValueError, r"logits must have shape \[B, C\]"),
    ({"logits": torch.zeros(4, 1)}, ValueError, r"logits must have shape \[B, C\] with C >= 2"),
    ({"logits": torch.zeros(4, 3, dtype=torch.long)}, TypeError, "logits must be a floating-point"),
])
def test_bad_loss_arguments(fn, kwargs, error, argument):
    call = {"logits": LOGITS, "targets": LABELS, **kwargs}
    with pytest.raises(error, match=argument):
        fn(**call)


@pytest.mark.parametrize("make, argument", [
    (lambda: DisMaxLoss(alpha=-0.1), "alpha"),
    (lambda: IsoMaxLoss(reduction="batchmean"), "reduction"),
    (lambda: dismax_loss(LOGITS, LABELS, alpha=-1.0), "alpha"),
])
def test_bad_loss_module_arguments(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()
