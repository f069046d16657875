"""`ScenesDataset`: scenes streamed from shards, transformed and voxelized, one scene per item."""
from __future__ import annotations

import numpy as np
import torch

from .store import SceneStore
from .transforms import Compose, TransformConfig, build_transforms


class ScenesDataset(torch.utils.data.Dataset):
    """Random access by scene index across shards.

    Shards are opened lazily, once per process, on first access, so the dataset can be built
    before a DataLoader forks its workers. Augmentation randomness is a function of
    (seed, epoch, index) alone: the same scene gets the same sample whichever worker or rank
    loads it, which makes resumed runs identical to uninterrupted ones. An item is a scene index
    (in the epoch of `set_epoch`) or an (epoch, index) pair, as the training sampler gives them:
    DataLoader workers that live across epochs never see `set_epoch`.
    """

    def __init__(self, paths, transforms: TransformConfig | Compose | None = None, seed: int = 0,
                 verify: bool = False, classes: list[str] | None = None, rooms: int | None = None):
        """`classes`: the class list that semantic labels and object label ids index (default: the
        store's vocabulary); points and objects of other classes are labelled -1 (ignored).
        `rooms`: only the first this many scenes of the stores (None: all)."""
        self.store = SceneStore(paths, verify=verify)
        self.rooms = len(self.store) if rooms is None else min(rooms, len(self.store))
        if transforms is None:
            transforms = TransformConfig()
        self.transforms = build_transforms(transforms) if isinstance(transforms, TransformConfig) else transforms
        self.seed = seed
        self.epoch = 0
        self.classes = list(self.store.vocabulary if classes is None else classes)
        self.label_index = {name: i for i, name in enumerate(self.classes)}
        # store label id -> index into `classes` (the last entry serves the ignore label -1)
        remap = [self.label_index.get(name, -1) for name in self.store.vocabulary] + [-1]
        self._semantic_map = None if classes is None else np.array(remap, dtype=np.int16)

    @property
    def vocabulary(self) -> list[str]:
        return self.store.vocabulary

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rooms

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        scene = self.store[index]
        if self._semantic_map is not None:
            scene.semantic = self._semantic_map[scene.semantic]
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = self.transforms(scene, rng)
        sample["index"] = index
        sample["object_label_id"] = np.array([self.label_index.get(o.label, -1) for o in sample["objects"]],
                                             dtype=np.int64)
        return sample
