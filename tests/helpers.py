"""The tests' one toolkit: random scenes, the one tiny model, the tiny pre-training config and its
shards, and the losses of a model's outputs. Tests import from here, never from each other."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparsegps.data import Scene, SceneText, boxes_from_points, write_scenes

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["wall", "floor", "chair", "table", "bed"]

# The one tiny GPSModel of the tests (a dict, so configs and --set overrides can use it).
TINY_MODEL = {
    "backbone": {"stem_channels": 8, "enc_channels": [8, 16], "dec_channels": [16, 8], "enc_blocks": [1, 1],
                 "dec_blocks": [1, 1]},
    "d_model": 32, "num_heads": 2, "spatial_layers": 1, "grounding_layers": 1, "ffn_dim": 64, "embed_dim": 16,
    "dropout": 0.0, "text": {"num_layers": 1, "max_length": 16}, "object_text": "class_name",
}


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


def tiny_model_config(**overrides):
    """The tiny model's `ModelConfig`, with `overrides` (nested dicts allowed) written over it."""
    from sparsegps.config import from_dict, merge_mappings
    from sparsegps.models.gps import ModelConfig

    return from_dict(ModelConfig, merge_mappings(TINY_MODEL, overrides))


def write_pretrain_shards(root: Path) -> Path:
    """8 training and 4 held-out random scenes of 3 objects, under root/train and root/val."""
    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"t{i}", 300, 3) for i in range(8)], root / "train", vocabulary=VOCAB,
                 progress=False)
    write_scenes([make_scene(rng, f"v{i}", 300, 3) for i in range(4)], root / "val", vocabulary=VOCAB,
                 progress=False)
    return root


def pretrain_config(shards: Path, out: Path, **overrides):
    """A `PretrainConfig` of the tiny model on `write_pretrain_shards` data: 6 steps of 4 scenes on
    CPU, checkpoints every 2 steps, no augmentation; `overrides` replace top-level keys."""
    from sparsegps.config import from_dict
    from sparsegps.train.pretrain import PretrainConfig

    data = {"train": [str(shards / "train")], "val": [str(shards / "val")], "eval_max_scenes": 4,
            "transforms": {"voxel_size": 0.15, "augment": False}}
    raw = {"micro_batch": 4, "global_batch": 4, "steps": 6, "device": "cpu", "output_dir": str(out),
           "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "num_workers": 0, "data": data,
           "model": TINY_MODEL, "optim": {"warmup_steps": 0, "lr_backbone": 2e-3, "lr_heads": 2e-3}}
    raw.update(overrides)
    return from_dict(PretrainConfig, raw)


def logged_losses(out: Path) -> list[float]:
    """The training loss of every logged step of a run (its metrics.jsonl)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def losses(model, batch: dict) -> dict:
    """The losses of `model` (a GPSModel) on `batch`, as training computes them."""
    from sparsegps.criterion import GPSCriterion

    return GPSCriterion.of(model.cfg)(model(batch), batch)


def outputs_and_losses(model, batch: dict) -> dict:
    """The model's outputs on `batch` with their losses added (the keys "loss" and "loss_<name>")."""
    from sparsegps.criterion import GPSCriterion

    out = model(batch)
    return {**out, **GPSCriterion.of(model.cfg)(out, batch)}
