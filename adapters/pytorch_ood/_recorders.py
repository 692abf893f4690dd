"""Recorders: pytorch-ood detectors of the same kind as the one they wrap, keeping every score they return.

:meth:`pytorch_ood.benchmark.Benchmark.evaluate` computes the metrics; the comparison also needs the raw
scores (the conventional FPR with ID positive, histograms, validation choices). A recorder of the
wrapped detector's kind (logits, features, or inputs) shares the benchmark's cache of logits and features.
"""

from __future__ import annotations

import torch
from pytorch_ood.api import Detector, FeaturesDetector, GradientDetector, LogitsDetector
from torch import Tensor, nn

from ._methods import ModelParts, needs_grad

__all__ = ["FeaturesRecorder", "InputsRecorder", "LogitsRecorder", "recorded_split", "recorder"]


class LogitsRecorder(LogitsDetector):
    """Scores cached logits with ``inner`` and keeps the scores (shares the model's logits cache)."""

    def __init__(self, inner: Detector, model: nn.Module):
        super().__init__()
        self.inner, self.model, self.scores = inner, model, []

    def predict_logits(self, logits: Tensor) -> Tensor:
        scores = self.inner.predict_logits(logits)
        self.scores.append(scores.detach().double().cpu())
        return scores


class FeaturesRecorder(FeaturesDetector):
    """Scores cached penultimate features with ``inner`` and keeps the scores."""

    def __init__(self, inner: Detector, encoder: nn.Module):
        super().__init__()
        self.inner, self.encoder, self.scores = inner, encoder, []

    def predict(self, x: Tensor) -> Tensor:
        return self.predict_features(self.encoder(x))

    def predict_features(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            scores = self.inner.predict_features(z)
        self.scores.append(scores.detach().double().cpu())
        return scores


class InputsRecorder(Detector):
    """Runs ``inner`` on the inputs (ODIN, ReAct, ASH) and keeps the scores."""

    def __init__(self, inner: Detector, grad: bool):
        super().__init__()
        self.inner, self.grad, self.scores = inner, grad, []

    def predict(self, x: Tensor) -> Tensor:
        with torch.enable_grad() if self.grad else torch.no_grad():
            scores = self.inner.predict(x)
        self.scores.append(scores.detach().double().cpu())
        return scores.detach()


def recorder(inner: Detector, parts: ModelParts, name: str) -> Detector:
    """The recorder of ``inner`` (detector ``name``) for the model of ``parts``."""
    if isinstance(inner, LogitsDetector):
        return LogitsRecorder(inner, parts.model)
    if isinstance(inner, FeaturesDetector) and not isinstance(inner, GradientDetector):
        return FeaturesRecorder(inner, parts.encoder)
    return InputsRecorder(inner, needs_grad(name))


def recorded_split(recorder: Detector, sizes: list[int], n_id: int) -> list[tuple[Tensor, Tensor]]:
    """The recorded scores as ``(ID scores, OOD scores)`` per OOD set (``sizes``: ID + OOD of each set)."""
    scores = torch.cat(recorder.scores) if recorder.scores else torch.empty(0)
    if len(scores) != sum(sizes):
        raise RuntimeError(f"{type(recorder.inner).__name__} recorded {len(scores)} scores for {sum(sizes)} images.")
    chunks = torch.split(scores, sizes)
    return [(chunk[:n_id], chunk[n_id:]) for chunk in chunks]
