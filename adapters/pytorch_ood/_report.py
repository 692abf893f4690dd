"""Tables of a comparison: the near/far summary (mean ± std over seeds), the per-set table, ``report.md``.

Input rows are those of :func:`compare` (fractions). :func:`summarize` averages each (model, seed,
method) over the OOD sets of each group, then over seeds: mean and sample standard deviation (no std
for one seed). Tables print percentages.

**What is reported, what chooses**: the summary's numbers are the *test* rows (ID test + OOD test sets).
The "best" marks (``*`` in the terminal, bold in ``report.md``) are chosen on the *validation* rows (ID
validation + OOD validation sets), never on the test sets: in each column the entries with the best mean
of that column's metric on the validation sets of the same group (on all validation sets when the group
has none there). Without validation rows nothing is marked.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Sequence

from ._compare import METRIC_KEYS

__all__ = ["format_summary", "format_table", "marks_note", "report_markdown", "summarize"]

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


def _group_means(members: list[dict], prefix: str) -> dict[str, float]:
    values = {}
    for group in (*_GROUPS, "all"):
        chosen = [r for r in members if group == "all" or r["group"] == group]
        for metric in _SUMMARY_METRICS:
            values[f"{prefix}{group} {metric}"] = statistics.fmean(r[metric] for r in chosen) if chosen else math.nan
    return values


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One entry per (model, method): ``near``/``far`` mean and std (over seeds) of AUROC and FPR95-ID on the
    test rows, the same on the validation rows (``val near AUROC``, ..., and ``val all ...`` over every
    validation set; NaN without them), ACC, ECE, images_per_s, ``speed`` (throughput relative to ``ce`` +
    ``MaxSoftmax`` when present), ``seeds``. Rows without a ``split`` count as test rows.

    :raises TypeError: if ``rows`` is not a list of dicts
    """
    _check_rows(rows)
    per_seed: dict[tuple, dict] = {}
    for row in rows:
        entry = per_seed.setdefault((row["model"], row["method"], row["seed"]), {"test": [], "val": []})
        entry["val" if row.get("split") == "val" else "test"].append(row)
    pairs: dict[tuple, list[dict]] = {}
    for (model, method, _), entry in per_seed.items():
        if not entry["test"]:
            continue
        values = {key: entry["test"][0][key] for key in ("ACC", "ECE", "images_per_s")}
        values.update(_group_means(entry["test"], ""))
        values.update(_group_means(entry["val"], "val "))
        del values["all AUROC"], values["all FPR95-ID"]
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


def _marked(summary: list[dict]) -> dict[str, set[tuple[str, str]]]:
    """``{column: {(model, method), ...}}``: the best entries of each column, chosen on the validation keys."""
    marked = {}
    for group in _GROUPS:
        for metric in _SUMMARY_METRICS:
            chooser = f"val {group} {metric}"
            if all(math.isnan(s.get(chooser, math.nan)) for s in summary):
                chooser = f"val all {metric}"
            values = [s[chooser] for s in summary if not math.isnan(s.get(chooser, math.nan))]
            if values:
                best = max(values) if _HIGHER_IS_BETTER[metric] else min(values)
                marked[f"{group} {metric}"] = {(s["model"], s["method"]) for s in summary if s.get(chooser) == best}
    return marked


def marks_note(summary: Sequence[dict]) -> str:
    """The sentence that says what the marks mean (or that there are none)."""
    if _marked(list(summary)):
        return ("best marks chosen on the OOD validation split (per column: same group, else all validation "
                "sets); the numbers are test results")  # fmt: skip
    return "no best marks: the benchmark has no OOD validation split (marks are never chosen on test sets)"


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
    """The summary as a terminal table (at most 100 columns for the usual names); ``*`` marks the best on the
    validation split (see the module documentation).

    Columns: near/far AUROC and FPR95-ID (ID positive) on the test sets in percent (mean±std over seeds),
    accuracy, throughput relative to ``ce`` + ``MaxSoftmax``.
    """
    summary = list(summary)
    marked = _marked(summary)
    keys = [f"{g} {m}" for g in _GROUPS for m in _SUMMARY_METRICS]
    header = ["model", "method", "near AUROC", "near FPR95", "far AUROC", "far FPR95", "ACC", "speed"]
    body = []
    for item in summary:
        entry = (item["model"], item["method"])
        cells = [item["model"], item["method"]]
        cells += [_pm(item, k) + ("*" if entry in marked.get(k, ()) else " ") for k in keys]
        cells += [_pm(item, "ACC"), f"{item['speed']:.2f}x" if item["speed"] else "-"]
        body.append(cells)
    notes = textwrap.wrap(
        "test sets (ID test + OOD test), percent, mean±std over seeds; FPR95 = OOD accepted at 95% ID recall; "
        + ("* = " if marked else "") + marks_note(summary) + "; speed vs ce+MaxSoftmax", 100
    )  # fmt: skip
    return "\n".join([*_text_table(header, body, 2), *notes])


def format_table(rows: Sequence[dict]) -> str:
    """Rows of :func:`compare` as a wide per-set text table (metrics, ACC and ECE in percent).

    :raises TypeError: if ``rows`` is not a list of dicts
    """
    _check_rows(rows)
    columns = ["model", "seed", "split", "method", "dataset", "group", *METRIC_KEYS, "ACC", "ECE", "fit_s",
               "images_per_s"]
    percent = {*METRIC_KEYS, "ACC", "ECE"}

    def cell(key, value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if key in percent:
            return f"{100 * float(value):.2f}"
        if key == "fit_s":
            return f"{float(value):.3f}"
        if key == "images_per_s":
            return f"{float(value):.0f}"
        return str(value)

    header = [f"{c} (%)" if c in percent else c for c in columns]
    body = [[cell(c, row.get(c, "test" if c == "split" else None)) for c in columns] for row in rows]
    notes = ["split test: ID test + OOD test sets (the reported numbers); val: ID validation + OOD validation "
             "sets (for choices only).", "FPR95TPR: OOD positive (pytorch-ood); FPR95-ID: in-distribution "
             "positive (conventional)."]  # fmt: skip
    return "\n".join([*_text_table(header, body, 6), *notes])


def report_markdown(summary: Sequence[dict], rows: Sequence[dict], *, title: str, notes: Sequence[str] = ()) -> str:
    """``report.md``: the summary table of the test sets (best on validation in bold), the notes, then the
    per-set table (test and validation rows).

    :param summary: from :func:`summarize`
    :param rows: from :func:`compare`
    :param title: first heading
    :param notes: lines shown under the summary (splits, tuning, groups, unsupported detectors, ...)
    """
    summary = list(summary)
    marked = _marked(summary)
    keys = [f"{g} {m}" for g in _GROUPS for m in _SUMMARY_METRICS]
    note = marks_note(summary)
    lines = [f"# {title}", "", f"Test sets (ID test + OOD test). {note[0].upper() + note[1:]}.", "",
             "| model | method | near AUROC | near FPR95-ID | far AUROC | far FPR95-ID | ACC | ECE | images/s "
             "| speed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for item in summary:
        entry = (item["model"], item["method"])
        cells = [f"**{_pm(item, k)}**" if entry in marked.get(k, ()) else _pm(item, k) for k in keys]
        speed = f"{item['speed']:.2f}x" if item["speed"] else "-"
        lines.append(
            f"| {item['model']} | {item['method']} | {' | '.join(cells)} | {_pm(item, 'ACC')} | {_pm(item, 'ECE')} "
            f"| {item['images_per_s']:.0f} | {speed} |"
        )
    lines += ["", *[f"- {note}" for note in notes], "", "## Per OOD set", "", "```", format_table(rows), "```", ""]
    return "\n".join(lines)
