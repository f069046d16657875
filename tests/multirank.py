"""Data and launch helpers for the multi-rank tests: uneven shards built from the sampler's own
assignment, so that a chosen rank's micro-batch at a chosen step lacks a chosen kind of content."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp

from sparsegps.data import Scene, write_scenes
from sparsegps.train.order import SampleOrder

from helpers import VOCAB, make_scene

# What rank 1's micro-batch lacks at each step of the first epoch (rank 0 always has everything).
LACKS = ("referrals", "scene captions", "object captions", "every text", "every object", "nothing")


def without(scene: Scene, lack: str, rng: np.random.Generator) -> Scene:
    """`scene` stripped of one kind of content."""
    drop = {"referrals": {"referral"}, "scene captions": {"scene_caption"}, "object captions": {"object_caption"},
            "every text": {"referral", "scene_caption", "object_caption"}, "nothing": set()}
    if lack == "every object":
        empty = make_scene(rng, scene.scene_id, len(scene.xyz), 0)  # every point unlabelled
        return dataclasses.replace(empty, texts=[t for t in empty.texts if t.kind == "scene_caption"])
    return dataclasses.replace(scene, texts=[t for t in scene.texts if t.kind not in drop[lack]])


def uneven_train_set(out: Path, micro_batch: int, seed: int = 0, world: int = 2, rank_lacking: int = 1) -> int:
    """Write len(LACKS) steps of micro-batches (one epoch, global batch micro_batch x world) where
    `rank_lacking`'s micro-batch at step k lacks LACKS[k]; scenes have 1-5 objects. Returns the
    number of scenes."""
    n = len(LACKS) * micro_batch * world
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, f"t{i:02d}", 300, int(rng.integers(1, 6))) for i in range(n)]
    share = SampleOrder(n, micro_batch * world, seed).rank_share(0, rank_lacking, world, micro_batch)
    mine = [index for _, (_, index) in zip(range(n // world), share)]
    for step, lack in enumerate(LACKS):
        for i in mine[step * micro_batch:(step + 1) * micro_batch]:
            scenes[i] = without(scenes[i], lack, rng)
    write_scenes(scenes, out, vocabulary=VOCAB, progress=False)
    return n


def odd_val_set(out: Path, count: int = 3, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, f"v{i}", 300, int(rng.integers(2, 5))) for i in range(count)]
    scenes[1] = without(scenes[1], "referrals", rng)  # evaluation meets uneven data too
    write_scenes(scenes, out, vocabulary=VOCAB, progress=False)


def spawn(fn, *args, world: int = 2) -> None:
    """Run fn(rank, world, port, *args) on `world` local processes (a gloo group each joins).

    A process whose fn returned leaves the group as a command does (`sparsegps.distributed.leave`: a
    barrier, then `destroy_process_group`), then ends at once (`os._exit(0)`, after flushing its
    output), without Python's interpreter teardown. A rank of these tests once aborted (SIGABRT,
    "terminate called without an active exception", on a loaded 2-core machine; not seen again in
    120 repeats): the known way is a gloo worker thread releasing a finished collective's tensors a
    moment late, taking the GIL while the interpreter is torn down. What fn reports is in files it
    has closed; an exception in fn still reaches the caller with its traceback."""
    from sparsegps.launch import free_port

    mp.spawn(_run_then_exit, args=(fn, world, free_port(), *args), nprocs=world, join=True)


def _run_then_exit(rank: int, fn, *args) -> None:
    from sparsegps.distributed import leave

    fn(rank, *args)
    leave()  # as a command that succeeded on every rank does: a barrier, then the group ends
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join_as(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give rank `rank`; one thread per rank on the shared cores."""
    import torch

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
