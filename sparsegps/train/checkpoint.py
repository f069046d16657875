"""Atomic, verifiable DeepSpeed checkpoints that keep the last K, resumable on any number of ranks,
and their consolidated fp32 state (which `sparsegps.exports` writes as an export).

A checkpoint is written by `engine.save_checkpoint` under a hidden temporary tag, with each rank's
RNG states beside it, described by a manifest (every file with its size and content hash, the world
size and ZeRO stage that wrote it), then renamed to `step<N>`; `latest` is rewritten atomically
last. On resume and export the newest checkpoint whose files match their manifest (sizes, then
hashes: read once, on rank 0) and which loads is used; a partial or damaged one is skipped with a
warning naming it, and when none loads the error says why for each. A checkpoint that fails to be
written (a full disk) is removed whole, with one line naming the folder; earlier ones stay.

A checkpoint written by another number of ranks loads too. Without ZeRO every rank holds the whole
optimizer state, so nothing changes. Under ZeRO 1-3 each rank's file holds its partition, so the
checkpoint is first converted (once, on rank 0) into DeepSpeed's universal checkpoint
(`ds_to_universal`, in `step<N>/universal`), which any number of ranks loads
(`load_universal_checkpoint`). DeepSpeed's universal load restores the parameters the optimizer
holds, not buffers (BatchNorm statistics) nor frozen parameters; those are taken from the
checkpoint's consolidated state. Ranks then start from RNG states seeded by (seed, step, rank):
per-rank states of another world size have no rank to go to.

The directory must be on a file system every rank sees (one machine, or a shared file system across
nodes; `setup_run` checks it at start).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sparsegps.errors import UsageError
from sparsegps.exports import ExportInfo, save_export
from sparsegps.files import atomic_write_text

MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # the folder of a checkpoint's universal conversion, inside it


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_ranks_succeeded(ok: bool) -> bool:
    """Whether `ok` holds on every rank (one collective), so that all ranks take the same branch."""
    if not dist.is_initialized():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    failed = torch.tensor([0.0 if ok else 1.0], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(failed)
    return failed.item() == 0


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


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Python, numpy and torch RNGs seeded from (seed, step, rank): a rank's start on resharding."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def _step_tags(directory: Path) -> list[str]:
    """Finished checkpoint tags, newest first."""
    tags = [p.name for p in directory.glob("step*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(tags, key=lambda t: int(t[4:]), reverse=True)


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (a full disk, a quota); it was removed, earlier ones stay."""


def file_hash(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _no_space(error: BaseException) -> bool:
    """An error of a write that ran out of space (torch's zip writer reports it as a failed
    'unexpected pos' check, not as ENOSPC)."""
    text = str(error)
    return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
            or "unexpected pos" in text or "Disk quota" in text)


def save_checkpoint(engine, directory: str | Path, step: int, client_state: dict, keep: int) -> Path:
    """Save through DeepSpeed into `directory/step<step>` atomically; prune to the newest `keep`.
    A save that fails on any rank removes the partial checkpoint and raises on every rank
    (`CheckpointWriteError`, one line naming the folder, when the disk is full)."""
    directory = Path(directory)
    tag = f"step{step}"
    tmp_tag = f".tmp-{tag}"
    tmp = directory / tmp_tag
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    failure = None
    try:
        engine.save_checkpoint(str(directory), tag=tmp_tag, client_state=client_state, save_latest=False)
        # DeepSpeed keeps rank 0's client state only; each rank's RNG streams differ (MLM masks, dropout)
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    except (OSError, RuntimeError) as e:
        failure = e
    if not _all_ranks_succeeded(failure is None):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        free = shutil.disk_usage(directory).free if directory.exists() else 0
        if failure is None:
            raise CheckpointWriteError(f"writing checkpoint {directory / tag} failed on another rank; the partial "
                                       f"checkpoint was removed, earlier ones are kept")
        if _no_space(failure):
            raise CheckpointWriteError(
                f"no space left on the disk of {directory} ({free / 2**20:.1f} MiB free) while writing checkpoint "
                f"{tag}: the partial checkpoint was removed and earlier ones are kept; free some space (or lower "
                f"keep_checkpoints), then run the same command with --resume auto") from None
        raise CheckpointWriteError(f"writing checkpoint {directory / tag} failed ({type(failure).__name__}: "
                                   f"{str(failure).splitlines()[0][:200] if str(failure) else ''}); the partial "
                                   f"checkpoint was removed, earlier ones are kept") from failure
    final = directory / tag
    if _rank() == 0:
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
        hashes = {str(p.relative_to(tmp)): file_hash(p) for p in paths}
        manifest = {"step": step, "world_size": _world(), "zero_stage": int(engine.zero_optimization_stage()),
                    "files": files, "blake2b": hashes}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(directory / "latest", tag)
        for old in _step_tags(directory)[keep:]:
            shutil.rmtree(directory / old, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(path: Path, content: bool = False) -> str | None:
    """None when the checkpoint at `path` is complete (every file of its manifest there, of its size;
    with `content`, also of its hash, where the manifest records hashes), else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest (partial checkpoint)"
    try:
        described = json.loads(manifest.read_text())
        files, hashes = described["files"], described.get("blake2b", {})
    except (ValueError, KeyError, AttributeError) as e:
        return f"unreadable manifest ({e})"
    for name, size in files.items():
        p = path / name
        if not p.exists():
            return f"missing file {name}"
        if p.stat().st_size != size:
            return f"file {name} has {p.stat().st_size} bytes, the manifest says {size}"
    if content:
        for name, expected in hashes.items():
            if file_hash(path / name) != expected:
                return f"file {name} is damaged (its content hash differs from the manifest's)"
    return None


def _verified_on_rank0(path: Path) -> str | None:
    """`verify_checkpoint(path, content=True)` read on rank 0 alone, its answer on every rank."""
    answer = [verify_checkpoint(path, content=True) if _rank() == 0 else None]
    if dist.is_initialized() and _world() > 1:
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its folder, step, and the world size and ZeRO stage that wrote it
    (None when an older manifest does not say)."""

    path: Path
    step: int
    world_size: int
    zero_stage: int | None

    @property
    def tag(self) -> str:
        return self.path.name


def complete_checkpoints(directory: str | Path) -> tuple[list[Checkpoint], dict[str, str]]:
    """The complete checkpoints in `directory`, newest first, and what is wrong with the others
    ({tag: problem})."""
    directory = Path(directory)
    found, problems = [], {}
    for tag in _step_tags(directory) if directory.is_dir() else []:
        path = directory / tag
        problem = verify_checkpoint(path)
        if problem is not None:
            problems[tag] = problem
            continue
        manifest = json.loads((path / MANIFEST).read_text())
        world = manifest.get("world_size") or len(list(path.glob("rng_rank*.pt"))) or 1
        found.append(Checkpoint(path, int(tag[4:]), int(world), manifest.get("zero_stage")))
    return found, problems


def _universal_folder(checkpoint: Checkpoint) -> Path:
    """`checkpoint` as a DeepSpeed universal checkpoint, converted on rank 0 when not done before
    (every rank calls this; all of them raise when the conversion failed)."""
    folder = checkpoint.path / UNIVERSAL
    tmp = checkpoint.path / f".tmp-{UNIVERSAL}"
    outcome = [None]
    if _rank() == 0 and not folder.is_dir():
        try:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(tmp, ignore_errors=True)
            print(f"converting {checkpoint.path} (written by {checkpoint.world_size} ranks) to a universal "
                  f"checkpoint for {_world()} ranks", flush=True)
            # in this process (no worker pool forked from a process that holds a process group)
            args = argparse.Namespace(input_folder=str(checkpoint.path), output_folder=str(tmp),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints every stage and its arguments
                ds_to_universal(args)
            (checkpoint.path / "latest_universal").unlink(missing_ok=True)  # names the temporary folder
            tmp.rename(folder)
        except Exception as e:  # noqa: BLE001 (any failure of the conversion is reported the same way)
            outcome[0] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RuntimeError(f"converting it to a universal checkpoint failed ({outcome[0]})")
    return folder


def _restore_what_universal_loads_skip(engine, checkpoint: Checkpoint) -> None:
    """Buffers (BatchNorm statistics) and frozen parameters from the checkpoint's consolidated state:
    DeepSpeed's universal load restores only the parameters its optimizer holds."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    module = engine.module
    frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad and name in state]
    with torch.no_grad(), deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0,
                                                            enabled=engine.zero_optimization_stage() == 3):
        for name, p in frozen:
            p.copy_(state[name])
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in state:
                buffer.copy_(state[name])


def _load(engine, checkpoint: Checkpoint) -> dict:
    """Load one checkpoint into `engine` (resharding it when another world size wrote it under
    ZeRO); returns its client state, with this rank's RNG states under "rng" when it has its own."""
    reshard = checkpoint.world_size != _world() and engine.zero_optimization_stage() > 0
    # DeepSpeed reads this switch of its config only when loading a checkpoint
    engine._config.load_universal_checkpoint = reshard
    if reshard:
        folder = _universal_folder(checkpoint)
        path, client_state = engine.load_checkpoint(str(checkpoint.path), tag=folder.name)
    else:
        path, client_state = engine.load_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    if path is None:
        raise RuntimeError("DeepSpeed found nothing to load")
    if reshard:
        _restore_what_universal_loads_skip(engine, checkpoint)
    client_state.pop("rng", None)
    own_rng = checkpoint.path / f"rng_rank{_rank()}.pt"
    if checkpoint.world_size == _world() and own_rng.exists():
        client_state["rng"] = torch.load(own_rng, weights_only=True)
    return client_state


def load_latest_checkpoint(engine, directory: str | Path) -> tuple[Checkpoint, dict] | None:
    """Load the newest complete checkpoint that loads; returns it and its client state, or None when
    `directory` holds no checkpoint at all. Checkpoints that fail are skipped with a warning naming
    them; when checkpoints exist and none loads, a UsageError says why for each.

    Every rank must call it: the ranks agree after each attempt, so they load the same one."""
    directory = Path(directory)
    checkpoints, problems = complete_checkpoints(directory)
    for tag, problem in problems.items():
        warnings.warn(f"checkpoint {directory / tag} is unusable: {problem}; trying the previous one", stacklevel=2)
    stage = engine.zero_optimization_stage()
    for checkpoint in checkpoints:
        if checkpoint.zero_stage is not None and checkpoint.zero_stage != stage:
            raise UsageError(f"{checkpoint.path} was written under ZeRO stage {checkpoint.zero_stage} and this run "
                             f"uses stage {stage}: resume with the DeepSpeed config the run started with")
        problem = _verified_on_rank0(checkpoint.path)
        if problem is not None:
            problems[checkpoint.tag] = problem
            warnings.warn(f"checkpoint {checkpoint.path} is unusable: {problem}; trying the previous one", stacklevel=2)
            continue
        try:
            client_state, problem = _load(engine, checkpoint), None
        except Exception as e:  # noqa: BLE001 (a corrupted tensor file, a failed conversion: try the previous one)
            client_state, problem = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if _all_ranks_succeeded(problem is None):
            return checkpoint, client_state
        problem = problem or "failed to load on another rank"
        if checkpoint.world_size != _world():
            problem = f"written by {checkpoint.world_size} ranks, this run has {_world()}: {problem}"
        problems[checkpoint.tag] = f"failed to load ({problem})"
        warnings.warn(f"checkpoint {checkpoint.path} is unusable: failed to load ({problem}); trying the previous "
                      f"one", stacklevel=2)
    if problems:
        listed = "; ".join(f"{tag}: {problem}" for tag, problem in problems.items())
        raise UsageError(f"no checkpoint in {directory} loads: {listed}; move the broken ones out of the folder to "
                         f"resume from an older one, or start afresh in another output_dir")
    return None


def remove_checkpoints(directory: str | Path) -> list[str]:
    """Delete every checkpoint in `directory` (a run that starts afresh there); returns their tags."""
    directory = Path(directory)
    tags = _step_tags(directory) if directory.is_dir() else []
    for tag in tags:
        shutil.rmtree(directory / tag, ignore_errors=True)
    (directory / "latest").unlink(missing_ok=True)
    return tags


def consolidated_state(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[dict, dict, str]:
    """The fp32 state dict of a DeepSpeed checkpoint (any ZeRO stage; the newest complete one when
    `tag` is None), its model-states file (DeepSpeed's entries and the client state the run saved
beside them) and its tag.

    ZeRO 1-3 keep fp32 master weights in their optimizer partitions, which DeepSpeed's
    `zero_to_fp32` merges; without ZeRO the module states are cast to fp32."""
    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        problems = {}
        for t in _step_tags(checkpoint_dir):
            problems[t] = verify_checkpoint(checkpoint_dir / t, content=True)
            if problems[t] is None:
                tag = t
                break
            warnings.warn(f"checkpoint {checkpoint_dir / t} is unusable: {problems[t]}; trying the previous one",
                          stacklevel=2)
        if tag is None:
            found = "; ".join(f"{t}: {p}" for t, p in problems.items())
            raise UsageError(f"{checkpoint_dir}: no complete checkpoint to export "
                             + (f"({found})" if found else "(expected step<N> folders written by a training run)"))
    else:
        problem = verify_checkpoint(checkpoint_dir / tag, content=True)
        if problem is not None:
            raise UsageError(f"{checkpoint_dir / tag}: {problem}")
    folder = checkpoint_dir / tag
    # "mp_rank_00_model_states.pt"; under ZeRO-3 "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states_file = sorted(folder.glob("*mp_rank_00_model_states.pt"), key=lambda p: len(p.name))[0]
    model_states = torch.load(states_file, map_location="cpu", weights_only=True)
    if list(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:
        state = model_states["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, {k: v for k, v in model_states.items() if k != "module"}, tag


def export_checkpoint(checkpoint_dir: str | Path, out_path: str | Path, tag: str | None = None,
                      source: str | None = None) -> Path:
    """Write the export of a training checkpoint (any ZeRO stage; the newest complete one by
    default): its consolidated fp32 weights, and the metadata the run saved beside them."""
    state, client, tag = consolidated_state(checkpoint_dir, tag)
    info = ExportInfo.from_state(client, step=client.get("step"), source=source or str(Path(checkpoint_dir).parent))
    if info.task == "segmentation":  # trained inside a loss wrapper before model and criterion were apart
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return save_export(out_path, state, info)
