"""The OOD methods of a comparison: native isotropic scores and pytorch-ood's post-hoc detectors, built per model.

One definition of the detector names (:data:`DETECTOR_NAMES`, :func:`check_detectors`) and of what each
detector needs from a model:

==========================================================  ==========================================
detectors                                                   need
==========================================================  ==========================================
MaxSoftmax, EnergyBased, MaxLogit, Entropy, GEN             logits (any model)
KLMatching, TemperatureScaling                              logits; fitted on the ID validation logits
WeightedEBO                                                 logits; class weights = training class frequencies
Mahalanobis, RMD, KNN, SHE, NNGuide                         penultimate features (input of the classifier)
ViM, DICE, fDBD                                             penultimate features and a *linear* classifier
                                                            (W, b): not for isotropic (distance) heads
ODIN                                                        input gradients through the model
ReAct                                                       timm ``forward_features`` / ``forward_head``
ASH                                                         as ReAct, with 4-D feature maps (CNNs)
==========================================================  ==========================================

:func:`unsupported_reason` says why a detector cannot run on a model; :func:`build_detectors` makes
fitted detectors from a :class:`ModelParts`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dismax_plugin.convert import find_classifier, heads_of

from ._checks import check_names

__all__ = [
    "DEFAULT_DETECTORS",
    "DETECTOR_NAMES",
    "ModelParts",
    "Penultimate",
    "build_detector",
    "check_detectors",
    "unsupported_reason",
]

log = logging.getLogger(__name__)

#: every pytorch-ood post-hoc detector the comparison offers, in the order of the report
DETECTOR_NAMES: tuple[str, ...] = (
    "MaxSoftmax",
    "EnergyBased",
    "MaxLogit",
    "Entropy",
    "GEN",
    "KLMatching",
    "TemperatureScaling",
    "WeightedEBO",
    "ODIN",
    "Mahalanobis",
    "RMD",
    "KNN",
    "ViM",
    "DICE",
    "SHE",
    "NNGuide",
    "fDBD",
    "ReAct",
    "ASH",
)
#: the default subset (cheap: one cached pass per model; keeps ``make run`` short)
DEFAULT_DETECTORS: tuple[str, ...] = ("MaxSoftmax", "EnergyBased", "Mahalanobis", "KNN")

_LINEAR_ONLY = ("ViM", "DICE", "fDBD")
_FEATURE_MAPS = ("ReAct", "ASH")
_VALIDATION_FITTED = ("KLMatching", "TemperatureScaling")


def check_detectors(names) -> list[str]:
    """Detector names in canonical spelling.

    :param names: ``None`` (:data:`DEFAULT_DETECTORS`), ``"all"`` (:data:`DETECTOR_NAMES`), a comma-separated
        string or a list of names (case-insensitive)
    :raises ValueError: for an unknown name (the message lists :data:`DETECTOR_NAMES`) or an empty list
    :raises TypeError: for anything else
    """
    if names is None:
        return list(DEFAULT_DETECTORS)
    if isinstance(names, str):
        if names.strip().lower() == "all":
            return list(DETECTOR_NAMES)
        names = [n for n in names.split(",") if n.strip()]
    return check_names("detectors", names, DETECTOR_NAMES)


class Penultimate(nn.Module):
    """The input of ``classifier`` when ``model`` runs, flattened to :math:`B \\times D` (a forward hook)."""

    def __init__(self, model: nn.Module, classifier: nn.Module):
        super().__init__()
        self.model, self.classifier = model, classifier
        self._captured: Tensor | None = None

    def _keep(self, module, inputs, output) -> None:
        self._captured = inputs[0]

    def forward(self, x: Tensor) -> Tensor:
        """:param x: model inputs. :return: features :math:`B \\times D`."""
        handle = self.classifier.register_forward_hook(self._keep)
        try:
            self.model(x)
        finally:
            handle.remove()
        features, self._captured = self._captured, None
        return features.flatten(1)


def _classifier_of(model: nn.Module) -> nn.Module:
    heads = heads_of(model)
    if heads:
        return heads[0][1]
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    if isinstance(classifier, nn.Linear):
        return classifier
    return find_classifier(model)[1]


@dataclass
class ModelParts:
    """What the detectors need from one model, and the ID data they are fitted on.

    :param model: the model in eval mode (logits :math:`B \\times C`)
    :param fit_features: penultimate features :math:`N \\times D` of the training set
    :param fit_labels: their labels :math:`N`
    :param val_logits: logits :math:`M \\times C` of the ID validation set (``None``: none)
    :param val_labels: their labels :math:`M`
    :param norm_std: per-channel std of the input normalisation (for ODIN's step), or ``None``
    """

    model: nn.Module
    fit_features: Tensor | None = None
    fit_labels: Tensor | None = None
    val_logits: Tensor | None = None
    val_labels: Tensor | None = None
    norm_std: Sequence[float] | None = None
    feature_s: float = 0.0  #: seconds of the feature pass over the training set

    def __post_init__(self):
        self.classifier = _classifier_of(self.model)
        self.encoder = Penultimate(self.model, self.classifier)
        self.isotropic = bool(heads_of(self.model))

    @property
    def num_classes(self) -> int:
        return int(getattr(self.classifier, "out_features", 0) or getattr(self.classifier, "num_classes", 0))


def unsupported_reason(name: str, model: nn.Module, probe: Tensor | None = None) -> str | None:
    """Why detector ``name`` cannot run on ``model`` (``None`` when it can).

    :param probe: an input batch, to check the rank of timm's ``forward_features`` output for ASH
    """
    if name in _LINEAR_ONLY and not isinstance(_classifier_of(model), nn.Linear):
        return "needs a linear classifier (W, b); the isotropic head is distance-based"
    if name in _FEATURE_MAPS:
        if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
            return "needs timm's forward_features/forward_head"
        if name == "ASH" and probe is not None:
            with torch.no_grad():
                rank = model.forward_features(probe[:1]).ndim
            if rank != 4:
                return f"needs B x C x H x W feature maps; forward_features gives {rank}-D tensors"
    return None


def _feature_detector(name: str, parts: ModelParts):
    from pytorch_ood import detector as pod

    weight = bias = None
    if isinstance(parts.classifier, nn.Linear):
        weight = parts.classifier.weight.detach().float().cpu()
        bias = parts.classifier.bias
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float().cpu()
    n_fit, width = parts.fit_features.shape
    makers = {
        "Mahalanobis": lambda: pod.Mahalanobis(None),
        "RMD": lambda: pod.RMD(None),
        "KNN": lambda: pod.KNN(None, k=min(50, n_fit)),
        "ViM": lambda: pod.ViM(None, d=max(1, min(width // 2, width - 1)), w=weight, b=bias),
        "DICE": lambda: pod.DICE(None, w=weight, b=bias, p=0.7),
        "SHE": lambda: pod.SHE(None, head=parts.classifier),
        "NNGuide": lambda: pod.NNGuide(None, head=parts.classifier, k=min(10, n_fit)),
        "fDBD": lambda: pod.fDBD(None, head=parts.classifier),
    }
    detector = makers[name]()
    with torch.no_grad():
        detector.fit_features(parts.fit_features, parts.fit_labels)
    return detector


def build_detector(name: str, parts: ModelParts, fit_loader=None):
    """A pytorch-ood detector ``name`` for ``parts.model``, fitted (without its model/encoder for the detectors
    that score cached logits or features: the comparison supplies those).

    :param fit_loader: loader of ID training batches, for ReAct's activation threshold
    :raises ValueError: for a detector that cannot run on the model (see :func:`unsupported_reason`)
    """
    from pytorch_ood import detector as pod

    reason = unsupported_reason(name, parts.model)
    if reason:
        raise ValueError(f"{name} cannot run on this model: {reason}.")
    model = parts.model
    if name in ("MaxSoftmax", "EnergyBased", "MaxLogit", "Entropy", "GEN"):
        return getattr(pod, name)(None)
    if name in _VALIDATION_FITTED:
        logits, labels = parts.val_logits, parts.val_labels
        if logits is None:
            raise ValueError(f"{name} is fitted on ID validation logits; the benchmark has no validation set.")
        return getattr(pod, name)(None).fit_logits(logits, labels)
    if name == "WeightedEBO":
        counts = torch.bincount(parts.fit_labels.long(), minlength=parts.num_classes).float()
        return pod.WeightedEBO(None, weights=counts / counts.sum() * len(counts))
    if name == "ODIN":
        return pod.ODIN(model, norm_std=list(parts.norm_std) if parts.norm_std is not None else None)
    if name == "ReAct":
        detector = pod.ReAct(model.forward_features, model.forward_head)
        detector.to(next(model.parameters()).device)
        with torch.no_grad():
            return detector.fit(fit_loader)
    if name == "ASH":
        return pod.ASH(model.forward_features, model.forward_head)
    return _feature_detector(name, parts)


def needs_grad(name: str) -> bool:
    """Whether detector ``name`` needs autograd at prediction time (ODIN's input perturbation)."""
    return name == "ODIN"
