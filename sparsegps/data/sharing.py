"""Arrays handed from DataLoader workers to the main process through shared memory.

A DataLoader worker sends what `__getitem__` (or the collate function) returns through a pipe,
pickled with `multiprocessing.reduction.ForkingPickler`. torch tensors go by shared memory (a file
descriptor and a size); numpy arrays, by default, are copied into the pickle byte by byte, read
back and copied again. `share_arrays_from_workers` registers a reduction that wraps each large
numeric array in a tensor (no copy) so it takes torch's shared-memory path, and unwraps it on
arrival (`tensor.numpy()`, no copy). It acts only inside DataLoader worker processes, and only on
`ForkingPickler`, so ordinary pickling is untouched.
"""
from __future__ import annotations

import numpy as np

# Below this size the pipe is cheaper than a shared-memory segment.
MIN_SHARED_BYTES = 1 << 16
_SHAREABLE_KINDS = "biuf"
_registered = False


def _array_from_tensor(tensor):
    return tensor.numpy()


def _reduce_array(array: np.ndarray):
    if array.nbytes >= MIN_SHARED_BYTES and array.dtype.kind in _SHAREABLE_KINDS and array.dtype.byteorder in "=|":
        import torch

        if not (array.flags.c_contiguous and array.flags.writeable):
            array = np.array(array)  # a writable, contiguous copy
        try:
            return _array_from_tensor, (torch.from_numpy(array),)
        except TypeError:  # a dtype torch does not have (e.g. uint32 on old torch)
            pass
    return array.__reduce__()


def share_arrays_from_workers() -> bool:
    """In a DataLoader worker, send numpy arrays to the main process through shared memory.
    Returns whether the reduction is (now) registered; outside a worker it does nothing."""
    global _registered
    if _registered:
        return True
    try:
        import torch.utils.data
    except ImportError:
        return False
    if torch.utils.data.get_worker_info() is None:
        return False
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(np.ndarray, _reduce_array)
    _registered = True
    return True
