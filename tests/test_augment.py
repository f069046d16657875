"""GPS's augmentations: a caption drawn per sample and epoch, rotations by right angles."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from sparsegps.data import SceneText, ScenesDataset, TransformConfig, write_scenes
from sparsegps.data.transforms import RandomRotateZ, scene_to_sample

from helpers import VOCAB, make_scene


@pytest.fixture
def captioned(tmp_path):
    """One scene with 3 scene captions and 4 captions for its first object."""
    scene = make_scene(np.random.default_rng(0), "s0", 300, 3)
    first = scene.objects[0].instance_id
    extra = [SceneText("scene_caption", f"scene caption {k}") for k in range(2)]
    extra += [SceneText("object_caption", f"object caption {k}", first) for k in range(3)]
    write_scenes([dataclasses.replace(scene, texts=scene.texts + extra)], tmp_path, vocabulary=VOCAB, progress=False)
    return tmp_path, first


def test_one_caption_per_scene_and_object_drawn_per_epoch_covers_them_all(captioned):
    path, first = captioned
    ds = ScenesDataset(path, TransformConfig(voxel_size=0.15, rotate=False, scale=None, jitter_sigma=0,
                                             color_jitter=False), seed=3)
    seen_scene, seen_object = set(), set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        texts = ds[0]["texts"]
        scene_caps = [t.text for t in texts if t.kind == "scene_caption"]
        object_caps = [t.text for t in texts if t.kind == "object_caption" and t.target_id == first]
        assert len(scene_caps) == 1 and len(object_caps) == 1
        assert sum(t.kind == "object_caption" for t in texts) == 3  # one per object
        assert sum(t.kind == "referral" for t in texts) == 3  # referrals untouched
        seen_scene.update(scene_caps)
        seen_object.update(object_caps)
    assert len(seen_scene) == 3 and len(seen_object) == 4
    # a function of (seed, epoch, index) alone: a resumed run draws the same captions
    again = ScenesDataset(path, ds.transforms, seed=3)
    for epoch in (0, 17):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        assert [t.text for t in ds[0]["texts"]] == [t.text for t in again[0]["texts"]]


def test_right_angle_rotations_keep_boxes_exact():
    scene = make_scene(np.random.default_rng(1), "s", 400, 3)
    rotate = RandomRotateZ(right_angles=True)
    angles = set()
    for seed in range(16):
        sample = rotate(scene_to_sample(scene), np.random.default_rng(seed))
        for before, after in zip(scene.objects, sample["objects"]):
            assert sorted(after.size[:2].tolist()) == pytest.approx(sorted(before.size[:2].tolist()), abs=1e-6)
            assert after.size[2] == pytest.approx(before.size[2])
            points = sample["xyz"][scene.instance == before.instance_id]
            lo, hi = after.center - after.size / 2, after.center + after.size / 2
            assert (points >= lo - 1e-5).all() and (points <= hi + 1e-5).all()  # still bounds its points
        angles.add(round(math.degrees(math.atan2(sample["xyz"][0, 1], sample["xyz"][0, 0])
                                      - math.atan2(scene.xyz[0, 1], scene.xyz[0, 0])) % 360))
    assert angles == {0, 90, 180, 270}
