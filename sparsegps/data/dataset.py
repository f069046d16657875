"""`ScenesDataset`: scenes streamed from shards, transformed and voxelized, one scene per item."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .scene import SceneFormatError
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

    A damaged scene (failing its checksum, `SceneStore`) raises `SceneFormatError` naming file, scene
    and field, or with `on_corrupt="skip"` is replaced by the next scene of the store that reads (so
    every batch keeps its size and every rank its steps); the item then lists what it passed over
    under "skipped" as (file, scene, reason) triples, which the collated batch carries on.
    """

    # scenes passed over in a row before `on_corrupt="skip"` gives up on the store
    MAX_SKIPPED_IN_A_ROW = 1000

    def __init__(self, paths, transforms: TransformConfig | Compose | None = None, seed: int = 0,
                 verify: bool = True, classes: list[str] | None = None, rooms: int | None = None,
                 on_corrupt: Literal["error", "skip"] = "error"):
        """`classes`: the class list that semantic labels and object label ids index (default: the
        store's vocabulary); points and objects of other classes are labelled -1 (ignored).
        `rooms`: only the first this many scenes of the stores (None: all)."""
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt: {on_corrupt!r} is not one of error, skip")
        self.on_corrupt = on_corrupt
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
        scene, skipped = self._read(index)
        if self._semantic_map is not None:
            scene.semantic = self._semantic_map[scene.semantic]
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = self.transforms(scene, rng)
        sample["index"] = index
        sample["object_label_id"] = np.array([self.label_index.get(o.label, -1) for o in sample["objects"]],
                                             dtype=np.int64)
        sample["skipped"] = skipped
        return sample

    def _read(self, index: int):
        """The scene at `index`, or under `on_corrupt="skip"` the first readable one after it; and the
        damaged scenes passed over, as (file, scene, reason)."""
        skipped = []
        for attempt in range(min(self.MAX_SKIPPED_IN_A_ROW, self.rooms - 1) + 1):
            try:
                return self.store[(index + attempt) % self.rooms], skipped
            except SceneFormatError as e:
                if self.on_corrupt == "error":
                    raise
                skipped.append((e.file or "", e.scene or "", e.reason if e.field is None else f"{e.field}: {e.reason}"))
        raise SceneFormatError(f"{len(skipped)} scenes in a row from scene index {index} on are damaged "
                               f"(on_corrupt: skip gives up); inspect the store with `sparsegps inspect`",
                               file=skipped[0][0])
