"""Process-wide settings are applied once, by entry points, and nowhere else."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from sparsegps.runtime import configure_process

ROOT = Path(__file__).resolve().parents[1]


def test_configure_process_flushes_denormals_and_sets_threads():
    threads = torch.get_num_threads()
    applied = configure_process(threads=1)
    try:
        assert applied["threads"] == 1 and torch.get_num_threads() == 1
        subnormal = torch.tensor([1e-40], dtype=torch.float32)  # below float32's smallest normal
        assert (subnormal * 1.0).item() == 0.0
        assert torch.tensor([1e-37]).mul(1.0).item() != 0.0  # normal values are untouched
    finally:
        torch.set_num_threads(threads)


def test_malloc_policy_applies_on_glibc_and_can_be_kept():
    script = "from sparsegps.runtime import configure_process; print(configure_process()['malloc'])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith("glibc: mmap >= 1 MiB") or out.startswith("unchanged (not glibc)")
    kept = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "SPARSEGPS_MALLOC": "default"}).stdout
    assert kept.strip() == "unchanged (SPARSEGPS_MALLOC=default)"
    if out.startswith("glibc"):
        eight = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env={**__import__("os").environ, "SPARSEGPS_MALLOC": "8"}).stdout
        assert eight.startswith("glibc: mmap >= 8 MiB")


# Entry points may set process state; library modules may not.
# (bench attention --quick on CPU turns the Triton interpreter on before the kernels are imported)
ENTRY_POINTS = {"sparsegps/runtime.py", "sparsegps/cli.py", "sparsegps/launch.py", "benchmarks/bench_spatial_attention.py"}
GLOBAL_STATE = re.compile(r"set_flush_denormal|set_num_threads|os\.environ\[[^]]+\]\s*=|os\.environ\.(update|setdefault)")


def test_library_modules_change_no_global_state():
    offenders = []
    for path in sorted((ROOT / "sparsegps").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ENTRY_POINTS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if GLOBAL_STATE.search(line.split("#")[0]):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


def test_resident_memory_follows_what_the_process_touches():
    import numpy as np

    from sparsegps.train.meter import resident_memory_mb

    before = resident_memory_mb()
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, written
    during = resident_memory_mb()
    del block
    after = resident_memory_mb()
    assert during - before > 150  # a block this large is mapped on its own and unmapped when freed
    assert during - after > 150


def test_free_heap_pages_go_back_to_the_system():
    """Small blocks freed between live ones stay resident in glibc's heap until the loop's
    `release_free_memory`; without the policy (SPARSEGPS_MALLOC=default) it does nothing."""
    script = """
import numpy as np
from sparsegps.runtime import configure_process, release_free_memory
from sparsegps.train.meter import resident_memory_mb
applied = configure_process()["malloc"]
blocks = [np.ones(64 * 1024 // 8) for _ in range(4000)]  # 250 MiB of 64 KiB blocks, under the mmap threshold
keep = blocks[::50]  # one in 50 stays alive, spread through the heap
del blocks
before = resident_memory_mb()
release_free_memory()
print(before - resident_memory_mb())
print(applied)
"""
    import os

    for setting in ("", "default"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "SPARSEGPS_MALLOC": setting}).stdout.splitlines()
        if not out[1].startswith("glibc") and setting == "":
            return  # not glibc: nothing to check
        released = float(out[0])
        assert released > 150 if setting == "" else released < 20, (setting, out)
