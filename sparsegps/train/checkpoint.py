"""Atomic, verifiable DeepSpeed checkpoints that keep the last K, and the fp32 export.

A checkpoint is written by `engine.save_checkpoint` under a hidden temporary tag, with each rank's
RNG states beside it, described by a manifest (every file and its size), then renamed to `step<N>`; `latest` is rewritten atomically
last. On resume the newest checkpoint whose manifest matches the files on disk and which loads is
used; a partial or corrupt one is skipped with a warning naming it. The directory must be on a
file system every rank sees (one machine, or a shared file system across nodes).
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sparsegps.errors import UsageError
from sparsegps.files import atomic_write_text

MANIFEST = "manifest.json"
EXPORT_FORMAT = "sparsegps-export"
EXPORT_METADATA = ("step", "model_config", "backbone_config", "vocabulary", "voxel_size", "task")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain objects (safe to store and reload)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_tags(directory: Path) -> list[str]:
    """Finished checkpoint tags, newest first."""
    tags = [p.name for p in directory.glob("step*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(tags, key=lambda t: int(t[4:]), reverse=True)


def save_checkpoint(engine, directory: str | Path, step: int, client_state: dict, keep: int) -> Path:
    """Save through DeepSpeed into `directory/step<step>` atomically; prune to the newest `keep`."""
    directory = Path(directory)
    tag = f"step{step}"
    tmp_tag = f".tmp-{tag}"
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(directory), tag=tmp_tag, client_state=client_state, save_latest=False)
    # DeepSpeed keeps rank 0's client state only; each rank's RNG streams differ (MLM masks, dropout)
    torch.save(rng_state(), directory / tmp_tag / f"rng_rank{_rank()}.pt")
    _barrier()
    final = directory / tag
    if _rank() == 0:
        tmp = directory / tmp_tag
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(directory / "latest", tag)
        for old in _step_tags(directory)[keep:]:
            shutil.rmtree(directory / old, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete, else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest (partial checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, size in files.items():
        p = path / name
        if not p.exists():
            return f"missing file {name}"
        if p.stat().st_size != size:
            return f"file {name} has {p.stat().st_size} bytes, the manifest says {size}"
    return None


def load_latest_checkpoint(engine, directory: str | Path) -> dict | None:
    """Load the newest complete checkpoint; returns its client state, or None when there is none."""
    directory = Path(directory)
    if not directory.exists():
        return None
    for tag in _step_tags(directory):
        problem = verify_checkpoint(directory / tag)
        if problem is None:
            try:
                path, client_state = engine.load_checkpoint(str(directory), tag=tag)
            except Exception as e:  # a corrupted tensor file: fall back to the previous checkpoint
                problem = f"failed to load ({type(e).__name__}: {e})"
            else:
                if path is not None:
                    own_rng = directory / tag / f"rng_rank{_rank()}.pt"
                    if own_rng.exists():
                        client_state["rng"] = torch.load(own_rng, weights_only=True)
                    return client_state
                problem = "DeepSpeed found nothing to load"
        warnings.warn(f"checkpoint {directory / tag} is unusable: {problem}; trying the previous one",
                      stacklevel=2)
    return None


def export_state_dict(checkpoint_dir: str | Path, out_path: str | Path, tag: str | None = None,
                      extra: dict | None = None) -> Path:
    """Consolidate a DeepSpeed checkpoint (any ZeRO stage) into one fp32 state dict file.

    ZeRO 1-3 keep fp32 master weights in their optimizer partitions, which DeepSpeed's
    `zero_to_fp32` merges; without ZeRO the module states are cast to fp32."""
    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        tags = [t for t in _step_tags(checkpoint_dir) if verify_checkpoint(checkpoint_dir / t) is None]
        if not tags:
            raise UsageError(f"{checkpoint_dir}: no complete checkpoint to export (expected step<N> folders "
                             f"written by a training run)")
        tag = tags[0]
    folder = checkpoint_dir / tag
    # "mp_rank_00_model_states.pt"; under ZeRO-3 "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states_file = sorted(folder.glob("*mp_rank_00_model_states.pt"), key=lambda p: len(p.name))[0]
    model_states = torch.load(states_file, map_location="cpu", weights_only=True)
    metadata = {k: model_states[k] for k in EXPORT_METADATA if k in model_states}
    if list(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:
        state = model_states["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save({"format": EXPORT_FORMAT, "state_dict": state, "tag": tag, **metadata, **(extra or {})}, tmp)
    tmp.replace(out_path)
    return out_path


HOW_TO_EXPORT = "write one with `sparsegps export RUN/checkpoints --out FILE` (training runs leave RUN/export.pt)"


def load_export(path: str | Path) -> dict:
    """Read a file written by `export_state_dict` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such export file; {HOW_TO_EXPORT}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickle with code in it
        raise UsageError(f"{path}: not a sparsegps export (unreadable: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}); {HOW_TO_EXPORT}") from None
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{path}: not a sparsegps export (expected format {EXPORT_FORMAT!r}); {HOW_TO_EXPORT}")
    return blob


def load_weights(module: torch.nn.Module, state_dict: dict, path: str | Path, strict: bool = True) -> None:
    """`module.load_state_dict`, failing with one line naming the export when the shapes differ."""
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UsageError(f"{path}: its weights do not fit this model ({detail[:300]}); use an export of the same "
                         f"architecture, or the config it was trained with") from None
