"""The engine's parts without the command line around them: the generated options, schedulers and their
exact resume, safe checkpoints, losses (FPR + smoothing, LogitNorm), augmentation, mixed precision and the
tracked inputs (the folder hold-outs: test_splits.py)."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dismax_plugin as dp
from dismax_plugin.adapters.engine import _checkpoint, _setup
from dismax_plugin.adapters.engine.cli import build_parser, main
from dismax_plugin.adapters.engine.config import (
    HEAD_CHOICES,
    SCHEDULERS,
    CompareOptions,
    ConfigError,
    TrackingOptions,
)
from dismax_plugin.adapters.engine.tracking import Tracker
from dismax_plugin.adapters.engine.training import TrainConfig, train


def _subparser(command: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command]


def test_every_config_field_is_an_option_with_the_same_default_and_choices():
    for command, classes in (("train", (TrainConfig, TrackingOptions)), ("compare", (CompareOptions,))):
        options = {a.dest: a for a in _subparser(command)._actions}
        for cls in classes:
            for f in dataclasses.fields(cls):
                if command == "compare" and f.name == "head":
                    continue
                action = options[f.name]
                assert action.default == f.default, f.name
                choices = f.metadata.get("choices")
                assert (list(action.choices) if action.choices else None) == (list(choices) if choices else None)
    assert "head" not in {a.dest for a in _subparser("compare")._actions}  # compare takes --heads
    from dismax_plugin.adapters import timm as dtimm

    assert HEAD_CHOICES == dtimm.HEAD_KINDS  # --head offers exactly the kinds the timm adapter builds
    assert set(SCHEDULERS) == {"cosine", "step", "multistep", "poly", "constant", "none"}


# --------------------------------------------------------------------------- schedulers
def _lrs(cfg: TrainConfig, epochs: range, steps: int, resume_state=None):
    """lr at the start of each epoch of ``epochs`` (stepped as the loop does), and the scheduler state after."""
    model = torch.nn.Linear(2, 2)
    optimizer = _setup.build_optimizer(cfg, model)
    scheduler = _setup.build_scheduler(cfg, optimizer, steps)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
    lrs = []
    for epoch in epochs:
        lrs.append(optimizer.param_groups[0]["lr"])
        for step in range(steps):
            optimizer.step()
            if scheduler is not None:
                scheduler.step_update(epoch * steps + step + 1)
        if scheduler is not None:
            scheduler.step(epoch + 1)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None}
    return lrs, state


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_shapes_the_lr_and_resumes_exactly(name, tmp_path):
    cfg = TrainConfig(scheduler=name, epochs=8, lr=0.1)
    straight, _ = _lrs(cfg, range(8), steps=3)
    first, state = _lrs(cfg, range(4), steps=3)
    torch.save(state, tmp_path / "s.pt")  # what a checkpoint holds, read back the safe way
    second, _ = _lrs(cfg, range(4, 8), steps=3, resume_state=torch.load(tmp_path / "s.pt", weights_only=True))
    assert first + second == straight
    expected = {
        "none": lambda lr: all(x == 0.1 for x in lr),
        "constant": lambda lr: all(x == pytest.approx(0.1) for x in lr),
        "cosine": lambda lr: lr[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lr, lr[1:])),
        "poly": lambda lr: lr[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lr, lr[1:])),
        # x0.1 every third of the 8 epochs (every 2 epochs), and at 1/2 and 3/4 of them (epochs 4 and 6)
        "step": lambda lr: lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4]),
        "multistep": lambda lr: lr == pytest.approx([0.1] * 4 + [0.01] * 2 + [1e-3] * 2),
    }[name]
    assert expected(straight), straight


# --------------------------------------------------------------------------- checkpoints
def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    _checkpoint.seed_everything(11)
    torch.save(_checkpoint.rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # disturb everything
    _checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert again == draws


class _Payload:
    """Unpickling this runs ``open(path, 'w')``: the kind of code a tampered checkpoint could carry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["tampered", "foreign", "truncated"])
def test_bad_checkpoint_is_refused_without_running_it(kind, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    if kind == "tampered":
        with open(out / "checkpoint.pt", "wb") as handle:
            pickle.dump({"format": "dismax-checkpoint", "model": _Payload(str(marker))}, handle)
    elif kind == "foreign":
        torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, out / "checkpoint.pt")
    else:
        torch.save({"x": torch.zeros(1000)}, out / "checkpoint.pt")
        (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:300])
    code = main(["train", "--model", "test_resnet", "--resume", "--no-track", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--resume" in err[0] and "checkpoint.pt" in err[0] and "Traceback" not in err[0]
    assert not marker.exists()  # the payload never ran


# --------------------------------------------------------------------------- losses
def _fpr_batch():
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    inputs, targets, stitched = dp.fpr_mix(x, y, 4, generator=torch.Generator().manual_seed(0))
    return targets, stitched, torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def test_smoothing_with_fpr_acts_on_the_clean_rows_only():
    targets, stitched, logits = _fpr_batch()
    assert stitched.any() and (~stitched).any()
    plain = _setup.build_loss(TrainConfig(head="dismax"))
    smooth = _setup.build_loss(TrainConfig(head="dismax", smoothing=0.2))

    def gap(z):
        return float(smooth(z, targets, stitched) - plain(z, targets, stitched))

    assert abs(gap(logits)) > 1e-4  # smoothing is not dropped under FPR
    moved = logits.clone()
    moved[stitched] += torch.randn(int(stitched.sum()), 4)  # change only the stitched rows' logits
    assert gap(moved) == pytest.approx(gap(logits), abs=1e-6)  # ... the smoothing term does not see them


def test_no_fpr_smoothing_with_alpha_0_trains_on_a_real_loss():
    targets, _, logits = _fpr_batch()
    y = targets.argmax(dim=1)
    loss = _setup.build_loss(TrainConfig(head="dismax", fpr=False, alpha=0.0, smoothing=0.1))
    value = loss(logits, y, None)  # logits: a head's training output, already times the entropic scale
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)  # nothing scaled again, every (clean) row smoothed
    assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_logitnorm_loss_is_pytorch_oods_at_the_papers_temperature():
    from pytorch_ood.loss import LogitNorm

    logits, y = torch.randn(6, 5), torch.arange(6) % 5
    loss = _setup.build_loss(TrainConfig(head="linear", loss="logitnorm"))
    assert float(loss(logits, y, None)) == pytest.approx(float(LogitNorm(t=0.04)(logits, y)), rel=1e-6)
    assert float(loss(logits, y, None)) != pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-3)
    with pytest.raises(ConfigError, match="--loss"):
        TrainConfig(head="dismax", loss="logitnorm").validate()


# --------------------------------------------------------------------------- data
def _first_image(dataset):
    return dataset[0][0]


def test_augment_randomises_the_training_images_only():
    from dismax_plugin.adapters.engine.training import _build_data

    plain = _build_data(TrainConfig(model="test_resnet", max_train_samples=4).validate())
    assert torch.equal(_first_image(plain.train), _first_image(plain.train))
    augmented = _build_data(TrainConfig(model="test_resnet", augment=True, max_train_samples=4).validate())
    torch.manual_seed(0)
    draws = [_first_image(augmented.train) for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crops/flips differ between reads
    assert torch.equal(_first_image(augmented.fit), _first_image(plain.fit))  # evaluation data is untouched
    assert draws[0].shape == _first_image(plain.train).shape


# --------------------------------------------------------------------------- end to end, in process
class _Recorder(Tracker):
    """The engine's tracker interface, recording what the loop sends."""

    def __init__(self):
        self.inputs, self.metrics, self.params = [], [], {}

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None, **_):
        self.metrics.append((step, dict(metrics)))

    def log_input(self, name, dataset, context):
        self.inputs.append((name, len(dataset), context))


def test_amp_trains_in_bfloat16_on_cpu_and_inputs_are_tracked(tmp_path):
    common = dict(model="test_resnet", epochs=1, batch_size=16, max_train_samples=32, device="cpu", seed=4)
    recorder = _Recorder()
    amp = train(TrainConfig(amp=True, output=str(tmp_path / "amp"), **common), recorder)
    full = train(TrainConfig(output=str(tmp_path / "fp32"), **common))
    assert all(math.isfinite(v) for v in amp.history[0].values())
    changed = [k for k, v in amp.model.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, full.model.state_dict()[k])]  # fmt: skip
    assert changed  # same seed and batches: only bfloat16 autocast makes the weights differ
    with _setup_autocast_probe(amp.model) as seen:
        from dismax_plugin.adapters.engine.training import _autocast

        with _autocast(torch.device("cpu"), True):
            amp.model(torch.randn(2, 3, 32, 32))
    assert torch.bfloat16 in seen
    assert recorder.params["amp"] is True and recorder.params["loss"] == "dismax"
    groups = {name: context for name, _, context in recorder.inputs}
    assert groups == {"in-distribution": "test", "digits_6_9": "ood-near", "image_patches": "ood-far",
                      "gaussian_noise": "ood-far", "uniform_noise": "ood-far"}  # fmt: skip
    assert all(size > 0 for _, size, _ in recorder.inputs)


class _setup_autocast_probe:
    """Records the dtypes of every convolution output of ``model`` inside the block."""

    def __init__(self, model):
        self.model, self.seen, self.hooks = model, set(), []

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                self.hooks.append(module.register_forward_hook(lambda m, i, o: self.seen.add(o.dtype)))
        return self.seen

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


# --------------------------------------------------------------------------- pretrained backbone from the hub
_HUB_SCRIPT = textwrap.dedent(
    """
    import sys, torch, safetensors.torch
    from dismax_plugin.adapters.engine import _setup
    from dismax_plugin.adapters.engine.config import TrainConfig
    model = _setup.build_model(TrainConfig(model="test_resnet", pretrained=True), 6, torch.device("cpu"))
    saved = safetensors.torch.load_file(sys.argv[1])
    state = model.state_dict()
    same = [k for k in saved if k in state and not k.startswith("fc.")]
    assert same and all(torch.equal(state[k], saved[k]) for k in same), "backbone differs from the file"
    assert type(model.fc).__name__ == "DisMaxHead" and model.fc.num_classes == 6
    from dismax_plugin.adapters.engine.cli import main
    # offline without a cached copy (resnet10t's weights are not in the cache): exit 2, one line
    code = main(["train", "--model", "resnet10t", "--pretrained", "--no-track", "--output", sys.argv[2]])
    print("ok", len(same), code)
    """
)


def _hub_cache(root, state: dict) -> str:
    """A huggingface_hub cache (refs/main + snapshot) holding ``state`` for test_resnet's hub repo."""
    import safetensors.torch
    import timm

    repo = timm.get_pretrained_cfg("test_resnet").hf_hub_id
    folder = root / ("models--" + repo.replace("/", "--"))
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(state, str(snapshot / "model.safetensors"))
    return str(snapshot / "model.safetensors")


def test_pretrained_backbone_comes_from_the_hub_cache_offline(tmp_path):
    import timm

    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    weights = _hub_cache(tmp_path / "hub", state)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, weights, str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    last = proc.stdout.strip().splitlines()[-1].split() if proc.stdout.strip() else []
    assert proc.returncode == 0 and last[:1] == ["ok"], proc.stderr[-3000:]
    assert last[-1] == "2"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pretrained" in lines[0], proc.stderr[-3000:]
