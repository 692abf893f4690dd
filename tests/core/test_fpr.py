"""Fractional probability regularisation: batch geometry, targets, determinism, the paper's objective."""

import pytest
import torch
import torch.nn.functional as F

from dismax_plugin import DisMaxLoss, dismax_loss, fpr_mix


def gen(seed):
    return torch.Generator().manual_seed(seed)


def batch(size=8, channels=3, height=6, width=6, classes=5, seed=0):
    images = torch.randn(size, channels, height, width, generator=gen(seed))  # all pixels distinct
    labels = torch.randint(0, classes, (size,), generator=gen(seed + 1))
    return images, labels


def quadrants(height, width):
    top, left = height // 2, width // 2
    return [(slice(None, top), slice(None, left)), (slice(None, top), slice(left, None)),
            (slice(top, None), slice(None, left)), (slice(top, None), slice(left, None))]


def find_source(images, patch, rows, cols):
    """Index of the (unique) batch image whose region (rows, cols) equals ``patch``."""
    matches = [i for i in range(images.shape[0]) if torch.equal(images[i, :, rows, cols], patch)]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize("size, height, width", [(8, 6, 6), (9, 7, 5), (16, 2, 3), (4, 5, 8)])
def test_clean_half_and_stitched_half_geometry(size, height, width):
    classes = 5
    images, labels = batch(size, height=height, width=width, classes=classes)
    mixed, targets, stitched = fpr_mix(images, labels, classes, generator=gen(3))
    assert mixed.shape == images.shape and mixed.dtype == images.dtype
    assert targets.shape == (size, classes) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(size))
    n_mixed = size // 2
    n_clean = size - n_mixed
    assert stitched.dtype == torch.bool and stitched.tolist() == [False] * n_clean + [True] * n_mixed

    # Clean half: distinct batch images (a shuffle, no repeats) with their one-hot targets.
    clean_sources = []
    for row in range(n_clean):
        source = find_source(images, mixed[row], slice(None), slice(None))
        clean_sources.append(source)
        assert torch.equal(targets[row], F.one_hot(labels[source], classes).float())
    assert len(set(clean_sources)) == n_clean

    # Stitched half: quadrant k of image r is quadrant k of some batch image; the four sources are
    # distinct images and each puts 0.25 on its class.
    for row in range(n_clean, size):
        sources = [find_source(images, mixed[row, :, r, c], r, c) for r, c in quadrants(height, width)]
        assert len(set(sources)) == 4
        expected = 0.25 * F.one_hot(labels[sources], classes).float().sum(dim=0)
        assert torch.equal(targets[row], expected)


def test_stitched_targets_are_fractional_when_classes_differ():
    images = torch.randn(8, 1, 4, 4, generator=gen(4))
    labels = torch.arange(8)  # every image its own class
    _, targets, _ = fpr_mix(images, labels, 8, generator=gen(5))
    assert (targets[:4].max(dim=1).values == 1.0).all()
    assert torch.equal(torch.sort(targets[4:], dim=1, descending=True).values[:, :4], torch.full((4, 4), 0.25))


def test_deterministic_under_a_generator():
    images, labels = batch()
    first = fpr_mix(images, labels, 5, generator=gen(7))
    second = fpr_mix(images, labels, 5, generator=gen(7))
    other = fpr_mix(images, labels, 5, generator=gen(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(0)
    global_a = fpr_mix(images, labels, 5)
    torch.manual_seed(0)
    global_b = fpr_mix(images, labels, 5)
    assert torch.equal(global_a[0], global_b[0])


@pytest.mark.parametrize("size", [1, 2, 3])
def test_small_batches(size):
    images, labels = batch(size)
    mixed, targets, stitched = fpr_mix(images, labels, 5, generator=gen(9))
    assert mixed.shape == images.shape and targets.shape == (size, 5) and int(stitched.sum()) == size // 2
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(size))
    if size == 1:
        assert torch.equal(mixed, images)


def test_integer_images_and_half_precision():
    images = torch.randint(0, 255, (6, 3, 5, 5), dtype=torch.uint8, generator=gen(10))
    mixed, targets, _ = fpr_mix(images, torch.arange(6) % 3, 3, generator=gen(11))
    assert mixed.dtype == torch.uint8 and targets.dtype == torch.float32
    mixed, targets, _ = fpr_mix(images.half(), torch.arange(6) % 3, 3, generator=gen(11))
    assert targets.dtype == torch.float16
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6, dtype=torch.float16))


def test_input_batch_is_not_modified():
    images, labels = batch()
    before = images.clone()
    fpr_mix(images, labels, 5, generator=gen(12))
    assert torch.equal(images, before)


def paper_objective(logits, targets, n_clean, entropic_scale, alpha):
    """Float64 transcription of the paper's loss: (CE on the clean half + alpha * KL on the mixed half) / 2."""
    z = entropic_scale * logits.double()
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    clean_labels = targets[:n_clean].argmax(dim=1)
    ce = -log_p[:n_clean].gather(1, clean_labels[:, None]).mean()
    t = targets[n_clean:].double()
    kl = (torch.where(t > 0, t * t.log(), torch.zeros_like(t)) - t * log_p[n_clean:]).sum(dim=1).mean()
    return (ce + alpha * kl) / 2


@pytest.mark.parametrize("size, classes, alpha, labels_seed", [
    (8, 10, 1.0, 0),     # labels may repeat
    (16, 3, 1.0, 1),     # many repeats: some stitched rows can be one-hot
    (8, 8, 0.3, None),   # distinct labels: every stitched row is fractional, alpha != 1
    (12, 20, 2.0, None),
    (9, 12, 0.5, None),  # odd batch: 5 clean rows, 4 stitched rows
])
def test_dismax_loss_on_an_fpr_batch_is_the_papers_objective(size, classes, alpha, labels_seed):
    images = torch.randn(size, 3, 4, 4, generator=gen(13))
    if labels_seed is None:
        labels = torch.randperm(classes, generator=gen(14))[:size]
    else:
        labels = torch.randint(0, classes, (size,), generator=gen(labels_seed))
    _, targets, stitched = fpr_mix(images, labels, classes, generator=gen(15))
    logits = torch.randn(size, classes, generator=gen(16), dtype=torch.float64).requires_grad_(True)
    got = DisMaxLoss(alpha=alpha)(10.0 * logits, targets, stitched)  # the head's training output: E z
    want = paper_objective(logits, targets, size - size // 2, 10.0, alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Same gradients as the transcription, and the float32 path agrees to float32 accuracy.
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0])
    torch.testing.assert_close(dismax_loss(10.0 * logits.detach().float(), targets, alpha=alpha,
                                           stitched=stitched).double(),
                               want.detach(), rtol=1e-5, atol=1e-5)


def test_label_smoothing_applies_to_the_clean_rows_only():
    images, labels = torch.randn(10, 1, 4, 4, generator=gen(20)), torch.arange(10) % 7
    _, targets, stitched = fpr_mix(images, labels, 7, generator=gen(21))
    logits = torch.randn(10, 7, generator=gen(22), dtype=torch.float64)
    eps, n_clean = 0.1, 5
    smoothed = targets.double().clone()
    smoothed[:n_clean] = smoothed[:n_clean] * (1 - eps) + eps / 7  # the clean rows' smoothed targets
    want = paper_objective(logits, targets, n_clean, 1.0, 0.5)  # the logits stand for E z
    log_p = torch.log_softmax(logits, dim=1)
    ce_clean = -(smoothed[:n_clean] * log_p[:n_clean]).sum(dim=1).mean()
    ce_plain = -log_p[:n_clean].gather(1, targets[:n_clean].argmax(dim=1, keepdim=True)).mean()
    want = want + (ce_clean - ce_plain) / 2  # only the clean half of the objective changes
    got = DisMaxLoss(alpha=0.5, label_smoothing=eps)(logits, targets, stitched)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_soft_rows_without_the_mask_are_plain_cross_entropy():
    # --no-fpr --smoothing 0.1 --alpha 0 used to give a zero loss: smoothed rows were taken for stitched ones.
    logits = torch.randn(6, 4, generator=gen(23), dtype=torch.float64)
    smoothed = F.one_hot(torch.arange(6) % 4, 4).double() * 0.9 + 0.1 / 4
    got = DisMaxLoss(alpha=0.0)(logits, smoothed)
    want = -(smoothed * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert float(got) > 0.1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, dismax_loss(logits, torch.arange(6) % 4, label_smoothing=0.1, alpha=0.0))


@pytest.mark.parametrize("stitched, error, match", [
    (torch.tensor([0, 1, 0, 1]), TypeError, "stitched must be a bool tensor"),
    ([False, True, False, True], TypeError, "stitched must be a bool tensor"),
    (torch.tensor([False, True]), ValueError, r"stitched must have shape \[B\] = \(4,\)"),
])
def test_bad_stitched_mask(stitched, error, match):
    with pytest.raises(error, match=match):
        dismax_loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), stitched=stitched)


# ----------------------------------------------------------------------------------------------- bad input
IMAGES = torch.zeros(4, 3, 4, 4)
LABELS = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"inputs": torch.zeros(4, 3, 16)}, ValueError, r"inputs must be images \[B, Ch, H, W\]"),
    ({"inputs": torch.zeros(4, 16)}, ValueError, r"inputs must be images \[B, Ch, H, W\]"),
    ({"inputs": torch.zeros(4, 3, 1, 8)}, ValueError, "inputs must be images .*H, W >= 2"),
    ({"inputs": [[0.0]]}, TypeError, "inputs must be a torch.Tensor of images"),
    ({"targets": torch.tensor([0.0, 1.0, 2.0, 0.0])}, TypeError, "targets"),
    ({"targets": torch.tensor([0, 1, 3, 0])}, ValueError, "targets must be class indices"),
    ({"targets": torch.tensor([0, 1])}, ValueError, "targets has 2 entries but the batch has 4"),
    ({"num_classes": 1}, ValueError, "num_classes"),
    ({"num_classes": 2.5}, TypeError, "num_classes"),
])
def test_bad_fpr_arguments(kwargs, error, argument):
    call = {"inputs": IMAGES, "targets": LABELS, "num_classes": 3, **kwargs}
    with pytest.raises(error, match=argument):
        fpr_mix(**call)
