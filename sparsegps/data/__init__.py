"""Scenes, HDF5 shards, datasets, transforms and collation."""
from .collate import collate_scenes, move_batch
from .dataset import ScenesDataset
from .scene import (IGNORE_LABEL, NO_INSTANCE, TEXT_KINDS, Scene, SceneFormatError, SceneObject, SceneText,
                    boxes_from_points)
from .store import SCHEMA_VERSION, SceneStore, ShardError, inspect_store, resolve_shards, write_scenes
from .transforms import GridSample, TransformConfig, build_transforms

__all__ = [
    "IGNORE_LABEL", "NO_INSTANCE", "SCHEMA_VERSION", "TEXT_KINDS", "GridSample", "Scene", "SceneFormatError",
    "SceneObject", "SceneStore", "SceneText", "ScenesDataset", "ShardError", "TransformConfig",
    "boxes_from_points", "build_transforms", "collate_scenes", "inspect_store", "move_batch", "resolve_shards",
    "write_scenes",
]
