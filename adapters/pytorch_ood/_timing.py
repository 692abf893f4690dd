"""Fair throughput of an OOD method: model forward + scoring on batches already in memory, warmed up.

Every (model, method) is timed the same way on the same batches: data loading is excluded, every job
runs once as a warm-up, then all jobs of a comparison run in turn for several rounds, each paired with a
reference job timed just before it (see :func:`interleaved_best`). For methods that score cached logits
or features, the forward pass to that representation is one job per model, added to the method's scoring
job, so ``images / (forward + scoring)`` is what a deployed ``detector(x)`` costs.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["interleaved_best"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(job, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    job()
    _sync(device)
    return time.perf_counter() - start


def interleaved_best(jobs: dict, device: torch.device, heavy=None, rounds: int = 5) -> dict:
    """Seconds of each job: heavy jobs relative to a reference job timed right before them, light ones best-of.

    The first heavy job is the reference. Each round runs every job once, in turn. A heavy job (a model
    forward pass) is paired with the reference timed just before it: its time is the median over rounds
    of ``job / reference`` times the fastest reference time, which cancels slow changes of the machine's
    load (other processes) so the ratios between models stay fair on a shared machine. A light job (scoring
    cached logits or features, milliseconds) keeps its fastest time. Every job runs once first as a warm-up.

    :param jobs: ``{key: callable}``
    :param heavy: the keys of the heavy jobs (default: all)
    :return: ``{key: seconds}``
    """
    heavy = list(jobs) if heavy is None else [key for key in jobs if key in set(heavy)]
    for job in jobs.values():
        job()
    reference = jobs[heavy[0]] if heavy else None
    ratios: dict = {key: [] for key in heavy}
    fastest = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for key, job in jobs.items():
            if key in ratios:
                base = _seconds(reference, device)
                fastest[heavy[0]] = min(fastest[heavy[0]], base)
                ratios[key].append(_seconds(job, device) / max(base, 1e-12))
            else:
                fastest[key] = min(fastest[key], _seconds(job, device))
    return {key: statistics.median(ratios[key]) * fastest[heavy[0]] if key in ratios else fastest[key] for key in jobs}
