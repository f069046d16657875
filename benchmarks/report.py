"""Benchmark results: ratios and targets, the markdown table, the JSON + markdown (+ PNG) files,
and figures."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sparsegps.files import atomic_save_figure, atomic_write_text

from .machine import load_note


def ratio(baseline_seconds: float, seconds: float) -> float:
    """How many times faster than the baseline (same work): baseline time / time."""
    return baseline_seconds / seconds if seconds > 0 else math.inf


def target(name: str, measured_ratio: float, wanted: float, higher_is_better: bool = True) -> dict:
    met = measured_ratio >= wanted if higher_is_better else measured_ratio <= wanted
    return {"name": name, "ratio": measured_ratio, "target": wanted, "met": bool(met)}


def _format(value) -> str:
    if isinstance(value, float):
        if value == 0 or math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if value is None:
        return "-"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def markdown_report(result: dict, columns: Sequence[str], extra_markdown: str = "") -> str:
    lines = [f"### {result['benchmark']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['summary']}. Baseline: {result['baseline']}.", "",
             markdown_table(result["rows"], columns), ""]
    if extra_markdown:
        lines += [extra_markdown, ""]
    for t in result["targets"]:
        lines.append(f"- target {t['name']}: {t['ratio']:.2f}x measured, {t['target']}x wanted: "
                     f"{'met' if t['met'] else 'NOT met'}")
    for note in result["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


@dataclass
class Result:
    """What one benchmark run produced; `finish` fills in the machine and writes the files."""

    benchmark: str
    command: str
    config: dict
    baseline: str
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self, machine: dict) -> dict:
        d = asdict(self)
        d["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.config.items()}
        d["machine"] = machine
        d["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return d


def finish(result: Result, machine: dict, columns: Sequence[str], out: Path | None,
           plot: Callable[[dict, Path], None] | None = None, extra_markdown: str = "") -> dict:
    """Print the markdown table (and `extra_markdown` after it); with `out`, write <name>.json,
    <name>.md and (if `plot`) <name>.png."""
    if hasattr(os, "getloadavg"):
        machine = {**machine, "load_average_1m_end": os.getloadavg()[0]}
    note = load_note(machine)
    if note:
        result.notes.append(note)
    data = result.to_dict(machine)
    report = markdown_report(data, columns, extra_markdown)
    print(report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = result.benchmark.replace("-", "_")
        atomic_write_text(out / f"{stem}.json", json.dumps(data, indent=1, default=_json_default))
        atomic_write_text(out / f"{stem}.md", report)
        if plot is not None:
            png = out / f"{stem}.png"
            tmp = png.with_name(png.stem + ".tmp.png")
            plot(data, tmp)
            os.replace(tmp, png)
    return data


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_figure(fig, path: Path) -> None:
    """Write a benchmark figure as PNG (atomically) and close it."""
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str,
              highlight: Sequence[bool] | None = None) -> None:
    """A horizontal bar chart (matplotlib, Agg backend) of one value per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.5))
    colours = ["tab:orange" if h else "tab:blue" for h in (highlight or [False] * len(labels))]
    y = np.arange(len(labels))
    ax.barh(y, values, color=colours)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3g}", va="center", fontsize=8)
    save_figure(fig, path)
