"""Real torchrun DDP (gloo, CPU): without FPR two processes equal one process on the combined batch; with FPR
each rank stitches its own batch from its own stream (seed, rank, epoch, step) -- exactly what a
single-process replay of the two ranks computes; BatchNorm trains through a last batch of one image; only
rank 0 prints; a checkpoint resumes only with the number of processes that wrote it; ``compare`` evaluates
and writes on rank 0 only; a SIGTERM'd DDP run resumes to the uninterrupted weights."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

COMMON = [
    "train", "--model", "test_vit", "--head", "isomaxplus", "--epochs", "1", "--max-train-samples", "32",
    "--scheduler", "none", "--optimizer", "sgd", "--lr", "0.1", "--no-track", "--seed", "5", "--device", "cpu",
    "--image-size", "16",
]  # fmt: skip
#: test_resnet has BatchNorm; 18 images = 9 per rank = batches of 4 and 4 + 1 (merged: 4 and 5)
FPR = [
    "train", "--model", "test_resnet", "--head", "dismax", "--epochs", "1", "--max-train-samples", "18",
    "--batch-size", "4", "--scheduler", "none", "--lr", "0.05", "--no-track", "--seed", "7", "--device", "cpu",
    "--image-size", "16",
]  # fmt: skip


def _torchrun(argv, log_dir=None, timeout=400, **kwargs):
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *logs,
               "-m", "dismax_plugin", *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(), **kwargs)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _rank_output(log_dir, rank: int) -> str:
    files = glob.glob(os.path.join(str(log_dir), "**", "attempt_0", str(rank), "std*.log"), recursive=True)
    assert files, f"no logs of rank {rank} under {log_dir}"
    return "".join(open(f).read() for f in files)


def _final_weights(output):
    return torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def test_two_process_ddp_matches_single_process(tmp_path, one_thread):
    from dismax_plugin.adapters.engine.cli import main

    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp = _torchrun([*COMMON, "--batch-size", "4", "--output", str(ddp_out)])
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    # the single process: the same command in this process (one thread, as each rank), on the combined batch
    assert main([*COMMON, "--batch-size", "8", "--output", str(single_out)]) == 0
    a, b = _final_weights(ddp_out), _final_weights(single_out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-4), key
    history = torch.load(ddp_out / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]
    assert len(history) == 1  # one epoch, recorded once (rank 0)


@pytest.fixture(scope="module")
def fpr_run(tmp_path_factory):
    """A two-process FPR run of a BatchNorm model whose last per-rank batch would hold one image."""
    root = tmp_path_factory.mktemp("fpr")
    proc = _torchrun([*FPR, "--output", str(root / "run")], log_dir=root / "logs")
    assert proc.returncode == 0, proc.stderr[-4000:] + _rank_output(root / "logs", 1)[-4000:]
    return root


def _replay(argv: list[str], world: int) -> dict:
    """The DDP run of ``argv`` replayed in this process: each rank's batch, FPR stream and BatchNorm batch
    statistics, the gradients averaged (rank 0's BatchNorm running statistics kept, as DDP broadcasts them)."""
    from torch.utils.data import DataLoader

    from dismax_plugin.adapters.engine import _checkpoint, _distributed, _setup
    from dismax_plugin.adapters.engine.cli import build_parser
    from dismax_plugin.adapters.engine.config import train_config
    from dismax_plugin.adapters.engine.training import _build_data

    cfg = train_config(build_parser().parse_args([*argv, "--output", "unused"])).validate()
    data = _build_data(cfg)
    _checkpoint.seed_everything(cfg.seed)
    model = _setup.build_model(cfg, data.num_classes, torch.device("cpu"))
    optimizer, loss_fn = _setup.build_optimizer(cfg, model), _setup.build_loss(cfg)
    model.train()
    ranks = [_distributed.Dist(rank, world) for rank in range(world)]
    loaders = [iter(DataLoader(data.train, batch_sampler=_distributed.EpochBatchSampler(
        len(data.train), cfg.batch_size, cfg.seed, 0, ddp))) for ddp in ranks]  # fmt: skip
    transforms = [_setup.BatchTransform(cfg, data.num_classes, ddp.rank) for ddp in ranks]
    steps = len(_distributed.EpochBatchSampler(len(data.train), cfg.batch_size, cfg.seed, 0, ranks[0]))
    owners = [(module, name) for module in model.modules() for name, _ in module.named_buffers(recurse=False)]
    for step in range(steps):
        buffers = [getattr(module, name).clone() for module, name in owners]
        losses = []
        for rank in reversed(range(world)):  # rank 0 last: its running statistics stay
            for (module, name), value in zip(owners, buffers):  # fresh tensors: autograd keeps the others
                setattr(module, name, value.clone())
            x, y = next(loaders[rank])
            inputs, targets, stitched = transforms[rank](x, y, 0, step)
            losses.append(loss_fn(model(inputs), targets, stitched))
        optimizer.zero_grad(set_to_none=True)
        (sum(losses) / world).backward()
        optimizer.step()
    return model.state_dict()


def test_fpr_ranks_stitch_their_own_streams_as_a_replay_of_the_ranks_computes(fpr_run, one_thread):
    trained = _final_weights(fpr_run / "run")
    replayed = _replay(FPR, world=2)
    assert trained.keys() == replayed.keys()
    for key in trained:
        assert torch.allclose(trained[key].double(), replayed[key].double(), atol=1e-4), key
    # not the single-process run on the combined batch: FPR stitches within each rank's batch
    single = _replay([*FPR, "--batch-size", "8"], world=1)
    assert any(not torch.allclose(trained[k].double(), single[k].double(), atol=1e-3) for k in trained
               if trained[k].is_floating_point())  # fmt: skip


def test_only_rank_0_prints(fpr_run):
    rank0, rank1 = _rank_output(fpr_run / "logs", 0), _rank_output(fpr_run / "logs", 1)
    assert "epoch 1/1" in rank0 and "model saved" in rank0
    assert "epoch 1/1" not in rank1 and "checkpoint" not in rank1 and "model saved" not in rank1, rank1


def test_resuming_with_another_number_of_processes_is_refused(fpr_run, capsys):
    from dismax_plugin.adapters.engine.cli import main

    code = main([*FPR, "--epochs", "2", "--resume", "--output", str(fpr_run / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "written by 2 process(es)" in err[0] and "nproc_per_node=2" in err[0]


@pytest.mark.slow
def test_compare_under_torchrun_evaluates_and_writes_on_rank_0_only(tmp_path):
    out = tmp_path / "cmp"
    proc = _torchrun(["compare", "--model", "test_resnet", "--epochs", "1", "--batch-size", "8",
                      "--max-train-samples", "32", "--twins", "ce", "--detectors", "MaxSoftmax", "--no-track",
                      "--device", "cpu", "--output", str(out)], log_dir=tmp_path / "logs")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "results.csv").is_file() and (out / "report.md").is_file()
    rank0, rank1 = _rank_output(tmp_path / "logs", 0), _rank_output(tmp_path / "logs", 1)
    assert "Comparison on digits" in rank0 and "wrote" in rank0
    assert "Comparison" not in rank1 and "wrote" not in rank1 and "AUROC" not in rank1, rank1


# 136 images = 68 per rank = 17 steps of 4: the ranks agree on a stop at step 16 of an epoch
LONG = [*FPR[:FPR.index("--epochs")], "--epochs", "2", "--max-train-samples", "136", "--batch-size", "4",
        "--scheduler", "cosine", "--lr", "0.05", "--no-track", "--seed", "7", "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_sigterm_under_ddp_checkpoints_at_an_agreed_step_and_resumes_exactly(tmp_path):
    straight = _torchrun([*LONG, "--output", str(tmp_path / "straight")], timeout=600)
    assert straight.returncode == 0, straight.stderr[-4000:]
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "dismax_plugin", *LONG, "--output", str(out)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 400
    for line in proc.stdout:  # rank 0 logs the end of epoch 1 after its checkpoint: stop early in epoch 2
        assert time.monotonic() < deadline
        if re.search(r"epoch 1/2 ", line):
            os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: every process of it
            break
    proc.communicate(timeout=300)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    if (state["epoch"], state["step"]) == (2, 0):
        pytest.fail("the run finished before the signal arrived")
    assert state["epoch"] == 1 and state["step"] in (0, 16), (state["epoch"], state["step"])
    resumed = _torchrun([*LONG, "--resume", "--output", str(out)], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _final_weights(tmp_path / "straight"), _final_weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
