"""Shared test fixtures: small random scenes with consistent labels, boxes and texts."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparsegps.data import Scene, SceneText, boxes_from_points

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

VOCAB = ["wall", "floor", "chair", "table", "bed"]


def make_scene(rng: np.random.Generator, scene_id: str, n_points: int = 500, n_objects: int = 4) -> Scene:
    """A random scene: points in blobs, one blob per object, plus unlabelled points; texts that
    reference real instances."""
    per = n_points // (n_objects + 1)
    xyz, instance, semantic = [], [], []
    for k in range(n_objects):
        centre = rng.uniform(-3, 3, 3)
        xyz.append(centre + rng.normal(0, 0.2, (per, 3)))
        instance.append(np.full(per, 10 + k))
        semantic.append(np.full(per, (k % (len(VOCAB) - 2)) + 2))
    rest = n_points - per * n_objects
    xyz.append(rng.uniform(-4, 4, (rest, 3)))
    instance.append(np.full(rest, -1))
    semantic.append(np.full(rest, -1))
    xyz = np.concatenate(xyz).astype(np.float32)
    instance = np.concatenate(instance).astype(np.int32)
    semantic = np.concatenate(semantic).astype(np.int16)
    labels = {10 + k: VOCAB[(k % (len(VOCAB) - 2)) + 2] for k in range(n_objects)}
    objects = boxes_from_points(xyz, instance, labels)
    texts = [SceneText("scene_caption", f"a room with {n_objects} objects")]
    for o in objects:
        texts.append(SceneText("object_caption", f"a {o.label} näher dran ✓", o.instance_id))
        same = [p.instance_id for p in objects if p.label == o.label and p is not o]
        texts.append(SceneText("referral", f"the {o.label} number {o.instance_id}", o.instance_id, same))
    return Scene(scene_id, xyz, rng.integers(0, 256, (n_points, 3), dtype=np.uint8), instance, semantic,
                 objects, texts)


@pytest.fixture
def scenes():
    rng = np.random.default_rng(0)
    return [make_scene(rng, f"scene_{i:03d}", n_points=int(rng.integers(200, 800)),
                       n_objects=int(rng.integers(1, 6))) for i in range(12)]
