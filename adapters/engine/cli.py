"""``dismax`` command line: train, evaluate, calibrate, compare.

Only argument parsing lives here; timm, pytorch-ood and MLflow are imported when a command runs, so
``dismax --help`` stays fast. Bad input exits with code 2 and one line on stderr; an interrupted run
(Ctrl-C/SIGTERM) writes a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_train_options(p: argparse.ArgumentParser, compare: bool = False) -> None:
    p.add_argument("--model", default="resnet10t", help="timm architecture (default: resnet10t)")
    heads = ["dismax", "isomaxplus", "isomax"] + ([] if compare else ["linear"])
    p.add_argument("--head", default="dismax", choices=heads, help="isotropic head (linear = stock CE head)")
    _add_data_options(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd", help="any timm optimizer name (default: sgd, momentum 0.9)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--scheduler", default="cosine", help="timm scheduler: cosine, step, multistep, poly, none, ...")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="run directory (default: runs/<command>-<model>-<head>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", help="start again even if --output holds a checkpoint")
    p.add_argument("--pretrained-file", default=None, help="local backbone weights (.pth/.safetensors)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--no-fpr", dest="fpr", action="store_false", help="DisMax without fractional probability reg.")
    p.add_argument("--entropic-scale", type=float, default=10.0)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the FPR KL term")
    p.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (needs --no-fpr with dismax)")
    p.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (needs --no-fpr with dismax)")
    p.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    p.add_argument("--augment", action="store_true", help="timm training augmentation (random resized crop)")
    p.add_argument("--max-train-samples", type=int, default=None, help="train on the first N samples only")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--calibration", default="ece", choices=["ece", "nll"], help="temperature objective")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="digits (embedded), a pytorch-ood benchmark name, or a folder")
    p.add_argument("--data-root", default=None, help="where a pytorch-ood benchmark's data lies")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detectors", default="", help="comma-separated pytorch-ood post-hoc detectors to add")
    p.add_argument("--eval-batch-size", type=int, default=256)


def _add_tracking_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracking (MLflow)")
    g.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else MLflow's local store")
    g.add_argument("--experiment", default=None, help="MLflow experiment name (default: dismax)")
    g.add_argument("--run-name", default=None)
    g.add_argument("--no-track", dest="track", action="store_false", help="do not track to MLflow")
    g.add_argument("--register-model", default=None, metavar="NAME", help="register the logged model")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dismax", description="IsoMax/IsoMax+/DisMax heads on timm backbones, evaluated on OOD.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a timm backbone with an isotropic head, calibrate, evaluate")
    _add_train_options(p)
    _add_eval_options(p)
    _add_tracking_options(p)

    p = sub.add_parser("compare", help="train the isotropic model and a CE twin, compare with post-hoc detectors")
    _add_train_options(p, compare=True)
    _add_eval_options(p)
    _add_tracking_options(p)

    for name, text in (
        ("evaluate", "native scores (and post-hoc detectors) of a saved model on a benchmark"),
        ("calibrate", "temperature and thresholds on validation data, written back"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help="a saved model directory or a run directory")
        _add_data_options(p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None)
        p.add_argument("--workers", type=int, default=0)
        if name == "evaluate":
            _add_eval_options(p)
            _add_tracking_options(p)
        else:
            p.add_argument("--calibration", default="ece", choices=["ece", "nll"])
            p.add_argument("--eval-batch-size", type=int, default=256)
    return parser


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("dismax_plugin")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    from .commands import run_command
    from .training import ConfigError, Interrupted

    try:
        return run_command(args)
    except ConfigError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"dismax {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as stop:
        print(f"dismax {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"dismax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
