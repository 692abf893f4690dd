"""compare() on tiny timm models trained for a few steps: structure and sanity of the numbers, not quality."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Subset

import dismax_plugin as dp
from dismax_plugin.adapters.pytorch_ood import DisMaxLoss
from dismax_plugin.adapters.pytorch_ood.benchmarks import DigitsBenchmark
from dismax_plugin.adapters.pytorch_ood.compare import DETECTOR_NAMES, METRIC_KEYS, compare, format_table

REQUIRED = {"Model", "Method", "Dataset", *METRIC_KEYS, "ACC", "ECE", "fit_s", "images_per_s"}
BATCH = 256


def _train(model: nn.Module, loss_fn, bench: DigitsBenchmark, steps: int = 20) -> nn.Module:
    torch.manual_seed(0)
    loader = DataLoader(bench.train_set(), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    return model


@pytest.fixture(scope="module")
def setup():
    bench = DigitsBenchmark(ood_size=60)
    torch.manual_seed(0)
    iso = _train(dp.convert(timm.create_model("test_resnet", num_classes=6), "dismax"), DisMaxLoss(), bench)
    torch.manual_seed(0)
    base = _train(timm.create_model("test_resnet", num_classes=6), nn.CrossEntropyLoss(), bench)
    before = {name: copy.deepcopy(m.state_dict()) for name, m in (("iso", iso), ("base", base))}
    fit_loader = DataLoader(bench.train_set(), batch_size=BATCH)
    rows = compare(iso, base, bench, fit_loader=fit_loader, batch_size=BATCH)
    return {"bench": bench, "iso": iso, "base": base, "before": before, "rows": rows, "fit_loader": fit_loader}


def _rows(rows, model=None, method=None, dataset=None):
    return [
        r
        for r in rows
        if (model is None or r["Model"] == model)
        and (method is None or r["Method"] == method)
        and (dataset is None or r["Dataset"] == dataset)
    ]


@torch.no_grad()
def _id_and_ood_logits(model, bench, ood_index):
    model.eval()
    try:
        out = []
        for dataset in (bench.test_sets(unknown=False)[0], bench.test_sets(known=False)[ood_index]):
            logits, labels = zip(*[(model(x), y) for x, y in DataLoader(dataset, batch_size=BATCH)])
            out.append((torch.cat(logits), torch.cat(labels)))
        return out
    finally:
        model.train()


def test_rows_structure(setup):
    rows, bench = setup["rows"], setup["bench"]
    methods = [m.upper() for m in dp.SCORE_NAMES] + list(DETECTOR_NAMES)
    assert len(rows) == len(methods) * (len(bench.ood_names) + 1)
    assert all(REQUIRED <= set(r) for r in rows)
    assert {r["Method"] for r in _rows(rows, model="isotropic")} == {m.upper() for m in dp.SCORE_NAMES}
    assert {r["Method"] for r in _rows(rows, model="baseline")} == set(DETECTOR_NAMES)
    for method in methods:
        assert [r["Dataset"] for r in _rows(rows, method=method)] == [*bench.ood_names, "mean"]


def test_numbers_are_sane(setup):
    rows = setup["rows"]
    for r in rows:
        for key in (*METRIC_KEYS, "ACC", "ECE"):
            assert 0.0 <= r[key] <= 1.0 and math.isfinite(r[key]), (r["Method"], key, r[key])
        assert r["images_per_s"] > 0 and math.isfinite(r["images_per_s"])
        assert (r["fit_s"] > 0) == (r["Method"] in ("Mahalanobis", "KNN", "ViM")), r["Method"]
    for model in ("isotropic", "baseline"):
        values = {(r["ACC"], r["ECE"]) for r in _rows(rows, model=model)}
        assert len(values) == 1  # one model, one accuracy and ECE
        assert next(iter(values))[0] > 1 / 6  # better than chance after a few steps


def test_mean_rows_average_the_sets(setup):
    rows, bench = setup["rows"], setup["bench"]
    for method in {r["Method"] for r in rows}:
        per_set = _rows(rows, method=method)[:-1]
        mean = _rows(rows, method=method, dataset="mean")[0]
        assert len(per_set) == len(bench.ood_names)
        for key in METRIC_KEYS:
            assert mean[key] == pytest.approx(np.mean([r[key] for r in per_set]))


def test_accuracy_and_ece_match_direct_computation(setup):
    bench = setup["bench"]
    for name, model in (("isotropic", setup["iso"]), ("baseline", setup["base"])):
        (logits, labels), _ = _id_and_ood_logits(model, bench, 0)
        row = _rows(setup["rows"], model=name)[0]
        assert row["ACC"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
        assert row["ECE"] == pytest.approx(dp.expected_calibration_error(logits, labels))


def test_fpr_conventions_and_auroc(setup):
    """FPR95TPR has OOD positive, FPR95-ID has ID positive; recomputed here from the model's logits."""
    bench = setup["bench"]
    for index, name in enumerate(bench.ood_names):
        (id_logits, _), (ood_logits, _) = _id_and_ood_logits(setup["iso"], bench, index)
        s_id = dp.scores.mmles(id_logits).numpy()  # in-distribution scores, larger = more ID
        s_ood = dp.scores.mmles(ood_logits).numpy()
        row = _rows(setup["rows"], method="MMLES", dataset=name)[0]
        # ID positive: accept the top 95% of ID samples, count accepted OOD samples
        t_id = np.sort(s_id)[::-1][math.ceil(0.95 * len(s_id)) - 1]
        assert row["FPR95-ID"] == pytest.approx(np.mean(s_ood >= t_id))
        # OOD positive: flag 95% of the OOD samples (lowest ID scores), count flagged ID samples
        t_ood = np.sort(s_ood)[math.ceil(0.95 * len(s_ood)) - 1]
        assert row["FPR95TPR"] == pytest.approx(np.mean(s_id <= t_ood))
        labels = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
        assert row["AUROC"] == pytest.approx(roc_auc_score(labels, -np.r_[s_id, s_ood]))


def test_models_restored_and_untouched(setup):
    for key in ("iso", "base"):
        model = setup[key]
        assert model.training  # the mode from before compare()
        after = model.state_dict()
        # eval mode during scoring: batch-norm statistics were not updated
        assert all(torch.equal(setup["before"][key][k], after[k]) for k in after)


def test_format_table(setup):
    rows = setup["rows"]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 3  # header, rule, footnote
    assert "AUROC (%)" in lines[0] and "FPR95-ID (%)" in lines[0] and "images_per_s" in lines[0]
    assert "OOD positive" in lines[-1] and "in-distribution positive" in lines[-1]
    first = lines[2]
    assert first.startswith("isotropic") and f"{100 * rows[0]['AUROC']:.2f}" in first
    assert format_table([]).count("\n") == 2
    with pytest.raises(TypeError, match="rows"):
        format_table("rows")


def test_one_model_and_chosen_methods(setup):
    bench = setup["bench"]
    small = Subset(bench.train_set(), range(0, 650, 5))
    rows = compare(setup["iso"], None, bench, fit_loader=None, scores=["MDS", "mps"])
    assert [r["Method"] for r in rows[:: len(bench.ood_names) + 1]] == ["MDS", "MPS"]
    assert {r["Model"] for r in rows} == {"isotropic"}
    fit_loader = DataLoader(small, batch_size=64)
    rows = compare(None, setup["base"], bench, fit_loader=fit_loader, detectors=["knn", "maxlogit"])
    assert [r["Method"] for r in rows[:: len(bench.ood_names) + 1]] == ["KNN", "MaxLogit"]
    assert {r["Model"] for r in rows} == {"baseline"}


def test_errors_name_the_argument(setup):
    bench, iso, base = setup["bench"], setup["iso"], setup["base"]
    with pytest.raises(ValueError, match="detectors") as error:
        compare(iso, base, bench, fit_loader=None, detectors=["GradNorm"])
    assert "Mahalanobis" in str(error.value)
    with pytest.raises(ValueError, match="scores"):
        compare(iso, None, bench, fit_loader=None, scores=["energy"])
    with pytest.raises(TypeError, match="scores"):
        compare(iso, None, bench, fit_loader=None, scores="mds")
    with pytest.raises(ValueError, match="isotropic head"):
        compare(base, None, bench, fit_loader=None)
    with pytest.raises(TypeError, match="benchmark"):
        compare(iso, base, [bench], fit_loader=None)
    with pytest.raises(ValueError, match="both be None"):
        compare(None, None, bench, fit_loader=None)
    with pytest.raises(ValueError, match="fit_loader"):
        compare(None, base, bench, fit_loader=None, detectors=["Mahalanobis"])
    only_class_0 = Subset(bench.train_set(), [i for i, (_, y) in enumerate(bench.train_set()) if y == 0][:20])
    with pytest.raises(ValueError, match="fit_loader must hold every class"):
        compare(None, base, bench, fit_loader=DataLoader(only_class_0, batch_size=20), detectors=["ViM"])
    with pytest.raises(ValueError, match="batch_size"):
        compare(iso, None, bench, fit_loader=None, batch_size=0)
