"""What a benchmark ran on: CPU or GPU, cores, torch, load average; page cache and disk sizes."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["summary"] = (info["gpu"] if "gpu" in info else
                       f"{info['cpu']}, {usable} usable cores, {info['torch_threads']} torch threads")
    return info


def load_note(machine: dict) -> str | None:
    """A caveat when other processes were competing for the CPU at the start or end of the run."""
    start, end = machine.get("load_average_1m"), machine.get("load_average_1m_end")
    cores = machine.get("cpu_cores_usable") or 1
    loads = [x for x in (start, end) if x is not None]
    if loads and max(loads) > 0.5 * cores:
        seen = " and ".join(f"{x:.2f} at the {when}" for x, when in ((start, "start"), (end, "end")) if x is not None)
        return (f"1-minute load average was {seen} of the run on {cores} cores: other processes may have slowed "
                "some measurements; ratios (same run, interleaved) are more reliable than absolute numbers")
    return None


# ------------------------------------------------------------------------------------ page cache

def drop_page_cache() -> bool:
    """Ask the kernel to drop clean page-cache pages (needs root); True if it did."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
