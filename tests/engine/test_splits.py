"""Splits end to end: a folder without val/ gets a held-out ID test split (a random-label folder scores near
chance there), the split record is saved with the model, ``calibrate`` rebuilds the calibration split from it
(no ``--seed``: the training temperature bit for bit), and data that does not match the record is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dismax_plugin.adapters import timm as dtimm
from dismax_plugin.adapters.engine.cli import main
from dismax_plugin.adapters.engine.data import build_data
from dismax_plugin.adapters.engine.training import collect_logits
from dismax_plugin.adapters.timm.preprocessing import preprocessing_config

SEED = 3
TRAIN = ["--model", "test_resnet", "--image-size", "16", "--batch-size", "16", "--no-track"]


def _random_label_folder(root, n: int = 90, classes: int = 3) -> None:
    """``n`` digits under ``train/c<k>/`` with labels drawn at random (only memorising can fit them), and a
    small far-OOD set."""
    digits, rng = load_digits(), np.random.default_rng(0)
    for i, label in enumerate(rng.integers(0, classes, n)):
        path = root / "train" / f"c{label}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
    for i in range(6):
        path = root / "ood" / "far" / "noise" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, one_thread):
    """A DisMax model trained to memorise a random-label folder (train/ only), with --seed 3."""
    root = tmp_path_factory.mktemp("splits")
    _random_label_folder(root / "data")
    code = main(["train", *TRAIN, "--data", str(root / "data"), "--epochs", "20", "--seed", str(SEED),
                 "--output", str(root / "run")])  # fmt: skip
    assert code == 0
    return root


def _model_and_data(run, data_dir):
    model = dtimm.load_model(str(run / "model"))
    metadata = dtimm.read_metadata(run / "model")["metadata"]
    return model, metadata, build_data(str(data_dir), metadata["preprocessing"], split=metadata["split"])


def test_random_label_folder_is_tested_on_held_out_images_near_chance(folder_run):
    model, metadata, data = _model_and_data(folder_run / "run", folder_run / "data")
    history = torch.load(folder_run / "run" / "checkpoint.pt", weights_only=True)["history"]
    assert history[-1]["train_acc"] > 0.9  # the labels were memorised ...
    (test,) = data.benchmark.test_sets(known=True, unknown=False)
    logits, labels = collect_logits(model, test)
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert accuracy < 0.6  # ... and the held-out ID test split shows it (chance: 1/3); train/ itself: > 0.9
    assert len(test) == 18 and len(data.val) == 9 and len(data.train) == 63  # 20% + 10% of 90 held out
    assert not set(test.files) & set(data.benchmark.train_set().files) and not set(test.files) & set(data.val.files)
    split = metadata["split"]
    assert split["seed"] == SEED and "held out" in split["sources"]["test"] and split["splits"]["test"]["size"] == 18


def test_calibrate_without_seed_reproduces_the_training_temperature_bit_for_bit(folder_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(folder_run / "run", run)
    before = dtimm.load_model(str(run / "model")).state_dict()
    stored = dtimm.read_metadata(run / "model")["metadata"]["calibration"]["temperature"]
    assert main(["calibrate", "--checkpoint", str(run), "--data", str(folder_run / "data")]) == 0  # no --seed
    assert "temperature" in capsys.readouterr().out
    after = dtimm.load_model(str(run / "model")).state_dict()
    assert dtimm.read_metadata(run / "model")["metadata"]["calibration"]["temperature"] == stored
    assert all(torch.equal(before[k], after[k]) for k in before)  # temperature and thresholds buffers too


def test_data_that_does_not_match_the_stored_split_exits_2(folder_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(folder_run / "data", data)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(data / "train" / "c0" / "extra.png")
    for command in (["evaluate", "--no-track"], ["calibrate"]):
        code = main([command[0], "--checkpoint", str(folder_run / "run"), "--data", str(data), *command[1:]])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "does not match the split stored with the model" in err[0], err
    code = main(["evaluate", "--checkpoint", str(folder_run / "run"), "--data", "digits", "--no-track"])
    err = capsys.readouterr().err
    assert code == 2 and "'digits'" in err and "'folder'" in err


def test_a_new_ood_test_set_is_allowed_and_logged(folder_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(folder_run / "data", data)
    (data / "ood" / "near" / "zeros").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(data / "ood" / "near" / "zeros" / "0.png")
    code = main(["evaluate", "--checkpoint", str(folder_run / "run"), "--data", str(data), "--no-track"])
    out = capsys.readouterr().out  # the command logs to stdout
    assert code == 0 and "zeros: not in the model's record" in out
    assert "ID test = 20% of train/" in out  # the table says where its numbers come from


def test_folder_data_takes_the_benchmark_splits_drawn_with_the_run_seed(tmp_path):
    rng = np.random.default_rng(0)
    for label, count in (("a", 23), ("b", 17)):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "ood" / "far" / "noise").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ood" / "far" / "noise" / "0.png")
    preprocessing = preprocessing_config("test_resnet", 16, 3)
    data = build_data(str(tmp_path), preprocessing, seed=5, augment=True)
    (test,) = data.benchmark.test_sets(known=True, unknown=False)
    assert (len(data.val), len(test), len(data.train), len(data.fit)) == (4, 8, 28, 28)  # 10% and 20% of 40
    assert data.benchmark.train_set().files == data.fit.files
    assert not set(data.val.files) & set(data.fit.files) and not set(test.files) & set(data.fit.files)
    assert data.split["seed"] == 5 and data.split["train_used"] == 28
    other = build_data(str(tmp_path), preprocessing, seed=6)
    assert other.val.files != data.val.files  # drawn with the run's seed
    again = build_data(str(tmp_path), preprocessing, seed=0, split=data.split)  # the stored record's seed wins
    assert again.val.files == data.val.files
    with pytest.raises(ValueError, match="no OOD test sets"):
        shutil.rmtree(tmp_path / "ood")
        build_data(str(tmp_path), preprocessing)


# ----------------------------------------------------------------------------------- calibrate --score
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("score") / "run"
    code = main(["train", "--model", "test_resnet", "--epochs", "1", "--batch-size", "32", "--max-train-samples",
                 "96", "--image-size", "16", "--no-track", "--output", str(out)])  # fmt: skip
    assert code == 0
    return out


def _validation_quality(model_dir) -> dict[str, float]:
    """Mean of near and far AUROC of each native score on the digits' OOD validation split, computed here
    with scikit-learn from the validation logits."""
    from sklearn.metrics import roc_auc_score

    import dismax_plugin as dp

    model = dtimm.load_model(str(model_dir))
    head = dtimm.get_head(model)
    data = build_data("digits", dtimm.read_metadata(model_dir)["metadata"]["preprocessing"])
    bench = data.benchmark
    id_logits = collect_logits(model, data.val)[0]
    quality = {}
    for name in dp.SCORE_NAMES:
        aurocs = {}
        for set_name, dataset in zip(bench.ood_val_names, bench.ood_val_sets()):
            ids, oods = head.ood_score(id_logits, name), head.ood_score(collect_logits(model, dataset)[0], name)
            aurocs[set_name] = roc_auc_score([1] * len(ids) + [0] * len(oods), torch.cat([ids, oods]).numpy())
        far = np.mean([v for n, v in aurocs.items() if bench.ood_val_groups[n] == "far"])
        quality[name] = (aurocs["digits_6_9"] + far) / 2
    return quality


def test_calibrate_score_auto_picks_the_best_score_on_the_ood_validation_split(digits_run, capsys):
    import dismax_plugin as dp

    quality = _validation_quality(digits_run / "model")
    expected = max(quality, key=quality.get)
    assert main(["calibrate", "--checkpoint", str(digits_run), "--data", "digits", "--score", "auto"]) == 0
    assert "--score auto" in capsys.readouterr().out
    head = dtimm.get_head(dtimm.load_model(str(digits_run / "model")))
    assert head.score == expected  # stored in the head: the served model and is_ood use it
    assert head.threshold(0.95) == dp.threshold_at(head.stored_scores(expected), 0.95)  # thresholds follow
    assert dtimm.read_metadata(digits_run / "model")["metadata"]["calibration"]["score"] == expected
    assert main(["calibrate", "--checkpoint", str(digits_run), "--data", "digits", "--score", "es"]) == 0
    assert dtimm.get_head(dtimm.load_model(str(digits_run / "model"))).score == "es"
    assert main(["calibrate", "--checkpoint", str(digits_run), "--data", "digits"]) == 0  # back to the default
    head = dtimm.get_head(dtimm.load_model(str(digits_run / "model")))
    assert head.score == type(head).default_score


def test_calibrate_score_auto_without_an_ood_validation_split_exits_2(folder_run, capsys):
    code = main(["calibrate", "--checkpoint", str(folder_run / "run"), "--data", str(folder_run / "data"),
                 "--score", "auto"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "OOD validation split" in err[0], err


def test_a_model_saved_without_a_split_record_is_evaluated_with_a_warning(folder_run, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    shutil.copytree(folder_run / "run" / "model", run / "model")
    config = json.loads((run / "model" / "config.json").read_text())
    del config["dismax"]["metadata"]["split"]  # as models saved before split records existed
    (run / "model" / "config.json").write_text(json.dumps(config))
    code = main(["evaluate", "--checkpoint", str(run), "--data", str(folder_run / "data"), "--seed", str(SEED),
                 "--no-track"])  # fmt: skip
    assert code == 0 and "no stored split record" in capsys.readouterr().out
