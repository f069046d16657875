"""Process-wide settings, applied once at start-up by entry points (the `sparsegps` command, the
demo, the recipes, each benchmark and the workers they fork). Library modules never change
global state; they may assume these settings hold.

- Denormals are flushed to zero on CPU: spconv's CPU kernels run about ten times slower on the
  subnormal values that small gradients reach.
- Hugging Face libraries stay offline: weights come from local directories, never a hub.
- glibc's malloc keeps a fixed mmap threshold and returns freed heap tops to the system. Its
  default raises the threshold each time a large block is freed, after which every tensor of
  a varying-size batch comes from the heap, which fragments: a long CPU fine-tuning's resident
  memory then grows several-fold and its steps slow down. Mapping every block of 1 MiB or more
  costs page faults instead (about 10% of a `tiny_cpu` pre-training step's time on 2 cores, 1.0
  against 1.7 GB resident after 60 steps). `SPARSEGPS_MALLOC=default` keeps glibc's own policy,
  `SPARSEGPS_MALLOC=8` sets the threshold in MiB; other C libraries are left alone. Smaller blocks
  still fragment the heap: the training loop hands its free pages back at every logged step
  (`release_free_memory`, glibc's `malloc_trim`).
- `threads` sets torch's intra-op thread count where a caller asks for one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks of at least 1 MiB are mapped on their own and unmapped when freed."""
TRIM_THRESHOLD_BYTES = 64 << 20
"""Free memory above 64 MiB at the top of the heap goes back to the system."""

_applied: dict | None = None
_malloc_trim = None  # glibc's malloc_trim once the policy is applied, else None


def configure_process(threads: int | None = None) -> dict:
    """Apply the process-wide settings (once; later calls only change `threads`). Returns what was
    applied: {"flush_denormal", "hf_offline", "malloc", "threads"}."""
    global _applied
    if threads is not None:
        torch.set_num_threads(threads)
    if _applied is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        _applied = {"flush_denormal": bool(torch.set_flush_denormal(True)), "hf_offline": True,
                    "malloc": _configure_malloc()}
    return dict(_applied, threads=torch.get_num_threads())


def _configure_malloc() -> str:
    """'glibc: mmap >= 1 MiB, trim > 64 MiB', or why nothing was changed."""
    setting = os.environ.get("SPARSEGPS_MALLOC", "")
    if setting == "default":
        return "unchanged (SPARSEGPS_MALLOC=default)"
    mmap_bytes = int(float(setting) * 2**20) if setting else MMAP_THRESHOLD_BYTES  # MiB
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl and macOS have no mallopt of this meaning
    except (OSError, AttributeError, TypeError):
        return "unchanged (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, mmap_bytes) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return "unchanged (mallopt refused)"
    global _malloc_trim
    _malloc_trim = libc.malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return f"glibc: mmap >= {mmap_bytes / 2**20:g} MiB, trim > {TRIM_THRESHOLD_BYTES >> 20} MiB"


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim(0)`, a few milliseconds):
    a long run's varying-size blocks under the mmap threshold leave free chunks all through the heap,
    which glibc otherwise keeps resident. Does nothing unless `configure_process` set the policy."""
    if _malloc_trim is not None:
        _malloc_trim(0)
