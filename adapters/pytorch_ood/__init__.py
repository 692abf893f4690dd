r"""pytorch-ood glue: the native isotropic scores as a :class:`~pytorch_ood.api.LogitsDetector` and the
isotropic losses with pytorch-ood metadata.

pytorch-ood's convention is that *larger outlier scores mean more likely OOD*; the native scores of
:mod:`dismax_plugin.scores` are in-distribution scores (larger means more in-distribution), so the detector
returns their negation, as pytorch-ood's ``EnergyBased`` and ``MaxLogit`` do for their papers' scores.

.. code-block:: python

    from pytorch_ood.benchmark import CIFAR10_ODIN
    from dismax_plugin.adapters.pytorch_ood import DisMaxDetector

    detector = DisMaxDetector(model)              # the head's default score, e.g. MMLES for DisMax
    results = benchmark.evaluate(detector, loader_kwargs={"batch_size": 128})

Papers (``Paper`` has no author field; the authors are listed in :data:`PAPER_AUTHORS`):

* IsoMax: *Entropic Out-of-Distribution Detection*, D. Macêdo, T. I. Ren, C. Zanchettin,
  A. L. I. Oliveira, T. Ludermir, arXiv 1908.05569 (2019), IJCNN 2021.
* IsoMax+: *Enhanced Isotropy Maximization Loss: Seamless and High-Performance Out-of-Distribution
  Detection Simply Replacing the SoftMax Loss*, D. Macêdo, T. Ludermir, arXiv 2105.14399 (2021).
* DisMax: *Distinction Maximization Loss: Efficiently Improving Out-of-Distribution Detection and
  Uncertainty Estimation by Replacing the Loss and Calibrating*, D. Macêdo, C. Zanchettin,
  T. Ludermir, arXiv 2205.05874 (2022).
"""

from __future__ import annotations

import logging

import torch
from pytorch_ood.api import DetectorInfo, LogitsDetector, LossInfo, Paper, Representation, Task
from pytorch_ood.utils import drop_unknown
from torch import Tensor, nn

from dismax_plugin import losses as _core_losses
from dismax_plugin._checks import check_choice
from dismax_plugin.convert import heads_of
from dismax_plugin.scores import SCORE_NAMES, SCORES

__all__ = [
    "DISMAX_PAPER",
    "ISOMAX_PAPER",
    "ISOMAX_PLUS_PAPER",
    "PAPER_AUTHORS",
    "DisMaxDetector",
    "DisMaxLoss",
    "IsoMaxLoss",
    "IsoMaxPlusLoss",
]

log = logging.getLogger(__name__)

_ISOMAX_CODE = "https://github.com/dlmacedo/entropic-out-of-distribution-detection"

#: IsoMax loss and entropic score (arXiv 1908.05569, first version 2019; published at IJCNN 2021).
ISOMAX_PAPER = Paper(
    title="Entropic Out-of-Distribution Detection",
    venue="IJCNN",
    year=2021,
    url="https://arxiv.org/abs/1908.05569",
    code=_ISOMAX_CODE,
)

#: IsoMax+ loss and minimum distance score (arXiv 2105.14399, 2021).
ISOMAX_PLUS_PAPER = Paper(
    title=(
        "Enhanced Isotropy Maximization Loss: Seamless and High-Performance Out-of-Distribution "
        "Detection Simply Replacing the SoftMax Loss"
    ),
    venue="arXiv",
    year=2021,
    url="https://arxiv.org/abs/2105.14399",
    code=_ISOMAX_CODE,
)

#: DisMax loss, fractional probability regularisation and the MMLES score (arXiv 2205.05874, 2022).
DISMAX_PAPER = Paper(
    title=(
        "Distinction Maximization Loss: Efficiently Improving Out-of-Distribution Detection and "
        "Uncertainty Estimation by Replacing the Loss and Calibrating"
    ),
    venue="arXiv",
    year=2022,
    url="https://arxiv.org/abs/2205.05874",
    code="https://github.com/dlmacedo/distinction-maximization-loss",
)

#: Author lists by arXiv URL (``pytorch_ood.api.Paper`` has no author field).
PAPER_AUTHORS: dict[str, tuple[str, ...]] = {
    ISOMAX_PAPER.url: (
        "David Macêdo",
        "Tsang Ing Ren",
        "Cleber Zanchettin",
        "Adriano L. I. Oliveira",
        "Teresa Ludermir",
    ),
    ISOMAX_PLUS_PAPER.url: ("David Macêdo", "Teresa Ludermir"),
    DISMAX_PAPER.url: ("David Macêdo", "Cleber Zanchettin", "Teresa Ludermir"),
}

_DEFAULT_SCORE = "mmles"


def _default_score_of(model: nn.Module | None) -> str:
    """The default score of the isotropic head(s) in ``model``; ``"mmles"`` when it has none."""
    if model is None or not isinstance(model, nn.Module):
        return _DEFAULT_SCORE
    defaults = {head.default_score for _, head in heads_of(model)}
    if not defaults:
        log.info("score=None but the model has no isotropic head; using the DisMax default '%s'.", _DEFAULT_SCORE)
        return _DEFAULT_SCORE
    if len(defaults) > 1:
        raise ValueError(
            f"score=None is ambiguous: the model holds heads with different default scores {sorted(defaults)}; "
            f"pass score= one of {list(SCORE_NAMES)}."
        )
    return defaults.pop()


class DisMaxDetector(LogitsDetector):
    r"""Outlier score from the native scores of the isotropic heads (IsoMax, IsoMax+, DisMax).

    The outlier score is the negated in-distribution score :math:`s` named by ``score``, so that larger
    values indicate OOD:

    .. math:: \mathrm{outlier}(x) = -s(f(x))

    with, for logits :math:`z = f(x) \in \mathbb{R}^C` and :math:`p = \mathrm{softmax}(z)`:

    .. math::
        \mathrm{MPS} = \max_j p_j, \quad
        \mathrm{ES} = \sum_j p_j \log p_j, \quad
        \mathrm{MDS} = \max_j z_j, \quad
        \mathrm{MMLS} = \max_j z_j + \tfrac{1}{C}\sum_j z_j, \quad
        \mathrm{MMLES} = \mathrm{MMLS} + \mathrm{ES}

    The scores need no fitting and are computed in float64 (see :mod:`dismax_plugin.scores`). As with
    every :class:`~pytorch_ood.api.LogitsDetector`, :meth:`predict` calls the model as it is: put it in
    ``eval()`` mode first. ``hyperparameter_space`` lets :class:`pytorch_ood.utils.GridSearch` choose
    the score on validation data.

    .. rubric:: Examples

    .. code-block:: python

        detector = DisMaxDetector(model)          # score of the model's head (MMLES for DisMax)
        scores = detector(images)                 # shape B, larger = more likely OOD
        scores = DisMaxDetector.score(logits, "mds")
    """

    info = DetectorInfo(paper=DISMAX_PAPER, tasks={Task.CLASSIFICATION})

    requires_fit = False

    #: Search space for :class:`pytorch_ood.utils.GridSearch`: the native score.
    hyperparameter_space = {"score": list(SCORE_NAMES)}

    def __init__(self, model: nn.Module | None, score: str | None = _DEFAULT_SCORE):
        """
        :param model: network whose outputs are logits :math:`B \\times C`; ``None`` when only
            :meth:`predict_logits` is used.
        :param score: one of ``"mps"``, ``"es"``, ``"mds"``, ``"mmls"``, ``"mmles"`` (case-insensitive), or
            ``None`` for the default score of the model's isotropic head (``"mmles"`` without one).
        :raises ValueError: for an unknown score, or ``score=None`` with heads of different defaults.
        :raises TypeError: if ``model`` is neither ``None`` nor callable.
        """
        super().__init__()
        if model is not None and not callable(model):
            raise TypeError(f"model must be a torch.nn.Module (or callable) or None; got {type(model).__name__}.")
        self.model = model
        self.score_name: str = (
            _default_score_of(model) if score is None else check_choice("score", score, SCORES)
        )  #: name of the native score in use

    # ---------------------------------------------------------------- hyperparameters
    def get_hyperparameters(self) -> dict:
        """:return: ``{"score": name}``."""
        return {"score": self.score_name}

    def set_hyperparameters(self, **kwargs) -> DisMaxDetector:
        """Set the score: ``set_hyperparameters(score="mds")``.

        :raises ValueError: for an unknown hyperparameter or score name.
        """
        for name, value in kwargs.items():
            if name not in self.hyperparameter_space:
                raise ValueError(
                    f"Unknown hyperparameter '{name}' for {type(self).__name__}. "
                    f"Known hyperparameters: {list(self.hyperparameter_space)}"
                )
            self.score_name = check_choice("score", value, SCORES)
        return self

    # ---------------------------------------------------------------- scoring
    def predict(self, x: Tensor) -> Tensor:
        """Run the model (without gradients) and score its logits.

        :param x: model inputs, e.g. images :math:`B \\times C \\times H \\times W`
        :return: outlier scores of shape :math:`B` (float64), larger means more likely OOD
        :raises ModelNotSetException: if the detector has no model
        """
        with torch.no_grad():
            return super().predict(x)

    def predict_logits(self, logits: Tensor) -> Tensor:
        """
        :param logits: logits :math:`B \\times C`
        :return: outlier scores of shape :math:`B` (float64), larger means more likely OOD
        :raises ValueError: if ``logits`` is not :math:`B \\times C` with :math:`C \\ge 2`
        """
        return DisMaxDetector.score(logits, self.score_name)

    @staticmethod
    def score(logits: Tensor, name: str = _DEFAULT_SCORE) -> Tensor:
        """Negated native score ``name`` of ``logits``.

        :param logits: logits :math:`B \\times C`
        :param name: one of :data:`dismax_plugin.SCORE_NAMES`
        :return: outlier scores of shape :math:`B` (float64), larger means more likely OOD
        :raises ValueError: for an unknown ``name`` or logits that are not :math:`B \\times C`
        """
        return -SCORES[check_choice("score", name, SCORES)](logits)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score_name!r})"


# -------------------------------------------------------------------- losses
class _DropsUnknown:
    """Discards samples with class-index targets < 0 (with pytorch-ood's warning); soft targets pass."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """
        :param logits: logits :math:`B \\times C`
        :param targets: class indices :math:`B` (values :math:`< 0` are dropped) or soft targets :math:`B \\times C`
        :return: the loss
        """
        if isinstance(targets, Tensor) and targets.ndim == 1 and not targets.is_floating_point():
            targets, logits = drop_unknown(targets, logits)
        return super().forward(logits, targets)


_LOSS_TASKS = {Task.CLASSIFICATION}
_LOSS_INPUTS = {Representation.LOGITS}


class IsoMaxLoss(_DropsUnknown, _core_losses.IsoMaxLoss):
    r"""IsoMax loss for pytorch-ood: cross-entropy of the entropically scaled logits of an
    :class:`~dismax_plugin.IsoMaxHead`.

    .. math:: \mathcal{L} = -\log \mathrm{softmax}(E\,z)_y, \qquad z_j = -\lVert f - p_j \rVert

    Samples with targets :math:`< 0` (OOD) are discarded with a warning, as in pytorch-ood's unsupervised
    losses; soft targets :math:`B \times C` are accepted. Logits :math:`B \times C`, targets :math:`B` or
    :math:`B \times C`; returns a 0-d loss (or :math:`B'` with ``reduction="none"``).
    """

    info = LossInfo(tasks=_LOSS_TASKS, inputs=_LOSS_INPUTS, supervised=False, paper=ISOMAX_PAPER)


class IsoMaxPlusLoss(_DropsUnknown, _core_losses.IsoMaxLoss):
    r"""IsoMax+ loss for pytorch-ood: the IsoMax loss on the logits of an :class:`~dismax_plugin.IsoMaxPlusHead`,
    :math:`z_j = -|s|\,\lVert \hat f - \hat p_j \rVert` (normalised features and prototypes).

    .. math:: \mathcal{L} = -\log \mathrm{softmax}(E\,z)_y

    Samples with targets :math:`< 0` (OOD) are discarded with a warning. Logits :math:`B \times C`, targets
    :math:`B` or :math:`B \times C`; returns a 0-d loss (or :math:`B'` with ``reduction="none"``).
    """

    info = LossInfo(tasks=_LOSS_TASKS, inputs=_LOSS_INPUTS, supervised=False, paper=ISOMAX_PLUS_PAPER)


class DisMaxLoss(_DropsUnknown, _core_losses.DisMaxLoss):
    r"""DisMax loss for pytorch-ood, on the logits of a :class:`~dismax_plugin.DisMaxHead`.

    Clean rows contribute :math:`-\log \mathrm{softmax}(E\,z)_y`; fractional rows (soft targets from
    :func:`~dismax_plugin.fpr_mix`) contribute :math:`\alpha\,\mathrm{KL}(t \,\Vert\, \mathrm{softmax}(E\,z))`.
    The outliers of the fractional probability regularisation are synthesised from in-distribution data,
    so the objective is unsupervised in pytorch-ood's sense; samples with targets :math:`< 0` are
    discarded with a warning. Logits :math:`B \times C`, targets :math:`B` or :math:`B \times C`.
    """

    info = LossInfo(tasks=_LOSS_TASKS, inputs=_LOSS_INPUTS, supervised=False, paper=DISMAX_PAPER)
