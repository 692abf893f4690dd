"""adapters.engine.figures: what the figures show (ROC AUROC/FPR95, reliability ECE) and argument checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import dismax_plugin as dp
from dismax_plugin.adapters.engine import figures


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_score_histogram_draws_one_histogram_per_set_on_shared_bins():
    rng = np.random.default_rng(0)
    id_scores = rng.normal(1.0, 0.2, 200)
    ood = {"noise": rng.normal(-1.0, 0.3, 50), "svhn": torch.linspace(-2, 2, 30)}
    fig = figures.score_histogram(id_scores, ood, title="scores", bins=20)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["in-distribution (n=200)", "noise (n=50)", "svhn (n=30)"]
    assert len(ax.patches) == 3 * 20 and ax.get_title() == "scores"
    heights = np.array([p.get_height() for p in ax.patches[:20]])
    widths = np.array([p.get_width() for p in ax.patches[:20]])
    assert np.isclose((heights * widths).sum(), 1.0)  # density-normalised
    assert _png(fig).startswith(b"\x89PNG")
    figures.close(fig)


def test_roc_curves_report_auroc_and_fpr95():
    rng = np.random.default_rng(1)
    id_scores = rng.normal(1.0, 1.0, 400)
    overlapping = rng.normal(0.0, 1.0, 300)
    separated = id_scores.min() - 1.0 - rng.random(100)
    fig = figures.roc_curves(id_scores, {"near": overlapping, "far": separated}, title="roc")
    (ax,) = fig.axes
    near, far = (t.get_text() for t in ax.get_legend().get_texts())
    auroc = roc_auc_score(np.r_[np.ones(400), np.zeros(300)], np.r_[id_scores, overlapping])
    threshold = np.sort(id_scores)[int(np.floor(0.05 * 400))]  # keeps >= 95 % of ID
    fpr95 = (overlapping >= threshold).mean()
    assert near == f"near: AUROC {auroc:.3f}, FPR95 {fpr95:.3f}"
    assert far == "far: AUROC 1.000, FPR95 0.000"
    assert len(ax.lines) == 2 + 2  # two curves, the chance diagonal and the 95 % TPR line
    figures.close(fig)


def test_reliability_diagram_matches_expected_calibration_error():
    torch.manual_seed(0)
    logits = torch.randn(500, 4) * 3
    labels = torch.randint(0, 4, (500,))
    fig = figures.reliability_diagram(logits, labels, n_bins=10, title="val")
    assert len(fig.axes) == 1
    expected = dp.expected_calibration_error(logits, labels, n_bins=10)
    assert fig.ece[0] == pytest.approx(expected, abs=1e-9)
    assert f"ECE {100 * expected:.2f} %" in fig.axes[0].get_title()
    figures.close(fig)

    # probabilities are used as they are; a second panel shows the calibrated logits
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    calibrated = logits / 3.0
    fig = figures.reliability_diagram(probabilities, labels.numpy(), n_bins=10, calibrated=calibrated)
    assert len(fig.axes) == 2
    assert fig.ece[0] == pytest.approx(expected, abs=1e-9)
    assert fig.ece[1] == pytest.approx(dp.expected_calibration_error(calibrated, labels, n_bins=10), abs=1e-9)
    assert fig.ece[1] < fig.ece[0]  # scores * 3 on random labels are over-confident
    assert _png(fig).startswith(b"\x89PNG")
    figures.close(fig)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="ood_scores must be a non-empty mapping"):
        figures.score_histogram([1.0, 2.0], [0.0, 1.0])
    with pytest.raises(TypeError, match="ood_scores"):
        figures.roc_curves([1.0, 2.0], {})
    with pytest.raises(ValueError, match=r"id_scores must be a non-empty 1-D array"):
        figures.roc_curves([], {"noise": [0.0]})
    with pytest.raises(ValueError, match="finite"):
        figures.score_histogram([1.0, float("nan")], {"noise": [0.0]})
    with pytest.raises(ValueError, match="bins"):
        figures.score_histogram([1.0], {"noise": [0.0]}, bins=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        figures.reliability_diagram(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integer class indices"):
        figures.reliability_diagram(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="calibrated must have the shape"):
        figures.reliability_diagram(np.zeros((2, 3)), np.array([0, 1]), calibrated=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="n_bins"):
        figures.reliability_diagram(np.zeros((2, 3)), np.array([0, 1]), n_bins=0)


def test_near_far_auroc_draws_paired_bars_with_seed_error_bars():
    summary = [
        {"model": "dismax", "method": "MMLES", "near AUROC": 0.95, "far AUROC": 0.99, "near AUROC std": 0.01,
         "far AUROC std": 0.002},
        {"model": "ce", "method": "MaxSoftmax", "near AUROC": 0.9, "far AUROC": 0.6, "near AUROC std": None,
         "far AUROC std": None},
    ]  # fmt: skip
    fig = figures.near_far_auroc(summary, title="digits")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dismax · MMLES", "ce · MaxSoftmax"]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == [60.0, 90.0, 95.0, 99.0]  # percent, one bar per model/method and group
    from matplotlib.container import BarContainer

    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2 and all(c.errorbar is not None for c in bars)  # std over seeds drawn
    assert ax.get_xlim()[1] == 100 and ax.get_title() == "digits"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["near-OOD", "far-OOD"]
    taller = figures.near_far_auroc(summary * 10)
    assert taller.get_size_inches()[1] > fig.get_size_inches()[1]
    assert _png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="summary"):
        figures.near_far_auroc([])
    with pytest.raises(ValueError, match="near AUROC"):
        figures.near_far_auroc([{"model": "ce"}])
    figures.close(fig)
    figures.close(taller)


def _evaluation():
    """A minimal :func:`_report.evaluate_model` result: one test row, the scores of one method, calibration."""
    rng = np.random.default_rng(2)
    row = {"dataset": "noise", "method": "MPS", "split": "test", "ACC": 0.5, "ECE": 0.1,
           **dict.fromkeys(("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95-ID", "FPR95TPR"), 0.5)}  # fmt: skip
    per_set = {"ID": torch.tensor(rng.normal(0, 1, 40)), "noise": torch.tensor(rng.normal(1, 1, 20))}
    scores = {("dismax", "MPS"): per_set}
    calibration = {"val_logits": torch.tensor(rng.normal(0, 1, (30, 3))), "val_labels": torch.arange(30) % 3,
                   "temperature": 2.0}  # fmt: skip
    return {"rows": [row], "scores": scores, "notes": []}, calibration


def test_figures_are_drawn_only_for_a_tracker_that_keeps_them(monkeypatch):
    from dismax_plugin.adapters.engine import _report
    from dismax_plugin.adapters.engine.tracking import Tracker

    class Recording(Tracker):
        def __init__(self):
            self.figures, self.metrics = {}, {}

        def log_metrics(self, metrics, step=None, *, dataset=None):
            self.metrics.update(metrics)

        def log_figure(self, figure, artifact_file):
            self.figures[artifact_file] = _png(figure)[:4]
            figures.close(figure)

    evaluation, calibration = _evaluation()
    recording = Recording()
    assert recording.keeps_figures and not Tracker().keeps_figures
    _report.log_evaluation(recording, evaluation, calibration)
    assert recording.figures == dict.fromkeys(["ood/histogram_MPS.png", "ood/roc_MPS.png",
                                               "calibration/reliability_before.png",
                                               "calibration/reliability_after.png"], b"\x89PNG")  # fmt: skip
    assert recording.metrics["noise.MPS.AUROC"] == 0.5 and recording.metrics["test_acc"] == 0.5

    def no_drawing(*args, **kwargs):
        raise AssertionError("a figure was drawn for a tracker that keeps none")

    for name in ("score_histogram", "roc_curves", "reliability_diagram"):
        monkeypatch.setattr(figures, name, no_drawing)
    _report.log_evaluation(Tracker(), evaluation, calibration)  # the untracked run (--no-track): no figure drawn
