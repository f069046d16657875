"""Per-scene transforms, from a stored `Scene` to a voxelized training sample.

A sample is a plain dict of numpy arrays (so it crosses DataLoader worker boundaries cheaply):

    xyz [N,3] float32, rgb [N,3] uint8, instance [N] int32, semantic [N] int16,
    objects (list[SceneObject]), texts (list[SceneText]), scene_id

Augmentations move points and keep object boxes in step. `GridSample` adds

    coord [V,3] int32 voxel coordinates (>= 0), voxel_xyz [V,3], voxel_rgb [V,3] (means of the
    voxel's points), voxel_instance [V], voxel_semantic [V] (label of the voxel's first point),
    inverse [N] int64 (voxel of every original point; -1 where a crop dropped the point)

so per-voxel predictions map back to every original point with `pred[inverse]`.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np

from .scene import NO_INSTANCE, Scene, SceneObject
from .voxelize import voxel_means, voxelize

Sample = dict


def scene_to_sample(scene: Scene) -> Sample:
    return {"scene_id": scene.scene_id, "xyz": scene.xyz, "rgb": scene.rgb, "instance": scene.instance,
            "semantic": scene.semantic, "objects": list(scene.objects), "texts": list(scene.texts)}


def _rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


BoxSizes = Literal["enclosing", "kept"]


def rotate_z(sample: Sample, angle: float, box_sizes: BoxSizes = "enclosing") -> Sample:
    """Rotate points about the vertical axis; box centres rotate with them. Box sizes: "enclosing",
    the extents of the axis-aligned box around the rotated box, as 3D grounding pipelines do (they
    grow by up to 1.41 at 45 degrees, so sizes depend on the angle); "kept", the object's own
    extents, which do not."""
    rot = _rotation_z(angle)
    sample["xyz"] = sample["xyz"] @ rot.T
    extent = np.abs(rot) if box_sizes == "enclosing" else np.eye(3, dtype=np.float32)
    sample["objects"] = [SceneObject(o.instance_id, o.label, rot @ o.center, extent @ o.size)
                         for o in sample["objects"]]
    return sample


class RandomRotateZ:
    """Rotate about z by a uniform angle in [-max_angle, max_angle] (radians), or with
    `right_angles` by 0, 90, 180 or 270 degrees (GPS), which keeps axis-aligned boxes exact."""

    def __init__(self, max_angle: float = math.pi, right_angles: bool = False, box_sizes: BoxSizes = "enclosing"):
        self.max_angle, self.right_angles, self.box_sizes = max_angle, right_angles, box_sizes

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.right_angles:
            return rotate_z(sample, int(rng.integers(4)) * math.pi / 2, self.box_sizes)
        return rotate_z(sample, rng.uniform(-self.max_angle, self.max_angle), self.box_sizes)


class SampleCaptions:
    """Keep one scene caption per scene and one caption per object, drawn at random (GPS draws one
    per sample), so that over epochs every stored caption is seen; other texts are kept."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(sample["texts"]):
            if t.kind == "scene_caption":
                groups.setdefault(("scene",), []).append(i)
            elif t.kind == "object_caption":
                groups.setdefault(("object", t.target_id), []).append(i)
        drop = set()
        for members in groups.values():
            if len(members) > 1:
                keep = members[int(rng.integers(len(members)))]
                drop.update(i for i in members if i != keep)
        if drop:
            sample["texts"] = [t for i, t in enumerate(sample["texts"]) if i not in drop]
        return sample


class HoldOutClasses:
    """Pre-training that never sees some classes' labels (a class hold-out, for zero-shot).

    mode "labels" (the open-vocabulary protocol of PLA and RegionPLC): objects of the `names`
    classes lose their class name, so they take no class target and no "a <class>" text; every
    caption and referral stays, the ones that name them too: what is withheld is the label, not the
    language. mode "strict": every text about one of them, or that uses one of `words` (the classes'
    nouns, synonyms and plurals: see `sparsegps.language.templates.class_words`), is dropped as
    well. Either way their points' semantic labels are dropped by the dataset's class list
    (`ScenesDataset(classes=...)`). The store is untouched."""

    def __init__(self, names: list[str], words: list[str], mode: str = "labels"):
        if mode not in ("labels", "strict"):
            raise ValueError(f"unknown hold-out mode {mode!r} (labels or strict)")
        self.names, self.mode = frozenset(names), mode
        alternatives = "|".join(re.escape(w) for w in sorted(set(words) | self.names, key=len, reverse=True) if w)
        self.pattern = re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE) if alternatives else None

    def names_a_class(self, text: str) -> bool:
        return self.pattern is not None and self.pattern.search(text) is not None

    def keeps(self, text: str) -> bool:
        """Whether a text can reach a batch (under "strict", one naming a held-out class cannot; a text
        about a held-out object is decided per scene in `__call__`)."""
        return self.mode == "labels" or not self.names_a_class(text)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        if not self.names:
            return sample
        held = {o.instance_id for o in sample["objects"] if o.label in self.names}
        sample["objects"] = [o if o.instance_id not in held else SceneObject(o.instance_id, "", o.center, o.size)
                             for o in sample["objects"]]
        if self.mode == "strict":
            sample["texts"] = [t for t in sample["texts"]
                               if t.target_id not in held and not self.names_a_class(t.text)]
        return sample


class RandomScale:
    def __init__(self, low: float = 0.9, high: float = 1.1):
        self.low, self.high = low, high

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = np.float32(rng.uniform(self.low, self.high))
        sample["xyz"] = sample["xyz"] * s
        sample["objects"] = [SceneObject(o.instance_id, o.label, o.center * s, o.size * s) for o in sample["objects"]]
        return sample


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normal noise by the Box-Muller transform of float32 uniforms.

    About 3x faster than `rng.normal` for the millions of values a scene's jitter needs; the tails
    end at 5.8 sigma (float32 uniforms), far beyond the clipping of every caller.
    """
    size = int(np.prod(shape))
    half = (size + 1) // 2
    u = rng.random(2 * half, dtype=np.float32)
    radius = np.log1p(-u[:half])  # log(1 - u) with u in [0, 1): finite
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle = u[half:]
    angle *= np.float32(2 * math.pi)
    out = np.empty(2 * half, dtype=np.float32)
    np.cos(angle, out=out[:half])
    np.sin(angle, out=out[half:])
    out[:half] *= radius
    out[half:] *= radius
    return out[:size].reshape(shape)


class RandomJitter:
    """Gaussian noise on every point, clipped at `clip` metres (boxes unchanged)."""

    def __init__(self, sigma: float = 0.005, clip: float = 0.02):
        self.sigma, self.clip = sigma, clip

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        noise = standard_normal(rng, sample["xyz"].shape)
        noise *= np.float32(self.sigma)
        np.clip(noise, -self.clip, self.clip, out=noise)
        noise += sample["xyz"]
        sample["xyz"] = noise
        return sample


class ColorJitter:
    """Per-scene brightness shift and per-point noise on rgb, in 0-255 units."""

    def __init__(self, brightness: float = 20.0, noise: float = 5.0):
        self.brightness, self.noise = brightness, noise

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        shift = np.float32(rng.uniform(-self.brightness, self.brightness))
        rgb = standard_normal(rng, sample["rgb"].shape)
        rgb *= np.float32(self.noise)
        rgb += shift
        rgb += sample["rgb"]
        np.clip(rgb, 0, 255, out=rgb)
        sample["rgb"] = rgb.astype(np.uint8)
        return sample


class GridSample:
    """Voxelize: one voxel per occupied cell of size `voxel_size`, keeping the point->voxel map.

    Voxel colour and position are the means of the voxel's points; voxel labels are those of the
    voxel's first point (in point order), so a voxel whose points agree restores them exactly.
    Voxels are ordered by their (x, y, z) coordinates (see `sparsegps.data.voxelize`).
    """

    def __init__(self, voxel_size: float = 0.02):
        if voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {voxel_size}")
        self.voxel_size = voxel_size

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        voxels = voxelize(sample["xyz"], self.voxel_size, scene_id=sample["scene_id"])
        sample.update(
            coord=voxels.coord, voxel_xyz=voxel_means(sample["xyz"], voxels),
            voxel_rgb=voxel_means(sample["rgb"], voxels), voxel_instance=sample["instance"][voxels.first],
            voxel_semantic=sample["semantic"][voxels.first], inverse=voxels.inverse, voxel_size=self.voxel_size,
        )
        return sample


def model_input(sample: Sample, voxel_size: float, index: int = 0, angle: float = 0.0) -> Sample:
    """A sample as a trained model reads it outside training (every evaluation, `show`, the
    gallery): turned by `angle` radians about the vertical axis (test-time augmentation; 0: as
    stored), voxelized at `voxel_size`, nothing random; `index` its place in the store, its object
    classes unknown to the model (-1)."""
    if angle:
        sample = rotate_z(sample, angle)
    sample = GridSample(voxel_size)(sample)
    sample["index"] = index
    sample["object_label_id"] = np.full(len(sample["objects"]), -1, np.int64)
    return sample


class VoxelizeOnDevice:
    """Leave the points as they are and record the voxel size: `collate_scenes` then batches points,
    and `move_batch` grid-samples them on the training device exactly as `GridSample` would."""

    def __init__(self, voxel_size: float = 0.02):
        if voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive, got {voxel_size}")
        self.voxel_size = voxel_size

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        sample["voxel_size"] = self.voxel_size
        sample["voxelize_on_device"] = True
        return sample


class CropToMaxVoxels:
    """Keep at most `max_voxels` voxels: the ones nearest (in xy) to a random voxel.

    Objects left with no voxel, and texts about them, are dropped; dropped points map to -1.
    Runs after `GridSample`."""

    def __init__(self, max_voxels: int):
        self.max_voxels = max_voxels

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        n = len(sample["coord"])
        if n <= self.max_voxels:
            return sample
        centre = sample["voxel_xyz"][rng.integers(n), :2]
        dist = ((sample["voxel_xyz"][:, :2] - centre) ** 2).sum(axis=1)
        keep = np.sort(np.argpartition(dist, self.max_voxels - 1)[: self.max_voxels])
        remap = np.full(n, -1, np.int64)
        remap[keep] = np.arange(len(keep))
        for key in ("coord", "voxel_xyz", "voxel_rgb", "voxel_instance", "voxel_semantic"):
            sample[key] = sample[key][keep]
        sample["coord"] = sample["coord"] - sample["coord"].min(axis=0)
        sample["inverse"] = remap[sample["inverse"]]
        alive = set(np.unique(sample["voxel_instance"]).tolist()) - {NO_INSTANCE}
        sample["objects"] = [o for o in sample["objects"] if o.instance_id in alive]
        sample["texts"] = [replace(t, distractor_ids=tuple(d for d in t.distractor_ids if d in alive))
                           for t in sample["texts"] if t.kind == "scene_caption" or t.target_id in alive]
        return sample


class LabelledPoints:
    """Sparse annotation (ScanNet's data-efficient benchmark: 20, 50, 100 or 200 labelled points per
    scene): of each room's labelled points, `count` are chosen once, class-blind, by a generator
    seeded with the room's id (not the epoch: the same points on every epoch, run and rank); each
    voxel holding a chosen point takes its label, every other voxel none (-1). A room with fewer
    labelled points keeps them all. Runs after `GridSample` (and any crop)."""

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"labelled points per room must be at least 1, got {count}")
        self.count = count

    def chosen(self, scene_id: str, semantic: np.ndarray) -> np.ndarray:
        """Indices of the room's chosen labelled points, ascending."""
        labelled = np.flatnonzero(semantic >= 0)
        if len(labelled) <= self.count:
            return labelled
        seed = int.from_bytes(hashlib.blake2b(scene_id.encode("utf-8"), digest_size=8).digest(), "little")
        return np.sort(np.random.default_rng(seed).choice(labelled, self.count, replace=False))

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        points = self.chosen(sample["scene_id"], sample["semantic"])
        voxels = sample["inverse"][points]
        kept = voxels >= 0  # not cropped away
        semantic = np.full_like(sample["voxel_semantic"], -1)
        semantic[voxels[kept]] = sample["semantic"][points[kept]]
        sample["voxel_semantic"] = semantic
        return sample


@dataclass
class TransformConfig:
    """Augmentations and voxelization applied to every scene, in this order."""
    # allowed values, checked on load (`sparsegps.config.check_limits`)
    LIMITS: ClassVar[dict[str, str]] = {"voxel_size": "> 0", "max_angle": ">= 0", "jitter_sigma": ">= 0",
                                        "max_voxels": ">= 1", "max_referrals": ">= 1"}

    voxel_size: float = 0.02
    rotate: bool = True
    max_angle: float = math.pi
    # uniform: any angle in [-max_angle, max_angle] (boxes stay axis-aligned, so they grow by up to
    # 1.41); right_angles: multiples of 90 degrees, as GPS (boxes stay exact)
    rotation: Literal["uniform", "right_angles"] = "uniform"
    # Box sizes of turned scenes (see `rotate_z`). enclosing: the axis-aligned box around the turned
    # box, as GPS's pipeline (up to 1.41x at 45 degrees; exact at right angles); kept: the object's
    # own extents, the same at every angle, so "largest" and "next to" mean the same in every pose.
    box_sizes: BoxSizes = "enclosing"
    # random: one scene caption and one caption per object drawn per sample and epoch (GPS);
    # all: every stored caption (the model then uses the first of each)
    captions: Literal["random", "all"] = "random"
    scale: tuple[float, float] | None = (0.9, 1.1)
    jitter_sigma: float = 0.005
    color_jitter: bool = True
    max_voxels: int | None = None
    augment: bool = True  # False: evaluation (no random transforms)
    max_referrals: int | None = None  # referrals kept per scene and epoch (random subset)
    voxelize_on: Literal["worker", "device"] = "worker"
    """Where scenes are grid-sampled. "worker": in the DataLoader workers (`GridSample`), so batches
    cross to the training process already voxelized. "device": workers send the augmented points
    and `move_batch` voxelizes them on the training device (a GPU sorts a scene's points in well
    under a millisecond; CPU workers then only read and augment). Both give the same batch, bit
    for bit. Not combinable with `max_voxels` (the crop needs voxels in the worker)."""


class SelectTexts:
    """Keep a random subset of at most `max_referrals` referrals (other texts are kept)."""

    def __init__(self, max_referrals: int):
        self.max_referrals = max_referrals

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        refs = [i for i, t in enumerate(sample["texts"]) if t.kind == "referral"]
        if len(refs) > self.max_referrals:
            drop = set(rng.choice(refs, len(refs) - self.max_referrals, replace=False).tolist())
            sample["texts"] = [t for i, t in enumerate(sample["texts"]) if i not in drop]
        return sample


class Compose:
    """Apply transforms in order with one RNG, starting from a `Scene`."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, scene: Scene, rng: np.random.Generator) -> Sample:
        sample = scene_to_sample(scene)
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


def build_transforms(cfg: TransformConfig) -> Compose:
    steps: list = []
    if cfg.augment:
        if cfg.captions == "random":
            steps.append(SampleCaptions())
        if cfg.rotate:
            steps.append(RandomRotateZ(cfg.max_angle, right_angles=cfg.rotation == "right_angles",
                                       box_sizes=cfg.box_sizes))
        if cfg.scale is not None:
            steps.append(RandomScale(*cfg.scale))
        if cfg.jitter_sigma > 0:
            steps.append(RandomJitter(cfg.jitter_sigma))
        if cfg.color_jitter:
            steps.append(ColorJitter())
    if cfg.voxelize_on == "device":
        if cfg.max_voxels is not None:
            raise ValueError("transforms.max_voxels needs voxelize_on: worker (the crop runs on voxels)")
        steps.append(VoxelizeOnDevice(cfg.voxel_size))
    elif cfg.voxelize_on == "worker":
        steps.append(GridSample(cfg.voxel_size))
    else:
        raise ValueError(f"transforms.voxelize_on must be 'worker' or 'device', got {cfg.voxelize_on!r}")
    if cfg.max_voxels is not None:
        steps.append(CropToMaxVoxels(cfg.max_voxels))
    if cfg.max_referrals is not None:
        steps.append(SelectTexts(cfg.max_referrals))
    return Compose(steps)
