"""The training loop's batches and host syncs: a last batch of one image joins the one before (BatchNorm
trains), FPR stitches from a stream of (seed, rank, epoch, step), and an epoch reads nothing back from the
device per step (counted)."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from dismax_plugin.adapters.engine import _distributed, training
from dismax_plugin.adapters.engine._setup import BatchTransform
from dismax_plugin.adapters.engine._signals import polling
from dismax_plugin.adapters.engine.config import ConfigError, TrainConfig
from dismax_plugin.adapters.engine.tracking import Tracker


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("n, batch, world", [(65, 64, 1), (17, 4, 1), (18, 4, 2), (650, 4, 2), (16, 4, 1), (5, 4, 1)])
def test_batches_cover_the_shard_once_and_never_hold_one_image(n, batch, world):
    per_rank = n // world
    for rank in range(world):
        ddp = _distributed.Dist(rank, world)
        sampler = _distributed.EpochBatchSampler(n, batch, seed=3, epoch=2, ddp=ddp)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(len(b) >= 2 for b in batches) and all(len(b) <= batch + 1 for b in batches)
        shard = sampler._indices()
        assert sorted(i for b in batches for i in b) == sorted(shard) and len(shard) == per_rank
        for start in range(len(batches)):  # resuming at any batch gives the same remaining batches
            assert list(_distributed.EpochBatchSampler(n, batch, 3, 2, ddp, start)) == batches[start:]


def test_a_last_batch_of_one_image_trains_a_batchnorm_model(tmp_path, one_thread):
    cfg = TrainConfig(model="test_resnet", epochs=1, batch_size=64, max_train_samples=65, device="cpu",
                      output=str(tmp_path / "run"))  # fmt: skip
    result = train_quietly(cfg)
    assert len(result.history) == 1 and result.model_dir is not None  # 65 = one batch of 65, not 64 + 1


def test_fewer_than_two_training_images_per_process_is_refused(tmp_path):
    cfg = TrainConfig(model="test_resnet", epochs=1, max_train_samples=1, device="cpu", output=str(tmp_path))
    with pytest.raises(ConfigError, match="--max-train-samples.*at least 2"):
        training.train(cfg)


def train_quietly(cfg):
    return training.train(cfg, Tracker())


# --------------------------------------------------------------------------- FPR streams
def _coded_batch(n=8):
    """Images whose pixels hold their index in the batch, so a stitched image shows its sources."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return x, torch.arange(n) % 4


def test_each_rank_stitches_its_own_pattern_and_a_position_always_the_same():
    cfg = TrainConfig(head="dismax", seed=5)
    x, y = _coded_batch()
    ranks = [BatchTransform(cfg, 4, rank) for rank in range(4)]
    outputs = [t(x, y, epoch=1, step=3)[0] for t in ranks]
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 4  # four ranks, four stitchings
    again = BatchTransform(cfg, 4, 2)
    again(x, y, epoch=0, step=0)  # draws in between do not matter: the stream is the position's
    assert torch.equal(again(x, y, epoch=1, step=3)[0], outputs[2])
    assert not torch.equal(again(x, y, epoch=1, step=4)[0], outputs[2])
    other_seed = BatchTransform(TrainConfig(head="dismax", seed=6), 4, 2)(x, y, epoch=1, step=3)[0]
    assert not torch.equal(other_seed, outputs[2])


# --------------------------------------------------------------------------- host syncs
_READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy")


class _CountReads:
    """Counts every read of a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``,
    ``.tolist()``, ``.numpy()``) by the file that made it: on an accelerator each one waits for the device."""

    def __init__(self):
        self.by_file: collections.Counter = collections.Counter()
        self._saved = {}

    def __enter__(self):
        for name in _READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.by_file[sys._getframe(1).f_code.co_filename] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def of(self, part: str) -> int:
        return sum(count for file, count in self.by_file.items() if part in file.replace("\\", "/"))


@pytest.mark.parametrize("bar", [False, True])
def test_an_epoch_reads_the_device_once_per_log_interval_not_per_step(tmp_path, monkeypatch, one_thread, bar):
    if bar:  # a terminal: the progress bar shows the running loss, read every LOG_EVERY steps
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cfg = TrainConfig(model="test_resnet", epochs=1, batch_size=4, max_train_samples=136, device="cpu",
                      output=str(tmp_path)).validate()  # fmt: skip
    run = training.setup(cfg, Tracker())
    steps = run.steps_per_epoch
    assert steps == 34 > 2 * training.LOG_EVERY
    with _CountReads() as reads, polling() as stop:
        sums = training.run_epoch(run, 0, 0, stop)  # (end_epoch then reads the sums once)
    engine = reads.of("adapters/engine/")
    allowed = 1 + (steps // training.LOG_EVERY if bar else 0)  # the sampler's order on the CPU (+ the bar)
    assert engine <= allowed, dict(reads.by_file)  # the loop before: 3 reads per step (loss, correct, judged)
    assert reads.of("dismax_plugin/_checks.py") >= steps  # the counter sees reads (here: the core's input checks)
    loss_sum, correct, judged, seen = sums.tolist()
    assert seen == 136 and judged == 136 - steps * 2 and 0 <= correct <= judged  # FPR: half of each batch stitched
