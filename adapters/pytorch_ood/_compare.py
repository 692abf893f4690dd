r"""One comparison run: several models on one benchmark through :meth:`pytorch_ood.benchmark.Benchmark.evaluate`.

For each model the methods (native isotropic scores for isotropic models, pytorch-ood post-hoc detectors
for every model) are fitted, optionally tuned with :class:`pytorch_ood.utils.GridSearch` on the
benchmark's ``validation_set()`` (ID + OOD validation), and evaluated together with
``benchmark.evaluate(detectors, cache=True, cache_key=...)``, so the model runs once per dataset for all
logits detectors and once for all feature detectors. Each detector is wrapped in a recorder of the same
pytorch-ood kind that keeps its raw scores (:mod:`._recorders`), for the conventional FPR (ID positive) and
the score histograms. With OOD validation sets (``ood_val_names``) every method is also scored on the
validation splits (:class:`~._splits.ValidationView`): rows with ``split = "val"``, from which reports
choose their "best" marks; the test rows are the reported numbers.

**Every model alike**: during the evaluation the isotropic heads' temperature is set to 1 (restored
after, also on error), so pytorch-ood's detectors see every model's logits at :math:`T = 1` — the
linear twins' raw logits and the isotropic heads' distance logits :math:`z` — never calibrated ones. The
native scores do not depend on :math:`T`. The ECE column is the one place a temperature enters: fitted the
same way for every model on its ID validation logits.

**Rows** (one per model, split, method and OOD set; all metrics fractions in [0, 1]):

==================  ========================================================================================
``model``           the model's name (e.g. ``dismax``, ``ce``, ``logitnorm``)
``seed``            the seed passed to :func:`compare`
``split``           ``test`` (ID test + OOD test sets: the reported numbers) or ``val`` (ID validation +
                    OOD validation sets: for choices only)
``method``          a native score (upper case, e.g. ``MMLES``) or a pytorch-ood detector class name
``dataset``         the OOD set (``benchmark.ood_names``; ``ood_val_names`` in ``val`` rows)
``group``           ``near`` or ``far`` (``benchmark.ood_groups``)
``AUROC``           :class:`~pytorch_ood.metrics.OODMetrics` (as returned by ``Benchmark.evaluate``)
``AUPR-IN/-OUT``    idem, in-distribution / OOD samples positive
``FPR95TPR``        idem: OOD positive; fraction of ID samples flagged at 95% OOD recall
``FPR95-ID``        conventional FPR@95%TPR, ID positive: fraction of OOD accepted at 95% ID recall
``ACC``             accuracy of the model on the ID test split (``val`` rows: on the ID validation split)
``ECE``             expected calibration error (15 bins) of the test set after temperature scaling fitted
                    the same way for every model (``calibration`` objective on the validation logits at T=1);
                    NaN in ``val`` rows
``ECE-raw``         the same at temperature 1 (no calibration); NaN in ``val`` rows
``fit_s``           seconds to fit (feature pass over the training set + fit) and tune the detector
``images_per_s``    model forward + scoring throughput (see :mod:`._timing`)
``tuning``          ``GridSearch <params>`` or ``defaults``
==================  ========================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch
from pytorch_ood.api import Detector, FeaturesDetector, LogitsDetector
from pytorch_ood.metrics import FPRAtTPR, OODMetrics
from pytorch_ood.utils import extract_features
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import dismax_plugin as dp

from ._checks import check_names, check_positive
from ._detector import DisMaxDetector
from ._methods import ModelParts, build_detector, check_detectors, unsupported_reason
from ._recorders import FeaturesRecorder, LogitsRecorder, recorded_split
from ._recorders import recorder as make_recorder
from ._splits import ValidationView
from ._standard import check_groups
from ._timing import interleaved_best

__all__ = ["METRIC_KEYS", "ROW_KEYS", "compare"]

log = logging.getLogger(__name__)

#: OOD metrics of a row (fractions); ``FPR95TPR`` has OOD positive, ``FPR95-ID`` has ID positive
METRIC_KEYS: tuple[str, ...] = ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95-ID", "FPR95TPR")
#: keys of every row, in the column order of ``results.csv``
ROW_KEYS: tuple[str, ...] = (
    "model", "seed", "split", "method", "dataset", "group", *METRIC_KEYS, "ACC", "ECE", "ECE-raw", "fit_s",
    "images_per_s", "tuning",
)  # fmt: skip
_TPR = 0.95


def ood_metrics(id_scores: Tensor, ood_scores: Tensor) -> dict[str, float]:
    """pytorch-ood's OODMetrics (OOD positive, larger score = more OOD) plus ``FPR95-ID`` (ID positive)."""
    scores = torch.cat([id_scores, ood_scores]).double()
    n_id, n_ood = len(id_scores), len(ood_scores)
    labels = torch.cat([torch.zeros(n_id, dtype=torch.long), torch.full((n_ood,), -1, dtype=torch.long)])
    result = {k: float(v) for k, v in OODMetrics(fpr_at=_TPR).update(scores, labels).compute().items()}
    # ID positive: give ID the "unknown" label (pytorch-ood's positive class) and negate the scores.
    swapped = torch.cat([torch.full((n_id,), -1, dtype=torch.long), torch.zeros(n_ood, dtype=torch.long)])
    (value,) = FPRAtTPR(tpr=_TPR).update(-scores, swapped).compute().values()
    result["FPR95-ID"] = float(value)
    return {key: result[key] for key in METRIC_KEYS}


@torch.no_grad()
def _logits_of(model: nn.Module, dataset: Dataset, loader_kwargs: dict, device) -> tuple[Tensor, Tensor]:
    logits, labels = [], []
    for x, y in DataLoader(dataset, **loader_kwargs):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y).long())
    return torch.cat(logits), torch.cat(labels)


@contextlib.contextmanager
def _unit_temperature(model: nn.Module):
    """The model's isotropic heads at temperature 1 inside the block, their own temperature restored after."""
    heads = [head for _, head in dp.heads_of(model)]
    saved = [head.temperature.detach().clone() for head in heads]
    try:
        with torch.no_grad():
            for head in heads:
                head.temperature.fill_(1.0)
        yield model
    finally:
        with torch.no_grad():
            for head, temperature in zip(heads, saved):
                head.temperature.copy_(temperature)


def _model_stats(parts: ModelParts, test: tuple[Tensor, Tensor], calibration: str, bins: int) -> dict[str, float]:
    """Accuracy and ECE (raw, and after a temperature fitted on the validation logits), from logits at T=1."""
    logits, labels = test
    stats = {"ACC": float((logits.argmax(1) == labels).double().mean())}
    stats["ECE-raw"] = float(dp.expected_calibration_error(logits, labels, n_bins=bins))
    temperature = 1.0
    if parts.val_logits is not None:
        temperature = dp.calibrate_temperature(parts.val_logits, parts.val_labels, objective=calibration)
    stats["ECE"] = float(dp.expected_calibration_error(logits / temperature, labels, n_bins=bins))
    return stats


def _tune(detector: Detector, name: str, parts: ModelParts, fit_loader, val_loader, device) -> str:
    """GridSearch over the detector's space (values that do not fit the model dropped); the chosen params."""
    from pytorch_ood.utils import GridSearch

    space = {k: list(v) for k, v in detector.hyperparameter_space.items()}
    n_fit, width = parts.fit_features.shape
    if name == "ViM":
        space["d"] = [d for d in space["d"] if d < width] or [max(1, width // 2)]
    if name == "KNN":
        space["k"] = [k for k in space["k"] if k <= n_fit] or [min(50, n_fit)]
    kind = "model" if isinstance(detector, LogitsDetector) else "encoder"
    attached = kind in vars(detector) and getattr(detector, kind) is None
    if attached:
        setattr(detector, kind, parts.model if kind == "model" else parts.encoder)
    try:
        best = GridSearch(detector, fit_loader, val_loader, hyperparameter_space=space, device=str(device)).run()
    finally:
        if attached:
            setattr(detector, kind, None)
    return "GridSearch " + ",".join(f"{k}={v}" for k, v in best.items())


class _Setting:
    """The shared inputs of one :func:`compare` call."""

    def __init__(self, benchmark, fit_data, val_data, loader_kwargs, device, timing_images, tune):
        self.benchmark, self.fit_data, self.val_data = benchmark, fit_data, val_data
        self.loader_kwargs, self.device = loader_kwargs, device
        self.groups = check_groups(benchmark)
        self.sizes = [len(d) for d in benchmark.test_sets()]
        (self.test_set,) = benchmark.test_sets(known=True, unknown=False)
        self.n_id = len(self.test_set)
        self.fit_loader = DataLoader(fit_data, **loader_kwargs)
        validation = getattr(benchmark, "validation_set", None)
        validation = validation() if tune and callable(validation) else None
        self.val_loader = DataLoader(validation, **loader_kwargs) if validation is not None else None
        #: the validation splits as a benchmark (``None`` without OOD validation sets)
        self.validation = ValidationView(benchmark) if getattr(benchmark, "ood_val_names", None) else None
        if self.validation is not None:
            self.val_groups = check_groups(self.validation)
            self.val_sizes = [len(d) for d in self.validation.test_sets()]
            self.n_val_id = len(self.validation.test_sets(known=True, unknown=False)[0])
        self.jobs: dict = {}  #: timing jobs of every model, run interleaved at the end
        self.heavy: set = set()  #: the keys of the jobs that run the model
        self.timing_batches: list[Tensor] = []
        for x, _ in DataLoader(self.test_set, **loader_kwargs):
            self.timing_batches.append(x[: timing_images - sum(len(b) for b in self.timing_batches)].to(device))
            if sum(len(b) for b in self.timing_batches) >= timing_images:
                break


def _build_methods(name: str, parts: ModelParts, setting: _Setting, scores, detectors, skipped) -> list[tuple]:
    """``(method, detector, fit_s, tuning)`` for every method that runs on the model (others to ``skipped``)."""
    methods = []
    if parts.isotropic:
        methods += [(s.upper(), DisMaxDetector(parts.model, score=s), 0.0, "defaults") for s in scores]
    for detector_name in detectors:
        reason = unsupported_reason(detector_name, parts.model, setting.timing_batches[0])
        if reason:
            log.info("%s: %s skipped (%s)", name, detector_name, reason)
            skipped.append({"model": name, "method": detector_name, "reason": reason})
            continue
        start = time.perf_counter()
        try:
            detector = build_detector(detector_name, parts, setting.fit_loader)
            tuning = "defaults"
            if setting.val_loader is not None and detector.hyperparameter_space:
                tuning = _tune(detector, detector_name, parts, setting.fit_loader, setting.val_loader, setting.device)
        except (ValueError, RuntimeError) as error:  # e.g. SHE on a class the model never predicts right
            log.warning("%s: %s could not be fitted (%s)", name, detector_name, error)
            skipped.append({"model": name, "method": detector_name, "reason": f"fit failed: {error}"})
            continue
        fit_s = time.perf_counter() - start
        if isinstance(detector, FeaturesDetector):
            fit_s += parts.feature_s
        methods.append((detector_name, detector, fit_s, tuning))
    return methods


def _timing_jobs(name: str, recorders: list[Detector], batches: list[Tensor], parts: ModelParts) -> list[tuple]:
    """Per recorder: ``(forward job key or None, scoring job key)``; the jobs go to ``parts.jobs``."""
    keys = []
    with torch.no_grad():
        represented = {"logits": [parts.model(x) for x in batches], "features": [parts.encoder(x) for x in batches]}
    for index, recorder in enumerate(recorders):
        inner = recorder.inner
        if isinstance(recorder, (LogitsRecorder, FeaturesRecorder)):
            kind = "logits" if isinstance(recorder, LogitsRecorder) else "features"
            producer = parts.model if kind == "logits" else parts.encoder
            score = inner.predict_logits if kind == "logits" else inner.predict_features
            parts.jobs[(name, kind)] = _no_grad(lambda p=producer: [p(x) for x in batches])
            parts.heavy.add((name, kind))
            parts.jobs[(name, index)] = _no_grad(lambda f=score, zs=represented[kind]: [f(z) for z in zs])
            keys.append(((name, kind), (name, index)))
        else:
            def job(f=inner.predict):
                return [f(x) for x in batches]

            parts.jobs[(name, index)] = job if recorder.grad else _no_grad(job)
            parts.heavy.add((name, index))
            keys.append((None, (name, index)))
    return keys


def _no_grad(job):
    def run():
        with torch.no_grad():
            return job()

    return run


def _scored_rows(benchmark, recorders: list, methods: list, split: dict, base: dict) -> tuple[list[dict], list]:
    """Run ``benchmark.evaluate`` with the recorders; one row per method and OOD set, and the recorded
    ``(ID, OOD)`` scores of each method. ``split``: ``name``, ``groups``, ``sizes``, ``n_id``, ``stats``,
    ``cache_key``; ``base``: the row fields common to every row (model, seed, loader, device, timing)."""
    for rec in recorders:
        rec.scores = []
    results = benchmark.evaluate(recorders, loader_kwargs=base["loader_kwargs"], device=base["device"], cache=True,
                                 cache_key=split["cache_key"])  # fmt: skip
    rows, recorded = [], []
    for j, ((method, _, fit_s, tuning), rec) in enumerate(zip(methods, recorders)):
        per_set = recorded_split(rec, split["sizes"], split["n_id"])
        recorded.append(per_set)
        for i, (dataset, (id_scores, ood_scores)) in enumerate(zip(split["groups"], per_set)):
            metrics = ood_metrics(id_scores, ood_scores)
            reported = results[i * len(recorders) + j]
            if abs(reported["AUROC"] - metrics["AUROC"]) > 1e-6:
                raise RuntimeError(f"{method} on {dataset}: recorded scores disagree with Benchmark.evaluate.")
            metrics.update({k: float(reported[k]) for k in ("AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR")})
            rows.append(
                {"model": base["model"], "seed": base["seed"], "split": split["name"], "method": method,
                 "dataset": dataset, "group": split["groups"][dataset], **metrics, **split["stats"], "fit_s": fit_s,
                 "images_per_s": base["timing"][j], "tuning": tuning}
            )  # fmt: skip
    return rows, recorded


def _evaluate_model(name: str, model: nn.Module, setting: _Setting, options: dict) -> list[dict]:
    """Rows of every method on one model (see the module documentation), the model's heads at T = 1."""
    device = setting.device
    parts = ModelParts(model, norm_std=options["norm_std"])
    start = time.perf_counter()
    parts.fit_features, parts.fit_labels = extract_features(setting.fit_loader, parts.encoder, device)
    parts.fit_features, parts.fit_labels = parts.fit_features.float().cpu(), parts.fit_labels.long().cpu()
    parts.feature_s = time.perf_counter() - start
    if setting.val_data is not None:
        parts.val_logits, parts.val_labels = _logits_of(model, setting.val_data, setting.loader_kwargs, device)
    test = _logits_of(model, setting.test_set, setting.loader_kwargs, device)
    stats = _model_stats(parts, test, options["calibration"], options["ece_bins"])
    skipped: list = []
    methods = _build_methods(name, parts, setting, options["scores"], options["detectors"], skipped)
    options["skipped"].extend({**entry, "seed": options["seed"]} for entry in skipped)
    recorders = [make_recorder(detector, parts, method) for method, detector, _, _ in methods]
    log.info("compare: %s, %d methods on %d OOD sets", name, len(methods), len(setting.groups))
    parts.jobs, parts.heavy = setting.jobs, setting.heavy
    base = {"model": name, "seed": options["seed"], "loader_kwargs": setting.loader_kwargs, "device": str(device),
            "timing": _timing_jobs(name, recorders, setting.timing_batches, parts)}  # fmt: skip
    key = f"{name}-seed{options['seed']}"
    test_split = {"name": "test", "groups": setting.groups, "sizes": setting.sizes, "n_id": setting.n_id,
                  "stats": stats, "cache_key": key}  # fmt: skip
    rows, recorded = _scored_rows(setting.benchmark, recorders, methods, test_split, base)
    if options["keep_scores"] is not None:
        for (method, *_), per_set in zip(methods, recorded):
            scores = {d: s[1] for d, s in zip(setting.groups, per_set)}
            options["keep_scores"][(name, method)] = {"ID": per_set[0][0], **scores}
    if setting.validation is not None:
        accuracy = math.nan
        if parts.val_logits is not None:
            accuracy = float((parts.val_logits.argmax(1) == parts.val_labels).double().mean())
        val_split = {"name": "val", "groups": setting.val_groups, "sizes": setting.val_sizes,
                     "n_id": setting.n_val_id, "cache_key": key + "-val",
                     "stats": {"ACC": accuracy, "ECE": math.nan, "ECE-raw": math.nan}}  # fmt: skip
        rows += _scored_rows(setting.validation, recorders, methods, val_split, base)[0]
    return rows


def _evaluate_all(models: Mapping[str, nn.Module], setting: _Setting, options: dict) -> list[dict]:
    """Rows of every model (in eval mode, restored after), then the interleaved throughput of every method."""
    rows = []
    modes = {name: model.training for name, model in models.items()}
    try:
        for name, model in models.items():
            model.eval()
            with _unit_temperature(model):
                rows += _evaluate_model(name, model, setting, options)
        seconds = interleaved_best(setting.jobs, setting.device, heavy=setting.heavy)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    n = sum(len(x) for x in setting.timing_batches)
    for row in rows:
        forward, score = row["images_per_s"]
        row["images_per_s"] = n / max(seconds[score] + (seconds[forward] if forward else 0.0), 1e-12)
    return rows


def _check_options(models, batch_size, ece_bins, timing_images, detectors, scores) -> dict:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping {name: model}.")
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] must be a torch.nn.Module; got {type(model).__name__}.")
    for argument, value in (("batch_size", batch_size), ("ece_bins", ece_bins), ("timing_images", timing_images)):
        check_positive(argument, value, integer=True, minimum=1)
    return {
        "detectors": check_detectors(detectors),
        "scores": [s.lower() for s in check_names("scores", scores, dp.SCORE_NAMES)],
    }


def compare(
    models: Mapping[str, nn.Module],
    benchmark,
    *,
    fit_data: Dataset,
    val_data: Dataset | None = None,
    detectors: Sequence[str] | str | None = None,
    scores: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    calibration: str = "ece",
    ece_bins: int = 15,
    timing_images: int = 256,
    tune: bool = True,
    norm_std: Sequence[float] | None = None,
    keep_scores: dict | None = None,
    skipped: list | None = None,
) -> list[dict]:
    """Evaluate every model with its methods on ``benchmark`` (rows: see the module documentation).

    :param models: ``{name: model}``; isotropic models (with an IsoMax/IsoMax+/DisMax head) get the native
        ``scores`` too. Models are put in ``eval()`` mode and their heads at temperature 1; both are restored.
    :param benchmark: a pytorch-ood ``Benchmark`` with ``ood_names`` and ``ood_groups``; with a
        ``validation_set()`` (ID + OOD) the detectors' hyperparameters are tuned with ``GridSearch``; with
        ``ood_val_names`` (the split interface of :mod:`._splits`) every method is also scored on the
        validation splits (``split = "val"`` rows)
    :param fit_data: ID training data (evaluation transform) the feature detectors are fitted on
    :param val_data: ID validation data: temperature for the ECE column, KLMatching/TemperatureScaling fit
    :param detectors: pytorch-ood detector names, ``"all"`` or ``None`` for the default set
    :param scores: native score names (:data:`dismax_plugin.SCORE_NAMES`); ``None`` for all
    :param seed: recorded in the rows (the caller trains per seed)
    :param batch_size: evaluation batch size
    :param device: device the models are on
    :param num_workers: DataLoader workers
    :param calibration: temperature objective of the ECE column, ``"ece"`` or ``"nll"``
    :param ece_bins: bins of the ECE
    :param timing_images: ID test images the throughput is measured on
    :param tune: tune hyperparameters when the benchmark has a validation set
    :param norm_std: per-channel std of the input normalisation, for ODIN's step
    :param keep_scores: receives ``{(model, method): {"ID": scores, <set>: scores}}`` (pytorch-ood sign)
    :param skipped: receives ``{"model", "method", "reason", "seed"}`` for every detector that cannot run on a model
    :raises ValueError: for unknown detector/score names, a benchmark without near/far groups, or no models
    :raises TypeError: for a model that is not an ``nn.Module``
    """
    options = _check_options(models, batch_size, ece_bins, timing_images, detectors, scores)
    options.update(seed=seed, calibration=calibration, ece_bins=ece_bins, norm_std=norm_std, keep_scores=keep_scores,
                   skipped=skipped if skipped is not None else [])  # fmt: skip
    device = torch.device(device)
    loader_kwargs = {"batch_size": batch_size, "shuffle": False, "num_workers": num_workers}
    setting = _Setting(benchmark, fit_data, val_data, loader_kwargs, device, timing_images, tune)
    return _evaluate_all(models, setting, options)
