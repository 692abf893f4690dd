"""Tables of a comparison: the near/far summary (mean ± std over seeds), the per-set table, ``report.md``.

Input rows are those of :func:`compare` (fractions). :func:`summarize` averages each (model, seed,
method) over the OOD sets of each group, then over seeds: mean and sample standard deviation (no std
for one seed). Tables print percentages.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ._compare import METRIC_KEYS

__all__ = ["format_summary", "format_table", "report_markdown", "summarize"]

_GROUPS = ("near", "far")
_SUMMARY_METRICS = ("AUROC", "FPR95-ID")
_HIGHER_IS_BETTER = {"AUROC": True, "FPR95-ID": False}
_BASELINE = ("ce", "MaxSoftmax")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _check_rows(rows) -> None:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("rows must be a list of dicts, as returned by compare().")


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One entry per (model, method): ``near``/``far`` mean and std (over seeds) of AUROC and FPR95-ID, ACC,
    ECE, images_per_s, ``speed`` (throughput relative to ``ce`` + ``MaxSoftmax`` when present), ``seeds``.

    :raises TypeError: if ``rows`` is not a list of dicts
    """
    _check_rows(rows)
    per_seed: dict[tuple, dict] = {}
    for row in rows:
        entry = per_seed.setdefault((row["model"], row["method"], row["seed"]), {"rows": [], "first": row})
        entry["rows"].append(row)
    pairs: dict[tuple, list[dict]] = {}
    for (model, method, _), entry in per_seed.items():
        values = {key: entry["first"][key] for key in ("ACC", "ECE", "images_per_s")}
        for group in _GROUPS:
            members = [r for r in entry["rows"] if r["group"] == group]
            for metric in _SUMMARY_METRICS:
                values[f"{group} {metric}"] = statistics.fmean(r[metric] for r in members) if members else math.nan
        pairs.setdefault((model, method), []).append(values)
    baseline = pairs.get(_BASELINE)
    base_rate = statistics.fmean(v["images_per_s"] for v in baseline) if baseline else None
    summary = []
    for (model, method), seeds in pairs.items():
        item = {"model": model, "method": method, "seeds": len(seeds)}
        for key in seeds[0]:
            item[key], item[f"{key} std"] = _mean_std([s[key] for s in seeds])
        item["speed"] = item["images_per_s"] / base_rate if base_rate else None
        summary.append(item)
    return summary


def _best(summary: list[dict]) -> dict[str, float]:
    best = {}
    for group in _GROUPS:
        for metric in _SUMMARY_METRICS:
            key = f"{group} {metric}"
            values = [s[key] for s in summary if not math.isnan(s[key])]
            if values:
                best[key] = max(values) if _HIGHER_IS_BETTER[metric] else min(values)
    return best


def _pm(item: dict, key: str, digits: int = 1) -> str:
    mean, std = item[key], item.get(f"{key} std")
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{100 * mean:.{digits}f}"
    return text + (f"±{100 * std:.{digits}f}" if std is not None else "")


def _text_table(header: list[str], body: list[list[str]], left: int) -> list[str]:
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(cells).rstrip() for cells in body)]


def format_summary(summary: Sequence[dict]) -> str:
    """The summary as a terminal table (at most 100 columns for the usual names); ``*`` marks the best.

    Columns: near/far AUROC and FPR95-ID (ID positive) in percent (mean±std over seeds), accuracy,
    throughput relative to ``ce`` + ``MaxSoftmax``.
    """
    summary = list(summary)
    best = _best(summary)
    keys = [f"{g} {m}" for g in _GROUPS for m in _SUMMARY_METRICS]
    header = ["model", "method", "near AUROC", "near FPR95", "far AUROC", "far FPR95", "ACC", "speed"]
    body = []
    for item in summary:
        cells = [item["model"], item["method"]]
        cells += [_pm(item, k) + ("*" if best.get(k) == item[k] else " ") for k in keys]
        cells += [_pm(item, "ACC"), f"{item['speed']:.2f}x" if item["speed"] else "-"]
        body.append(cells)
    notes = "percent, mean±std over seeds; FPR95 = OOD accepted at 95% ID recall; * best; speed vs ce+MaxSoftmax"
    return "\n".join([*_text_table(header, body, 2), notes])


def format_table(rows: Sequence[dict]) -> str:
    """Rows of :func:`compare` as a wide per-set text table (metrics, ACC and ECE in percent).

    :raises TypeError: if ``rows`` is not a list of dicts
    """
    _check_rows(rows)
    columns = ["model", "seed", "method", "dataset", "group", *METRIC_KEYS, "ACC", "ECE", "fit_s", "images_per_s"]
    percent = {*METRIC_KEYS, "ACC", "ECE"}

    def cell(key, value):
        if value is None:
            return "-"
        if key in percent:
            return f"{100 * float(value):.2f}"
        if key == "fit_s":
            return f"{float(value):.3f}"
        if key == "images_per_s":
            return f"{float(value):.0f}"
        return str(value)

    header = [f"{c} (%)" if c in percent else c for c in columns]
    body = [[cell(c, row.get(c)) for c in columns] for row in rows]
    note = "FPR95TPR: OOD positive (pytorch-ood); FPR95-ID: in-distribution positive (conventional)."
    return "\n".join([*_text_table(header, body, 5), note])


def report_markdown(summary: Sequence[dict], rows: Sequence[dict], *, title: str, notes: Sequence[str] = ()) -> str:
    """``report.md``: the summary table (best in bold), the notes, then the per-set table.

    :param summary: from :func:`summarize`
    :param rows: from :func:`compare`
    :param title: first heading
    :param notes: lines shown under the summary (tuning, groups, unsupported detectors, ...)
    """
    summary = list(summary)
    best = _best(summary)
    keys = [f"{g} {m}" for g in _GROUPS for m in _SUMMARY_METRICS]
    lines = [f"# {title}", "", "| model | method | near AUROC | near FPR95-ID | far AUROC | far FPR95-ID | ACC | ECE "
             "| images/s | speed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for item in summary:
        cells = [f"**{_pm(item, k)}**" if best.get(k) == item[k] else _pm(item, k) for k in keys]
        speed = f"{item['speed']:.2f}x" if item["speed"] else "-"
        lines.append(
            f"| {item['model']} | {item['method']} | {' | '.join(cells)} | {_pm(item, 'ACC')} | {_pm(item, 'ECE')} "
            f"| {item['images_per_s']:.0f} | {speed} |"
        )
    lines += ["", *[f"- {note}" for note in notes], "", "## Per OOD set", "", "```", format_table(rows), "```", ""]
    return "\n".join(lines)
