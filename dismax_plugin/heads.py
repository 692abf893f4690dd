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
``forward(x, pre_logits=False)`` and ``reset(num_classes)``. Deployment state (the temperature and OOD
thresholds stored at chosen in-distribution TPRs) lives in buffers and round-trips through
``state_dict``.

The logits are divided by the temperature so that probabilities are calibrated; OOD scores are taken from
the logits at :math:`T = 1` (:meth:`PrototypeHead.ood_score` multiplies the temperature back, see
:func:`dismax_plugin.scores.ood_score`), so calibration never changes which inputs are flagged.

``forward`` is traceable and scriptable (``torch.fx.symbolic_trace``, ``torch.jit.script``/``trace``,
``torch.export``, ``torch.compile``): its argument checks run in eager mode only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ._checks import check_choice, check_positive
from .distances import euclidean_distances, normalized_distances
from .scores import SCORE_NAMES, ood_score
from .thresholds import _check_tpr

# torch.fx records the distance functions as calls (leaves) instead of tracing their eager-only dispatch.
torch.fx.wrap("euclidean_distances")
torch.fx.wrap("normalized_distances")

__all__ = ["HEADS", "DisMaxHead", "IsoMaxHead", "IsoMaxPlusHead", "PrototypeHead", "create_head"]


class PrototypeHead(nn.Module):
    """Base class: prototypes, temperature, thresholds, checks. Subclasses define :meth:`distance_logits`.

    :param in_features: feature width :math:`D` (the ``in_features`` of the replaced ``nn.Linear``).
    :param num_classes: number of classes :math:`C \\ge 2`.
    """

    kind: str = ""
    #: name of the OOD score used when none is given (one of :data:`dismax_plugin.SCORE_NAMES`)
    default_score: str = ""
    __jit_unused_properties__ = ["stored_score", "stored_thresholds"]

    def __init__(self, in_features: int, num_classes: int, *, device=None, dtype=None):
        super().__init__()
        check_positive("in_features", in_features, integer=True, minimum=1)
        check_positive("num_classes", num_classes, integer=True, minimum=2)
        dd = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.prototypes = nn.Parameter(torch.empty(num_classes, in_features, **dd))
        self.register_buffer("temperature", torch.ones((), **dd))
        self.register_buffer("thresholds", torch.empty(0, device=device, dtype=torch.float64))
        self.register_buffer("threshold_tprs", torch.empty(0, device=device, dtype=torch.float64))
        self.register_buffer("threshold_score", torch.tensor(-1, device=device, dtype=torch.long))
        self.reset_parameters()

    # ---------------------------------------------------------------- parameters
    def reset_parameters(self) -> None:
        nn.init.normal_(self.prototypes, 0.0, 1.0)

    def reset(self, num_classes: int) -> None:
        """Fresh prototypes for ``num_classes`` classes (timm's ``reset``); clears the thresholds."""
        check_positive("num_classes", num_classes, integer=True, minimum=2)
        dd = {"device": self.prototypes.device, "dtype": self.prototypes.dtype}
        self.num_classes = num_classes
        self.prototypes = nn.Parameter(torch.empty(num_classes, self.in_features, **dd))
        self.reset_parameters()
        self.clear_thresholds()

    # ---------------------------------------------------------------- forward
    def _logits(self, features: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Logits divided by ``temperature`` (a 0-d tensor); scalars are folded into one multiplication."""
        raise NotImplementedError  # pragma: no cover - abstract

    def distance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits before the temperature, i.e. at :math:`T = 1` (no shape checks)."""
        return self._logits(features, torch.ones_like(self.temperature))

    def _check_features(self, features) -> None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor [B, {self.in_features}]; got {type(features)}.")
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape [B, {self.in_features}] (in_features={self.in_features}); "
                f"got {tuple(features.shape)}."
            )

    def forward(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits :math:`B \\times C` from features :math:`B \\times D` (divided by ``temperature``).

        :raises ValueError: if ``features`` is not :math:`B \\times D` with ``D == in_features`` (eager mode;
            the check is skipped while scripting, tracing, exporting or compiling).
        """
        if not torch.jit.is_scripting():
            if not _is_tracing():
                self._check_features(features)
        if pre_logits:
            return features
        return self._logits(features, self.temperature)

    # ---------------------------------------------------------------- deployment
    def ood_score(self, logits: torch.Tensor, score: str | None = None) -> torch.Tensor:
        """In-distribution score [B] (float64) of this head's calibrated ``logits`` [B, C], taken at
        :math:`T = 1`: ``scores.ood_score(logits, self.temperature, score)``.

        :param logits: the head's output (divided by its temperature).
        :param score: one of :data:`dismax_plugin.SCORE_NAMES`; default :attr:`default_score`.
        """
        name = check_choice("score", score or self.default_score, SCORE_NAMES)
        return ood_score(logits, self.temperature.to(torch.float64), name)

    def set_temperature(self, temperature: float) -> None:
        """Set the temperature that divides the logits (e.g. from :func:`calibrate_temperature`)."""
        check_positive("temperature", float(temperature))
        self.temperature.fill_(float(temperature))

    @property
    def stored_score(self) -> str | None:
        """Name of the score the stored thresholds apply to, or ``None`` when none are stored."""
        index = int(self.threshold_score)
        return SCORE_NAMES[index] if index >= 0 else None

    @property
    def stored_thresholds(self) -> dict[float, float]:
        """``{tpr: threshold}`` as stored (empty when none)."""
        return {round(float(t), 6): float(v) for t, v in zip(self.threshold_tprs, self.thresholds)}

    def set_thresholds(self, thresholds: Mapping[float, float], score_name: str | None = None) -> None:
        """Store ``{tpr: threshold}`` (from :func:`compute_thresholds`) for the score ``score_name``."""
        name = check_choice("score_name", score_name or self.default_score, SCORE_NAMES)
        if not isinstance(thresholds, Mapping) or not thresholds:
            raise ValueError("thresholds must be a non-empty mapping {tpr: threshold}, see compute_thresholds().")
        tprs = [_check_tpr(t) for t in thresholds]
        values = [float(v) for v in thresholds.values()]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("thresholds must be finite numbers.")
        device = self.thresholds.device
        self.threshold_tprs = torch.tensor(tprs, dtype=torch.float64, device=device)
        self.thresholds = torch.tensor(values, dtype=torch.float64, device=device)
        self.threshold_score.fill_(SCORE_NAMES.index(name))

    def clear_thresholds(self) -> None:
        device = self.thresholds.device
        self.thresholds = torch.empty(0, dtype=torch.float64, device=device)
        self.threshold_tprs = torch.empty(0, dtype=torch.float64, device=device)
        self.threshold_score.fill_(-1)

    def is_ood(self, logits: torch.Tensor, tpr: float = 0.95) -> torch.Tensor:
        """Flag OOD inputs (bool [B]): :meth:`ood_score` with the stored score below the threshold stored for
        ``tpr``. ``logits`` are the head's (calibrated) output; thresholds come from
        ``compute_thresholds(head.ood_score(val_logits))``.

        :raises RuntimeError: when no thresholds are stored; ValueError when ``tpr`` was not stored.
        """
        if self.stored_score is None:
            raise RuntimeError(
                "No OOD thresholds are stored in this head; compute them on held-out in-distribution data "
                "with compute_thresholds() and store them with head.set_thresholds()."
            )
        tpr = _check_tpr(tpr)
        wanted = torch.tensor(tpr, dtype=torch.float64, device=self.thresholds.device)
        match = torch.isclose(self.threshold_tprs, wanted)
        if not bool(match.any()):
            raise ValueError(f"tpr={tpr} has no stored threshold; stored tprs: {sorted(self.stored_thresholds)}.")
        threshold = self.thresholds[match][0]
        return self.ood_score(logits, self.stored_score) < threshold.to(logits.device)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half()/.double() would round the stored thresholds and TPRs to the model dtype (0.95 is
        # 0.949 in bfloat16, so is_ood(tpr=0.95) could no longer find it): keep them float64, follow the device.
        saved = {name: getattr(self, name) for name in ("thresholds", "threshold_tprs")}
        module = super()._apply(fn, recurse)
        for name, value in saved.items():
            moved = getattr(self, name)
            if moved.dtype != torch.float64:
                setattr(self, name, value.to(device=moved.device, dtype=torch.float64))
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Thresholds have a variable length: adopt the incoming size before the strict copy.
        for name in ("thresholds", "threshold_tprs"):
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != getattr(self, name).shape:
                device = getattr(self, name).device
                setattr(self, name, torch.empty(incoming.shape, dtype=torch.float64, device=device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, num_classes={self.num_classes}"
        if float(self.temperature) != 1.0:
            text += f", temperature={float(self.temperature):.4g}"
        if self.stored_score is not None:
            text += f", thresholds[{self.stored_score}]={self.stored_thresholds}"
        return text


class IsoMaxHead(PrototypeHead):
    r"""IsoMax head: :math:`z_j = -\lVert f - p_j \rVert / T`, prototypes initialised to 0.

    Shapes: features :math:`B \times D` to logits :math:`B \times C`. Default score: ``mps`` (the paper: ``es``).
    """

    kind = "isomax"
    default_score = "mps"  # chosen by benchmarks/digits_quality.py, see README

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.prototypes)

    def _logits(self, features: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return euclidean_distances(features, self.prototypes) * (-1.0 / temperature)


class IsoMaxPlusHead(PrototypeHead):
    r"""IsoMax+ head: :math:`z_j = -|s|\,\lVert \hat f - \hat p_j \rVert / T`.

    ``distance_scale`` :math:`s` is a learnable scalar (init 1); prototypes start from
    :math:`\mathcal{N}(0, 1)`. Shapes: :math:`B \times D \to B \times C`. Default score: ``mps`` (the paper:
    ``mds``).
    """

    kind = "isomaxplus"
    default_score = "mps"  # chosen by benchmarks/digits_quality.py, see README

    def __init__(self, in_features: int, num_classes: int, *, device=None, dtype=None):
        super().__init__(in_features, num_classes, device=device, dtype=dtype)
        self.distance_scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "distance_scale"):  # not yet created while the base __init__ runs
            nn.init.ones_(self.distance_scale)

    def scaled_distances(self, features: torch.Tensor) -> torch.Tensor:
        """:math:`|s|\\,\\lVert \\hat f - \\hat p_j \\rVert` [B, C]."""
        return self.distance_scale.abs() * normalized_distances(features, self.prototypes)

    def _factor(self, temperature: torch.Tensor) -> torch.Tensor:
        return self.distance_scale.abs() * (-1.0 / temperature)

    def _logits(self, features: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        return normalized_distances(features, self.prototypes) * self._factor(temperature)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", distance_scale={float(self.distance_scale.detach().abs()):.4g}"


class DisMaxHead(IsoMaxPlusHead):
    r"""DisMax head: :math:`d_j = |s|\,\lVert \hat f - \hat p_j \rVert / \sqrt 2`,
    :math:`z_j = -(d_j + \frac{1}{C}\sum_k d_k) / T`.

    Shapes: :math:`B \times D \to B \times C`. Default score: ``mps`` (the paper: ``mmles``).
    """

    kind = "dismax"
    default_score = "mps"  # chosen by benchmarks/digits_quality.py, see README

    def _logits(self, features: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        # -(d + mean d) with d = |s| u / sqrt(2), u the normalised distances: the scalars fold into one factor.
        unit = normalized_distances(features, self.prototypes)
        return (unit + unit.mean(dim=1, keepdim=True)) * (self._factor(temperature) / math.sqrt(2.0))


def _is_tracing() -> bool:
    """True under torch.jit.trace, torch.fx symbolic tracing, torch.export and torch.compile."""
    return torch.jit.is_tracing() or _is_fx_symbolic_tracing() or torch.compiler.is_compiling()


# torch >= 2.6 names the symbolic-tracing test apart from export's; older versions have only is_fx_tracing.
_is_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing
)


HEADS: dict[str, type[PrototypeHead]] = {cls.kind: cls for cls in (IsoMaxHead, IsoMaxPlusHead, DisMaxHead)}


def create_head(name: str, in_features: int, num_classes: int, *, device=None, dtype=None) -> PrototypeHead:
    """Build the head ``name`` (``"dismax"``, ``"isomaxplus"`` or ``"isomax"``).

    :raises ValueError: for an unknown name, listing the known ones.
    """
    return HEADS[check_choice("head", name, HEADS)](in_features, num_classes, device=device, dtype=dtype)
