"""Colours: per-point colourings of a scene (rgb, semantic, instance) and the roles of boxes."""
from __future__ import annotations

import colorsys
import zlib

import numpy as np

# ScanNet's benchmark colours for its 20 classes (BenchmarkScripts/util.py), so pictures of
# ScanNet-labelled scenes look as people know them; other classes get a stable hashed colour.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "wall": (174, 199, 232), "floor": (152, 223, 138), "cabinet": (31, 119, 180), "bed": (255, 187, 120),
    "chair": (188, 189, 34), "sofa": (140, 86, 75), "table": (255, 152, 150), "door": (214, 39, 40),
    "window": (197, 176, 213), "bookshelf": (148, 103, 189), "picture": (196, 156, 148),
    "counter": (23, 190, 207), "desk": (247, 182, 210), "curtain": (219, 219, 141),
    "refrigerator": (255, 127, 14), "shower curtain": (158, 218, 229), "toilet": (44, 160, 44),
    "sink": (112, 128, 144), "bathtub": (227, 119, 194), "otherfurniture": (82, 84, 163),
}
UNLABELLED = (200, 200, 200)  # ignore label, no instance

# box roles: what a box means in a picture of a referral
TARGET = (0, 158, 115)  # bluish green
DISTRACTOR = (230, 159, 0)  # orange
WRONG_CHOICE = (213, 0, 50)  # red: the model chose this object, and it is not the target
OBJECT = (90, 90, 90)  # any other object box
OUTLINE = (255, 255, 255)  # halo drawn under boxes so they stand out on any points


def _hashed(name: str) -> tuple[int, int, int]:
    hue = (zlib.crc32(name.encode()) % 1000) / 1000.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def class_color(name: str) -> tuple[int, int, int]:
    return CLASS_COLORS.get(name, _hashed(name))


def class_palette(names: list[str]) -> np.ndarray:
    """uint8 [K + 1, 3]: one colour per class, the last row for ignored points (index -1)."""
    return np.array([class_color(n) for n in names] + [UNLABELLED], np.uint8)


def semantic_colors(labels: np.ndarray, names: list[str]) -> np.ndarray:
    """Colours of per-point class indices into `names` (-1 or out of range: grey)."""
    labels = np.asarray(labels, np.int64)
    palette = class_palette(names)
    return palette[np.where((labels >= 0) & (labels < len(names)), labels, len(names))]


def instance_colors(instance: np.ndarray) -> np.ndarray:
    """Colours of per-point instance ids: neighbouring ids get far-apart hues (golden ratio), -1 grey."""
    instance = np.asarray(instance, np.int64)
    ids, inverse = np.unique(instance, return_inverse=True)
    hues = (ids * 0.618033988749895) % 1.0
    table = np.array([colorsys.hsv_to_rgb(h, 0.7 if i % 2 else 0.9, 0.95 if i % 3 else 0.75)
                      for i, h in zip(ids, hues)]) * 255
    table[ids < 0] = UNLABELLED
    return table.astype(np.uint8)[inverse.reshape(-1)]


def fade(colors: np.ndarray, amount: float, keep: np.ndarray | None = None) -> np.ndarray:
    """Blend colours towards white by `amount` (0..1), except where `keep` is True."""
    faded = (colors.astype(np.float32) * (1 - amount) + 255 * amount).astype(np.uint8)
    if keep is not None:
        faded[keep] = colors[keep]
    return faded
