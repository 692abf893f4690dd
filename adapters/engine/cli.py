"""``dismax`` command line: train, evaluate, calibrate, compare — generated from :mod:`.config`.

Every option is a field of :class:`~.config.TrainConfig`, :class:`~.config.EvalOptions`,
:class:`~.config.CompareOptions` or :class:`~.config.TrackingOptions`; this module only turns those fields
into argparse options (type, default, choices, help) and picks which fields each subcommand takes.
timm, pytorch-ood and MLflow are imported when a command runs, so ``dismax --help`` stays fast. Bad input
exits with code 2 and one line on stderr, and so does an option the command does not use (it is not
offered). Ctrl-C/SIGTERM follow one policy for the whole command (:mod:`._signals`): training writes a
checkpoint, anything else marks the tracked run ``KILLED`` and flushes it; the exit code is 128 + the
signal number. Under ``torchrun`` only rank 0 prints its progress (other ranks: warnings and errors only).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing

from .config import (
    CalibrateOptions,
    CompareOptions,
    ConfigError,
    EvalOptions,
    ImportOptions,
    TrackingOptions,
    TrainConfig,
    flag_of,
)

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
#: TrainConfig fields that ``evaluate``/``calibrate`` take (how to load data for a saved model); the input size
#: and channels come from the saved model, ``--image-size``/``--channels`` only for one saved without them
_LOAD_FIELDS = ("data", "data_root", "seed", "device", "workers", "eval_batch_size")
_SHAPE_FIELDS = ("image_size", "channels")
#: options a command does not take: ``compare`` and ``evaluate`` log no model to register
_NOT_TAKEN = {"compare": ("register_model", "alias"), "evaluate": ("register_model", "alias")}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _value_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _add_fields(parser, cls: type, names: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                without_default: bool = False) -> None:  # fmt: skip
    """One option per field of the dataclass ``cls`` (only ``names`` if given), from the field's metadata;
    ``without_default``: the option is ``None`` unless given (its help says when it applies)."""
    for f in dataclasses.fields(cls):
        if (names is not None and f.name not in names) or f.name in exclude:
            continue
        meta, kind = f.metadata, _value_type(cls, f.name)
        help_text = meta.get("help", "")
        if without_default:
            help_text = f"{help_text}: only for a model saved without its preprocessing (default: {f.default})"
            parser.add_argument(flag_of(f), dest=f.name, type=kind, default=None, choices=meta.get("choices"),
                                help=help_text)  # fmt: skip
            continue
        if kind is bool:
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag_of(f), dest=f.name, action=action, default=f.default, help=help_text)
            continue
        if f.default not in (None, ""):
            help_text = f"{help_text} (default: {f.default})"
        kwargs = {"type": kind, "default": f.default, "help": help_text}
        if meta.get("repeatable"):  # list[T] field: the option may be given several times
            kwargs.update(action="append", type=typing.get_args(kind)[0])
        for key in ("choices", "metavar", "required"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        if kwargs.get("required"):
            del kwargs["default"]
        parser.add_argument(flag_of(f), dest=f.name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``dismax`` parser with its subcommands."""
    parser = _Parser(prog="dismax", description="IsoMax/IsoMax+/DisMax heads on timm backbones, evaluated on OOD.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a timm backbone with an isotropic head, calibrate, evaluate")
    _add_fields(p, TrainConfig)
    _add_fields(p, EvalOptions, exclude=("checkpoint",))
    _add_fields(p.add_argument_group("tracking (MLflow)"), TrackingOptions)

    p = sub.add_parser("compare", help="isotropic models and linear twins side by side with post-hoc detectors")
    _add_fields(p, TrainConfig, exclude=("head", "loss", "seed"))  # set per model and per seed (--seeds)
    _add_fields(p, CompareOptions)
    _add_fields(p.add_argument_group("tracking (MLflow)"), TrackingOptions, exclude=_NOT_TAKEN["compare"])

    p = sub.add_parser("evaluate", help="native scores (and post-hoc detectors) of a saved model on a benchmark")
    _add_fields(p, EvalOptions, ("checkpoint",))
    _add_fields(p, TrainConfig, _LOAD_FIELDS)
    _add_fields(p, TrainConfig, _SHAPE_FIELDS, without_default=True)
    _add_fields(p, EvalOptions, exclude=("checkpoint",))
    _add_fields(p.add_argument_group("tracking (MLflow)"), TrackingOptions, exclude=_NOT_TAKEN["evaluate"])

    p = sub.add_parser("calibrate", help="temperature and thresholds on validation data, written back")
    _add_fields(p, EvalOptions, ("checkpoint",))
    _add_fields(p, TrainConfig, (*_LOAD_FIELDS, "calibration"))
    _add_fields(p, CalibrateOptions)
    _add_fields(p, TrainConfig, _SHAPE_FIELDS, without_default=True)

    p = sub.add_parser("import", help="a timm train.py checkpoint, calibrated and saved as a model folder")
    _add_fields(p, ImportOptions)
    _add_fields(p, TrainConfig, (*_LOAD_FIELDS, "calibration"), exclude=("image_size", "channels"))  # from train.py
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("dismax_plugin")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if _rank() == 0 else logging.WARNING)  # rank 0 tells the progress
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run ``dismax`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    from ._memory import keep_freed_memory

    keep_freed_memory()  # freed memory reused, not page-faulted back every step (glibc; see _memory)
    _configure_logging()
    from ._signals import GaveUp, Interrupted, SignalPolicy
    from .commands import run_command

    prefix = f"dismax {args.command}" + (f" [rank {_rank()}]" if _rank() else "")
    with SignalPolicy():
        try:
            return run_command(args)
        except ConfigError as error:
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            print(f"{prefix}: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except Interrupted as stop:
            if _rank() == 0:  # the checkpoint, the tracked run: rank 0's
                print(f"{prefix}: {stop}", file=sys.stderr)
            return 128 + stop.signum
        except GaveUp as stop:
            print(f"{prefix}: {stop}", file=sys.stderr)
            return 128 + stop.signum
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
