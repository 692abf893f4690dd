r"""Compare an isotropic model's native scores with pytorch-ood's post-hoc detectors on a cross-entropy twin.

:func:`compare` evaluates, on one :class:`~pytorch_ood.benchmark.Benchmark`:

* the **isotropic** model (one with an IsoMax/IsoMax+/DisMax head) with every native score (``MPS``,
  ``ES``, ``MDS``, ``MMLS``, ``MMLES``), and
* the **baseline**, a cross-entropy model with the same backbone, data, epochs and seed (trained by the
  caller), with pytorch-ood's detectors ``MaxSoftmax``, ``EnergyBased``, ``MaxLogit``, ``Entropy``,
  ``ODIN``, ``Mahalanobis``, ``KNN`` and ``ViM`` (the last three fitted on ``fit_loader``).

Each model runs once per dataset (the in-distribution test set and each OOD set): the logits and the
penultimate features (the input of the classifier, captured by a forward hook) are kept and every
logit/feature detector scores them. ODIN perturbs its inputs and so runs the model itself. Models are put
in ``eval()`` mode for the evaluation and their previous mode is restored afterwards.

**Rows.** One dict per (model, method, OOD set) plus a ``"mean"`` row per method (the average over the OOD
sets). Keys:

=================  ==========================================================================================
``Model``          ``"isotropic"`` or ``"baseline"``
``Method``         the native score (upper case) or the pytorch-ood detector's class name
``Dataset``        the OOD set (``benchmark.ood_names``) or ``"mean"``
``AUROC``          from :class:`~pytorch_ood.metrics.OODMetrics`; fraction in [0, 1]
``AUTC``           idem (lower is better)
``AUPR-IN``        idem, in-distribution samples positive
``AUPR-OUT``       idem, OOD samples positive
``FPR95TPR``       pytorch-ood's: **OOD is the positive class**; fraction of ID test samples flagged as OOD
                   at the threshold that flags 95% of the OOD samples
``FPR95-ID``       the conventional FPR@95%TPR: **in-distribution is the positive class**; fraction of OOD
                   samples accepted at the threshold that accepts 95% of the ID test samples (computed with
                   :class:`~pytorch_ood.metrics.FPRAtTPR` on the negated scores with the roles swapped)
``ACC``            test accuracy of the model (fraction, pytorch-ood :class:`~pytorch_ood.metrics.Accuracy`)
``ECE``            expected calibration error of the model on the ID test set (fraction, 15 bins)
``fit_s``          seconds to fit the detector on ``fit_loader`` as if run alone: the one feature pass over
                   ``fit_loader`` plus the detector's own fit; ``0.0`` for detectors that need no fitting
``images_per_s``   scoring throughput over all test images (ID + every OOD set): images divided by the
                   seconds of the model's forward passes plus the detector's scoring (data loading excluded)
=================  ==========================================================================================

All metrics are **fractions** in [0, 1], as pytorch-ood reports them; :func:`format_table` prints them
as percentages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from pytorch_ood.api import FeaturesDetector, LogitsDetector
from pytorch_ood.benchmark import Benchmark
from pytorch_ood.metrics import Accuracy, FPRAtTPR, OODMetrics
from pytorch_ood.utils import extract_features
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dismax_plugin.calibration import expected_calibration_error
from dismax_plugin.convert import find_classifier, heads_of
from dismax_plugin.scores import SCORE_NAMES

from . import DisMaxDetector

__all__ = ["DETECTOR_NAMES", "METRIC_KEYS", "compare", "format_table"]

log = logging.getLogger(__name__)

#: pytorch-ood detectors applied to the baseline model, in the order of the rows
DETECTOR_NAMES: tuple[str, ...] = (
    "MaxSoftmax",
    "EnergyBased",
    "MaxLogit",
    "Entropy",
    "ODIN",
    "Mahalanobis",
    "KNN",
    "ViM",
)
_FITTED = ("Mahalanobis", "KNN", "ViM")

#: OOD metrics of a row (fractions); ``FPR95TPR`` has OOD positive, ``FPR95-ID`` has ID positive
METRIC_KEYS: tuple[str, ...] = ("AUROC", "AUTC", "AUPR-IN", "AUPR-OUT", "FPR95TPR", "FPR95-ID")
_TPR = 0.95


# -------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _classifier_of(model: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` of a baseline model (timm's ``get_classifier()`` first)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        classifier = get()
        if isinstance(classifier, nn.Linear):
            return classifier
    return find_classifier(model)[1]


class _Outputs:
    """Logits, features and labels of one dataset, and the seconds spent in the model."""

    def __init__(self, logits: Tensor, features: Tensor | None, labels: Tensor, seconds: float):
        self.logits, self.features, self.labels, self.seconds = logits, features, labels, seconds


class _Runner:
    """Runs a model in eval mode and keeps its logits and (optionally) the input of its classifier."""

    def __init__(self, model: nn.Module, device: torch.device, classifier: nn.Module | None):
        self.model = model
        self.device = device
        self.classifier = classifier
        self._captured: Tensor | None = None

    def _hook(self, module, inputs, output) -> None:
        self._captured = inputs[0].detach()

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[None]:
        handle = self.classifier.register_forward_hook(self._hook) if self.classifier is not None else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features :math:`B \\times D` of ``x`` (for pytorch-ood's ``extract_features``)."""
        with self._capturing():
            self.model(x)
        return self._captured.flatten(1)

    @torch.no_grad()
    def run(self, loader: DataLoader) -> _Outputs:
        logits, features, labels = [], [], []
        seconds = 0.0
        with self._capturing():
            for x, y in loader:
                x = x.to(self.device)
                _sync(self.device)
                start = time.perf_counter()
                z = self.model(x)
                _sync(self.device)
                seconds += time.perf_counter() - start
                if not isinstance(z, Tensor) or z.ndim != 2:
                    raise ValueError(
                        f"the model must return logits [B, C]; got {type(z).__name__} "
                        f"{tuple(z.shape) if isinstance(z, Tensor) else ''}."
                    )
                logits.append(z.float().cpu())
                if self.classifier is not None:
                    features.append(self._captured.flatten(1).float().cpu())
                labels.append(torch.as_tensor(y).long().cpu())
        return _Outputs(
            torch.cat(logits),
            torch.cat(features) if features else None,
            torch.cat(labels),
            seconds,
        )


def _ood_metrics(id_scores: Tensor, ood_scores: Tensor) -> dict[str, float]:
    """pytorch-ood's OODMetrics (OOD positive) plus the ID-positive FPR at 95% TPR."""
    scores = torch.cat([id_scores, ood_scores]).double()
    n_id, n_ood = len(id_scores), len(ood_scores)
    labels = torch.cat([torch.zeros(n_id, dtype=torch.long), torch.full((n_ood,), -1, dtype=torch.long)])
    result = {k: float(v) for k, v in OODMetrics(fpr_at=_TPR).update(scores, labels).compute().items()}
    # Conventional FPR@95: ID positive. Swap the roles: ID gets the "unknown" label (positive in
    # pytorch-ood) and larger scores must mean more in-distribution, hence the negation.
    swapped = torch.cat([torch.full((n_id,), -1, dtype=torch.long), torch.zeros(n_ood, dtype=torch.long)])
    (value,) = FPRAtTPR(tpr=_TPR).update(-scores, swapped).compute().values()
    result["FPR95-ID"] = float(value)
    return {key: result[key] for key in METRIC_KEYS}


def _check_names(argument: str, names, known: Sequence[str]) -> list[str]:
    if names is None:
        return list(known)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a list of names from {list(known)} or None; got {names!r}.")
    lookup = {k.lower(): k for k in known}
    chosen = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in lookup:
            raise ValueError(f"Unknown {argument[:-1]} {name!r} in {argument}, expected names from {list(known)}.")
        if lookup[name.lower()] not in chosen:
            chosen.append(lookup[name.lower()])
    if not chosen:
        raise ValueError(f"{argument} must name at least one of {list(known)}.")
    return chosen


def _model_stats(outputs: _Outputs, ece_bins: int) -> dict[str, float]:
    predictions = outputs.logits.argmax(dim=1)
    (accuracy,) = Accuracy().update(predictions, outputs.labels).compute().values()
    ece = expected_calibration_error(outputs.logits, outputs.labels, n_bins=ece_bins)
    return {"ACC": float(accuracy), "ECE": float(ece)}


def _rows_for(
    model_name: str,
    method: str,
    per_set: dict[str, dict[str, float]],
    extra: dict[str, float],
) -> list[dict]:
    head = {"Model": model_name, "Method": method}
    rows = [{**head, "Dataset": name, **metrics, **extra} for name, metrics in per_set.items()]
    mean = {key: sum(m[key] for m in per_set.values()) / len(per_set) for key in METRIC_KEYS}
    rows.append({**head, "Dataset": "mean", **mean, **extra})
    return rows


class _Evaluation:
    """Shared state of one :func:`compare` call."""

    def __init__(self, benchmark: Benchmark, batch_size: int, num_workers: int, device: torch.device):
        self.device = device
        self.names = list(benchmark.ood_names)
        id_sets = benchmark.test_sets(known=True, unknown=False)
        ood_sets = benchmark.test_sets(known=False, unknown=True)
        if len(id_sets) != 1 or len(ood_sets) != len(self.names):
            raise ValueError(
                f"benchmark.test_sets() must give one ID test set and one OOD set per ood_names entry "
                f"({len(self.names)}); got {len(id_sets)} and {len(ood_sets)}."
            )
        self.datasets: list[Dataset] = [id_sets[0], *ood_sets]
        self.loaders = [
            DataLoader(d, batch_size=batch_size, shuffle=False, num_workers=num_workers) for d in self.datasets
        ]
        self.n_images = sum(len(d) for d in self.datasets)
        self.keep: dict | None = None

    def run(self, runner: _Runner) -> list[_Outputs]:
        return [runner.run(loader) for loader in self.loaders]

    def split(self, scores: list[Tensor], key: tuple[str, str]) -> dict[str, dict[str, float]]:
        id_scores, *ood = scores
        if self.keep is not None:
            self.keep[key] = {"ID": id_scores, **dict(zip(self.names, ood))}
        return {name: _ood_metrics(id_scores, s) for name, s in zip(self.names, ood)}


def _timed(fn: Callable[[], list[Tensor]]) -> tuple[list[Tensor], float]:
    start = time.perf_counter()
    scores = fn()
    return [s.detach().double().cpu() for s in scores], time.perf_counter() - start


# -------------------------------------------------------------------- public API
def compare(
    isotropic_model: nn.Module | None,
    baseline_model: nn.Module | None,
    benchmark: Benchmark,
    *,
    fit_loader: DataLoader | None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    detectors: Sequence[str] | None = None,
    scores: Sequence[str] | None = None,
    num_workers: int = 0,
    ece_bins: int = 15,
    knn_k: int = 50,
    vim_dim: int | None = None,
    odin_eps: float = 0.0014,
    odin_temperature: float = 1000.0,
    keep_scores: dict | None = None,
) -> list[dict]:
    """Evaluate the isotropic model's native scores and the baseline's pytorch-ood detectors on ``benchmark``.

    See the module documentation for the rows and their units (fractions in [0, 1]).

    :param isotropic_model: model with an isotropic head (found with :func:`dismax_plugin.heads_of`);
        ``None`` to evaluate the baseline only
    :param baseline_model: cross-entropy twin with a final ``nn.Linear`` classifier (timm's
        ``get_classifier()``, else the last ``nn.Linear``); ``None`` to evaluate the isotropic model only
    :param benchmark: a pytorch-ood benchmark (``ood_names``, ``test_sets(known, unknown)``)
    :param fit_loader: loader of in-distribution training batches ``(x, y)`` for ``Mahalanobis``, ``KNN`` and
        ``ViM``; may be ``None`` when none of them is requested
    :param batch_size: batch size of the evaluation loaders
    :param device: device the models (moved there) and inputs run on
    :param detectors: names from :data:`DETECTOR_NAMES` (case-insensitive); ``None`` for all
    :param scores: native score names from :data:`dismax_plugin.SCORE_NAMES`; ``None`` for all
    :param num_workers: workers of the evaluation loaders
    :param ece_bins: bins of the expected calibration error
    :param knn_k: neighbours of ``KNN`` (capped at the number of training samples)
    :param vim_dim: principal subspace dimension of ``ViM``; ``None`` for half the feature width
    :param odin_eps: input perturbation step of ``ODIN``
    :param odin_temperature: temperature of ``ODIN``
    :param keep_scores: if a dict, it receives the raw outlier scores (pytorch-ood sign: larger = more OOD)
        as ``{(model, method): {"ID": tensor [N_id], <ood name>: tensor [N_ood], ...}}`` (for plots)
    :return: list of row dicts (see the module documentation)
    :raises TypeError: for a benchmark that is not a pytorch-ood ``Benchmark``, or models that are not modules
    :raises ValueError: for unknown detector/score names, an isotropic model without an isotropic head, a
        missing ``fit_loader`` for fitted detectors, or a ``fit_loader`` that lacks a class
    """
    if isotropic_model is None and baseline_model is None:
        raise ValueError("isotropic_model and baseline_model cannot both be None.")
    for argument, model in (("isotropic_model", isotropic_model), ("baseline_model", baseline_model)):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"{argument} must be a torch.nn.Module or None; got {type(model).__name__}.")
    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"benchmark must be a pytorch_ood.benchmark.Benchmark; got {type(benchmark).__name__}.")
    if not hasattr(benchmark, "ood_names"):
        raise ValueError(f"benchmark {type(benchmark).__name__} has no ood_names.")
    for argument, value in (("batch_size", batch_size), ("ece_bins", ece_bins), ("knn_k", knn_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive integer; got {value!r}.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}.")
    if vim_dim is not None and (isinstance(vim_dim, bool) or not isinstance(vim_dim, int) or vim_dim < 1):
        raise ValueError(f"vim_dim must be a positive integer or None; got {vim_dim!r}.")
    score_names = [s.lower() for s in _check_names("scores", scores, SCORE_NAMES)]
    detector_names = _check_names("detectors", detectors, DETECTOR_NAMES)
    if isotropic_model is not None and not heads_of(isotropic_model):
        raise ValueError(
            "isotropic_model has no isotropic head (IsoMax/IsoMax+/DisMax); convert it with "
            "dismax_plugin.convert(model, head) or pass it as baseline_model."
        )
    if baseline_model is not None and fit_loader is None and set(detector_names) & set(_FITTED):
        raise ValueError(
            f"fit_loader is required to fit {sorted(set(detector_names) & set(_FITTED))}; pass a loader of "
            "training batches (x, y) or leave those detectors out of detectors=."
        )
    device = torch.device(device)
    evaluation = _Evaluation(benchmark, batch_size, num_workers, device)
    evaluation.keep = keep_scores
    rows: list[dict] = []
    if isotropic_model is not None:
        rows += _evaluate_isotropic(isotropic_model, evaluation, score_names, ece_bins)
    if baseline_model is not None:
        rows += _evaluate_baseline(
            baseline_model,
            evaluation,
            detector_names,
            fit_loader,
            ece_bins=ece_bins,
            knn_k=knn_k,
            vim_dim=vim_dim,
            odin_eps=odin_eps,
            odin_temperature=odin_temperature,
        )
    return rows


def _evaluate_isotropic(model: nn.Module, evaluation: _Evaluation, score_names, ece_bins: int) -> list[dict]:
    rows = []
    model.to(evaluation.device)
    with _eval_mode(model):
        log.info("compare: isotropic model, %d datasets", len(evaluation.loaders))
        outputs = evaluation.run(_Runner(model, evaluation.device, classifier=None))
    stats = _model_stats(outputs[0], ece_bins)
    forward_s = sum(o.seconds for o in outputs)
    for name in score_names:
        detector = DisMaxDetector(None, score=name)
        scores, score_s = _timed(lambda d=detector: [d.predict_logits(o.logits) for o in outputs])
        extra = {**stats, "fit_s": 0.0, "images_per_s": evaluation.n_images / max(forward_s + score_s, 1e-12)}
        rows += _rows_for("isotropic", name.upper(), evaluation.split(scores, ("isotropic", name.upper())), extra)
    return rows


def _evaluate_baseline(
    model: nn.Module,
    evaluation: _Evaluation,
    detector_names: list[str],
    fit_loader: DataLoader | None,
    *,
    ece_bins: int,
    knn_k: int,
    vim_dim: int | None,
    odin_eps: float,
    odin_temperature: float,
) -> list[dict]:
    from pytorch_ood import detector as pod

    classifier = _classifier_of(model)
    device = evaluation.device
    model.to(device)
    runner = _Runner(model, device, classifier)
    rows = []
    with _eval_mode(model):
        train_features = train_labels = None
        extract_s = 0.0
        if set(detector_names) & set(_FITTED):
            log.info("compare: baseline features of fit_loader")
            start = time.perf_counter()
            train_features, train_labels = extract_features(fit_loader, runner.features, device)
            extract_s = time.perf_counter() - start
            train_features, train_labels = train_features.float().cpu(), train_labels.long().cpu()
            num_classes = classifier.out_features
            present = set(train_labels.unique().tolist())
            if present != set(range(num_classes)):
                raise ValueError(
                    f"fit_loader must hold every class 0..{num_classes - 1}; labels present: {sorted(present)}."
                )

        log.info("compare: baseline model, %d datasets", len(evaluation.loaders))
        outputs = evaluation.run(runner)
        stats = _model_stats(outputs[0], ece_bins)
        forward_s = sum(o.seconds for o in outputs)

        for name in detector_names:
            fit_s = 0.0
            if name == "ODIN":
                detector = pod.ODIN(model, eps=odin_eps, temperature=odin_temperature).to(device)
                scores, seconds = [], 0.0
                for loader in evaluation.loaders:
                    chunks = []
                    for x, _ in loader:
                        x = x.to(device)
                        _sync(device)
                        begin = time.perf_counter()
                        chunks.append(detector.predict(x).detach())
                        _sync(device)
                        seconds += time.perf_counter() - begin
                    scores.append(torch.cat(chunks).double().cpu())
            else:
                if name in ("MaxSoftmax", "EnergyBased", "MaxLogit", "Entropy"):
                    detector = getattr(pod, name)(None)
                elif name == "Mahalanobis":
                    detector = pod.Mahalanobis(None)
                elif name == "KNN":
                    detector = pod.KNN(None, k=min(knn_k, len(train_labels)))
                else:  # ViM
                    width = train_features.shape[1]
                    bias = classifier.bias if classifier.bias is not None else torch.zeros(classifier.out_features)
                    detector = pod.ViM(
                        None,
                        d=vim_dim or max(1, width // 2),
                        w=classifier.weight.detach().float().cpu(),
                        b=bias.detach().float().cpu(),
                    )
                if name in _FITTED:
                    start = time.perf_counter()
                    detector.fit_features(train_features, train_labels)
                    fit_s = extract_s + time.perf_counter() - start
                if isinstance(detector, LogitsDetector):
                    scores, score_s = _timed(lambda d=detector: [d.predict_logits(o.logits) for o in outputs])
                elif isinstance(detector, FeaturesDetector):
                    scores, score_s = _timed(lambda d=detector: [d.predict_features(o.features) for o in outputs])
                else:  # pragma: no cover - every name above is one of the two kinds
                    raise TypeError(f"unsupported detector {type(detector).__name__}")
                seconds = forward_s + score_s
            extra = {**stats, "fit_s": fit_s, "images_per_s": evaluation.n_images / max(seconds, 1e-12)}
            rows += _rows_for("baseline", name, evaluation.split(scores, ("baseline", name)), extra)
    return rows


# -------------------------------------------------------------------- table
_COLUMNS = ("Model", "Method", "Dataset", *METRIC_KEYS, "ACC", "ECE", "fit_s", "images_per_s")
_PERCENT = {*METRIC_KEYS, "ACC", "ECE"}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if key in _PERCENT:
        return f"{100.0 * float(value):.2f}"
    if key == "fit_s":
        return f"{float(value):.3f}"
    if key == "images_per_s":
        return f"{float(value):.0f}"
    return str(value)


def format_table(rows: Sequence[dict]) -> str:
    """Rows of :func:`compare` as an aligned text table; metrics, ``ACC`` and ``ECE`` in percent.

    ``FPR95TPR`` has OOD as the positive class (pytorch-ood); ``FPR95-ID`` has in-distribution as the
    positive class (the conventional FPR@95%TPR). Missing keys print as ``-``.

    :param rows: list of dicts, e.g. from :func:`compare`
    :return: the table, one line per row after a header and a rule
    :raises TypeError: if ``rows`` is not a sequence of dicts
    """
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("rows must be a list of dicts, as returned by compare().")
    header = [f"{c} (%)" if c in _PERCENT else c for c in _COLUMNS]
    body = [[_cell(c, row.get(c)) for c in _COLUMNS] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [c not in ("Model", "Method", "Dataset") for c in _COLUMNS]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(cells) for cells in body]
    lines.append("FPR95TPR: OOD positive (pytorch-ood); FPR95-ID: in-distribution positive (conventional).")
    return "\n".join(lines)
