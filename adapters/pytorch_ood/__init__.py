r"""pytorch-ood glue: the native isotropic scores as a detector, the isotropic losses, benchmarks with near/far
OOD groups and explicit, disjoint, recorded splits, and the comparison harness built on
:meth:`pytorch_ood.benchmark.Benchmark.evaluate`.

Every benchmark of :func:`create_benchmark` has the same split interface (:mod:`._splits`): ``train_set()``,
``val_set()`` (ID calibration/validation), ``test_sets(known, unknown)``, ``ood_names``/``ood_groups`` (OOD
test), ``ood_val_names``/``ood_val_groups``/``ood_val_sets()`` (OOD validation, may be empty),
``validation_set()`` (ID + OOD validation for GridSearch, or ``None``) and ``split_info()`` (a JSON record:
split seed, sizes, digests; :func:`check_split` compares two records).

.. code-block:: python

    from dismax_plugin.adapters.pytorch_ood import DisMaxDetector, create_benchmark, compare, summarize

    benchmark = create_benchmark("digits")
    detector = DisMaxDetector(model)              # the default score of the model's head class
    results = benchmark.evaluate(detector, loader_kwargs={"batch_size": 128})
    rows = compare({"dismax": model, "ce": twin}, benchmark, fit_data=benchmark.train_set())
    print(format_summary(summarize(rows)))

Modules (private): ``_detector`` (DisMaxDetector), ``_losses``, ``_papers``, ``_splits`` (the split
interface, hold-outs, records), ``_digits``, ``_folder`` and ``_files`` (image folders), ``_wrapped``
(pytorch-ood's benchmarks with the split interface), ``_standard`` (benchmarks by name, near/far groups),
``_methods`` (detector names and construction), ``_recorders`` (detectors that keep their scores),
``_compare`` (one comparison run), ``_timing`` (throughput), ``_report`` (tables, report.md).
"""

from ._compare import METRIC_KEYS, ROW_KEYS, compare, ood_metrics
from ._detector import DisMaxDetector
from ._digits import DigitsBenchmark
from ._folder import FolderBenchmark
from ._losses import DisMaxLoss, IsoMaxLoss, IsoMaxPlusLoss
from ._methods import DEFAULT_DETECTORS, DETECTOR_NAMES, check_detectors, unsupported_reason
from ._papers import DISMAX_PAPER, ISOMAX_PAPER, ISOMAX_PLUS_PAPER, PAPER_AUTHORS
from ._report import format_summary, format_table, report_markdown, summarize
from ._splits import TEST_FRACTION, VAL_FRACTION, check_split, describe_split
from ._standard import BENCHMARK_NAMES, STANDARD_GROUPS, check_groups, create_benchmark

__all__ = [
    "BENCHMARK_NAMES",
    "DEFAULT_DETECTORS",
    "DETECTOR_NAMES",
    "DISMAX_PAPER",
    "ISOMAX_PAPER",
    "ISOMAX_PLUS_PAPER",
    "METRIC_KEYS",
    "PAPER_AUTHORS",
    "ROW_KEYS",
    "STANDARD_GROUPS",
    "TEST_FRACTION",
    "VAL_FRACTION",
    "DigitsBenchmark",
    "DisMaxDetector",
    "DisMaxLoss",
    "FolderBenchmark",
    "IsoMaxLoss",
    "IsoMaxPlusLoss",
    "check_detectors",
    "check_groups",
    "check_split",
    "compare",
    "create_benchmark",
    "describe_split",
    "format_summary",
    "format_table",
    "ood_metrics",
    "report_markdown",
    "summarize",
    "unsupported_reason",
]
