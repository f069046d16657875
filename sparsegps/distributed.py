"""The collectives sparsegps issues, and the even split of held-out sets over ranks.

Every function here is a no-op in a single process. Each that communicates must be called by every
rank, in the same order (a rank that skips one leaves the others waiting until the collective
timeout, `dist_timeout_s`)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def leave() -> None:
    """End this process's part in a process group of several ranks, at the end of a command that
    succeeded on every rank: a barrier (no collective still in flight anywhere), then
    `destroy_process_group`, which stops the backend's worker threads while the interpreter is
    whole. Left to interpreter teardown, a gloo thread that releases a finished collective's tensors
    a moment late can take the GIL there and abort the process (SIGABRT) after a successful run.
    Every rank must call it. A world of one is left as it is: DeepSpeed keeps handles to the group it
    started with, and later commands in the same process (a notebook, the tests) run on it."""
    if world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a copy; no gradient). Every rank must call it, in the same order."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def gather_rows(x: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, int]:
    """Concatenate `x` [N_r, ...] over ranks, keeping the gradient path to every rank's rows.

    Returns the rows of all ranks and the index of this rank's first row. Ranks may hold different
    N_r, including none. GPS gathers with plain `all_gather`, which returns tensors that carry no
    gradient, so its scene-text loss trains nothing on several GPUs; the autograd-aware collective
    fixes that. `grad=False` is GPS's gather (on one rank `x` itself, as GPS skips the gather)."""
    if world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    if grad:
        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.detach().contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[: dist.get_rank()])


def even_shard(count: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's items of a held-out set of `count` items, as the same number on every rank.

    Items are dealt round-robin; a rank left short repeats an item (its flag False, so it is run
    but not counted). Every rank then runs the same number of batches, and each item counts once."""
    per_rank = math.ceil(count / world) if count else 0
    mine = list(range(rank, count, world))
    filler = mine[:1] or [0]
    return mine + filler * (per_rank - len(mine)), [True] * len(mine) + [False] * (per_rank - len(mine))


def gather_objects(items: list) -> list:
    """The concatenation of every rank's list of picklable `items`, in rank order (a copy on one
    rank). Every rank must call it, in the same order; for small evaluation records, not tensors."""
    if world_size() == 1:
        return list(items)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]
