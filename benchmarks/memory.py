"""Peak memory of one call: process RSS sampled in a thread on CPU, the allocator's peak on CUDA."""
from __future__ import annotations

import ctypes
import gc
import threading
from typing import Callable

import torch


CPU_MEMORY_METHOD = ("process RSS sampled every 1 ms by a background thread (psutil), peak minus the RSS "
                     "before the call, after malloc_trim(0) handed freed heap pages back to the OS (else "
                     "memory freed by earlier runs and reused would not show)")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during the call minus memory allocated before it"


class _RssSampler:
    """Peak resident set size of this process while the context is open, sampled in a thread."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _release_free_heap() -> None:
    """Return memory that glibc's allocator keeps after frees to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak extra memory (bytes) that one call of `fn` needs on `device` (see *_MEMORY_METHOD)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(int(torch.cuda.max_memory_allocated() - base), 0)
    _release_free_heap()
    with _RssSampler() as sampler:
        fn()
    return max(int(sampler.peak - sampler.start), 0)


def memory_method(device: str) -> str:
    return CUDA_MEMORY_METHOD if torch.device(device).type == "cuda" else CPU_MEMORY_METHOD
