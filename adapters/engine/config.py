"""The engine's configuration: one dataclass per option group, each field's default, choices and help.

:class:`TrainConfig` is one training run; :class:`EvalOptions`, :class:`CompareOptions` and
:class:`TrackingOptions` are the other options of the ``dismax`` subcommands. The command line is generated
from these fields (:mod:`.cli` reads their type, default and ``metadata``), so no default or choice list is
written twice. :meth:`TrainConfig.validate` turns bad input into a :class:`ConfigError` that names the
option; the CLI prints it as one line and exits with code 2.

Only the core and the standard library are imported here, so ``dismax --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

import dismax_plugin as dp
from dismax_plugin import calibration as _calibration
from dismax_plugin._checks import check_positive

__all__ = [
    "CALIBRATE_SCORES",
    "COMPARE_HEADS",
    "CalibrateOptions",
    "CompareOptions",
    "ConfigError",
    "EvalOptions",
    "HEAD_CHOICES",
    "ImportOptions",
    "LOGITNORM_TEMPERATURE",
    "LOSS_CHOICES",
    "RESUME_MAY_CHANGE",
    "SCHEDULERS",
    "TWINS",
    "TrackingOptions",
    "TrainConfig",
    "check_integer",
    "flag_of",
    "parse_list",
    "train_config",
]

LINEAR = "linear"
#: head kinds: the core's isotropic heads plus timm's stock classifier (as the timm adapter's ``HEAD_KINDS``)
HEAD_CHOICES: tuple[str, ...] = (*dp.HEADS, LINEAR)
#: training losses; ``auto`` picks by head (linear: cross_entropy, dismax: dismax, isomax/isomaxplus: isomax)
LOSS_CHOICES: tuple[str, ...] = ("auto", "cross_entropy", "logitnorm", "isomax", "dismax")
_LINEAR_LOSSES = ("cross_entropy", "logitnorm")
#: LogitNorm temperature: the value of Wei et al., ICML 2022 ("Mitigating Neural Network Overconfidence with
#: Logit Normalization") for CIFAR-10.
LOGITNORM_TEMPERATURE = 0.04
#: timm schedulers the engine checkpoints and resumes exactly (timm's deprecated ``plateau`` is left out: its
#: state_dict drops the patience counters, so a resumed run would differ)
SCHEDULERS: tuple[str, ...] = ("cosine", "step", "multistep", "poly", "constant", "none")
CALIBRATION_OBJECTIVES: tuple[str, ...] = _calibration.OBJECTIVES
COMPARE_HEADS: tuple[str, ...] = tuple(dp.HEADS)
#: the :class:`TrainConfig` options a resumed run may change: how long it trains (a longer ``epochs`` re-plans
#: the lr schedule, see :func:`._setup.build_scheduler`), where it runs, how it reads its data and how fast it
#: evaluates, and the folder flags. Every other option changes the run: ``--resume`` with another value is
#: refused (:func:`._checkpoint.load_checkpoint`). Tracking and output options are not part of the run at all.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "epochs", "workers", "device", "eval_batch_size", "data_root", "output", "resume", "overwrite",
)  # fmt: skip
TWINS: tuple[str, ...] = ("ce", "logitnorm")


class ConfigError(ValueError):
    """Bad user input (the CLI turns it into one line and exit code 2)."""


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None, **extra) -> Any:
    """A dataclass field whose ``metadata`` carries the command-line help, choices and flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, **extra})


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (``batch_size`` -> ``--batch-size``; ``fpr`` -> ``--no-fpr``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an integer >= ``minimum``, else a :class:`ConfigError` naming the option ``name``."""
    try:
        check_positive(_flag(name), value, integer=True, minimum=minimum)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error
    return value


def parse_list(name: str, text: str, known: tuple[str, ...] | None = None, item=str) -> list:
    """A comma list (``"a,b"``) as a list of ``item``, each in ``known`` if given, else a ConfigError."""
    values = [part.strip() for part in str(text).split(",") if part.strip()]
    if not values:
        raise ConfigError(f"{_flag(name)} must be a comma-separated list; got {text!r}.")
    if known is not None:
        unknown = [v for v in values if v.lower() not in known]
        if unknown:
            raise ConfigError(f"{_flag(name)}: unknown {unknown}, expected names from {list(known)}.")
        return [v.lower() for v in values]
    try:
        return [item(v) for v in values]
    except ValueError as error:
        raise ConfigError(f"{_flag(name)} must be a comma-separated list of {item.__name__}; got {text!r}.") from error


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is per process (the global batch is ``batch_size * world_size``)."""

    model: str = option("resnet10t", "timm architecture")
    head: str = option("dismax", "isotropic head (linear = timm's stock classifier)", choices=HEAD_CHOICES)
    loss: str = option("auto", "training loss (auto: by head; logitnorm needs --head linear)", choices=LOSS_CHOICES)
    data: str = option("digits", "digits (embedded), a pytorch-ood benchmark name, or an image folder")
    data_root: str | None = option(None, "where a pytorch-ood benchmark's data lies")
    image_size: int = option(32, "input height and width")
    channels: int = option(3, "input channels", choices=(1, 3))
    epochs: int = option(10, "training epochs")
    batch_size: int = option(64, "batch size per process")
    lr: float = option(0.05, "learning rate")
    optimizer: str = option("sgd", "any timm optimizer name (see timm.optim.list_optimizers())")
    momentum: float = option(0.9, "optimizer momentum")
    weight_decay: float = option(5e-4, "weight decay (timm: not applied to biases and norms)")
    scheduler: str = option("cosine", "timm lr scheduler (step: x0.1 every third of the epochs; multistep: x0.1 "
                            "at 1/2 and 3/4 of them)", choices=SCHEDULERS)  # fmt: skip
    warmup_epochs: int = option(0, "linear warm-up epochs")
    seed: int = option(0, "random seed (model, data order, FPR)")
    output: str | None = option(None, "run directory (default: runs/<command>-<model>-<head>-<data>)")
    resume: bool = option(False, "continue the checkpoint in --output")
    overwrite: bool = option(False, "start again even if --output holds a checkpoint")
    pretrained: bool = option(False, "timm's pretrained backbone weights (Hugging Face hub and its cache)")
    pretrained_file: str | None = option(None, "local backbone weights (.pth/.safetensors)")
    amp: bool = option(False, "mixed precision (bfloat16 on CPU, float16 on CUDA)")
    fpr: bool = option(True, "DisMax without fractional probability regularisation", flag="--no-fpr")
    entropic_scale: float = option(10.0, "entropic scale of the IsoMax/DisMax losses")
    alpha: float = option(1.0, "weight of the FPR KL term")
    mixup: float = option(0.0, "timm Mixup alpha (with DisMax add --no-fpr)")
    cutmix: float = option(0.0, "timm CutMix alpha (with DisMax add --no-fpr)")
    smoothing: float = option(0.0, "label smoothing (with FPR: on the clean rows)")
    augment: bool = option(False, "timm training augmentation (random resized crop, scale 0.7-1; no flip)")
    max_train_samples: int | None = option(None, "train on the first N samples only")
    workers: int = option(0, "DataLoader workers")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available)")
    eval_batch_size: int = option(256, "evaluation batch size")
    calibration: str = option("ece", "temperature objective", choices=CALIBRATION_OBJECTIVES)

    # ---------------------------------------------------------------- derived
    @property
    def loss_name(self) -> str:
        """The loss actually trained with (``auto`` resolved by head)."""
        if self.loss != "auto":
            return self.loss
        return {LINEAR: "cross_entropy", "dismax": "dismax"}.get(self.head, "isomax")

    @property
    def uses_fpr(self) -> bool:
        return self.loss_name == "dismax" and self.fpr

    def default_output(self, command: str = "train") -> str:
        data = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(os.path.normpath(self.data)))
        return os.path.join("runs", f"{command}-{self.model}-{self.head}-{data}")

    # ---------------------------------------------------------------- checks
    def validate(self) -> TrainConfig:
        """A copy with ``output`` filled in; :class:`ConfigError` naming the option for anything invalid."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{flag_of(f)}: unknown value {getattr(self, f.name)!r}, expected one of {list(choices)}."
                )
        for name in ("epochs", "batch_size", "image_size", "eval_batch_size"):
            check_integer(name, getattr(self, name))
        for name in ("warmup_epochs", "workers", "seed"):
            check_integer(name, getattr(self, name), minimum=0)
        if self.max_train_samples is not None:
            check_integer("max_train_samples", self.max_train_samples)
        self._check_numbers()
        self._check_loss()
        self._check_paths()
        return dataclasses.replace(self, output=self.output or self.default_output())

    def _check_numbers(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a finite number > 0; got {self.lr!r}.")
        if not (self.entropic_scale > 0 and math.isfinite(self.entropic_scale)):
            raise ConfigError(f"--entropic-scale must be a finite number > 0; got {self.entropic_scale!r}.")
        for name in ("weight_decay", "alpha", "mixup", "cutmix", "momentum"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0; got {value!r}.")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"--smoothing must be in [0, 1); got {self.smoothing!r}.")
        from timm.optim import list_optimizers

        if self.optimizer.lower() not in list_optimizers():
            raise ConfigError(
                f"--optimizer: unknown optimizer '{self.optimizer}', expected a timm optimizer such as "
                "sgd, momentum, adamw, lamb, lion (see timm.optim.list_optimizers())."
            )

    def _check_loss(self) -> None:
        linear_loss = self.loss_name in _LINEAR_LOSSES
        if linear_loss != (self.head == LINEAR):
            expected = list(_LINEAR_LOSSES) if self.head == LINEAR else ["isomax", "dismax"]
            raise ConfigError(f"--loss {self.loss} does not fit --head {self.head}; expected auto or one of {expected}")
        if self.uses_fpr and (self.mixup or self.cutmix):
            raise ConfigError("--mixup/--cutmix cannot be combined with DisMax's FPR; add --no-fpr to use them.")
        if self.loss_name == "logitnorm" and (self.mixup or self.cutmix or self.smoothing):
            raise ConfigError("--loss logitnorm takes class labels: drop --mixup, --cutmix and --smoothing.")

    def _check_paths(self) -> None:
        if self.pretrained and self.pretrained_file:
            raise ConfigError("--pretrained and --pretrained-file exclude each other; pass one of them.")
        if self.pretrained_file and not os.path.isfile(self.pretrained_file):
            raise ConfigError(f"--pretrained-file: no such file '{self.pretrained_file}'.")
        if self.data_root and not os.path.isdir(self.data_root):
            raise ConfigError(f"--data-root: no such directory '{self.data_root}'.")

    def params(self) -> dict[str, Any]:
        """The run's parameters as logged (plus the library versions)."""
        import timm

        params = dataclasses.asdict(self)
        params.update(loss=self.loss_name, fpr=self.uses_fpr, dismax_plugin=dp.__version__, torch=torch.__version__)
        params["timm"] = timm.__version__
        import pytorch_ood

        params["pytorch_ood"] = getattr(pytorch_ood, "__version__", "unknown")
        return params


@dataclass
class EvalOptions:
    """Options of the evaluation (``train`` and ``evaluate``) beyond the training run."""

    checkpoint: str = option(None, "a saved model directory or a run directory", required=True)
    detectors: str = option("", "comma-separated pytorch-ood post-hoc detectors (for linear-head models)")


#: ``dismax calibrate --score``: the head's default, chosen on the OOD validation split, or a native score
CALIBRATE_SCORES: tuple[str, ...] = ("default", "auto", *dp.SCORE_NAMES)


@dataclass
class CalibrateOptions:
    """Options of ``dismax calibrate`` beyond loading the model and its data."""

    score: str = option("default", "the OOD score thresholds use: default (the head's), auto (best mean near/far "
                        "AUROC on the OOD validation split) or a native score", choices=CALIBRATE_SCORES)  # fmt: skip


@dataclass
class CompareOptions:
    """Options of ``dismax compare`` (the comparison itself lives in :mod:`.compare`)."""

    heads: str = option("dismax", f"comma list of isotropic heads from {list(COMPARE_HEADS)}")
    twins: str = option("ce,logitnorm", f"comma list of linear-head twins from {list(TWINS)}")
    seeds: str = option("0", "comma list of integer seeds (one run of each model per seed)")
    detectors: str | None = option(
        None, "comma list of pytorch-ood detectors, or 'all' (default: the pytorch-ood adapter's DEFAULT_DETECTORS)"
    )

    def check(self) -> CompareOptions:
        """Raise :class:`ConfigError` for an unknown head or twin, or a bad seed list."""
        parse_list("heads", self.heads, COMPARE_HEADS)
        parse_list("twins", self.twins, TWINS)
        parse_list("seeds", self.seeds, item=int)
        return self


@dataclass
class ImportOptions:
    """Options of ``dismax import``: a checkpoint of timm's train.py made a calibrated model folder
    (:mod:`.importing`)."""

    checkpoint: str = option(None, "train.py's last.pth.tar or model_best.pth.tar, or its output folder", required=True)
    model: str | None = option(None, "train.py's --model (resnet10t_dismax; a stock name imports a linear twin); "
                               "default: the one train.py recorded")  # fmt: skip
    args_yaml: str | None = option(None, "train.py's args.yaml (default: next to the checkpoint, else its args)")
    use_ema: bool = option(False, "import the EMA weights (train.py --model-ema)")
    output: str | None = option(None, "run directory, the model goes to <output>/model "
                                "(default: runs/import-<model>-<data>)")  # fmt: skip
    overwrite: bool = option(False, "replace an existing <output>/model")


@dataclass
class TrackingOptions:
    """Where the run is tracked (MLflow)."""

    tracking_uri: str | None = option(None, "default: $MLFLOW_TRACKING_URI, else MLflow's local store")
    experiment: str | None = option(None, "MLflow experiment name (default: dismax)")
    run_name: str | None = option(None, "MLflow run name")
    track: bool = option(True, "do not track to MLflow", flag="--no-track")
    register_model: str | None = option(None, "register the logged model under this name", metavar="NAME")
    alias: list[str] | None = option(None, "registry alias set on the new version, e.g. champion (repeatable; "
                                     "needs --register-model)", metavar="ALIAS", repeatable=True)  # fmt: skip


def train_config(args: Any, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of parsed options (an ``argparse.Namespace``; ``overrides`` win); without an
    ``output``, the command's default run folder."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(overrides)
    cfg = TrainConfig(**values)
    return cfg if cfg.output else dataclasses.replace(cfg, output=cfg.default_output(args.command))
