r"""Isotropic classification heads: drop-in replacements for the final ``nn.Linear``.

Each head keeps one learnable prototype per class and returns logits that are negative distances from
the feature vector to the prototypes, divided by a (calibrated) ``temperature`` buffer:

* :class:`IsoMaxHead` (IsoMax, arXiv 1908.05569): :math:`z_j = -\lVert f - p_j \rVert`, prototypes
  start at 0.
* :class:`IsoMaxPlusHead` (IsoMax+, arXiv 2105.14399):
  :math:`z_j = -|s|\,\lVert \hat f - \hat p_j \rVert`, with :math:`\hat v = v / \lVert v \rVert`, a
  learnable distance scale :math:`s` (init 1) and prototypes drawn from :math:`\mathcal{N}(0, 1)`.
* :class:`DisMaxHead` (DisMax, arXiv 2205.05874): :math:`d_j = |s|\,\lVert \hat f - \hat p_j \rVert/\sqrt 2`,
  :math:`z_j = -(d_j + \frac{1}{C}\sum_k d_k)`.

The heads follow timm's head protocol: ``(in_features, num_classes, *, device=None, dtype=None)``,
``forward(x, pre_logits=False)`` and ``reset(num_classes)``; the prototypes are ``weight``
(:math:`C \times D`, as ``nn.Linear.weight``).

**Training mode** returns :math:`E z`, the logits at :math:`T = 1` times the entropic scale :math:`E`
(:data:`ENTROPIC_SCALE`, 10): the isotropic losses are then the plain cross-entropy of the head's output,
so any training code that applies ``nn.CrossEntropyLoss`` (timm's ``train.py`` and its stock losses
included) trains the isotropic loss, and nothing scales twice. **Eval mode** returns the calibrated logits
:math:`z / T`.

Deployment state lives in buffers and round-trips through ``state_dict``: the ``temperature``, the sorted
``calibration_scores`` of every native score on held-out in-distribution data (so a threshold at any TPR,
for any score, is an order statistic: :meth:`PrototypeHead.threshold`) and the chosen ``score``. OOD scores
are taken from the logits at :math:`T = 1` (:meth:`PrototypeHead.ood_score` multiplies the temperature back,
see :func:`dismax_plugin.scores.ood_score`), so calibration never changes which inputs are flagged.

``forward`` is traceable and scriptable (``torch.fx.symbolic_trace``, ``torch.jit.script``/``trace``,
``torch.export``, ``torch.compile``): its argument checks run in eager mode only.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._checks import check_choice, check_logits, check_positive
from .distances import euclidean_distances, normalized_distances
from .scores import SCORE_NAMES, ood_score
from .thresholds import threshold_at

# torch.fx records the distance functions as calls (leaves) instead of tracing their eager-only dispatch.
torch.fx.wrap("euclidean_distances")
torch.fx.wrap("normalized_distances")

ENTROPIC_SCALE = 10.0
"""The entropic scale :math:`E` of the papers: the factor of the logits in training mode (the one definition;
each head's ``entropic_scale`` defaults to it)."""

__all__ = ["ENTROPIC_SCALE", "HEADS", "DisMaxHead", "IsoMaxHead", "IsoMaxPlusHead", "PrototypeHead", "create_head"]


class PrototypeHead(nn.Module):
    r"""Base class: prototypes, entropic scale, temperature, calibration scores. Subclasses define ``_logits``.

    :param in_features: feature width :math:`D` (the ``in_features`` of the replaced ``nn.Linear``).
    :param num_classes: number of classes :math:`C \ge 2`.
    :param entropic_scale: :math:`E > 0`, the factor of the logits in training mode (default
        :data:`ENTROPIC_SCALE`).

    ``weight`` (:math:`C \times D`, named as ``nn.Linear.weight`` so that timm's classifier handling and
    parameter-group code see it) holds one prototype per class. In training mode the head returns
    :math:`E z` (``z`` the logits at temperature 1), so the plain cross-entropy of its output is the
    isotropic loss; in eval mode it returns the calibrated logits :math:`z / T`.
    """

    kind: str = ""
    #: name of the OOD score used when none is chosen (one of :data:`dismax_plugin.SCORE_NAMES`)
    default_score: str = ""
    __jit_unused_properties__ = ["score", "calibration_size"]

    def __init__(
        self, in_features: int, num_classes: int, *, entropic_scale: float = ENTROPIC_SCALE, device=None, dtype=None
    ):
        super().__init__()
        check_positive("in_features", in_features, integer=True, minimum=1)
        check_positive("num_classes", num_classes, integer=True, minimum=2)
        check_positive("entropic_scale", entropic_scale)
        dd = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.entropic_scale = float(entropic_scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **dd))
        self.register_buffer("temperature", torch.ones((), **dd))
        self.register_buffer("calibration_scores", _no_scores(device))
        self.register_buffer("score_index", torch.tensor(-1, device=device, dtype=torch.long))
        self.reset_parameters()

    # ---------------------------------------------------------------- parameters
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 1.0)

    def reset(self, num_classes: int) -> None:
        """Fresh prototypes for ``num_classes`` classes (timm's ``reset``); clears the calibration scores."""
        check_positive("num_classes", num_classes, integer=True, minimum=2)
        dd = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, self.in_features, **dd))
        self.reset_parameters()
        self.clear_calibration()

    # ---------------------------------------------------------------- forward
    def _logits(self, features: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``factor * z`` (``factor`` a one-element tensor), the factor folded into the distance node, so that
        the entropic scale or :math:`1/T` costs no pass over the :math:`B \times C` logits."""
        raise NotImplementedError  # pragma: no cover - abstract

    def distance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits :math:`z` before the temperature and the entropic scale, in either mode (no shape checks)."""
        return self._logits(features, torch.ones_like(self.temperature))

    def _output(self, features: torch.Tensor) -> torch.Tensor:
        """Training mode: :math:`E z` (float32 for half-precision inputs); eval mode: :math:`z / T`."""
        if self.training:
            # a 1-element float32 factor (not a 0-d one) makes float16/bfloat16 logits float32, keeps
            # float32/float64, and needs no dtype test (which torch.fx could not trace)
            factor = torch.full((1,), self.entropic_scale, dtype=torch.float32, device=features.device)
            return self._logits(features, factor)
        return self._logits(features, 1.0 / self.temperature)

    def _check_features(self, features) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor [B, {self.in_features}]; got {type(features)}.")
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape [B, {self.in_features}] (in_features={self.in_features}); "
                f"got {tuple(features.shape)}."
            )

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        r"""Logits :math:`B \times C` from features :math:`B \times D`: :math:`E z` in training mode (what the
        loss takes), :math:`z / T` in eval mode (calibrated).

        :raises ValueError: if ``features`` is not :math:`B \times D` with ``D == in_features`` (eager mode;
            the check is skipped while scripting, tracing, exporting or compiling).
        """
        if not torch.jit.is_scripting():
            if not _is_tracing():
                self._check_features(features)
        if pre_logits:
            return features
        return self._output(features)

    # ---------------------------------------------------------------- deployment
    @property
    def score(self) -> str:
        """The native score used when none is named: the one chosen with :meth:`set_score`, else the
        class's :attr:`default_score`."""
        index = int(self.score_index)
        return SCORE_NAMES[index] if index >= 0 else type(self).default_score

    def set_score(self, name: str | None) -> None:
        """Choose the native score of :meth:`ood_score`, :meth:`threshold` and :meth:`is_ood` (``None``: the
        class's :attr:`default_score`). The calibration scores of every score are stored, so thresholds follow."""
        if name is None:
            self.score_index.fill_(-1)
            return
        self.score_index.fill_(SCORE_NAMES.index(check_choice("score", name, SCORE_NAMES)))

    def ood_score(self, logits: torch.Tensor, score: str | None = None) -> torch.Tensor:
        """In-distribution score [B] (float64) of this head's calibrated ``logits`` [B, C], taken at
        :math:`T = 1`: ``scores.ood_score(logits, self.temperature, score)``.

        :param logits: the head's eval-mode output (divided by its temperature).
        :param score: one of :data:`dismax_plugin.SCORE_NAMES`; default :attr:`score`.
        """
        name = check_choice("score", score or self.score, SCORE_NAMES)
        return ood_score(logits, self.temperature.to(torch.float64), name)

    def set_temperature(self, temperature: float) -> None:
        """Set the temperature that divides the logits (e.g. from :func:`calibrate_temperature`). Calibration
        scores stored before belong to the old temperature's logits: re-run :meth:`calibrate_scores`."""
        check_positive("temperature", float(temperature))
        self.temperature.fill_(float(temperature))

    def calibrate_scores(self, logits: torch.Tensor) -> None:
        r"""Store every native score of held-out in-distribution ``logits``, sorted (float64 :math:`S \times N`).

        :param logits: :math:`N \times C`, this head's eval-mode output on the calibration split — exactly
            what the deployed model returns (already divided by the temperature now set). Thresholds are
            order statistics of these scores (:meth:`threshold`), and :meth:`is_ood` re-scores its input with
            the same :meth:`ood_score`, so on these logits exactly :math:`\lfloor N (1 - \mathrm{tpr}) \rfloor`
            are flagged (distinct scores).
        :raises ValueError: for logits that are not :math:`N \times C` with :math:`N \ge 1`, or not finite.
        """
        check_logits(logits)
        if logits.shape[0] == 0 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape [N, {self.num_classes}] with N >= 1 (num_classes={self.num_classes}); "
                f"got {tuple(logits.shape)}."
            )
        rows = torch.stack([self.ood_score(logits, name).cpu().double() for name in SCORE_NAMES])
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("logits must be finite: their OOD scores hold NaN or inf.")
        self.calibration_scores = rows.sort(dim=1).values.to(self.calibration_scores.device)

    def clear_calibration(self) -> None:
        """Forget the calibration scores (the temperature and the chosen score stay)."""
        self.calibration_scores = _no_scores(self.calibration_scores.device)

    @property
    def calibration_size(self) -> int:
        """:math:`N`, the number of calibration samples behind the thresholds (0 when not calibrated)."""
        return int(self.calibration_scores.shape[1])

    def stored_scores(self, score: str | None = None) -> torch.Tensor:
        """The sorted float64 calibration scores :math:`N` of ``score`` (default :attr:`score`).

        :raises RuntimeError: when the head holds no calibration scores.
        """
        name = check_choice("score", score or self.score, SCORE_NAMES)
        if self.calibration_size == 0:
            raise RuntimeError(
                "This head holds no calibration scores; pass its eval-mode logits on held-out in-distribution "
                "data to head.calibrate_scores() (dismax train and dismax calibrate do it)."
            )
        return self.calibration_scores[SCORE_NAMES.index(name)]

    def threshold(self, tpr: float = 0.95, score: str | None = None) -> float:
        """The OOD threshold of ``score`` at in-distribution ``tpr``: :func:`~dismax_plugin.threshold_at` of the
        stored calibration scores. An input with a score below it is OOD.

        :param tpr: any in-distribution true-positive rate in (0, 1].
        """
        return threshold_at(self.stored_scores(score), tpr)

    def is_ood(self, logits: torch.Tensor, tpr: float = 0.95, score: str | None = None) -> torch.Tensor:
        """Flag OOD inputs (bool [B]): ``ood_score(logits, score) < threshold(tpr, score)``.

        :param logits: the head's eval-mode (calibrated) output.
        :param tpr: in-distribution true-positive rate in (0, 1] (the fraction of ID inputs kept).
        :param score: a native score name; default :attr:`score`.
        :raises RuntimeError: when not calibrated; ValueError for a bad ``tpr`` or ``score``.
        """
        name = check_choice("score", score or self.score, SCORE_NAMES)
        threshold = self.threshold(tpr, name)
        scores = self.ood_score(logits, name)
        return scores < torch.tensor(threshold, dtype=scores.dtype, device=scores.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half()/.double() would round the calibration scores to the model dtype: keep them
        # float64, follow the device.
        saved = self.calibration_scores
        module = super()._apply(fn, recurse)
        moved = self.calibration_scores
        if moved.dtype != torch.float64:
            self.calibration_scores = saved.to(device=moved.device, dtype=torch.float64)
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        _upgrade_state_dict(self, state_dict, prefix)
        incoming = state_dict.get(prefix + "calibration_scores")
        if isinstance(incoming, torch.Tensor) and incoming.shape != self.calibration_scores.shape:
            device = self.calibration_scores.device
            self.calibration_scores = torch.empty(incoming.shape, dtype=torch.float64, device=device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, num_classes={self.num_classes}"
        if self.entropic_scale != ENTROPIC_SCALE:
            text += f", entropic_scale={self.entropic_scale:g}"
        if float(self.temperature) != 1.0:
            text += f", temperature={float(self.temperature):.4g}"
        if self.calibration_size:
            text += f", score={self.score!r}, calibration_size={self.calibration_size}"
        return text


def _no_scores(device) -> torch.Tensor:
    return torch.empty(len(SCORE_NAMES), 0, device=device, dtype=torch.float64)


_LEGACY_THRESHOLD_KEYS = ("thresholds", "threshold_tprs", "threshold_score")


def _upgrade_state_dict(head: PrototypeHead, state_dict, prefix: str) -> None:
    """State dicts of earlier versions: ``prototypes`` is now ``weight``; the three stored thresholds are
    replaced by calibration scores (dropped with a warning); missing deployment buffers keep their values."""
    legacy = state_dict.pop(prefix + "prototypes", None)
    if legacy is not None and prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = legacy
    dropped = {key: state_dict.pop(prefix + key) for key in _LEGACY_THRESHOLD_KEYS if prefix + key in state_dict}
    if dropped.get("thresholds") is not None and dropped["thresholds"].numel():
        warnings.warn(
            f"'{prefix}thresholds' of an earlier format were dropped: calibrate the model again (dismax calibrate, "
            "or head.calibrate_scores()) to get OOD thresholds.",
            stacklevel=4,
        )
    if legacy is not None or dropped:
        for name in ("calibration_scores", "score_index"):
            state_dict.setdefault(prefix + name, getattr(head, name))


class IsoMaxHead(PrototypeHead):
    r"""IsoMax head: :math:`z_j = -\lVert f - p_j \rVert / T`, prototypes initialised to 0.

    Shapes: features :math:`B \times D` to logits :math:`B \times C`. Default score: ``mps`` (the paper: ``es``).
    """

    kind = "isomax"
    default_score = "mps"  # chosen by benchmarks/digits_quality.py, see README

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def _logits(self, features: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return euclidean_distances(features, self.weight, -factor)


class IsoMaxPlusHead(PrototypeHead):
    r"""IsoMax+ head: :math:`z_j = -|s|\,\lVert \hat f - \hat p_j \rVert / T`.

    ``distance_scale`` :math:`s` is a learnable scalar (init 1); prototypes start from
    :math:`\mathcal{N}(0, 1)`. Shapes: :math:`B \times D \to B \times C`. Default score: ``mps`` (the paper:
    ``mds``; on the digits validation split ``mps`` led in three runs, once within the tie band).
    """

    kind = "isomaxplus"
    default_score = "mps"  # chosen by benchmarks/digits_quality.py, see README

    def __init__(
        self, in_features: int, num_classes: int, *, entropic_scale: float = ENTROPIC_SCALE, device=None, dtype=None
    ):
        super().__init__(in_features, num_classes, entropic_scale=entropic_scale, device=device, dtype=dtype)
        self.distance_scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "distance_scale"):  # not yet created while the base __init__ runs
            nn.init.ones_(self.distance_scale)

    def scaled_distances(self, features: torch.Tensor) -> torch.Tensor:
        """:math:`|s|\\,\\lVert \\hat f - \\hat p_j \\rVert` [B, C]."""
        return self.distance_scale.abs() * normalized_distances(features, self.weight)

    def _factor(self, factor: torch.Tensor) -> torch.Tensor:
        return self.distance_scale.abs() * -factor

    def _logits(self, features: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return normalized_distances(features, self.weight, self._factor(factor))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", distance_scale={float(self.distance_scale.detach().abs()):.4g}"


class DisMaxHead(IsoMaxPlusHead):
    r"""DisMax head: :math:`d_j = |s|\,\lVert \hat f - \hat p_j \rVert / \sqrt 2`,
    :math:`z_j = -(d_j + \frac{1}{C}\sum_k d_k) / T`.

    Shapes: :math:`B \times D \to B \times C`. Default score: ``mps`` (the paper: ``mmles``).
    """

    kind = "dismax"
    default_score = "mps"  # chosen by benchmarks/digits_quality.py, see README

    def _logits(self, features: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        # -(d + mean d) with d = |s| u / sqrt(2), u the normalised distances: the scalars fold into one factor
        # and the mean is added inside the distance node.
        return normalized_distances(features, self.weight, self._factor(factor) / math.sqrt(2.0), add_mean=True)


def _is_tracing() -> bool:
    """True under torch.jit.trace, torch.fx symbolic tracing, torch.export and torch.compile."""
    return torch.jit.is_tracing() or _is_fx_symbolic_tracing() or torch.compiler.is_compiling()


# torch >= 2.6 names the symbolic-tracing test apart from export's; older versions have only is_fx_tracing.
_is_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)


HEADS: dict[str, type[PrototypeHead]] = {cls.kind: cls for cls in (IsoMaxHead, IsoMaxPlusHead, DisMaxHead)}


def create_head(
    name: str, in_features: int, num_classes: int, *, entropic_scale: float = ENTROPIC_SCALE, device=None, dtype=None
) -> PrototypeHead:
    """Build the head ``name`` (``"dismax"``, ``"isomaxplus"`` or ``"isomax"``).

    :raises ValueError: for an unknown name, listing the known ones.
    """
    cls = HEADS[check_choice("head", name, HEADS)]
    return cls(in_features, num_classes, entropic_scale=entropic_scale, device=device, dtype=dtype)
