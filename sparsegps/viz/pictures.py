"""Pictures of one scene: an oblique and a top-down view side by side, with object boxes, class
labels, a referral and what a model made of it; and segmentation against ground truth.

Both views hide points of `ceiling` objects. The oblique view also cuts away, on the camera's
half of the room, what rises more than `cut_height` above the floor unless it belongs to a
non-structural object (a doll's-house view: the near walls would otherwise hide the room).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from sparsegps.data import NO_INSTANCE, Scene

from .camera import oblique_camera, top_down_camera
from .figure import LegendEntry, compose, panel_size
from .palette import (DISTRACTOR, OBJECT, TARGET, WRONG_CHOICE, class_color, fade, instance_colors,
                      semantic_colors)
from .render import BoxMark, point_spacing, render_panel

ColorMode = Literal["rgb", "semantic", "instance", "prediction"]
COLOR_MODES = get_args(ColorMode)
STRUCTURAL = frozenset({"wall", "floor", "ceiling"})


@dataclass
class ViewConfig:
    width: int = 1800
    """Width of the whole picture in pixels (panels share it)."""
    azimuth: float = -60.0
    """Oblique view: direction of the eye from the scene centre, degrees from +x towards +y."""
    elevation: float = 50.0
    """Oblique view: degrees above the horizon."""
    cut_height: float | None = 0.8
    """Oblique view: metres above the floor where near walls are cut; None keeps everything."""


def _object_mask(scene: Scene, labels) -> np.ndarray:
    ids = [o.instance_id for o in scene.objects if o.label in labels]
    return np.isin(scene.instance, ids) if ids else np.zeros(scene.num_points, bool)


def oblique_visible(scene: Scene, view: ViewConfig) -> np.ndarray:
    """Points the oblique view draws (see the module docstring)."""
    keep = ~_object_mask(scene, {"ceiling"})
    if view.cut_height is None:
        return keep
    xyz = scene.xyz
    floor = float(np.percentile(xyz[:, 2], 2))
    center = (xyz[:, :2].min(axis=0) + xyz[:, :2].max(axis=0)) / 2
    a = np.radians(view.azimuth)
    towards_eye = (xyz[:, :2] - center) @ np.array([np.cos(a), np.sin(a)]) > 0
    furniture = (scene.instance != NO_INSTANCE) & ~_object_mask(scene, STRUCTURAL)
    return keep & ~(towards_eye & (xyz[:, 2] > floor + view.cut_height) & ~furniture)


def point_colors(scene: Scene, mode: ColorMode, vocabulary: list[str],
                 predicted: np.ndarray | None = None) -> tuple[np.ndarray, list[LegendEntry]]:
    """Per-point colours for `mode` and the legend they need. `predicted`: per-point class
    indices into `vocabulary` (mode "prediction")."""
    if mode == "rgb":
        return scene.rgb, []
    if mode == "instance":
        return instance_colors(scene.instance), []
    if mode == "semantic":
        labels = scene.semantic
    elif mode == "prediction":
        if predicted is None:
            raise ValueError("colour mode 'prediction' needs per-point predicted classes")
        labels = predicted
    else:
        raise ValueError(f"unknown colour mode {mode!r} (one of {', '.join(COLOR_MODES)})")
    return semantic_colors(labels, vocabulary), class_legend(vocabulary, labels)


def class_legend(vocabulary: list[str], *labels: np.ndarray) -> list[LegendEntry]:
    """One legend entry per class present in any of the label arrays, in vocabulary order."""
    present = set()
    for arr in labels:
        present |= set(np.unique(arr).tolist())
    return [LegendEntry(name, class_color(name)) for k, name in enumerate(vocabulary) if k in present]


def _volume(o) -> float:
    return float(np.prod(np.maximum(o.size, 1e-3)))


def referral_boxes(scene: Scene, text_index: int | None, choice: int | None) -> tuple[list[BoxMark], list[LegendEntry]]:
    """Boxes of a picture and their legend. Without a text (or for a scene caption): every
    non-structural object, labelled with its class. With an object caption or a referral: its
    target and distractors, and with `choice` (an instance id) the model's pick."""
    objects = scene.object_by_id()
    text = scene.texts[text_index] if text_index is not None else None
    if text is None or text.target_id not in objects:
        boxes = [BoxMark(o.center, o.size, OBJECT, o.label, 1, _volume(o)) for o in scene.objects
                 if o.label not in STRUCTURAL]
        return boxes, ([LegendEntry("object box", OBJECT, "line")] if boxes else [])
    target = objects[text.target_id]
    right = choice == text.target_id
    wrong = choice is not None and not right and choice in objects
    boxes = [BoxMark(objects[d].center, objects[d].size, DISTRACTOR, f"distractor: {objects[d].label}", 2, 1.0)
             for d in text.distractor_ids if d in objects and not (wrong and d == choice)]
    legend = [LegendEntry("target", TARGET, "line")]
    if text.distractor_ids:
        legend.append(LegendEntry("distractor (same class)", DISTRACTOR, "line"))
    if wrong:
        chosen = objects[choice]
        boxes.append(BoxMark(chosen.center, chosen.size, WRONG_CHOICE, f"model's choice \u2717: {chosen.label}", 2, 2.0))
        legend.append(LegendEntry("model's choice (wrong)", WRONG_CHOICE, "line"))
    target_label = f"target: {target.label}" + (" = model's choice \u2713" if right else "")
    boxes.append(BoxMark(target.center, target.size, TARGET, target_label, 3 if right else 2, 3.0))
    return boxes, legend


def two_views(xyz: np.ndarray, colors: np.ndarray, oblique_mask: np.ndarray, top_mask: np.ndarray,
              boxes: list[BoxMark], view: ViewConfig, titles=("oblique view", "top-down view")):
    """The oblique and the top-down panel of the same points and boxes."""
    w, h = panel_size(view.width, 2)
    oblique = oblique_camera(xyz[oblique_mask], w, h, view.azimuth, view.elevation)
    top = top_down_camera(xyz[top_mask], w, h)
    spacing = point_spacing(xyz)
    return [render_panel(xyz[oblique_mask], colors[oblique_mask], oblique, boxes, titles[0], spacing),
            render_panel(xyz[top_mask], colors[top_mask], top, boxes, titles[1], spacing)]


def draw_scene(scene: Scene, vocabulary: list[str], path: str | os.PathLike, color: ColorMode = "rgb",
               text_index: int | None = None, choice: int | None = None, predicted: np.ndarray | None = None,
               view: ViewConfig | None = None, subtitle: str | None = None) -> Path:
    """A picture of `scene` at `path`: oblique and top-down views, boxes and labels; with
    `text_index` that text as the title and its target and distractors boxed; with `choice` the
    instance a model picked for it."""
    if text_index is not None and not 0 <= text_index < len(scene.texts):
        raise IndexError(f"scene {scene.scene_id!r} has {len(scene.texts)} texts; "
                         f"text {text_index} does not exist")
    view = view or ViewConfig()
    colors, legend = point_colors(scene, color, vocabulary, predicted)
    boxes, box_legend = referral_boxes(scene, text_index, choice)
    text = scene.texts[text_index] if text_index is not None else None
    if text is not None and text.target_id >= 0:
        focus = np.isin(scene.instance, [text.target_id, *text.distractor_ids, *([choice] if choice is not None else [])])
        colors = fade(colors, 0.45, focus)
    top_mask = ~_object_mask(scene, {"ceiling"})
    panels = two_views(scene.xyz, colors, oblique_visible(scene, view), top_mask, boxes, view)
    title = f"\u201c{text.text}\u201d" if text is not None else f"scene {scene.scene_id}"
    if subtitle is None:
        parts = [scene.scene_id, f"{scene.num_points:,} points", f"{len(scene.objects)} objects",
                 f"colour: {color}"]
        if text is not None:
            parts.insert(1, f"text {text_index} ({text.kind.replace('_', ' ')})")
        if choice is not None and text is not None:
            parts.append("model: right" if choice == text.target_id else "model: wrong")
        subtitle = "  \u00b7  ".join(parts)
    return compose(panels, path, title, subtitle, legend + box_legend)


def draw_segmentation(scene: Scene, class_names: list[str], truth: np.ndarray, predicted: np.ndarray,
                      path: str | os.PathLike, view: ViewConfig | None = None, title: str | None = None) -> Path:
    """Ground-truth classes against predicted ones (per-point indices into `class_names`, -1 for
    ignore) as two oblique panels with one legend."""
    view = view or ViewConfig()
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    labelled = truth >= 0
    accuracy = float((truth[labelled] == predicted[labelled]).mean()) if labelled.any() else float("nan")
    mask = oblique_visible(scene, view)
    w, h = panel_size(view.width, 2)
    camera = oblique_camera(scene.xyz[mask], w, h, view.azimuth, view.elevation)
    xyz = scene.xyz[mask]
    spacing = point_spacing(scene.xyz)
    panels = [render_panel(xyz, semantic_colors(truth, class_names)[mask], camera, (), "ground truth", spacing),
              render_panel(xyz, semantic_colors(predicted, class_names)[mask], camera, (),
                           f"prediction ({accuracy:.0%} of labelled points right)", spacing)]
    legend = class_legend(class_names, truth, predicted)
    if (~labelled).any():
        legend.append(LegendEntry("ignored / unlabelled", (200, 200, 200)))
    subtitle = f"{scene.scene_id}  \u00b7  {scene.num_points:,} points  \u00b7  point accuracy {accuracy:.3f}"
    return compose(panels, path, title or f"semantic segmentation of {scene.scene_id}", subtitle, legend)
