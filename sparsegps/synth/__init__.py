"""Procedural indoor scenes: furnished rooms with ScanNet20 classes, sampled to labelled points.

`generate_scene(cfg, index)` is a pure function of the config (its seed) and the scene index, so
scene i is the same whatever the number of scenes or workers.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Iterator

import numpy as np

from sparsegps.data.scene import Scene, boxes_from_points
from sparsegps.language import annotate_scene

from .config import PRESETS, SynthConfig, preset, preset_dict
from .rooms import ROOM_TYPES, RoomLayout, generate_layout
from .sampling import sample_points


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    text = resources.files("sparsegps").joinpath("resources/scannet/benchmark_classes.json").read_text()
    return tuple(json.loads(text)["scannet20"]["names"])


SYNTH_VOCABULARY: list[str] = list(_vocabulary())


def scene_id(seed: int, index: int) -> str:
    return f"synth_{seed:04d}_{index:06d}"


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def layout_for(cfg: SynthConfig, index: int) -> RoomLayout:
    """The room layout of scene `index` (no points): cheap, for statistics over many scenes."""
    return generate_layout(cfg, scene_rng(cfg.seed, index))


def generate_scene(cfg: SynthConfig, index: int, with_language: bool = True) -> Scene:
    """Scene `index` of the run seeded `cfg.seed`: points, labels, boxes and (by default) texts."""
    rng = scene_rng(cfg.seed, index)
    layout = generate_layout(cfg, rng)
    xyz, rgb, owner = sample_points(layout, rng, cfg.points_per_m2, cfg.jitter, cfg.color_noise,
                                    cfg.min_points_per_object)
    label_index = {name: i for i, name in enumerate(SYNTH_VOCABULARY)}
    semantic = np.array([label_index[o.label] for o in layout.objects], dtype=np.int16)[owner]
    labels = {i: o.label for i, o in enumerate(layout.objects)}
    scene = Scene(scene_id(cfg.seed, index), xyz, rgb, owner, semantic, boxes_from_points(xyz, owner, labels))
    if with_language:
        scene = annotate_scene(scene, cfg.seed, cfg.language)
    return scene


def generate_scenes(cfg: SynthConfig, n: int | None = None, with_language: bool = True) -> Iterator[Scene]:
    """Scenes 0 .. n-1 (n defaults to `cfg.scenes`), in order."""
    for index in range(cfg.scenes if n is None else n):
        yield generate_scene(cfg, index, with_language)


__all__ = ["PRESETS", "ROOM_TYPES", "SYNTH_VOCABULARY", "RoomLayout", "SynthConfig", "generate_layout",
           "generate_scene", "generate_scenes", "layout_for", "preset", "preset_dict", "scene_id", "scene_rng"]
