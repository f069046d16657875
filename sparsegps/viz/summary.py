"""The `sparsegps inspect --plot` figure: class histogram and per-scene distributions of points,
objects and texts (by kind)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from sparsegps.data import TEXT_KINDS, resolve_shards
from sparsegps.files import atomic_save_figure


def per_scene_counts(paths) -> dict[str, np.ndarray]:
    """Points, objects and texts of every kind per scene, from the shards' offset tables alone
    (docs/FORMAT.md: scenes/*_offset, texts/kind), without reading any points. Shards that cannot
    be read are left out (`inspect` reports them)."""
    import h5py

    counts: dict[str, list] = {"points": [], "objects": [], **{k: [] for k in TEXT_KINDS}}
    for path in resolve_shards(paths):
        try:
            with h5py.File(path, "r") as f:
                points, objects = np.diff(f["scenes/point_offset"][()]), np.diff(f["scenes/object_offset"][()])
                text_offset, kinds = f["scenes/text_offset"][()], f["texts/kind"][()]
        except (OSError, KeyError):
            continue
        counts["points"].append(points)
        counts["objects"].append(objects)
        scene_of_text = np.repeat(np.arange(len(text_offset) - 1), np.diff(text_offset))
        for k, kind in enumerate(TEXT_KINDS):
            counts[kind].append(np.bincount(scene_of_text[kinds == k], minlength=len(text_offset) - 1))
    return {k: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in counts.items()}


def plot_store_summary(classes: Counter | dict, counts: dict[str, np.ndarray], path: str | os.PathLike,
                       title: str = "", top: int = 25) -> Path:
    """Save the summary figure (PNG, atomically): objects per class (the `top` most common) on the
    left; histograms of points, objects and texts per scene on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    classes = Counter(classes)
    fig = plt.figure(figsize=(14, 8.5), dpi=100)
    grid = fig.add_gridspec(3, 2, width_ratios=[1, 1.25], hspace=0.55, wspace=0.3)
    ax = fig.add_subplot(grid[:, 0])
    common = classes.most_common(top)
    if common:
        names, values = zip(*common)
        ax.barh(range(len(names)), values, color="#4c72b0")
        ax.set_yticks(range(len(names)), names, fontsize=9)
        ax.invert_yaxis()
        for k, v in enumerate(values):
            ax.text(v, k, f" {v:,}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.15)
    rest = len(classes) - len(common)
    ax.set_title(f"objects per class ({len(classes)} classes" + (f", top {len(common)} shown)" if rest > 0 else ")"))
    ax.set_xlabel("objects")
    scenes = len(counts["points"])

    def histogram(axis, data, label, color):
        data = np.asarray(data)
        if data.size:
            bins = np.arange(data.min(), data.max() + 2) - 0.5 if data.max() - data.min() < 40 else 30
            axis.hist(data, bins=bins, color=color, alpha=0.75, label=label)
            axis.axvline(np.median(data), color="black", linestyle="--", linewidth=1)

    panels = [("points", "points per scene", "#55a868"), ("objects", "objects per scene", "#c44e52")]
    for row, (key, name, color) in enumerate(panels):
        axis = fig.add_subplot(grid[row, 1])
        histogram(axis, counts[key], name, color)
        data = counts[key]
        stats = f" (median {np.median(data):,.0f}, min {data.min():,}, max {data.max():,})" if data.size else ""
        axis.set_title(name + stats, fontsize=11)
        axis.set_ylabel("scenes")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis = fig.add_subplot(grid[2, 1])
    colors = {"object_caption": "#8172b2", "scene_caption": "#937860", "referral": "#da8bc3"}
    for kind in TEXT_KINDS:
        if counts[kind].any():
            histogram(axis, counts[kind], f"{kind.replace('_', ' ')}s (total {counts[kind].sum():,})", colors[kind])
    axis.set_title("texts per scene, by kind (dashed: medians)", fontsize=11)
    axis.set_ylabel("scenes")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=9)
    fig.suptitle(title or f"{scenes:,} scenes", fontsize=14, fontweight="bold")
    return atomic_save_figure(fig, path, dpi=100)
