"""Basic colour names and the naming of measured colours (nearest reference colour in CIELAB).

The synthetic generator paints objects with these reference colours, and the scene graph names
the mean colour of any scan's object with `color_name`, so the words in generated texts are
measured from points, never copied from generator metadata.
"""
from __future__ import annotations

import numpy as np

NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 232),
    "black": (35, 35, 38),
    "gray": (128, 128, 128),
    "brown": (115, 74, 45),
    "beige": (214, 196, 160),
    "red": (178, 40, 40),
    "orange": (226, 124, 40),
    "yellow": (228, 200, 64),
    "green": (64, 140, 72),
    "blue": (48, 88, 168),
    "purple": (112, 64, 144),
    "pink": (228, 150, 172),
}
_NAMES = list(NAMED_COLORS)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 255] (any leading shape) -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_REFERENCE_LAB = rgb_to_lab(np.array([NAMED_COLORS[n] for n in _NAMES]))


def color_names(rgb: np.ndarray) -> list[str]:
    """Name of the nearest reference colour for each row of an [N, 3] sRGB array."""
    lab = rgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 3))
    dist = ((lab[:, None, :] - _REFERENCE_LAB[None]) ** 2).sum(-1)
    return [_NAMES[i] for i in dist.argmin(axis=1)]


def color_name(rgb) -> str:
    """Name of the nearest reference colour of one sRGB triple."""
    return color_names(np.asarray(rgb).reshape(1, 3))[0]
