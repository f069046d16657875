"""Object classes of the synthetic rooms: class-typical sizes, colours and part shapes.

Each class has one or more variants (a nightstand and a wardrobe are both cabinets). A variant
gives a size range (w along the object's front, d front to back, h) and parts: boxes in the
object's unit frame, x and y in [0, 1] from left/back to right/front and z in [0, 1] from bottom
to top, with the faces that a scanner would see. Points are sampled on those faces.
"""
from __future__ import annotations

from dataclasses import dataclass

FACES = "xXyYzZ"  # -x, +x, -y (back), +y (front), -z (bottom), +z (top)
VISIBLE = "xXyYZ"  # every face but the bottom


@dataclass(frozen=True)
class Part:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    faces: str = VISIBLE


@dataclass(frozen=True)
class Variant:
    name: str
    size_lo: tuple[float, float, float]
    size_hi: tuple[float, float, float]
    parts: tuple[Part, ...]
    colors: tuple[str, ...] = ()  # overrides the class palette


@dataclass(frozen=True)
class ObjectClass:
    name: str
    colors: tuple[str, ...]
    variants: dict[str, Variant]


def P(x0, x1, y0, y1, z0, z1, faces: str = VISIBLE) -> Part:
    return Part((x0, y0, z0), (x1, y1, z1), faces)


BOX = (P(0, 1, 0, 1, 0, 1),)


def _legs(z1: float, t: float = 0.07) -> tuple[Part, ...]:
    return tuple(P(x, x + t, y, y + t, 0, z1, "xXyY") for x in (0, 1 - t) for y in (0, 1 - t))


def _open_box(wall: float, floor_top: float, z0: float = 0.0) -> tuple[Part, ...]:
    """A tub or basin between heights z0 and 1: four walls and the inner floor (its top at
    `floor_top` of the box height); raised above the ground (z0 > 0) its underside shows too."""
    faces = FACES if z0 > 0 else VISIBLE
    floor = z0 + floor_top * (1 - z0)
    return (P(0, 1, 0, wall, z0, 1, faces), P(0, 1, 1 - wall, 1, z0, 1, faces), P(0, wall, wall, 1 - wall, z0, 1, faces),
            P(1 - wall, 1, wall, 1 - wall, z0, 1, faces), P(wall, 1 - wall, wall, 1 - wall, z0, floor, "zZ" if z0 > 0 else "Z"))


def _folds(n: int) -> tuple[Part, ...]:
    """A hanging cloth: vertical strips alternating front and back, like folds."""
    return tuple(P(i / n, (i + 1) / n, 0.5 * (i % 2), 0.5 + 0.5 * (i % 2), 0, 1, "xXY") for i in range(n))


def _shelves(n: int) -> tuple[Part, ...]:
    boards = tuple(P(0.04, 0.96, 0.05, 1, z, z + 0.025, "yYzZ") for z in [i / n * 0.97 for i in range(n + 1)])
    return (P(0, 0.04, 0, 1, 0, 1), P(0.96, 1, 0, 1, 0, 1), P(0.04, 0.96, 0, 0.05, 0, 1, "Y")) + boards


_TABLE = (P(0, 1, 0, 1, 0.94, 1),) + _legs(0.94)
_CHAIR = (P(0, 1, 0, 1, 0.45, 0.52), P(0, 1, 0, 0.12, 0.52, 1)) + _legs(0.45, 0.1)
_STOOL = (P(0, 1, 0, 1, 0.9, 1),) + _legs(0.9, 0.12)
_LAMP = (P(0.3, 0.7, 0.3, 0.7, 0, 0.06), P(0.45, 0.55, 0.45, 0.55, 0.06, 0.65, "xXyY"), P(0, 1, 0, 1, 0.65, 1))

CLASSES: dict[str, ObjectClass] = {c.name: c for c in (
    ObjectClass("wall", ("white", "beige", "gray"), {
        "wall": Variant("wall", (1, 0.1, 2.4), (1, 0.1, 3.2), (P(0, 1, 0, 1, 0, 1, "Y"),))}),
    ObjectClass("floor", ("brown", "gray", "beige"), {
        "floor": Variant("floor", (1, 1, 0.02), (1, 1, 0.02), (P(0, 1, 0, 1, 0, 1, "Z"),))}),
    ObjectClass("cabinet", ("brown", "white", "gray", "black", "beige"), {
        "nightstand": Variant("nightstand", (0.4, 0.35, 0.45), (0.6, 0.5, 0.65), BOX),
        "wardrobe": Variant("wardrobe", (0.8, 0.5, 1.7), (1.4, 0.65, 2.2),
                            (P(0, 1, 0, 0.97, 0, 1), P(0.02, 0.49, 0.97, 1, 0.03, 0.97), P(0.51, 0.98, 0.97, 1, 0.03, 0.97))),
        "base": Variant("base", (0.6, 0.5, 0.8), (1.2, 0.6, 0.95), (P(0, 1, 0, 1, 0.08, 1), P(0.02, 0.98, 0, 0.9, 0, 0.08))),
        "wall": Variant("wall", (0.6, 0.3, 0.55), (1.2, 0.4, 0.8), (P(0, 1, 0, 1, 0, 1, FACES),)),
        "file": Variant("file", (0.4, 0.5, 0.7), (0.5, 0.65, 1.3), BOX),
    }),
    ObjectClass("bed", ("white", "beige", "blue", "gray", "brown"), {
        "bed": Variant("bed", (0.9, 1.9, 0.8), (1.8, 2.15, 1.2),
                       (P(0, 1, 0.06, 1, 0, 0.5), P(0, 1, 0, 0.06, 0, 1), P(0.1, 0.9, 0.08, 0.25, 0.5, 0.6)))}),
    ObjectClass("chair", ("black", "gray", "brown", "blue", "red", "green", "white"), {
        "chair": Variant("chair", (0.42, 0.42, 0.78), (0.6, 0.6, 1.05), _CHAIR),
        "armchair": Variant("armchair", (0.7, 0.7, 0.8), (0.9, 0.85, 1.0),
                            (P(0, 1, 0, 1, 0, 0.45), P(0, 1, 0, 0.25, 0.45, 1), P(0, 0.15, 0.25, 1, 0.45, 0.7),
                             P(0.85, 1, 0.25, 1, 0.45, 0.7))),
    }),
    ObjectClass("sofa", ("gray", "blue", "beige", "green", "red", "brown", "black"), {
        "sofa": Variant("sofa", (1.5, 0.8, 0.75), (2.4, 1.0, 0.95),
                        (P(0, 1, 0, 1, 0, 0.45), P(0, 1, 0, 0.25, 0.45, 1), P(0, 0.1, 0.25, 1, 0.45, 0.7),
                         P(0.9, 1, 0.25, 1, 0.45, 0.7)))}),
    ObjectClass("table", ("brown", "white", "black", "gray"), {
        "dining": Variant("dining", (1.0, 0.7, 0.72), (2.0, 1.0, 0.78), _TABLE),
        "coffee": Variant("coffee", (0.8, 0.45, 0.38), (1.3, 0.7, 0.5), _TABLE),
        "side": Variant("side", (0.4, 0.4, 0.5), (0.6, 0.6, 0.7), _TABLE),
        "conference": Variant("conference", (2.4, 1.0, 0.72), (4.0, 1.4, 0.78), _TABLE),
    }),
    ObjectClass("door", ("brown", "white", "gray"), {
        "door": Variant("door", (0.8, 0.04, 1.95), (1.0, 0.06, 2.1), (P(0, 1, 0, 1, 0, 1, "xXYZ"),))}),
    ObjectClass("window", ("white", "gray", "black"), {
        "window": Variant("window", (0.6, 0.08, 0.8), (2.0, 0.12, 1.4),
                          (P(0, 1, 0, 1, 0, 0.08), P(0, 1, 0, 1, 0.92, 1), P(0, 0.06, 0, 1, 0.08, 0.92),
                           P(0.94, 1, 0, 1, 0.08, 0.92), P(0.06, 0.94, 0.4, 0.5, 0.08, 0.92, "Y")))}),
    ObjectClass("bookshelf", ("brown", "white", "black"), {
        "bookshelf": Variant("bookshelf", (0.6, 0.28, 1.0), (1.2, 0.4, 2.1), _shelves(4))}),
    ObjectClass("picture", ("red", "blue", "green", "yellow", "orange", "purple", "pink", "black"), {
        "picture": Variant("picture", (0.3, 0.03, 0.3), (1.2, 0.05, 0.9), (P(0, 1, 0, 1, 0, 1, "xXYzZ"),))}),
    ObjectClass("counter", ("white", "gray", "black", "beige"), {
        "counter": Variant("counter", (1.2, 0.55, 0.85), (3.0, 0.7, 0.95),
                           (P(0, 1, 0, 0.93, 0, 0.95), P(0, 1, 0, 1, 0.95, 1)))}),
    ObjectClass("desk", ("brown", "white", "black", "gray"), {
        "desk": Variant("desk", (1.0, 0.55, 0.72), (1.6, 0.8, 0.78),
                        (P(0, 1, 0, 1, 0.95, 1), P(0, 0.05, 0, 1, 0, 0.95), P(0.95, 1, 0, 1, 0, 0.95),
                         P(0.65, 0.95, 0.05, 0.95, 0.6, 0.95)))}),
    ObjectClass("curtain", ("beige", "white", "blue", "red", "green", "gray", "purple"), {
        "curtain": Variant("curtain", (0.4, 0.06, 1.2), (0.9, 0.12, 2.3), _folds(6))}),
    ObjectClass("refrigerator", ("white", "gray", "black"), {
        "refrigerator": Variant("refrigerator", (0.6, 0.6, 1.6), (0.9, 0.75, 1.95),
                                (P(0, 1, 0, 0.96, 0, 1), P(0.02, 0.98, 0.96, 1, 0.02, 0.98)))}),
    ObjectClass("shower curtain", ("white", "blue", "pink", "beige"), {
        "shower curtain": Variant("shower curtain", (0.9, 0.04, 1.4), (1.7, 0.08, 1.8), _folds(8))}),
    ObjectClass("toilet", ("white",), {
        "toilet": Variant("toilet", (0.36, 0.6, 0.7), (0.45, 0.75, 0.85),
                          (P(0, 1, 0, 0.28, 0.45, 1), P(0.1, 0.9, 0.28, 1, 0.1, 0.5), P(0.25, 0.75, 0.3, 0.8, 0, 0.1)))}),
    ObjectClass("sink", ("white", "gray"), {
        "basin": Variant("basin", (0.4, 0.35, 0.15), (0.6, 0.5, 0.22), _open_box(0.1, 0.15)),
        "pedestal": Variant("pedestal", (0.45, 0.4, 0.8), (0.6, 0.5, 0.9),
                            (P(0.35, 0.65, 0.1, 0.5, 0, 0.75, "xXyY"),) + _open_box(0.1, 0.2, z0=0.75)),
    }),
    ObjectClass("bathtub", ("white",), {
        "bathtub": Variant("bathtub", (1.4, 0.7, 0.45), (1.8, 0.85, 0.6), _open_box(0.08, 0.25))}),
    ObjectClass("otherfurniture", ("brown", "black", "gray", "white", "red", "blue", "green", "yellow", "orange"), {
        "box": Variant("box", (0.15, 0.15, 0.1), (0.45, 0.4, 0.4), BOX),
        "lamp": Variant("lamp", (0.2, 0.2, 0.35), (0.35, 0.35, 0.6), _LAMP),
        "floor lamp": Variant("floor lamp", (0.3, 0.3, 1.4), (0.45, 0.45, 1.8), _LAMP),
        "stool": Variant("stool", (0.35, 0.35, 0.4), (0.5, 0.5, 0.7), _STOOL),
        "bin": Variant("bin", (0.25, 0.25, 0.3), (0.4, 0.4, 0.6), _open_box(0.06, 0.05)),
        "ottoman": Variant("ottoman", (0.5, 0.5, 0.35), (0.9, 0.7, 0.5), BOX),
        "rack": Variant("rack", (0.6, 0.3, 1.2), (1.2, 0.5, 1.8), _shelves(3)),
    }),
)}
