"""Disjoint sets of procedural rooms for experiments whose numbers a sceptic can trust.

Five stores, each synthesized from its own seed (a room depends only on its seed and index, so
different seeds give different rooms; `check_disjoint` verifies it by point content):

    pretrain      pre-training
    finetune      fine-tuning, and `finetune_few`, its first `FEW_ROOMS` rooms (a subset of it)
    val           every choice: presets, learning rates, steps
    test          reported, never chosen on

`HOLDOUT_CLASSES` are the classes the experiments hold out of pre-training, to measure zero-shot
segmentation of classes it never saw.
"""
from __future__ import annotations

import hashlib
from itertools import combinations
from pathlib import Path

# Seed of each store, as an offset from the experiment's seed.
STORE_SEEDS = {"pretrain": 0, "finetune": 1, "val": 2, "test": 3}
STORES = ("pretrain", "finetune", "finetune_few", "val", "test")
FEW_ROOMS = 16
# One class per room type (living room, office, kitchen, bathroom), each in 15-30% of the rooms of
# `synth --preset demo`: never labelled or named in pre-training, segmented zero-shot by name.
HOLDOUT_CLASSES = ("sofa", "desk", "refrigerator", "bathtub")


def store_seed(name: str, seed: int = 0) -> int:
    """The generator seed of store `name` (finetune_few shares finetune's: it is its first rooms)."""
    return seed + STORE_SEEDS["finetune" if name == "finetune_few" else name]


def synth_command(name: str, rooms: int, out: Path, seed: int = 0, workers: int = 1) -> list[str]:
    """The `sparsegps synth` arguments that write store `name` with `rooms` rooms to `out`."""
    return ["synth", "--preset", "demo", "--scenes", str(rooms), "--seed", str(store_seed(name, seed)),
            "--workers", str(workers), "--out", str(out)]


def room_fingerprints(path: str | Path) -> set[str]:
    """A hash of each room's points (coordinates and colours) in a store: equal rooms have equal
    hashes, whatever their ids."""
    from sparsegps.data import SceneStore

    store = SceneStore(path)
    try:
        return {hashlib.blake2b(s.xyz.tobytes() + s.rgb.tobytes(), digest_size=16).hexdigest()
                for s in (store[i] for i in range(len(store)))}
    finally:
        store.close()


def check_disjoint(stores: dict[str, str | Path]) -> None:
    """Raise ValueError unless every pair of stores shares no room (`finetune_few`, when given, must
    instead be part of `finetune`)."""
    prints = {name: room_fingerprints(path) for name, path in stores.items()}
    if "finetune_few" in prints and not prints["finetune_few"] <= prints.get("finetune", set()):
        raise ValueError("finetune_few is not a subset of finetune")
    for a, b in combinations([n for n in prints if n != "finetune_few"], 2):
        shared = prints[a] & prints[b]
        if shared:
            raise ValueError(f"stores {a} ({stores[a]}) and {b} ({stores[b]}) share {len(shared)} room(s)")
