"""Procedural room layouts: walls, floor and furniture groups placed without interpenetration.

A room (x in [0, width], y in [0, depth], floor at z = 0) gets doors and windows, then the groups
typical of its type (a bed with nightstands and a picture above it, a table with chairs around
it, a kitchen counter with a sink on it and cabinets above it, ...), then fillers until it holds
its drawn number of objects. Every object is a box in its own frame turned by quarter turns
(`yaw`), so world boxes stay axis-aligned. Placement is rejection sampling against every placed
box and the free space kept in front of doors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sparsegps.language.colors import NAMED_COLORS

from .catalog import CLASSES, ObjectClass, Variant

STRUCTURAL = ("wall", "floor")
WALL_THICKNESS = 0.1
_EPS = 1e-3


@dataclass
class PlacedObject:
    """One object of a room: class, variant, colour, local size (w, d, h) and pose.

    `base` is the world position of the centre of the object's bottom face; `yaw` counts quarter
    turns, the object's front (+y in its frame) facing +y, -x, -y, +x for yaw 0, 1, 2, 3.
    """

    label: str
    variant: str
    color: str
    rgb: np.ndarray  # float [3], the palette colour with this object's own variation
    size: np.ndarray  # float [3]
    base: np.ndarray  # float [3]
    yaw: int = 0
    wall: int | None = None  # wall it stands against or hangs on
    along: float = 0.0  # position along that wall

    @property
    def extent(self) -> np.ndarray:
        w, d, h = self.size
        return np.array([d, w, h] if self.yaw % 2 else [w, d, h])

    @property
    def lo(self) -> np.ndarray:
        e = self.extent
        return self.base - np.array([e[0] / 2, e[1] / 2, 0.0])

    @property
    def hi(self) -> np.ndarray:
        e = self.extent
        return self.base + np.array([e[0] / 2, e[1] / 2, e[2]])


@dataclass
class RoomLayout:
    room_type: str
    width: float
    depth: float
    height: float
    objects: list[PlacedObject]

    def furniture(self) -> list[PlacedObject]:
        return [o for o in self.objects if o.label not in STRUCTURAL]


def rotate(yaw: int, xy) -> np.ndarray:
    """Turn a 2D vector by `yaw` quarter turns counter-clockwise."""
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][yaw % 4]
    x, y = xy
    return np.array([c * x - s * y, s * x + c * y], dtype=np.float64)


class RoomBuilder:
    """Places objects into one room, refusing any that would interpenetrate another."""

    def __init__(self, rng: np.random.Generator, cfg, room_type: str, width: float, depth: float, height: float,
                 target: int):
        self.rng, self.cfg, self.room_type = rng, cfg, room_type
        self.width, self.depth, self.height = width, depth, height
        self.target = target
        self.objects: list[PlacedObject] = []
        self.keepouts: list[tuple[np.ndarray, np.ndarray]] = []
        self._build_shell()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def count(self) -> int:
        return sum(o.label not in STRUCTURAL for o in self.objects)

    @property
    def full(self) -> bool:
        return self.count >= self.target

    def wall_length(self, wall: int) -> float:
        return self.width if wall % 2 == 0 else self.depth

    def wall_point(self, wall: int, along: float, inward: float) -> np.ndarray:
        """World xy of a point `along` a wall and `inward` from it; walls 0-3 are south, east,
        north, west, and an object facing into the room from wall w has yaw w."""
        w, d = self.width, self.depth
        return np.array([(along, inward), (w - inward, along), (w - along, d - inward), (inward, d - along)][wall])

    def make(self, label: str, variant: str | None = None, color: str | None = None) -> PlacedObject:
        """A new, unplaced object with a class-typical size and colour."""
        cls: ObjectClass = CLASSES[label]
        var: Variant = cls.variants[variant] if variant else cls.variants[self.pick(list(cls.variants))]
        size = self.rng.uniform(var.size_lo, var.size_hi)
        color = color or self.pick(list(var.colors or cls.colors))
        jitter = self.rng.uniform(-1, 1, 3) * self.cfg.color_variation
        rgb = np.clip(np.array(NAMED_COLORS[color], dtype=np.float64) + jitter, 0, 255)
        return PlacedObject(label, var.name, color, rgb, size, np.zeros(3))

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def count_of(self, label: str) -> int:
        return sum(o.label == label for o in self.objects)

    def fits(self, obj: PlacedObject, keepouts: bool = True) -> bool:
        lo, hi = obj.lo, obj.hi
        if (lo[:2] < -_EPS).any() or hi[0] > self.width + _EPS or hi[1] > self.depth + _EPS or hi[2] > self.height:
            return False
        boxes = [(o.lo, o.hi) for o in self.objects if o.label not in STRUCTURAL]
        if keepouts:
            boxes += self.keepouts
        return not any(((lo < h - _EPS) & (hi > l + _EPS)).all() for l, h in boxes)

    def add(self, obj: PlacedObject, keepouts: bool = True) -> bool:
        """Keep `obj` if the room is not full, its class is below its cap, and it fits."""
        if self.full or self.count_of(obj.label) >= self.cfg.max_instances_per_class:
            return False
        if not self.fits(obj, keepouts):
            return False
        self.objects.append(obj)
        return True

    # ------------------------------------------------------------------ placement primitives
    def _build_shell(self):
        t, h = WALL_THICKNESS, self.height
        color = self.pick(list(CLASSES["wall"].colors))
        for wall in range(4):
            length = self.wall_length(wall)
            obj = self.make("wall", color=color)
            obj.size = np.array([length, t, h])
            xy = self.wall_point(wall, length / 2, -t / 2)
            obj.base, obj.yaw, obj.wall, obj.along = np.array([xy[0], xy[1], 0.0]), wall, wall, length / 2
            self.objects.append(obj)
        floor = self.make("floor")
        floor.size = np.array([self.width, self.depth, 0.02])
        floor.base = np.array([self.width / 2, self.depth / 2, -0.02])
        self.objects.append(floor)

    def at_wall(self, obj: PlacedObject, wall: int, along: float, gap: float, z: float) -> PlacedObject:
        """Pose `obj` with its back `gap` from `wall`, centred at `along`, bottom at `z`."""
        xy = self.wall_point(wall, along, gap + obj.size[1] / 2)
        obj.base, obj.yaw, obj.wall, obj.along = np.array([xy[0], xy[1], z]), wall, wall, along
        return obj

    def against_wall(self, obj: PlacedObject, wall: int | None = None, along: float | None = None,
                     gap: float = 0.01, z: float = 0.0, tries: int = 20, keepouts: bool = True) -> bool:
        """Stand (or hang, with `z` > 0) `obj` against a wall; random wall and position unless given."""
        for _ in range(tries if along is None or wall is None else 1):
            w = wall if wall is not None else self.pick_wall()
            length = self.wall_length(w)
            if obj.size[0] > length - 0.05:
                continue
            s = along if along is not None else self.rng.uniform(obj.size[0] / 2, length - obj.size[0] / 2)
            if self.add(self.at_wall(obj, w, s, gap, z), keepouts):
                return True
        return False

    def pick_wall(self) -> int:
        lengths = np.array([self.wall_length(w) for w in range(4)])
        return int(self.rng.choice(4, p=lengths / lengths.sum()))

    def relative(self, obj: PlacedObject, anchor: PlacedObject, local_xy, turn: int, z: float = 0.0
                 ) -> PlacedObject:
        """Pose `obj` at `local_xy` in `anchor`'s frame, turned `turn` quarter turns from it."""
        xy = anchor.base[:2] + rotate(anchor.yaw, local_xy)
        obj.base, obj.yaw = np.array([xy[0], xy[1], z]), (anchor.yaw + turn) % 4
        return obj

    def on_top(self, obj: PlacedObject, support: PlacedObject, tries: int = 10) -> bool:
        """Rest `obj` on the top of `support`, inside its footprint."""
        w, d = support.size[0], support.size[1]
        if obj.size[0] > w - 0.04 or obj.size[1] > d - 0.04:
            return False
        for _ in range(tries):
            local = (self.rng.uniform(-(w - obj.size[0]) / 2 + 0.02, (w - obj.size[0]) / 2 - 0.02),
                     self.rng.uniform(-(d - obj.size[1]) / 2 + 0.02, (d - obj.size[1]) / 2 - 0.02))
            self.relative(obj, support, local, 2 * int(self.rng.integers(2)), z=support.hi[2])
            if self.add(obj):
                return True
        return False

    def free(self, obj: PlacedObject, margin: float = 0.3, tries: int = 20) -> bool:
        """Place `obj` anywhere on the floor at least `margin` from the walls."""
        for _ in range(tries):
            obj.yaw = int(self.rng.integers(4))
            e = obj.extent
            lo_x, hi_x = margin + e[0] / 2, self.width - margin - e[0] / 2
            lo_y, hi_y = margin + e[1] / 2, self.depth - margin - e[1] / 2
            if lo_x > hi_x or lo_y > hi_y:
                continue
            obj.base = np.array([self.rng.uniform(lo_x, hi_x), self.rng.uniform(lo_y, hi_y), 0.0])
            if self.add(obj):
                return True
        return False

    def beside_along_wall(self, obj: PlacedObject, neighbour: PlacedObject, gap: float = 0.02,
                          z: float = 0.0) -> bool:
        """Stand `obj` against the same wall as `neighbour`, right next to it on either side."""
        if neighbour.wall is None:
            return False
        sides = [-1, 1] if self.rng.random() < 0.5 else [1, -1]
        for side in sides:
            along = neighbour.along + side * (neighbour.size[0] / 2 + gap + obj.size[0] / 2)
            length = self.wall_length(neighbour.wall)
            if obj.size[0] / 2 <= along <= length - obj.size[0] / 2:
                if self.add(self.at_wall(obj, neighbour.wall, along, 0.01, z)):
                    return True
        return False

    def keep_free_in_front(self, obj: PlacedObject, depth: float):
        """Reserve the floor in front of `obj` (a door): nothing may stand there."""
        w = obj.size[0] + 0.2
        c = obj.base[:2] + rotate(obj.yaw, (0, obj.size[1] / 2 + depth / 2))
        e = np.abs(rotate(obj.yaw, (w, depth)))
        self.keepouts.append((np.array([c[0] - e[0] / 2, c[1] - e[1] / 2, 0.0]),
                              np.array([c[0] + e[0] / 2, c[1] + e[1] / 2, obj.size[2] + 0.05])))

    # ------------------------------------------------------------------ groups
    def doors(self):
        for _ in range(1 if self.rng.random() < 0.7 else 2):
            door = self.make("door")
            door.size[2] = min(door.size[2], self.height - 0.1)
            if self.against_wall(door, gap=0.0, keepouts=True):
                self.keep_free_in_front(door, 0.9)

    def windows(self, n: int):
        for _ in range(n):
            window = self.make("window")
            z = self.rng.uniform(0.7, 1.0)
            window.size[2] = min(window.size[2], self.height - 0.25 - z)
            if not self.against_wall(window, gap=0.0, z=z):
                continue
            if self.rng.random() < 0.5:
                color = self.pick(list(CLASSES["curtain"].colors))
                for side in (-1, 1)[: 1 + int(self.rng.random() < 0.7)]:
                    curtain = self.make("curtain", color=color)
                    top = min(window.hi[2] + 0.15, self.height - 0.05)
                    curtain.size[2] = min(curtain.size[2], top - 0.05)
                    along = window.along + side * (window.size[0] / 2 + 0.03 + curtain.size[0] / 2)
                    if curtain.size[0] / 2 <= along <= self.wall_length(window.wall) - curtain.size[0] / 2:
                        self.add(self.at_wall(curtain, window.wall, along, 0.0, top - curtain.size[2]))

    def picture_on_wall(self, wall: int | None = None, along: float | None = None, z: float | None = None):
        picture = self.make("picture")
        z = z if z is not None else self.rng.uniform(1.2, 1.6)
        if z + picture.size[2] > self.height - 0.1:
            picture.size[2] = max(0.2, self.height - 0.1 - z)
        return self.against_wall(picture, wall, along, gap=0.0, z=z)

    def table_with_chairs(self, variant: str = "dining", chairs: int | None = None, against_wall: bool = False):
        table = self.make("table", variant)
        # leave room for a chair and a passage on every side
        table.size[0] = min(table.size[0], max(self.width, self.depth) - 2.4)
        table.size[1] = min(table.size[1], min(self.width, self.depth) - 2.4)
        if table.size[1] < 0.5 or table.size[0] < table.size[1]:
            return None
        placed = self.against_wall(table) if against_wall else self.free(table, margin=0.7)
        if not placed:
            return None
        chairs = chairs if chairs is not None else int(self.rng.integers(2, 7))
        color = self.pick(list(CLASSES["chair"].colors))
        w, d = table.size[0], table.size[1]
        slots = []
        for side, length, turn in (("front", w, 2), ("back", w, 0), ("right", d, 1), ("left", d, 3)):
            n = max(1, int(length / 0.7))
            for i in range(n):
                slots.append((side, -length / 2 + (i + 0.5) * length / n, turn))
        self.rng.shuffle(slots)
        for side, offset, turn in slots[:chairs]:
            chair = self.make("chair", "chair", color=color)
            reach = chair.size[1] / 2 + self.rng.uniform(0.03, 0.2)
            local = {"front": (offset, d / 2 + reach), "back": (offset, -d / 2 - reach),
                     "right": (w / 2 + reach, offset), "left": (-w / 2 - reach, offset)}[side]
            self.add(self.relative(chair, table, local, turn))
        for _ in range(int(self.rng.integers(0, 3))):
            self.on_top(self.make("otherfurniture", self.pick(["box", "lamp"])), table)
        return table

    def desk_with_chair(self):
        desk = self.make("desk")
        if not self.against_wall(desk):
            return None
        chair = self.make("chair", "chair")
        local = (self.rng.uniform(-0.2, 0.2) * desk.size[0], desk.size[1] / 2 + chair.size[1] / 2
                 + self.rng.uniform(0.05, 0.3))
        self.add(self.relative(chair, desk, local, 2))
        for _ in range(int(self.rng.integers(0, 3))):
            self.on_top(self.make("otherfurniture", self.pick(["box", "lamp"])), desk)
        if self.rng.random() < 0.3:
            self.picture_on_wall(desk.wall, desk.along, z=desk.hi[2] + self.rng.uniform(0.35, 0.6))
        return desk

    def bed_group(self):
        bed = self.make("bed")
        if not self.against_wall(bed):
            return None
        color = self.pick(list(CLASSES["cabinet"].colors))
        for side in (-1, 1):
            if self.rng.random() < 0.75:
                stand = self.make("cabinet", "nightstand", color=color)
                local = (side * (bed.size[0] / 2 + 0.05 + stand.size[0] / 2), -bed.size[1] / 2 + stand.size[1] / 2)
                if self.add(self.relative(stand, bed, local, 0)) and self.rng.random() < 0.6:
                    self.on_top(self.make("otherfurniture", "lamp"), stand)
        if self.rng.random() < 0.6:
            self.picture_on_wall(bed.wall, bed.along, z=bed.hi[2] + self.rng.uniform(0.3, 0.5))
        return bed

    def sofa_group(self):
        sofa = self.make("sofa")
        if not self.against_wall(sofa):
            return None
        table = self.make("table", "coffee")
        local = (0.0, sofa.size[1] / 2 + self.rng.uniform(0.35, 0.6) + table.size[1] / 2)
        if self.add(self.relative(table, sofa, local, 0)):
            if self.rng.random() < 0.5:
                self.on_top(self.make("otherfurniture", "box"), table)
            for side in (-1, 1):
                if self.rng.random() < 0.4:
                    chair = self.make("chair", "armchair")
                    reach = table.size[0] / 2 + self.rng.uniform(0.3, 0.5) + chair.size[1] / 2
                    self.add(self.relative(chair, table, (side * reach, 0.0), 1 if side > 0 else 3))
        if self.rng.random() < 0.5:
            side_table = self.make("table", "side")
            side = self.pick([-1, 1])
            local = (side * (sofa.size[0] / 2 + 0.05 + side_table.size[0] / 2), -sofa.size[1] / 2
                     + side_table.size[1] / 2)
            if self.add(self.relative(side_table, sofa, local, 0)) and self.rng.random() < 0.7:
                self.on_top(self.make("otherfurniture", "lamp"), side_table)
        if self.rng.random() < 0.6:
            self.picture_on_wall(sofa.wall, sofa.along, z=sofa.hi[2] + self.rng.uniform(0.35, 0.6))
        return sofa

    def kitchen_run(self):
        counter = self.make("counter")
        if not self.against_wall(counter):
            return None
        self.on_top(self.make("sink", "basin"), counter)
        for _ in range(int(self.rng.integers(0, 3))):
            self.on_top(self.make("otherfurniture", "box"), counter)
        color = self.pick(list(CLASSES["cabinet"].colors))
        n = int(self.rng.integers(0, 4))
        z = counter.hi[2] + self.rng.uniform(0.5, 0.65)
        for i in range(n):
            cab = self.make("cabinet", "wall", color=color)
            cab.size[2] = min(cab.size[2], self.height - 0.05 - z)
            along = counter.along - counter.size[0] / 2 + (i + 0.5) * counter.size[0] / n
            if cab.size[0] > counter.size[0] / n:
                cab.size[0] = counter.size[0] / n - 0.02
            self.add(self.at_wall(cab, counter.wall, along, 0.0, z))
        if self.rng.random() < 0.8:
            self.beside_along_wall(self.make("refrigerator"), counter, gap=0.05)
        for _ in range(int(self.rng.integers(0, 3))):
            self.beside_along_wall(self.make("cabinet", "base", color=color), counter)
        return counter

    def bathroom_fixtures(self):
        tub = self.make("bathtub")
        wall = self.pick_wall()
        along = self.pick([tub.size[0] / 2 + 0.01, self.wall_length(wall) - tub.size[0] / 2 - 0.01])
        if self.against_wall(tub, wall, along) or self.against_wall(tub):
            curtain = self.make("shower curtain")
            curtain.size[0] = tub.size[0] * self.rng.uniform(0.85, 0.98)
            z = tub.hi[2] + self.rng.uniform(0.1, 0.3)
            curtain.size[2] = min(curtain.size[2], self.height - 0.1 - z)
            local = (0.0, tub.size[1] / 2 - 0.05 - curtain.size[1] / 2)
            self.add(self.relative(curtain, tub, local, 0, z=z))
        self.against_wall(self.make("toilet"))
        if self.rng.random() < 0.5:
            host = self.make("sink", "pedestal")
            placed = self.against_wall(host)
        else:
            host = self.make("cabinet", "base")
            placed = self.against_wall(host) and self.on_top(self.make("sink", "basin"), host)
        if placed and self.rng.random() < 0.6:
            cab = self.make("cabinet", "wall")
            self.against_wall(cab, host.wall, host.along, gap=0.0, z=self.rng.uniform(1.35, 1.5))

    def row_along_wall(self, label: str, variant: str | None = None):
        """Several objects of one class side by side along a wall (cabinets, bookshelves)."""
        first = self.make(label, variant)
        if not self.against_wall(first):
            return
        lo, hi = self.cfg.instances_per_class
        previous = first
        for _ in range(int(self.rng.integers(lo, hi + 1)) - 1):
            nxt = self.make(label, first.variant, color=first.color)
            nxt.size[1:] = first.size[1:]
            if not self.beside_along_wall(nxt, previous):
                break
            previous = nxt

    def loose(self, label: str, variant: str | None = None):
        """One object against a wall or free on the floor."""
        obj = self.make(label, variant)
        if not (self.rng.random() < 0.6 and self.against_wall(obj)):
            self.free(obj)


# ---------------------------------------------------------------------------------------- room types

def _fill(b: RoomBuilder, fillers: list[tuple[float, callable]], attempts: int = 40):
    weights = np.array([w for w, _ in fillers], dtype=np.float64)
    for _ in range(attempts):
        if b.full:
            return
        fillers[int(b.rng.choice(len(fillers), p=weights / weights.sum()))][1]()


def _bedroom(b: RoomBuilder):
    for _ in range(1 if b.rng.random() < 0.8 else 2):
        b.bed_group()
    _fill(b, [(1.0, lambda: b.row_along_wall("cabinet", "wardrobe")), (1.0, b.desk_with_chair),
              (0.7, lambda: b.row_along_wall("bookshelf")), (0.6, lambda: b.loose("chair", "armchair")),
              (0.6, b.picture_on_wall), (0.8, lambda: b.loose("otherfurniture")),
              (0.5, lambda: b.row_along_wall("cabinet", "file")), (0.3, lambda: b.loose("sofa"))])


def _living_room(b: RoomBuilder):
    b.sofa_group()
    _fill(b, [(1.0, lambda: b.table_with_chairs("dining")), (0.8, lambda: b.row_along_wall("bookshelf")),
              (0.8, lambda: b.row_along_wall("cabinet", "base")), (0.6, lambda: b.loose("chair", "armchair")),
              (0.8, b.picture_on_wall), (1.0, lambda: b.loose("otherfurniture")), (0.3, b.sofa_group),
              (0.4, lambda: b.loose("table", "side")), (0.3, b.desk_with_chair)])


def _kitchen(b: RoomBuilder):
    b.kitchen_run()
    _fill(b, [(1.0, lambda: b.table_with_chairs("dining")), (0.7, lambda: b.row_along_wall("cabinet", "base")),
              (0.4, b.kitchen_run), (0.5, lambda: b.loose("otherfurniture", "bin")), (0.4, b.picture_on_wall),
              (0.3, lambda: b.loose("refrigerator")), (0.4, lambda: b.loose("chair", "chair")),
              (0.3, lambda: b.loose("otherfurniture", "stool"))])


def _office(b: RoomBuilder):
    for _ in range(int(b.rng.integers(1, 4))):
        b.desk_with_chair()
    _fill(b, [(1.0, b.desk_with_chair), (0.8, lambda: b.row_along_wall("bookshelf")),
              (0.8, lambda: b.row_along_wall("cabinet", "file")), (0.5, lambda: b.table_with_chairs("dining")),
              (0.6, b.picture_on_wall), (0.6, lambda: b.loose("otherfurniture")),
              (0.4, lambda: b.loose("chair", "chair")), (0.3, lambda: b.loose("sofa"))])


def _bathroom(b: RoomBuilder):
    b.bathroom_fixtures()
    _fill(b, [(0.8, lambda: b.loose("otherfurniture", b.pick(["bin", "rack", "stool"]))),
              (0.6, lambda: b.row_along_wall("cabinet", "base")), (0.5, b.picture_on_wall),
              (0.4, lambda: b.against_wall(b.make("sink", "pedestal"))),
              (0.3, lambda: b.against_wall(b.make("toilet"))), (0.3, lambda: b.loose("chair", "chair")),
              (0.2, lambda: b.row_along_wall("cabinet", "wall"))])


def _conference_room(b: RoomBuilder):
    b.table_with_chairs("conference", chairs=int(b.rng.integers(6, 13)))
    _fill(b, [(0.8, lambda: b.row_along_wall("cabinet", "base")), (0.8, b.picture_on_wall),
              (0.5, lambda: b.loose("otherfurniture")), (0.5, lambda: b.loose("chair", "chair")),
              (0.4, lambda: b.row_along_wall("bookshelf")), (0.4, lambda: b.table_with_chairs("dining")),
              (0.3, lambda: b.loose("table", "side"))])


# Most objects a room of a type holds, whatever the configured range allows: a bathroom with
# thirty objects would be no bathroom.
ROOM_CAPACITY = {"bathroom": 14, "bedroom": 28, "kitchen": 30}

ROOM_TYPES = {"bedroom": _bedroom, "living room": _living_room, "kitchen": _kitchen, "office": _office,
              "bathroom": _bathroom, "conference room": _conference_room}


def generate_layout(cfg, rng: np.random.Generator) -> RoomLayout:
    """A furnished room drawn from `rng` with the sizes, counts and room types of `cfg`."""
    names = list(cfg.room_types)
    weights = np.array([cfg.room_types[n] for n in names], dtype=np.float64)
    room_type = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    lo_n, hi_n = cfg.objects
    target = int(rng.integers(lo_n, max(lo_n, min(hi_n, ROOM_CAPACITY.get(room_type, hi_n))) + 1))
    best = None
    for attempt in range(3):
        area = (target * rng.uniform(1.0, 1.8) + 6.0) * 1.3 ** attempt
        aspect = rng.uniform(1.0, 1.6)
        width = float(np.clip(math.sqrt(area * aspect), *cfg.room_size))
        depth = float(np.clip(area / width, *cfg.room_size))
        if rng.random() < 0.5:
            width, depth = depth, width
        height = float(rng.uniform(*cfg.room_height))
        b = RoomBuilder(rng, cfg, room_type, width, depth, height, target)
        b.doors()
        b.windows(int(rng.integers(0, 4)))
        ROOM_TYPES[room_type](b)
        layout = RoomLayout(room_type, width, depth, height, b.objects)
        if best is None or b.count > len(best.furniture()):
            best = layout
        if b.count >= lo_n:
            break
    return best
