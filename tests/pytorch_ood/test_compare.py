"""The comparison harness on pytorch-ood's Benchmark.evaluate: rows (test and validation), groups, metrics, every
model at temperature 1, ECE, tuning on the validation split, throughput, tables and their validation marks."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader

import dismax_plugin as dp
from dismax_plugin.adapters.pytorch_ood import (
    DETECTOR_NAMES,
    METRIC_KEYS,
    ROW_KEYS,
    DigitsBenchmark,
    DisMaxLoss,
    check_detectors,
    compare,
    format_summary,
    format_table,
    report_markdown,
    summarize,
)

BATCH = 256


def _train(model: nn.Module, loss_fn, bench: DigitsBenchmark, steps: int = 20) -> nn.Module:
    torch.manual_seed(0)
    loader = DataLoader(bench.train_set(), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _, (x, y) in zip(range(steps), loader):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def setup():
    bench = DigitsBenchmark(ood_size=60, image_size=16, memoize=True)  # small images: a cheap fixture
    torch.manual_seed(0)
    iso = _train(dp.convert(timm.create_model("test_resnet", num_classes=6), "dismax"), DisMaxLoss(), bench, 40)
    dp.heads_of(iso)[0][1].set_temperature(0.05)  # a calibrated head: scores must not change
    torch.manual_seed(0)
    base = _train(timm.create_model("test_resnet", num_classes=6), nn.CrossEntropyLoss(), bench, 40)
    before = {name: copy.deepcopy(m.state_dict()) for name, m in (("iso", iso), ("base", base))}
    keep, skipped = {}, []
    detectors = ["MaxSoftmax", "EnergyBased", "Mahalanobis", "KNN", "ViM", "TemperatureScaling", "ASH"]
    rows = compare({"dismax": iso, "ce": base}, bench, fit_data=bench.train_set(), val_data=bench.val_set(),
                   detectors=detectors, seed=3, batch_size=BATCH, timing_images=64, keep_scores=keep,
                   skipped=skipped)  # fmt: skip
    return {"bench": bench, "iso": iso, "base": base, "before": before, "rows": rows, "keep": keep,
            "skipped": skipped, "detectors": detectors}  # fmt: skip


def _rows(rows, **match):
    match.setdefault("split", "test")
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_rows_cover_every_model_method_and_set_with_its_group(setup):
    rows, bench = setup["rows"], setup["bench"]
    assert all(set(r) == set(ROW_KEYS) for r in rows) and {r["split"] for r in rows} == {"test", "val"}
    assert [r["split"] for r in _rows(rows, model="ce", split="val")][:1] == ["val"]
    for model in ("dismax", "ce"):  # every method is scored on the validation splits too, set by set
        test_methods = [(r["method"], r["dataset"]) for r in _rows(rows, model=model)]
        assert [(r["method"], r["dataset"]) for r in _rows(rows, model=model, split="val")] == test_methods
    assert bench.ood_val_names == bench.ood_names
    natives = [s.upper() for s in dp.SCORE_NAMES]
    dismax_methods = [*natives, *[d for d in setup["detectors"] if d != "ViM"]]
    assert list(dict.fromkeys(r["method"] for r in _rows(rows, model="dismax"))) == dismax_methods
    assert list(dict.fromkeys(r["method"] for r in _rows(rows, model="ce"))) == setup["detectors"]
    for r in rows:
        assert r["seed"] == 3 and r["group"] == bench.ood_groups[r["dataset"]]
        assert [x["dataset"] for x in _rows(rows, model=r["model"], method=r["method"])] == bench.ood_names
    (skipped,) = setup["skipped"]
    assert skipped == {"model": "dismax", "method": "ViM", "reason": skipped["reason"], "seed": 3}
    assert "linear classifier" in setup["skipped"][0]["reason"]


def test_metrics_are_finite_fractions_and_match_sklearn(setup):
    rows, keep = setup["rows"], setup["keep"]
    for r in _rows(rows):
        for key in (*METRIC_KEYS, "ACC", "ECE", "ECE-raw"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key)
        assert r["images_per_s"] > 0 and r["fit_s"] >= 0
        # tuned with GridSearch on the benchmark's validation split (ID + OOD validation) where there is a space
        searched = r["method"] in ("KNN", "ASH", "ViM")
        tuned = r["tuning"].startswith("GridSearch") if searched else r["tuning"] == "defaults"
        assert tuned, (r["model"], r["method"], r["tuning"])
    for r in _rows(rows, split="val"):
        assert 0.0 <= r["AUROC"] <= 1.0 and 0.0 <= r["ACC"] <= 1.0 and math.isnan(r["ECE"])
    for r in _rows(rows, dataset="digits_6_9"):
        scores = keep[(r["model"], r["method"])]
        id_scores, ood_scores = scores["ID"], scores["digits_6_9"]
        labels = [0] * len(id_scores) + [1] * len(ood_scores)  # OOD positive, larger score = more OOD
        expected = roc_auc_score(labels, torch.cat([id_scores, ood_scores]).numpy())
        assert r["AUROC"] == pytest.approx(expected, abs=1e-6)
        # FPR95-ID: fraction of OOD accepted at the threshold keeping 95% of ID
        threshold = torch.quantile(id_scores, 0.95)
        assert r["FPR95-ID"] == pytest.approx(float((ood_scores <= threshold).double().mean()), abs=0.01)


def test_every_model_is_scored_at_temperature_1_so_mps_equals_maxsoftmax(setup):
    rows, keep = setup["rows"], setup["keep"]
    iso, bench = setup["iso"], setup["bench"]
    (test_set,) = bench.test_sets(known=True, unknown=False)
    with torch.no_grad():
        logits = torch.cat([iso.eval()(x) for x, _ in DataLoader(test_set, batch_size=BATCH)])
    assert float(dp.heads_of(iso)[0][1].temperature) == pytest.approx(0.05)  # restored after the comparison
    torch.testing.assert_close(keep[("dismax", "MPS")]["ID"], -dp.score(logits * 0.05, "mps"))
    # pytorch-ood's MaxSoftmax sees the logits at T = 1, as the native MPS does (and as the twin's raw logits)
    torch.testing.assert_close(keep[("dismax", "MaxSoftmax")]["ID"], keep[("dismax", "MPS")]["ID"])
    msp = _rows(rows, model="dismax", method="MaxSoftmax")
    mps = _rows(rows, model="dismax", method="MPS")
    # the same scores up to float32 rounding (pytorch-ood's softmax vs ours), which can reorder a near-tie
    assert [r["AUROC"] for r in msp] == pytest.approx([r["AUROC"] for r in mps], abs=1e-4)


class _FailingBenchmark(DigitsBenchmark):
    def evaluate(self, *args, **kwargs):
        raise RuntimeError("disk gone")


def test_the_temperature_is_restored_when_the_evaluation_fails(setup):
    iso, bench = setup["iso"], setup["bench"]
    with pytest.raises(RuntimeError, match="disk gone"):
        compare({"dismax": iso}, _FailingBenchmark(ood_size=5), fit_data=bench.val_set(), detectors=["MaxSoftmax"])
    assert float(dp.heads_of(iso)[0][1].temperature) == pytest.approx(0.05)


def test_accuracy_and_calibrated_ece_are_computed_the_same_way_for_every_model(setup):
    rows, bench = setup["rows"], setup["bench"]
    (test_set,) = bench.test_sets(known=True, unknown=False)
    for name, model, temperature in (("dismax", setup["iso"], 0.05), ("ce", setup["base"], 1.0)):
        with torch.no_grad():
            raw = [(model.eval()(x) * temperature, y) for x, y in DataLoader(test_set, batch_size=BATCH)]
            val = [(model(x) * temperature, y) for x, y in DataLoader(bench.val_set(), batch_size=BATCH)]
        logits, labels = torch.cat([z for z, _ in raw]), torch.cat([y for _, y in raw])
        fitted = dp.calibrate_temperature(torch.cat([z for z, _ in val]), torch.cat([y for _, y in val]))
        row = _rows(rows, model=name)[0]
        assert row["ACC"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
        assert row["ECE-raw"] == pytest.approx(dp.expected_calibration_error(logits, labels), abs=1e-7)
        assert row["ECE"] == pytest.approx(dp.expected_calibration_error(logits / fitted, labels), abs=1e-7)


def test_models_are_restored_and_untouched(setup):
    for name, model in (("iso", setup["iso"]), ("base", setup["base"])):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, setup["before"][name][key])


def test_summary_near_far_and_seeds():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        for dataset, group, auroc in (("a", "near", 0.6), ("b", "far", 0.8), ("c", "far", 0.9)):
            rows.append({"model": "ce", "seed": seed, "method": "MaxSoftmax", "dataset": dataset, "group": group,
                         "AUROC": auroc + shift, "FPR95-ID": 0.5, "ACC": 0.9, "ECE": 0.1, "images_per_s": 100.0})
    (one,) = summarize(rows)
    assert one["near AUROC"] == pytest.approx(0.65) and one["far AUROC"] == pytest.approx(0.9)
    assert one["near AUROC std"] == pytest.approx(math.sqrt(0.005)) and one["seeds"] == 2 and one["speed"] == 1.0
    (single,) = summarize(rows[:3])
    assert single["near AUROC std"] is None and "±" not in format_summary([single]).splitlines()[2]
    text = format_summary([one])
    assert "65.0±7.1 " in text and "85.0" not in text and max(len(line) for line in text.splitlines()) <= 100
    assert "*" not in text and "no best marks" in text  # no validation rows: nothing is marked
    report = report_markdown([one], rows, title="T", notes=["tuned: no"])
    assert report.startswith("# T") and "**" not in report and "- tuned: no" in report
    assert "digits" not in report and "| ce | MaxSoftmax |" in report and "Test sets (ID test + OOD test)" in report


def test_best_marks_are_chosen_on_the_validation_rows_never_on_the_test_rows():
    rows = []
    for model, test_auroc, val_auroc in (("ce", 0.9, 0.6), ("dismax", 0.7, 0.8)):
        for split, auroc in (("test", test_auroc), ("val", val_auroc)):
            for dataset, group in (("a", "near"), ("b", "far")):
                rows.append({"model": model, "seed": 0, "split": split, "method": "M", "dataset": dataset,
                             "group": group, "AUROC": auroc, "FPR95-ID": 1 - auroc, "ACC": 0.9, "ECE": 0.1,
                             "images_per_s": 100.0})  # fmt: skip
    ce, dismax = summarize(rows)
    assert (ce["near AUROC"], ce["val near AUROC"]) == (0.9, 0.6)  # the numbers shown are the test rows
    text = format_summary([ce, dismax])
    lines = {line.split()[0]: line for line in text.splitlines()[2:4]}
    assert "90.0 " in lines["ce"] and "70.0*" in lines["dismax"] and "OOD validation" in text
    report = report_markdown([ce, dismax], rows, title="T")
    assert "**70.0**" in report and "**90.0**" not in report and "| val " not in report.split("##")[0]
    assert "chosen on the OOD validation split" in report


def test_format_table_prints_percent_and_checks_its_input(setup):
    text = format_table(setup["rows"][:2])
    assert "AUROC (%)" in text and "FPR95-ID (%)" in text and "images_per_s" in text
    assert f"{100 * setup['rows'][0]['AUROC']:.2f}" in text
    with pytest.raises(TypeError, match="rows"):
        format_table("rows")


def test_detector_names_are_checked_in_one_place():
    assert check_detectors("all") == list(DETECTOR_NAMES) and len(DETECTOR_NAMES) == 19
    assert check_detectors("maxsoftmax, KNN") == ["MaxSoftmax", "KNN"]
    with pytest.raises(ValueError, match="detectors.*Energy'") as error:
        check_detectors(["Energy"])
    assert "EnergyBased" in str(error.value)


def test_bad_arguments_name_the_argument(setup):
    bench, iso = setup["bench"], setup["iso"]
    with pytest.raises(ValueError, match="models"):
        compare({}, bench, fit_data=bench.train_set())
    with pytest.raises(TypeError, match="models"):
        compare({"x": "resnet"}, bench, fit_data=bench.train_set())
    with pytest.raises(ValueError, match="scores"):
        compare({"dismax": iso}, bench, fit_data=bench.train_set(), scores=["energy"])
    with pytest.raises(ValueError, match="batch_size"):
        compare({"dismax": iso}, bench, fit_data=bench.train_set(), batch_size=0)
    grouped = DigitsBenchmark(ood_size=5)
    grouped.ood_groups = {"digits_6_9": "near"}
    with pytest.raises(ValueError, match="neither the near nor the far"):
        compare({"dismax": iso}, grouped, fit_data=grouped.train_set(), detectors=["MaxSoftmax"])
