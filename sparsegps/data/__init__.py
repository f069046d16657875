"""Scenes, HDF5 shards, datasets, transforms and collation.

The scene and store APIs import only numpy and h5py; the torch-facing parts (dataset, collate)
load on first use, so packing and inspecting start fast and spawn cheap workers."""
from .scene import (IGNORE_LABEL, NO_INSTANCE, TEXT_KINDS, Scene, SceneFormatError, SceneObject, SceneText,
                    boxes_from_points)
from .store import (SCHEMA_VERSION, SceneStore, ShardError, inspect_store, resolve_shards, upgrade_shards,
                    write_scenes)
from .transforms import GridSample, TransformConfig, build_transforms

_LAZY = {"collate_scenes": ".collate", "move_batch": ".collate", "ScenesDataset": ".dataset"}

__all__ = [
    "IGNORE_LABEL", "NO_INSTANCE", "SCHEMA_VERSION", "TEXT_KINDS", "GridSample", "Scene", "SceneFormatError",
    "SceneObject", "SceneStore", "SceneText", "ScenesDataset", "ShardError", "TransformConfig",
    "boxes_from_points", "build_transforms", "collate_scenes", "inspect_store", "move_batch", "resolve_shards",
    "upgrade_shards", "write_scenes",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
