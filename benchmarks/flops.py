"""Forward (and backward) FLOPs of a call, as torch's flop counter sees them."""
from __future__ import annotations

from typing import Callable


def count_flops(fn: Callable[[], object]) -> int | None:
    """FLOPs of the aten matmul / convolution / attention ops `fn` runs (forward and, if `fn`
    calls backward, backward), via torch.utils.flop_counter.FlopCounterMode.

    Only ops dispatched through aten are seen: spconv's native algorithm (CPU) runs its
    gather-GEMM-scatter through torch.mm and is counted, its implicit-GEMM CUDA kernels are not.
    Returns None where the counter cannot run.
    """
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except RuntimeError:
        return None
    return int(counter.get_total_flops())
