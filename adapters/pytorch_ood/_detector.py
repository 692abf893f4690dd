r"""The native isotropic scores (IsoMax, IsoMax+, DisMax) as a pytorch-ood :class:`~pytorch_ood.api.LogitsDetector`.

pytorch-ood's convention is that *larger outlier scores mean more likely OOD*; the native scores of
:mod:`dismax_plugin.scores` are in-distribution scores, so the detector returns their negation, as
pytorch-ood's ``EnergyBased`` and ``MaxLogit`` do for their papers' scores.

The scores do not depend on the calibration temperature: a calibrated head returns
:math:`z / T`, and the detector scores :math:`(z / T) \cdot T = z`, as every other consumer of the
heads does (``head.ood_score``, the stored thresholds, the served model).
"""

from __future__ import annotations

import logging

import torch
from pytorch_ood.api import DetectorInfo, LogitsDetector, Task
from torch import Tensor, nn

from dismax_plugin import scores as _scores
from dismax_plugin._checks import check_choice
from dismax_plugin.convert import heads_of
from dismax_plugin.heads import DisMaxHead

from ._papers import DISMAX_PAPER

__all__ = ["DisMaxDetector"]

log = logging.getLogger(__name__)


def _heads(model) -> list:
    return [head for _, head in heads_of(model)] if isinstance(model, nn.Module) else []


def _default_score_of(model: nn.Module | None) -> str:
    """The ``default_score`` of the head class(es) in ``model``; DisMax's when it holds none."""
    defaults = {type(head).default_score for head in _heads(model)}
    if not defaults:
        return DisMaxHead.default_score
    if len(defaults) > 1:
        raise ValueError(
            f"score=None is ambiguous: the model holds heads with different default scores {sorted(defaults)}; "
            f"pass score= one of {list(_scores.SCORE_NAMES)}."
        )
    return defaults.pop()


class DisMaxDetector(LogitsDetector):
    r"""Outlier score from the native scores of the isotropic heads (IsoMax, IsoMax+, DisMax).

    The outlier score is the negated in-distribution score :math:`s` named by ``score`` of the logits at
    temperature 1, so that larger values indicate OOD:

    .. math:: \mathrm{outlier}(x) = -s(T \cdot f(x))

    where :math:`f(x) = z / T` are the calibrated logits the model returns and :math:`T` its heads'
    temperature. For :math:`z \in \mathbb{R}^C` and :math:`p = \mathrm{softmax}(z)`:

    .. math::
        \mathrm{MPS} = \max_j p_j, \quad
        \mathrm{ES} = \sum_j p_j \log p_j, \quad
        \mathrm{MDS} = \max_j z_j, \quad
        \mathrm{MMLS} = \max_j z_j + \tfrac{1}{C}\sum_j z_j, \quad
        \mathrm{MMLES} = \mathrm{MMLS} + \mathrm{ES}

    The scores need no fitting and are computed in float64. Put the model in ``eval()`` mode first.
    ``hyperparameter_space`` lets :class:`pytorch_ood.utils.GridSearch` choose the score.

    .. code-block:: python

        detector = DisMaxDetector(model)          # the default score of the model's head class
        scores = detector(images)                 # shape B, larger = more likely OOD
    """

    info = DetectorInfo(paper=DISMAX_PAPER, tasks={Task.CLASSIFICATION})

    requires_fit = False

    #: Search space for :class:`pytorch_ood.utils.GridSearch`: the native score.
    hyperparameter_space = {"score": list(_scores.SCORE_NAMES)}

    def __init__(self, model: nn.Module | None, score: str | None = None, temperature: float | None = None):
        """
        :param model: network whose outputs are logits :math:`B \\times C`; ``None`` when only
            :meth:`predict_logits` is used.
        :param score: a name from :data:`dismax_plugin.SCORE_NAMES` (case-insensitive), or ``None`` for the
            ``default_score`` of the model's head class (DisMax's without an isotropic head).
        :param temperature: temperature :math:`T` the logits were divided by; ``None`` reads it from the
            model's heads at each call (1 without heads).
        :raises ValueError: for an unknown score, ``score=None`` with heads of different defaults, or a
            temperature that is not a finite number > 0.
        :raises TypeError: if ``model`` is neither ``None`` nor callable.
        """
        super().__init__()
        if model is not None and not callable(model):
            raise TypeError(f"model must be a torch.nn.Module (or callable) or None; got {type(model).__name__}.")
        if temperature is not None and not (float(temperature) > 0 and float(temperature) != float("inf")):
            raise ValueError(f"temperature must be a finite number > 0 or None; got {temperature!r}.")
        self.model = model
        self.temperature = temperature
        self.score_name: str = (
            _default_score_of(model) if score is None else check_choice("score", score, _scores.SCORES)
        )  #: name of the native score in use

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
            self.score_name = check_choice("score", value, _scores.SCORES)
        return self

    def current_temperature(self) -> float | Tensor:
        """The temperature the logits are multiplied back by: ``temperature``, else the heads' 0-d buffer.

        :raises ValueError: if the model's heads hold different temperatures.
        """
        if self.temperature is not None:
            return float(self.temperature)
        temperatures = [head.temperature.detach() for head in _heads(self.model)]
        if not temperatures:
            return 1.0
        if temperatures[0].device.type != "meta" and any(not torch.equal(t, temperatures[0]) for t in temperatures):
            raise ValueError("the model's heads hold different temperatures; pass temperature=.")
        return temperatures[0]

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
        :param logits: calibrated logits :math:`B \\times C` (as the model returns them)
        :return: outlier scores of shape :math:`B` (float64), larger means more likely OOD
        :raises ValueError: if ``logits`` is not :math:`B \\times C` with :math:`C \\ge 2`
        """
        return -_scores.ood_score(logits, self.current_temperature(), self.score_name)

    @staticmethod
    def score(logits: Tensor, name: str = DisMaxHead.default_score) -> Tensor:
        """Negated native score ``name`` of ``logits`` (taken as they are, temperature 1).

        :param logits: logits :math:`B \\times C`
        :param name: one of :data:`dismax_plugin.SCORE_NAMES`
        :return: outlier scores of shape :math:`B` (float64), larger means more likely OOD
        :raises ValueError: for an unknown ``name`` or logits that are not :math:`B \\times C`
        """
        return -_scores.score(logits, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score_name!r})"
