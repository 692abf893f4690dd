r"""pytorch-ood glue: the native isotropic scores as a detector, the isotropic losses, benchmarks with near/far
OOD groups, and the comparison harness built on :meth:`pytorch_ood.benchmark.Benchmark.evaluate`.

.. code-block:: python

    from dismax_plugin.adapters.pytorch_ood import DisMaxDetector, create_benchmark, compare, summarize

    benchmark = create_benchmark("digits")
    detector = DisMaxDetector(model)              # the default score of the model's head class
    results = benchmark.evaluate(detector, loader_kwargs={"batch_size": 128})
    rows = compare({"dismax": model, "ce": twin}, benchmark, fit_data=benchmark.train_set())
    print(format_summary(summarize(rows)))

Modules (private): ``_detector`` (DisMaxDetector), ``_losses``, ``_papers``, ``_digits``, ``_folder``,
``_standard`` (benchmarks by name, near/far groups), ``_methods`` (detector names and construction),
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
    "DigitsBenchmark",
    "DisMaxDetector",
    "DisMaxLoss",
    "FolderBenchmark",
    "IsoMaxLoss",
    "IsoMaxPlusLoss",
    "check_detectors",
    "check_groups",
    "compare",
    "create_benchmark",
    "format_summary",
    "format_table",
    "ood_metrics",
    "report_markdown",
    "summarize",
    "unsupported_reason",
]
