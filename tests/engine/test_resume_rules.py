"""What ``--resume`` accepts: the checkpoint's whole configuration is compared (every option but
``RESUME_MAY_CHANGE``, one line naming the option), the number of processes, and ``--epochs`` re-plans the lr
schedule of an extended run instead of training the new epochs at lr 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dismax_plugin.adapters.engine import _checkpoint, _setup
from dismax_plugin.adapters.engine.cli import main
from dismax_plugin.adapters.engine.config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, flag_of
from dismax_plugin.adapters.engine.training import train

TINY = dict(model="test_resnet", epochs=2, batch_size=16, max_train_samples=32, device="cpu", seed=1, lr=0.05)
ARGV = ["train", "--model", "test_resnet", "--epochs", "2", "--batch-size", "16", "--max-train-samples", "32",
        "--device", "cpu", "--seed", "1", "--lr", "0.05", "--no-track", "--resume"]  # fmt: skip

#: another valid value of every option that changes the run (a new TrainConfig option must be added here or
#: to RESUME_MAY_CHANGE: the test below fails until it is)
OTHER = {
    "model": "test_vit", "head": "isomaxplus", "loss": "isomax", "data": "cifar10_odin", "image_size": 48,
    "channels": 1, "batch_size": 32, "lr": 0.1, "optimizer": "adamw", "momentum": 0.5, "weight_decay": 0.0,
    "scheduler": "step", "warmup_epochs": 1, "seed": 2, "pretrained": True, "pretrained_file": "/w.pth",
    "amp": True, "fpr": False, "entropic_scale": 20.0, "alpha": 0.5, "mixup": 0.2, "cutmix": 0.2, "smoothing": 0.1,
    "augment": True, "max_train_samples": 31, "calibration": "nll",
}  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """A finished 2-epoch run (cosine schedule) and its checkpoint."""
    out = tmp_path_factory.mktemp("run")
    result = train(TrainConfig(output=str(out), **TINY))
    return out, result, torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def test_every_option_that_changes_the_run_is_compared(finished):
    out, _, state = finished
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(OTHER) | set(RESUME_MAY_CHANGE) == names and not set(OTHER) & set(RESUME_MAY_CHANGE)
    base = TrainConfig(output=str(out), resume=True, **TINY)
    _checkpoint.check_resumable(state, base)  # the same run: accepted
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, value in OTHER.items():
        with pytest.raises(ConfigError) as error:
            _checkpoint.check_resumable(state, dataclasses.replace(base, **{name: value}))
        message = str(error.value)
        assert "\n" not in message and "--resume" in message, message
        assert flag_of(fields[name]) in message or f"{name}=" in message, (name, message)


def test_options_that_do_not_change_the_run_may_change(finished):
    out, _, state = finished
    cfg = TrainConfig(output=str(out), resume=True, **(TINY | {"epochs": 5}), workers=1, eval_batch_size=7,
                      data_root=str(out))  # fmt: skip
    _checkpoint.check_resumable(state, dataclasses.replace(cfg, device=None, loss="dismax"))  # auto = dismax


@pytest.mark.parametrize(
    "extra, needle",
    [(["--optimizer", "adamw"], "--optimizer"), (["--channels", "1"], "--channels"),
     (["--batch-size", "32"], "--batch-size"), (["--smoothing", "0.1"], "--smoothing"),
     (["--no-fpr"], "fpr="), (["--epochs", "1"], "--epochs 1")],
)  # fmt: skip
def test_resume_with_another_run_exits_2_with_one_line(finished, capsys, extra, needle):
    out, _, _ = finished
    code = main([*ARGV, "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert needle in err[0] and "Traceback" not in err[0], err


def test_another_number_of_processes_is_refused(finished):
    out, _, state = finished
    with pytest.raises(ConfigError, match="written by 1 process.*nproc_per_node=1"):
        _checkpoint.check_resumable(state, TrainConfig(output=str(out), resume=True, **TINY), world_size=2)


def _planned_lrs(epochs: int) -> list[float]:
    """The lr of each epoch of a run planned for ``epochs`` (stepped as the loop steps it)."""
    cfg = TrainConfig(**(TINY | {"epochs": epochs}))
    optimizer = _setup.build_optimizer(cfg, torch.nn.Linear(2, 2))
    scheduler = _setup.build_scheduler(cfg, optimizer, 2)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)
    return lrs


def test_extending_a_finished_run_replans_the_schedule(finished, tmp_path):
    import shutil

    out, first, _ = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    assert [h["lr"] for h in first.history] == pytest.approx(_planned_lrs(2))  # the lr each epoch trained at
    resumed = train(TrainConfig(output=str(run), resume=True, **(TINY | {"epochs": 4})))
    lrs = [h["lr"] for h in resumed.history]
    assert len(lrs) == 4 and lrs[:2] == [h["lr"] for h in first.history]
    assert lrs[2:] == pytest.approx(_planned_lrs(4)[2:])  # the new epochs: a 4-epoch plan's lr, not 0
    assert min(lrs[2:]) > 0.005
    before, after = first.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (4, 0)
