"""dismax-plugin: IsoMax, IsoMax+ and DisMax isotropic heads, losses and native OOD scores.

The core depends on torch only; the timm, pytorch-ood and MLflow glue lives in
:mod:`dismax_plugin.adapters` and imports its ecosystem lazily.
"""

from . import scores
from ._modes import eval_mode
from .calibration import CalibrationBins, calibrate_temperature, calibration_bins, expected_calibration_error
from .convert import convert, find_classifier, heads_of
from .fpr import fpr_mix
from .heads import ENTROPIC_SCALE, HEADS, DisMaxHead, IsoMaxHead, IsoMaxPlusHead, PrototypeHead, create_head
from .losses import DisMaxLoss, IsoMaxLoss, dismax_loss, isomax_loss
from .scores import SCORE_NAMES, ood_score, score
from .thresholds import DEFAULT_TPRS, compute_thresholds, flagged_count, threshold_at

__version__ = "0.1.0"

__all__ = [
    "CalibrationBins",
    "DEFAULT_TPRS",
    "ENTROPIC_SCALE",
    "HEADS",
    "SCORE_NAMES",
    "DisMaxHead",
    "DisMaxLoss",
    "IsoMaxHead",
    "IsoMaxLoss",
    "IsoMaxPlusHead",
    "PrototypeHead",
    "calibrate_temperature",
    "calibration_bins",
    "compute_thresholds",
    "convert",
    "create_head",
    "dismax_loss",
    "eval_mode",
    "expected_calibration_error",
    "find_classifier",
    "flagged_count",
    "fpr_mix",
    "heads_of",
    "isomax_loss",
    "ood_score",
    "score",
    "scores",
    "threshold_at",
]
