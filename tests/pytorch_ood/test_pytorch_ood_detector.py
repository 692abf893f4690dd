"""DisMaxDetector and the loss wrappers against pytorch-ood 0.4 (real pytorch-ood, no mocks)."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from pytorch_ood.api import (
    BenchmarkInfo,
    DetectorInfo,
    LogitsDetector,
    LossInfo,
    Representation,
    Task,
)
from pytorch_ood.detector import MaxSoftmax
from pytorch_ood.metrics import OODMetrics
from pytorch_ood.utils import GridSearch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

import dismax_plugin as dp
from dismax_plugin import losses as core_losses
from dismax_plugin import scores as core_scores
from dismax_plugin.adapters import pytorch_ood as adapter
from dismax_plugin.adapters.pytorch_ood import (
    DISMAX_PAPER,
    ISOMAX_PAPER,
    ISOMAX_PLUS_PAPER,
    PAPER_AUTHORS,
    DigitsBenchmark,
    DisMaxDetector,
    DisMaxLoss,
    IsoMaxLoss,
    IsoMaxPlusLoss,
)

DEFAULT = dp.DisMaxHead.default_score

LOSSES = (IsoMaxLoss, IsoMaxPlusLoss, DisMaxLoss)


def _model(head: str = "dismax", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return dp.convert(timm.create_model("test_resnet", num_classes=6), head).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def bench() -> DigitsBenchmark:
    return DigitsBenchmark(ood_size=40)


# -------------------------------------------------------------------- scores
@pytest.mark.parametrize("name", dp.SCORE_NAMES)
def test_score_is_negated_native_score(name):
    logits = torch.randn(7, 5) * 3
    outlier = DisMaxDetector.score(logits, name)
    assert outlier.shape == (7,) and outlier.dtype == torch.float64
    torch.testing.assert_close(outlier, -core_scores.score(logits, name))
    torch.testing.assert_close(DisMaxDetector(None, score=name).predict_logits(logits), outlier)


@pytest.mark.parametrize("name", dp.SCORE_NAMES)
def test_larger_outlier_score_for_flat_logits(name):
    confident = torch.tensor([[0.0, -3, -3, -3, -3, -3]])  # near one prototype
    flat = torch.full((1, 6), -2.0)  # equally far from all prototypes
    scores = DisMaxDetector.score(torch.cat([confident, flat]), name)
    assert scores[1] > scores[0]


def test_predict_runs_model_without_grad(model):
    x = torch.rand(5, 3, 32, 32)
    detector = DisMaxDetector(model)
    scores = detector.predict(x)
    assert scores.shape == (5,) and not scores.requires_grad and torch.isfinite(scores).all()
    with torch.no_grad():
        expected = -core_scores.score(model(x), DEFAULT)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(detector(x), expected)  # __call__ forwards to predict


@pytest.mark.parametrize("name", dp.SCORE_NAMES)
def test_scores_do_not_depend_on_the_calibration_temperature(name):
    model = _model("dismax")
    x = torch.rand(6, 3, 32, 32)
    at_one = DisMaxDetector(model, score=name).predict(x)
    dp.heads_of(model)[0][1].set_temperature(0.03)  # what ECE calibration gives at ~100% accuracy
    calibrated = DisMaxDetector(model, score=name)
    torch.testing.assert_close(calibrated.predict(x), at_one)
    with torch.no_grad():  # the detector undoes the temperature; the raw score of the scaled logits differs
        torch.testing.assert_close(calibrated.predict_logits(model(x)), at_one)
    assert float(calibrated.current_temperature()) == pytest.approx(0.03)
    assert DisMaxDetector(None, score=name, temperature=0.5).current_temperature() == 0.5


@pytest.mark.parametrize("kind", sorted(dp.HEADS))
def test_score_none_uses_head_default(kind):
    detector = DisMaxDetector(_model(kind), score=None)
    assert detector.score_name == dp.HEADS[kind].default_score


def test_score_none_without_head_or_with_conflicting_heads():
    assert DisMaxDetector(None, score=None).score_name == DEFAULT
    assert DisMaxDetector(nn.Linear(4, 3), score=None).score_name == DEFAULT
    other = next(name for name in dp.SCORE_NAMES if name != DEFAULT)
    other_head = type("OtherHead", (dp.IsoMaxHead,), {"default_score": other})  # a head class with another default
    mixed = nn.ModuleDict({"a": other_head(4, 3), "b": dp.DisMaxHead(4, 3)})
    with pytest.raises(ValueError, match="score"):
        DisMaxDetector(mixed, score=None)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="score"):
        DisMaxDetector(None, score="energy")
    with pytest.raises(TypeError, match="score"):
        DisMaxDetector(None, score=3)
    with pytest.raises(TypeError, match="model"):
        DisMaxDetector("resnet", score="mps")
    with pytest.raises(ValueError, match="logits"):
        DisMaxDetector.score(torch.randn(4), "mps")


def test_hyperparameters_round_trip():
    detector = DisMaxDetector(None)
    assert detector.get_hyperparameters() == {"score": DEFAULT}
    assert detector.set_hyperparameters(score="MDS") is detector
    assert detector.get_hyperparameters() == {"score": "mds"} and detector.score_name == "mds"
    with pytest.raises(ValueError, match="Known hyperparameters"):
        detector.set_hyperparameters(t=2.0)
    with pytest.raises(ValueError, match="score"):
        detector.set_hyperparameters(score="nope")
    assert set(DisMaxDetector.hyperparameter_space["score"]) == set(dp.SCORE_NAMES)


def test_to_device_moves_model_and_inputs():
    detector = DisMaxDetector(_model())
    assert detector.to("meta") is detector
    assert detector.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in detector.model.parameters())
    cpu = DisMaxDetector(_model()).to(torch.device("cpu"))
    assert cpu.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_and_predict():
    detector = DisMaxDetector(_model()).to("cuda")
    scores = detector.predict(torch.rand(4, 3, 32, 32))
    assert scores.device.type == "cuda" and scores.shape == (4,)


# -------------------------------------------------------------------- Benchmark.evaluate / GridSearch
METRICS = {"AUROC", "AUTC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "ACC", "Dataset"}


@pytest.fixture(scope="module")
def plain(model, bench) -> list[dict]:
    """Uncached evaluation of the default (MMLES) detector."""
    return bench.evaluate(DisMaxDetector(model), loader_kwargs={"batch_size": 512})


def test_benchmark_evaluate_without_cache(plain, bench):
    assert [r["Dataset"] for r in plain] == bench.ood_names
    assert all(set(r) == METRICS for r in plain)
    assert all(0.0 <= r["AUROC"] <= 1.0 and 0.0 <= r["ACC"] <= 1.0 for r in plain)
    assert not getattr(bench, "_representation_cache", {})  # nothing kept without cache=True


def test_benchmark_evaluate_with_cache_matches(model, plain):
    fresh = DigitsBenchmark(ood_size=40)
    detector = DisMaxDetector(model)
    cached = fresh.evaluate(detector, loader_kwargs={"batch_size": 512}, cache=True)
    assert len(fresh._representation_cache) == len(fresh.ood_names)  # logits kept per dataset
    detector.set_hyperparameters(score="mds")
    again = fresh.evaluate(detector, loader_kwargs={"batch_size": 512}, cache=True)  # served from the cache
    assert len(fresh._representation_cache) == len(fresh.ood_names)
    for a, b in zip(plain, cached):
        for key in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "ACC"):
            assert a[key] == pytest.approx(b[key], abs=1e-9)
    logits = fresh._representation_cache[next(iter(fresh._representation_cache))]["data"]["logits"]
    assert logits.shape[1] == 6
    assert [r["ACC"] for r in again] == [r["ACC"] for r in cached]
    assert [r["AUROC"] for r in again] != [r["AUROC"] for r in cached]  # another score, same logits


def test_benchmark_evaluate_list_shares_logits(model, plain):
    detectors = [DisMaxDetector(model, score=s) for s in dp.SCORE_NAMES] + [MaxSoftmax(model)]
    fresh = DigitsBenchmark(ood_size=40)
    results = fresh.evaluate(detectors, loader_kwargs={"batch_size": 512}, cache=True)
    n_sets = len(fresh.ood_names)
    assert len(results) == len(detectors) * n_sets
    assert len(fresh._representation_cache) == n_sets  # one model: one logits entry per dataset
    assert {r["Detector"] for r in results} == {"DisMaxDetector", "MaxSoftmax"}
    # the MMLES rows of the list match the single-detector evaluation
    mmles_rows = results[dp.SCORE_NAMES.index(DEFAULT) :: len(detectors)]
    assert [r["Dataset"] for r in mmles_rows] == fresh.ood_names
    assert [r["AUROC"] for r in mmles_rows] == pytest.approx([r["AUROC"] for r in plain])
    # MPS equals MaxSoftmax on the same logits (both -max softmax; float64 vs float32 ties)
    mps_rows = results[dp.SCORE_NAMES.index("mps") :: len(detectors)]
    msp_rows = results[len(detectors) - 1 :: len(detectors)]
    assert [r["AUROC"] for r in mps_rows] == pytest.approx([r["AUROC"] for r in msp_rows], abs=1e-4)


def test_grid_search_picks_a_score(model, bench):
    val = ConcatDataset([bench.val_set(), Subset(bench.test_sets(known=False)[0], range(100))])
    loader = DataLoader(val, batch_size=256)
    detector = DisMaxDetector(model, score="mps")
    search = GridSearch(detector, fit_loader=None, val_loader=loader)
    best = search.run()
    assert set(best) == {"score"} and best["score"] in dp.SCORE_NAMES
    assert detector.score_name == best["score"]
    assert [r["params"]["score"] for r in search.results_] == list(dp.SCORE_NAMES)
    assert search.best_score_ == max(r["score"] for r in search.results_)
    # the chosen detector reproduces the best validation AUROC
    metrics = OODMetrics()
    for x, y in loader:
        metrics.update(detector.predict(x), y)
    assert metrics.compute()["AUROC"] == pytest.approx(search.best_score_)


# -------------------------------------------------------------------- metadata
def _exported_classes():
    for name in adapter.__all__:
        obj = getattr(adapter, name)
        # FolderBenchmark wraps the user's own images: no publication to record
        if isinstance(obj, type) and hasattr(obj, "info") and name != "FolderBenchmark":
            yield obj


def test_every_exported_component_defines_its_own_info():
    classes = list(_exported_classes())
    expected = {"DisMaxDetector", "IsoMaxLoss", "IsoMaxPlusLoss", "DisMaxLoss", "DigitsBenchmark"}
    assert {c.__name__ for c in classes} >= expected
    for cls in classes:
        assert "info" in vars(cls), cls
        info = cls.info
        assert isinstance(info, (DetectorInfo, LossInfo, BenchmarkInfo)), cls
        assert info.tasks and all(isinstance(t, Task) for t in info.tasks)
        if isinstance(info, LossInfo):
            assert info.inputs and all(isinstance(r, Representation) for r in info.inputs)
        assert info.paper is not None and info.paper.url.startswith("https://")


def test_paper_metadata():
    assert ISOMAX_PAPER.url == "https://arxiv.org/abs/1908.05569"
    assert (ISOMAX_PAPER.venue, ISOMAX_PAPER.year) == ("IJCNN", 2021)
    assert ISOMAX_PAPER.title == "Entropic Out-of-Distribution Detection"
    assert ISOMAX_PLUS_PAPER.url.endswith("2105.14399") and ISOMAX_PLUS_PAPER.year == 2021
    assert ISOMAX_PLUS_PAPER.title.startswith("Enhanced Isotropy Maximization Loss")
    assert DISMAX_PAPER.url.endswith("2205.05874") and DISMAX_PAPER.year == 2022
    assert DISMAX_PAPER.title.startswith("Distinction Maximization Loss")
    assert IsoMaxLoss.info.paper == ISOMAX_PAPER
    assert IsoMaxPlusLoss.info.paper == ISOMAX_PLUS_PAPER
    assert DisMaxLoss.info.paper == DisMaxDetector.info.paper == DISMAX_PAPER
    assert PAPER_AUTHORS[ISOMAX_PAPER.url][0] == "David Macêdo" and len(PAPER_AUTHORS[ISOMAX_PAPER.url]) == 5
    assert PAPER_AUTHORS[ISOMAX_PLUS_PAPER.url] == ("David Macêdo", "Teresa Ludermir")
    assert PAPER_AUTHORS[DISMAX_PAPER.url] == ("David Macêdo", "Cleber Zanchettin", "Teresa Ludermir")


def test_detector_claims_hold():
    assert DisMaxDetector.info.tasks == {Task.CLASSIFICATION}
    assert issubclass(DisMaxDetector, LogitsDetector) and DisMaxDetector.requires_fit is False
    detector = DisMaxDetector(None)
    assert detector.fit(None) is detector  # nothing to fit
    for name in dp.SCORE_NAMES:
        detector.set_hyperparameters(score=name)
        scores = detector.predict_logits(torch.randn(8, 10) * 50)
        assert scores.shape == (8,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("cls", LOSSES)
def test_loss_claims_hold(cls):
    info = cls.info
    assert info.tasks == {Task.CLASSIFICATION} and info.inputs == {Representation.LOGITS}
    assert info.supervised is False
    loss_fn = cls()
    assert isinstance(loss_fn, nn.Module)
    logits = torch.randn(6, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    value = loss_fn(logits, targets)
    assert value.ndim == 0 and math.isfinite(value.item())
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("cls", LOSSES)
def test_unsupervised_losses_drop_ood_targets(cls):
    logits = torch.randn(6, 4)
    targets = torch.tensor([0, -1, 2, -1, 3, 1])
    known = targets >= 0
    with pytest.warns(UserWarning, match="Discarding"):
        mixed = cls()(logits, targets)
    torch.testing.assert_close(mixed, cls()(logits[known], targets[known]))
    only_ood = torch.randn(3, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        empty = cls()(only_ood, torch.full((3,), -1))
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph


def test_loss_wrappers_match_the_core():
    logits = torch.randn(8, 5) * 2
    targets = torch.randint(0, 5, (8,))
    soft = torch.softmax(torch.randn(8, 5), dim=1)
    pairs = [(IsoMaxLoss, core_losses.IsoMaxLoss), (IsoMaxPlusLoss, core_losses.IsoMaxLoss)]
    for cls, core in [*pairs, (DisMaxLoss, core_losses.DisMaxLoss)]:
        assert issubclass(cls, core)
        smoothed = core(label_smoothing=0.1)(logits, targets)
        torch.testing.assert_close(cls(label_smoothing=0.1)(logits, targets), smoothed)
        torch.testing.assert_close(cls()(logits, soft), core()(logits, soft))
    torch.testing.assert_close(
        DisMaxLoss(alpha=0.5, reduction="none")(logits, soft), dp.dismax_loss(logits, soft, alpha=0.5, reduction="none")
    )


def test_dismax_loss_passes_the_stitched_mask_through_and_filters_it_with_the_ood_rows():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 8, 8)
    labels = torch.randint(0, 4, (8,))
    _, targets, stitched = dp.fpr_mix(images, labels, 4, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(8, 4)
    core = core_losses.DisMaxLoss(alpha=0.3)
    torch.testing.assert_close(
        DisMaxLoss(alpha=0.3)(logits, targets, stitched=stitched), core(logits, targets, stitched=stitched)
    )
    # class-index targets with OOD rows (< 0): rows and mask are dropped together
    hard = torch.tensor([0, -1, 2, 3, -1, 1, 0, 2])
    mask = torch.tensor([False, True, True, False, False, False, True, False])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = DisMaxLoss(alpha=0.3)(logits, hard, stitched=mask)
    keep = hard >= 0
    torch.testing.assert_close(loss, core(logits[keep], hard[keep], stitched=mask[keep]))
