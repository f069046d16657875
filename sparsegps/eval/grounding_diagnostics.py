"""Where grounding fails: the class of the object a sentence names, or the object within that class.

Every referral of our stores names its target's class, and most have same-class distractors. So
accuracy alone mixes two skills: recognising the class the sentence names, and choosing among the
objects of that class by the relation the sentence states. `grounding_diagnostics` separates them:

    accuracy               argmax over the scene's objects is the target
    class_accuracy         the chosen object has the target's class
    within_class_accuracy  argmax over the objects of the target's class alone is the target: what
                           the spatial reasoning adds once the class is known
    class_prior            mean of 1 / (objects of the target's class): picking the named class and
                           guessing among it; the baseline of both accuracy and within-class accuracy
    chance                 mean of 1 / (objects in the scene)

and breaks accuracy down by relation (each relation a referral uses counts it once), by shape, by the
number of same-class objects, and, for Nr3D and Sr3D referrals, by view dependence (ReferIt3D's word
list; our generated referrals are view-independent by construction). With boxes it also says
which same-class object the model tends to pick (the largest, the first slot, the one nearest the
room's centre) against how often that object is the target, which exposes a systematic preference.

A record is a plain dict (model outputs and hand-built cases alike):

    {"scores": [n] floats over the scene's objects (-inf: not a candidate), "target": index,
     "classes": [n] class names, "relation": "closest" or "color+next_to" or "", "shape": "single",
     "utterance": "the chair closest to the door", "source": "generated" or "nr3d" ...,
     "boxes": optional [n, 6] (centre, size)}
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .grounding import is_view_dependent

VIEW_SOURCES = ("nr3d", "sr3d", "sr3d+")  # where ReferIt3D's view-dependence split is defined
SUMMARY_KEYS = ("accuracy", "class_accuracy", "within_class_accuracy", "class_prior", "chance")


def _outcome(record: Mapping) -> dict:
    """Per-referral facts: hit, class hit, within-class hit, prior, chance, same-class count."""
    scores = np.asarray(record["scores"], dtype=np.float64)
    classes = list(record["classes"])
    target = int(record["target"])
    if not 0 <= target < len(scores) or len(classes) != len(scores):
        raise ValueError(f"record: target {target} and {len(classes)} classes do not fit {len(scores)} scores")
    candidates = np.isfinite(scores)
    same = np.array([c == classes[target] for c in classes]) & candidates
    chosen = int(np.argmax(np.where(candidates, scores, -np.inf)))
    within = np.where(same & candidates, scores, -np.inf)
    within_choice = int(np.argmax(within))
    out = {"hit": chosen == target, "class_hit": classes[chosen] == classes[target],
           "within_hit": within_choice == target, "prior": 1.0 / same.sum(),
           "chance": 1.0 / max(int(candidates.sum()), 1), "same_class": int(same.sum()),
           "within_choice": within_choice, "same": same}
    return out


def _summary(outcomes: list[dict]) -> dict:
    n = len(outcomes)
    if not n:
        return {"referrals": 0, **{k: None for k in SUMMARY_KEYS}}
    mean = (lambda key: float(np.mean([o[key] for o in outcomes])))
    return {"referrals": n, "accuracy": mean("hit"), "class_accuracy": mean("class_hit"),
            "within_class_accuracy": mean("within_hit"), "class_prior": mean("prior"), "chance": mean("chance")}


def _preferences(records: list[Mapping], outcomes: list[dict]) -> dict:
    """Among referrals with at least two same-class objects and boxes: how often the within-class
    choice is the largest / first / most central same-class object, and how often the target is
    (the rate a model without that preference would show on the choices it gets right)."""
    picks, truths = defaultdict(list), defaultdict(list)
    for r, o in zip(records, outcomes):
        if r.get("boxes") is None or o["same_class"] < 2:
            continue
        boxes = np.asarray(r["boxes"], dtype=np.float64)
        members = np.flatnonzero(o["same"])
        volume = np.prod(np.maximum(boxes[members, 3:], 1e-6), axis=1)
        centre = boxes[np.isfinite(np.asarray(r["scores"], dtype=np.float64))][:, :2].mean(axis=0)
        distance = np.linalg.norm(boxes[members, :2] - centre, axis=1)
        special = {"largest": members[np.argmax(volume)], "smallest": members[np.argmin(volume)],
                   "first_slot": members[0], "nearest_centre": members[np.argmin(distance)],
                   "farthest_from_centre": members[np.argmax(distance)]}
        for name, index in special.items():
            picks[name].append(o["within_choice"] == index)
            truths[name].append(int(r["target"]) == index)
    return {name: {"chosen": float(np.mean(picks[name])), "is_target": float(np.mean(truths[name])),
                   "referrals": len(picks[name])} for name in picks}


def grounding_diagnostics(records: Iterable[Mapping]) -> dict:
    """Accuracy, class accuracy, within-class accuracy, class prior and chance, overall and by
    relation, shape, same-class count and view dependence (see the module docstring)."""
    records = list(records)
    outcomes = [_outcome(r) for r in records]
    groups: dict[str, dict[str, list[dict]]] = {"by_relation": defaultdict(list), "by_shape": defaultdict(list),
                                                 "by_same_class": defaultdict(list), "by_view": defaultdict(list)}
    for r, o in zip(records, outcomes):
        for relation in sorted(set(filter(None, str(r.get("relation") or "").split("+")))) or ["(none)"]:
            groups["by_relation"][relation].append(o)
        groups["by_shape"][str(r.get("shape") or "(none)")].append(o)
        groups["by_same_class"][str(min(o["same_class"], 6)) + ("+" if o["same_class"] >= 6 else "")].append(o)
        if r.get("source") in VIEW_SOURCES:
            view = "view_dependent" if is_view_dependent(str(r.get("utterance", ""))) else "view_independent"
            groups["by_view"][view].append(o)
    report = _summary(outcomes)
    for name, group in groups.items():
        report[name] = {key: _summary(group[key]) for key in sorted(group, key=_group_order)}
    report["within_class_picks"] = _preferences(records, outcomes)
    return report


def _group_order(key: str):
    return (0, int(key.rstrip("+"))) if key.rstrip("+").isdigit() else (1, key)


def flat_summary(report: Mapping, prefix: str = "grounding_") -> dict:
    """The overall numbers of a report as flat keys (`grounding_accuracy`, ...), for summaries."""
    out = {f"{prefix}{key}": report[key] for key in SUMMARY_KEYS}
    out[f"{prefix}referrals"] = report["referrals"]
    return out


def format_diagnostics(report: Mapping) -> str:
    """A markdown rendering: the overall line, then one table per breakdown."""
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{report['referrals']} referrals: accuracy {cell(report['accuracy'])}, class accuracy "
             f"{cell(report['class_accuracy'])}, within-class accuracy {cell(report['within_class_accuracy'])}, "
             f"class prior {cell(report['class_prior'])}, chance {cell(report['chance'])}", ""]
    titles = {"by_relation": "relation", "by_shape": "shape", "by_same_class": "same-class objects",
              "by_view": "view"}
    for name, title in titles.items():
        if not report[name]:
            continue
        lines += [f"| {title} | referrals | accuracy | within-class | class prior |", "|---|---:|---:|---:|---:|"]
        for key, s in report[name].items():
            lines.append(f"| {key} | {s['referrals']} | {cell(s['accuracy'])} | {cell(s['within_class_accuracy'])} "
                         f"| {cell(s['class_prior'])} |")
        lines.append("")
    picks = report.get("within_class_picks") or {}
    if picks:
        lines += ["| within-class choice is the ... | chosen | is the target |", "|---|---:|---:|"]
        lines += [f"| {name} | {cell(p['chosen'])} | {cell(p['is_target'])} |" for name, p in picks.items()]
    return "\n".join(lines) + "\n"


def plot_diagnostics(report: Mapping, path: str | os.PathLike, title: str = "grounding") -> Path:
    """A bar chart: within-class accuracy and accuracy against the class prior, overall and by relation
    and by same-class count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsegps.files import atomic_save_figure

    panels = [("overall", {"all": report}), ("by relation", report["by_relation"]),
              ("by same-class objects", report["by_same_class"])]
    widths = [max(len(groups), 1) + 1 for _, groups in panels]
    fig, axes = plt.subplots(1, 3, figsize=(3 + 0.55 * sum(widths), 4.2), gridspec_kw={"width_ratios": widths},
                             sharey=True)
    for ax, (name, groups) in zip(axes, panels):
        keys = list(groups)
        x = np.arange(len(keys))
        value = (lambda key: [groups[k][key] if groups[k][key] is not None else np.nan for k in keys])
        ax.bar(x - 0.2, value("accuracy"), 0.4, label="accuracy", color="#9ecae1")
        ax.bar(x + 0.2, value("within_class_accuracy"), 0.4, label="within-class accuracy", color="#3182bd")
        ax.scatter(x + 0.2, value("class_prior"), marker="_", s=300, color="#d62728", zorder=3, label="class prior")
        ax.set_xticks(x, keys, rotation=45 if len(keys) > 3 else 0, ha="right" if len(keys) > 3 else "center")
        ax.set_title(name)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        for i, k in enumerate(keys):
            ax.text(i, 0.01, str(groups[k]["referrals"]), ha="center", va="bottom", fontsize=7, color="#555")
    axes[0].set_ylabel("share of referrals")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title}: {report['referrals']} referrals (numbers in the bars: referrals per group)")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def save_diagnostics(report: Mapping, out_dir: str | os.PathLike, name: str = "grounding",
                     title: str = "grounding") -> tuple[Path, Path, Path]:
    """Write `NAME.json`, `NAME.md` and `NAME.png` (the bar chart) into `out_dir`, atomically."""
    from sparsegps.files import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=1))
    atomic_write_text(out / f"{name}.md", format_diagnostics(report))
    return out / f"{name}.json", out / f"{name}.md", plot_diagnostics(report, out / f"{name}.png", title)
