"""`SynthConfig`: everything that decides what the procedural room generator produces."""
from __future__ import annotations

from dataclasses import dataclass, field

from sparsegps.config import ConfigError, from_dict, merge_mappings, to_dict
from sparsegps.language.generate import LanguageConfig


def _default_room_types() -> dict[str, float]:
    return {"bedroom": 1.0, "living room": 1.0, "kitchen": 1.0, "office": 1.0, "bathroom": 0.8,
            "conference room": 0.5}


@dataclass
class SynthConfig:
    """Procedural rooms. The defaults (preset `scannet`) give scenes comparable to a ScanNet scan
    at 0.02 m voxels; preset `demo` gives small rooms for CPU demos."""

    seed: int = 0
    scenes: int = 100
    shard_scenes: int = 256  # scenes per HDF5 shard
    room_types: dict[str, float] = field(default_factory=_default_room_types)  # relative frequency
    room_size: tuple[float, float] = (3.0, 10.0)  # metres, range of each side of the floor
    room_height: tuple[float, float] = (2.5, 3.2)
    objects: tuple[int, int] = (8, 40)  # furniture per room, walls and floor not counted
    instances_per_class: tuple[int, int] = (1, 4)  # objects per row of cabinets, bookshelves, ...
    max_instances_per_class: int = 12
    points_per_m2: float = 1000.0  # surface sampling density
    min_points_per_object: int = 40
    jitter: float = 0.005  # metres, standard deviation of the sensor noise on positions
    color_noise: float = 8.0  # standard deviation per channel (0-255) of each point's colour
    color_variation: float = 12.0  # largest per-channel offset of an object from its palette colour
    language: LanguageConfig = field(default_factory=LanguageConfig)

    def __post_init__(self):
        from .rooms import ROOM_TYPES

        unknown = sorted(set(self.room_types) - set(ROOM_TYPES))
        if unknown:
            raise ValueError(f"room_types: unknown room type(s) {unknown}; known: {sorted(ROOM_TYPES)}")
        if not self.room_types or min(self.room_types.values()) < 0 or sum(self.room_types.values()) <= 0:
            raise ValueError("room_types: weights must be >= 0 with a positive sum")
        for name in ("room_size", "room_height", "objects", "instances_per_class"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}: expected 0 < low <= high, got {[lo, hi]}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("points_per_m2", "scenes", "shard_scenes", "max_instances_per_class"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("jitter", "color_noise", "color_variation", "min_points_per_object"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _preset_files():
    from importlib import resources

    return resources.files("sparsegps").joinpath("resources", "synth")


# The presets: YAML files of package data (sparsegps/resources/synth/NAME.yaml), each holding what
# differs from the defaults.
PRESETS: tuple[str, ...] = tuple(sorted(f.name.removesuffix(".yaml") for f in _preset_files().iterdir()
                                        if f.name.endswith(".yaml")))


def preset_dict(name: str) -> dict:
    """The full config of preset `name` as a plain mapping (defaults with the preset's file over them)."""
    import yaml

    if name not in PRESETS:
        raise ConfigError(f"unknown synth preset {name!r}; known: {list(PRESETS)}")
    return merge_settings(to_dict(SynthConfig()), yaml.safe_load(_preset_files().joinpath(f"{name}.yaml").read_text()))


def preset(name: str) -> SynthConfig:
    return from_dict(SynthConfig, preset_dict(name))


def merge_settings(base: dict, update: dict) -> dict:
    """`base` with the settings of `update` written over it, section by section; room_types (a
    mapping of room type to frequency) is replaced whole."""
    merged = merge_mappings(base, {k: v for k, v in update.items() if k != "room_types"})
    if "room_types" in update:
        merged["room_types"] = update["room_types"]
    return merged
