"""Panels side by side in one matplotlib figure (Agg): a title, each panel's image at its own
pixel size, box labels that do not overlap, and a legend shared by the panels."""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path


from sparsegps.files import atomic_save_figure

from .render import LabelAnchor, Panel

DPI = 100
GAP = 16  # pixels between and around panels
LABEL_FONT = 9  # points
TITLE_FONT = 15


@dataclass
class LegendEntry:
    text: str
    color: tuple[int, int, int]
    kind: str = "patch"  # patch: a filled square (point colours); line: a box outline


def _rgb(color) -> tuple[float, float, float]:
    return tuple(c / 255 for c in color)


def _label_box(anchor: LabelAnchor) -> tuple[float, float, float, float]:
    """Approximate pixel rectangle (u0, v0, u1, v1) a label drawn above its anchor occupies."""
    px = LABEL_FONT * DPI / 72
    w, h = 0.62 * px * len(anchor.text) + 8, 1.5 * px
    return anchor.u - w / 2, anchor.v - h - 3, anchor.u + w / 2, anchor.v - 3


def place_labels(anchors: list[LabelAnchor], width: int, height: int) -> list[LabelAnchor]:
    """The labels to draw: highest priority first, each moved inside the image, dropped if it
    would overlap one already placed (so a crowded room stays readable)."""
    placed, boxes = [], []
    for anchor in sorted(anchors, key=lambda a: -a.priority):
        u0, v0, u1, v1 = _label_box(anchor)
        du = max(0.0, -u0) - max(0.0, u1 - width)
        dv = max(0.0, -v0) - max(0.0, v1 - height)
        box = (u0 + du, v0 + dv, u1 + du, v1 + dv)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
            continue
        boxes.append(box)
        placed.append(LabelAnchor(anchor.u + du, anchor.v + dv, anchor.text, anchor.color, anchor.priority))
    return placed


def compose(panels: list[Panel], path: str | os.PathLike, title: str | None = None, subtitle: str | None = None,
            legend: list[LegendEntry] = ()) -> Path:
    """Save the panels side by side as a PNG at `path` (atomically) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lines = textwrap.wrap(title, 110) if title else []
    head = GAP + (len(lines) * 26 if lines else 0) + (22 if subtitle else 0) + 26  # + panel titles
    columns = max(1, min(len(legend), 8))
    foot = GAP + (((len(legend) + columns - 1) // columns) * 24 + 12 if legend else 0)
    width = sum(p.image.shape[1] for p in panels) + GAP * (len(panels) + 1)
    height = head + max(p.image.shape[0] for p in panels) + foot
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    y = height - GAP
    for line in lines:
        fig.text(0.5, y / height, line, ha="center", va="top", fontsize=TITLE_FONT, fontweight="bold")
        y -= 26
    if subtitle:
        fig.text(0.5, y / height, subtitle, ha="center", va="top", fontsize=10, color="0.3")
    x = GAP
    for panel in panels:
        h, w = panel.image.shape[:2]
        ax = fig.add_axes([x / width, foot / height, w / width, h / height])
        ax.imshow(panel.image, interpolation="nearest")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("0.8")
        if panel.title:
            ax.set_title(panel.title, fontsize=11, pad=5)
        for label in place_labels(panel.labels, w, h):
            ax.text(label.u, label.v - 3, label.text, ha="center", va="bottom", fontsize=LABEL_FONT,
                    color="black", clip_on=True,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", alpha=0.85,
                              edgecolor=_rgb(label.color), linewidth=1.5))
        x += w + GAP
    if legend:
        handles = [Line2D([], [], color=_rgb(e.color), linewidth=3) if e.kind == "line"
                   else Patch(facecolor=_rgb(e.color), edgecolor="0.5") for e in legend]
        fig.legend(handles, [e.text for e in legend], loc="lower center", ncol=columns, frameon=False,
                   fontsize=10, bbox_to_anchor=(0.5, 4 / height), handlelength=1.6)
    return atomic_save_figure(fig, path, dpi=DPI)


def panel_size(total_width: int, panels: int, aspect: float = 0.75) -> tuple[int, int]:
    """Width and height in pixels of each of `panels` panels filling `total_width` pixels."""
    w = (total_width - GAP * (panels + 1)) // panels
    return w, int(round(w * aspect))


__all__ = ["LegendEntry", "compose", "panel_size", "place_labels"]
