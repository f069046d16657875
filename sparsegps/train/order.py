"""The order in which a run reads its samples, the same on any number of ranks.

Epoch e is a seeded permutation of the dataset (`torch.randperm` seeded with seed + e), cut to whole
global batches; the run reads the epochs one after another as one stream of (epoch, index) pairs.
Optimizer step k consumes the stream's samples k x global_batch to (k + 1) x global_batch; each of
its micro-steps takes the next micro_batch x world of them, and rank r the r-th micro_batch of
those. The data position of a run is one number, the samples of the stream consumed (by all ranks
together), so a checkpoint written by N ranks continues the same stream on M ranks: only which rank
and micro-step a sample lands in changes, never the step it belongs to.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from sparsegps.errors import UsageError


class SampleOrder:
    """The stream of (epoch, index) pairs of a run (see the module's docstring)."""

    def __init__(self, size: int, global_batch: int, seed: int, shuffle: bool = True):
        if size < global_batch:
            raise UsageError(f"{size} scenes cannot fill one global batch of {global_batch}; lower global_batch "
                             f"or add scenes")
        self.size, self.global_batch, self.seed, self.shuffle = size, global_batch, seed, shuffle
        self.per_epoch = size // global_batch * global_batch  # the rest of an epoch's permutation is dropped

    def epoch_indices(self, epoch: int) -> list[int]:
        """The scenes of `epoch`, in the order they are read."""
        if not self.shuffle:
            return list(range(self.per_epoch))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator)[:self.per_epoch].tolist()

    def epoch_of(self, samples: int) -> int:
        return samples // self.per_epoch

    def stream(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(epoch, index) pairs from global sample number `start` on, without end."""
        epoch, offset = divmod(start, self.per_epoch)
        for e in itertools.count(epoch):
            for index in self.epoch_indices(e)[offset if e == epoch else 0:]:
                yield e, index

    def rank_share(self, start: int, rank: int, world: int, micro_batch: int) -> Iterator[tuple[int, int]]:
        """Rank `rank`'s (epoch, index) pairs from global sample `start` on: of every micro_batch x
        world samples of the stream, the rank-th run of micro_batch."""
        stream = self.stream(start)
        while True:
            chunk = list(itertools.islice(stream, micro_batch * world))
            yield from chunk[rank * micro_batch:(rank + 1) * micro_batch]


class RankSampler(torch.utils.data.Sampler):
    """A DataLoader sampler over this rank's share of a `SampleOrder` from a global sample on. It
    yields (epoch, index) pairs without end, so the dataset sees the epoch in each item (workers that
    live for the whole run never miss an epoch change) and one DataLoader serves the whole run."""

    def __init__(self, order: SampleOrder, start: int, rank: int, world: int, micro_batch: int):
        super().__init__()
        self.order, self.start, self.rank, self.world, self.micro_batch = order, start, rank, world, micro_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.order.rank_share(self.start, self.rank, self.world, self.micro_batch)


__all__ = ["RankSampler", "SampleOrder"]
