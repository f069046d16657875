"""Benchmark scenes: seeded random box rooms of exact sizes, or `sparsegps.synth`'s rooms."""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from sparsegps.data.scene import Scene, SceneText, boxes_from_points


def _scannet20() -> tuple[str, ...]:
    text = resources.files("sparsegps").joinpath("resources/scannet/benchmark_classes.json").read_text()
    return tuple(json.loads(text)["scannet20"]["names"])


# The label vocabulary of benchmark scenes: the 20 ScanNet benchmark classes, walls and floors first.
SCANNET20 = _scannet20()


def random_room(scene_id: str, rng: np.random.Generator, *, num_objects: int, num_points: int,
                background_fraction: float = 0.35) -> Scene:
    """A box-shaped room: floor and four walls, `num_objects` boxes standing on the floor.

    Points are sampled on surfaces; object sizes (0.3-1.6 m) and colours are random. About
    `background_fraction` of the points are floor and walls, the rest is split between the objects
    in proportion to their surface area, so a scene has exactly `num_points` points. Each object
    gets an object caption and a referral; the scene gets a caption.
    """
    extent = np.array([rng.uniform(5.0, 8.0), rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.0)], np.float32)
    sizes = rng.uniform([0.3, 0.3, 0.3], [1.6, 1.6, 1.6], size=(num_objects, 3)).astype(np.float32)
    sizes = np.minimum(sizes, extent[None] * 0.45)
    lows = rng.uniform(0.0, 1.0, size=(num_objects, 2)) * (extent[None, :2] - sizes[:, :2])
    mins = np.concatenate([lows, np.zeros((num_objects, 1))], axis=1).astype(np.float32)
    areas = 2 * (sizes[:, 0] * sizes[:, 1] + sizes[:, 1] * sizes[:, 2] + sizes[:, 0] * sizes[:, 2])
    n_background = int(round(num_points * background_fraction)) if num_objects else num_points
    counts = np.floor(areas / areas.sum() * (num_points - n_background)).astype(int) if num_objects else []
    n_background = num_points - int(np.sum(counts))

    xyz_parts, rgb_parts, inst_parts, sem_parts = [], [], [], []
    # Background: the floor (semantic 1) and the walls (semantic 0), as points on the room's box.
    n_floor = n_background // 3
    floor = rng.uniform([0, 0, 0], [extent[0], extent[1], 0], size=(n_floor, 3))
    wall = _box_surface(rng, np.zeros(3), extent, n_background - n_floor, faces=(0, 1, 2, 3))
    xyz_parts += [floor, wall]
    rgb_parts += [rng.normal(150, 12, size=(n_floor, 3)), rng.normal(210, 8, size=(len(wall), 3))]
    inst_parts += [np.full(n_floor, -1), np.full(len(wall), -1)]
    sem_parts += [np.full(n_floor, 1), np.full(len(wall), 0)]
    labels = {}
    for k in range(num_objects):
        label_index = int(rng.integers(2, len(SCANNET20)))
        pts = _box_surface(rng, mins[k], mins[k] + sizes[k], int(counts[k]), faces=(0, 1, 2, 3, 5))
        colour = rng.uniform(30, 225, size=3)
        xyz_parts.append(pts)
        rgb_parts.append(colour + rng.normal(0, 10, size=(len(pts), 3)))
        inst_parts.append(np.full(len(pts), k))
        sem_parts.append(np.full(len(pts), label_index))
        labels[k] = SCANNET20[label_index]
    xyz = np.concatenate(xyz_parts).astype(np.float32)
    order = rng.permutation(len(xyz))
    instance = np.concatenate(inst_parts).astype(np.int32)[order]
    xyz = xyz[order]
    objects = boxes_from_points(xyz, instance, labels)
    texts = [SceneText("scene_caption", f"a room with {num_objects} objects.")]
    for o in objects:
        texts.append(SceneText("object_caption", f"this is a {o.label}.", o.instance_id))
        texts.append(SceneText("referral", f"the {o.label} that is {o.size[2]:.1f} metres tall.", o.instance_id))
    return Scene(scene_id=scene_id, xyz=xyz,
                 rgb=np.clip(np.concatenate(rgb_parts), 0, 255).astype(np.uint8)[order],
                 instance=instance, semantic=np.concatenate(sem_parts).astype(np.int16)[order],
                 objects=objects, texts=texts)


def _box_surface(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, n: int,
                 faces: Sequence[int]) -> np.ndarray:
    """`n` points uniformly on the chosen faces of an axis-aligned box (0-3 sides, 4 bottom, 5 top)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    size = hi - lo
    face_area = np.array([size[1] * size[2], size[1] * size[2], size[0] * size[2], size[0] * size[2],
                          size[0] * size[1], size[0] * size[1]])[list(faces)]
    face = np.asarray(faces)[rng.choice(len(faces), size=n, p=face_area / face_area.sum())]
    pts = lo + rng.uniform(size=(n, 3)) * size
    axis = np.array([0, 0, 1, 1, 2, 2])[face]
    at_high = np.isin(face, (1, 3, 5))
    pts[np.arange(n), axis] = np.where(at_high, hi[axis], lo[axis])
    return pts


def synthetic_scenes(num_scenes: int, *, num_objects: int, num_points: int, seed: int,
                     prefer_generator: bool = False) -> tuple[Iterator[Scene], str]:
    """A stream of `num_scenes` seeded scenes (with a progress bar) and where they come from.

    With `prefer_generator`, the procedural rooms of `sparsegps.synth` (default `SynthConfig`,
    ScanNet-like sizes) are used when that package is installed, and `num_objects` and
    `num_points` are ignored; otherwise `random_room` makes scenes of exactly these sizes.
    """
    if prefer_generator:
        try:
            from sparsegps.synth import SynthConfig, generate_scene
        except ImportError:
            pass
        else:
            cfg = SynthConfig(seed=seed)
            stream = (generate_scene(cfg, i) for i in range(num_scenes))
            return (tqdm(stream, total=num_scenes, desc="generating scenes", unit="scene", leave=False),
                    f"sparsegps.synth.generate_scene (default SynthConfig, seed {seed})")
    rng = np.random.default_rng(seed)
    stream = (random_room(f"room_{i:05d}", rng, num_objects=num_objects, num_points=num_points)
              for i in range(num_scenes))
    return (tqdm(stream, total=num_scenes, desc="generating scenes", unit="scene", leave=False),
            f"random_room ({num_objects} objects, {num_points} points per scene, seed {seed})")


def write_demo_store(folder: Path, scenes: int, seed: int) -> str:
    """Shards of `scenes` demo-preset rooms; returns where they come from."""
    from sparsegps.data import write_scenes
    from sparsegps.synth import SYNTH_VOCABULARY, generate_scene, preset

    synth = dataclasses.replace(preset("demo"), seed=seed)
    stream = tqdm((generate_scene(synth, i) for i in range(scenes)), total=scenes, desc="generating scenes",
                  unit="scene", leave=False)
    write_scenes(stream, folder, vocabulary=SYNTH_VOCABULARY, source="benchmark", progress=False)
    return f"sparsegps.synth preset 'demo' (seed {seed})"


def demo_texts(rooms: int = 64, seed: int = 0) -> list[str]:
    """The texts of `rooms` demo-preset rooms: the corpus a benchmark's model predicts with MLM over
    the corpus's tokens (`model.mlm_vocabulary: corpus`)."""
    from sparsegps.synth import generate_scene, preset

    synth = dataclasses.replace(preset("demo"), seed=seed)
    return [t.text for i in range(rooms) for t in generate_scene(synth, i).texts]
