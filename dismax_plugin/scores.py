r"""Native OOD scores of the isotropic heads: pure functions of the logits.

All scores are *in-distribution* scores: larger means more in-distribution. (pytorch-ood's detectors
use the opposite sign; :mod:`dismax_plugin.adapters.pytorch_ood` negates them.) They are computed in
float64 (float32 on Apple ``mps``) whatever the input dtype, so float16/bfloat16/float32 logits of any
finite magnitude give finite scores; the entropy uses ``softmax * log_softmax`` (never ``log(softmax)``).

==========  ==================================================  ==========================
name        formula (:math:`z \in \mathbb{R}^{C}` the logits)   the paper's score for
==========  ==================================================  ==========================
``mps``     :math:`\max_j \mathrm{softmax}(z)_j`
``es``      :math:`\sum_j p_j \log p_j` (negative entropy)       IsoMax
``mds``     :math:`\max_j z_j` (minimum distance)                IsoMax+
``mmls``    :math:`\max_j z_j + \frac{1}{C}\sum_j z_j`
``mmles``   ``mmls`` + negative entropy                          DisMax
``mmleps``  ``mmles`` + :math:`\max_j \mathrm{softmax}(z)_j`
==========  ==================================================  ==========================

(The last column is the papers' choice. The default of each head class is its ``default_score``
attribute, chosen by measurement: ``mps`` for all three, see README and ``benchmarks/digits_quality.py``.)

**Temperature.** A head returns calibrated logits :math:`z / T`. OOD scores are always taken from the
logits at :math:`T = 1` (:func:`ood_score` multiplies :math:`T` back), so a calibration temperature that
sharpens or flattens the probabilities cannot change how inputs rank or which are flagged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_logits, check_positive

__all__ = ["SCORE_NAMES", "SCORES", "es", "mds", "mmleps", "mmles", "mmls", "mps", "ood_score", "score"]


def _prepare(logits: torch.Tensor) -> torch.Tensor:
    check_logits(logits)
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    return logits.detach().to(dtype)


def _negative_entropy(z: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(z, dim=1)
    return (log_p.exp() * log_p).sum(dim=1)


def mps(logits: torch.Tensor) -> torch.Tensor:
    r"""Maximum probability score :math:`\max_j \mathrm{softmax}(z)_j`. :math:`B \times C \to B`."""
    return F.softmax(_prepare(logits), dim=1).amax(dim=1)


def es(logits: torch.Tensor) -> torch.Tensor:
    r"""Entropic score :math:`\sum_j p_j \log p_j` (negative entropy, :math:`\le 0`). :math:`B \times C \to B`."""
    return _negative_entropy(_prepare(logits))


def mds(logits: torch.Tensor) -> torch.Tensor:
    r"""Minimum distance score :math:`\max_j z_j` (logits are negative distances). :math:`B \times C \to B`."""
    return _prepare(logits).amax(dim=1)


def mmls(logits: torch.Tensor) -> torch.Tensor:
    r"""Max-mean logit score :math:`\max_j z_j + \mathrm{mean}_j z_j`. :math:`B \times C \to B`."""
    z = _prepare(logits)
    return z.amax(dim=1) + z.mean(dim=1)


def mmles(logits: torch.Tensor) -> torch.Tensor:
    r"""Max-mean logit entropy score: ``mmls`` plus the negative entropy. :math:`B \times C \to B`."""
    z = _prepare(logits)
    return z.amax(dim=1) + z.mean(dim=1) + _negative_entropy(z)


def mmleps(logits: torch.Tensor) -> torch.Tensor:
    r"""Max-mean logit entropy probability score, as in the DisMax authors' code:

    .. math:: \max_j z_j + \frac{1}{C}\sum_j z_j + \sum_j p_j \log p_j + \max_j p_j,
        \qquad p = \mathrm{softmax}(z).

    :math:`B \times C \to B`.
    """
    z = _prepare(logits)
    log_p = F.log_softmax(z, dim=1)
    probabilities = log_p.exp()
    return z.amax(dim=1) + z.mean(dim=1) + (probabilities * log_p).sum(dim=1) + probabilities.amax(dim=1)


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mps": mps,
    "es": es,
    "mds": mds,
    "mmls": mmls,
    "mmles": mmles,
    "mmleps": mmleps,
}
SCORE_NAMES: tuple[str, ...] = tuple(SCORES)


def score(logits: torch.Tensor, name: str) -> torch.Tensor:
    """In-distribution score ``name`` (one of :data:`SCORE_NAMES`) of ``logits`` [B, C] -> [B].

    :raises ValueError: for an unknown ``name``.
    """
    return SCORES[check_choice("score", name, SCORES)](logits)


def ood_score(logits: torch.Tensor, temperature, name: str) -> torch.Tensor:
    r"""Score ``name`` of calibrated logits :math:`z / T`, taken at :math:`T = 1`: ``score(logits * T, name)``.

    Every consumer that scores a head's output (thresholds, ``is_ood``, detectors, served models) goes
    through this function (or :meth:`PrototypeHead.ood_score`, which passes the head's temperature), so
    the OOD ranking does not depend on the calibration temperature.

    :param logits: calibrated logits :math:`B \times C` (a head's output, already divided by ``temperature``).
    :param temperature: the temperature :math:`T > 0` they were divided by: a float or a 0-d tensor.
    :param name: one of :data:`SCORE_NAMES`.
    :return: float64 scores :math:`B` (float32 on Apple ``mps``), larger = more in-distribution.
    :raises ValueError/TypeError: for bad logits, an unknown name or a temperature that is not a finite number > 0.
    """
    check_logits(logits)
    name = check_choice("score", name, SCORES)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number or a 0-d tensor; got shape {tuple(temperature.shape)}.")
        temperature = float(temperature)
    check_positive("temperature", temperature)
    return SCORES[name](_prepare(logits) * float(temperature))
