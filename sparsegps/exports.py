"""Exports: a trained model's weights and everything that rebuilds it, in one self-describing file.

`RUN/export.safetensors` holds the fp32 state dict as safetensors (tensors only: reading one runs
no code) and, in the file's header under "sparsegps", the metadata (`ExportInfo`) as JSON:

    task             pretraining, segmentation or grounding
    model_config     the model's config (GPSModel's, or the segmentation model's)
    vocabulary       segmentation: the head's classes; otherwise the training store's classes
    trained_classes  the classes whose labels pre-training consumed (without `holdout_classes`)
    holdout_classes  the classes held out of pre-training
    holdout          what was withheld from them: labels (texts kept) or strict (texts dropped too)
    preset           language, objects or dense: named by `labels_consumed`
    labels_consumed  texts, object_classes, voxel_classes
    voxel_size       the voxel size it was trained at (read back here, and only here)
    sparsegps_version, source (the run folder), step

`load_model(path, device)` returns the model and its `ExportInfo`, whatever the task; every command,
fine-tuning and picture loads through it. Exports of earlier versions (`.pt`: a pickled dict of
tensors and plain data, read with `torch.load(weights_only=True)`) still load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sparsegps import __version__
from sparsegps.errors import UsageError

EXPORT_FORMAT = "sparsegps-export"
EXPORT_NAME = "export.safetensors"
# backbone: a U-Net alone, read from another framework's checkpoint (`models.pointcept`)
Task = Literal["pretraining", "segmentation", "grounding", "backbone"]
TASKS: tuple[str, ...] = ("pretraining", "segmentation", "grounding")
HOW_TO_EXPORT = f"write one with `sparsegps export RUN/checkpoints --out FILE` (training runs leave RUN/{EXPORT_NAME})"


@dataclass
class ExportInfo:
    """What an export says about itself (see the module docstring)."""

    task: Task
    model_config: dict
    vocabulary: list[str] = field(default_factory=list)
    voxel_size: float | None = None
    trained_classes: list[str] = field(default_factory=list)
    holdout_classes: list[str] = field(default_factory=list)
    holdout: str | None = None  # labels or strict (`PretrainDataConfig.holdout`); None: nothing held out
    preset: str | None = None
    labels_consumed: list[str] = field(default_factory=list)
    sparsegps_version: str = ""
    source: str = ""
    step: int | None = None

    def voxel_size_for(self, path, given: float | None = None) -> float:
        """The voxel size at which the model of export `path` reads scenes: `given` (a command's
        --voxel-size, said when it differs from the one the export records), else the recorded one."""
        if given is not None:
            if not given > 0:
                raise UsageError(f"--voxel-size must be positive, got {given}")
            if self.voxel_size is not None and abs(given - self.voxel_size) > 1e-9:
                print(f"note: {path} was trained at voxel size {self.voxel_size}; reading scenes at --voxel-size "
                      f"{given}", file=sys.stderr)
            return float(given)
        if self.voxel_size is None:
            raise UsageError(f"{path}: the export records no voxel size; give it with --voxel-size (eval-seg, "
                             f"eval-ground, eval-pretrain, show)")
        return float(self.voxel_size)

    @classmethod
    def from_state(cls, state: dict, **changes) -> "ExportInfo":
        """The fields of `state` (a checkpoint's client state, or an earlier version's export) that
        an ExportInfo has; `task` defaults to pretraining, the model config to a segmentation
        export's backbone config."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in state.items() if k in names}
        values.setdefault("task", "pretraining")
        if "model_config" not in values and "backbone_config" in state:  # earliest segmentation exports
            values["model_config"] = {"backbone": state["backbone_config"]}
        values.setdefault("model_config", {})
        return cls(**{**values, **changes})


@dataclass
class Export:
    """An export as read: where it came from, its metadata and its fp32 state dict."""

    path: Path
    info: ExportInfo
    state_dict: dict[str, torch.Tensor]


def save_export(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: ExportInfo) -> Path:
    """Write `state_dict` and `info` as a safetensors export, atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    from sparsegps.files import fsync_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = dataclasses.replace(info, sparsegps_version=info.sparsegps_version or __version__)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UsageError(f"{path}: not written: {bad} holds non-finite values (the run diverged, or its checkpoint "
                         f"is damaged)")
    metadata = json.dumps(dataclasses.asdict(info))
    header = {"format": EXPORT_FORMAT, "sparsegps": metadata, "content_hash": content_hash(tensors, metadata)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def read_export(path: str | os.PathLike) -> Export:
    """An export as written by `save_export`, or by an earlier version (`.pt`); one-line errors for
    a missing or unreadable file. `path` may also be a Hub-style model folder or a repo id in the
    local Hugging Face cache (`sparsegps.hub`), or a Pointcept SpUNet-v1m1 checkpoint (its U-Net)."""
    from sparsegps.hub import resolve_model_path

    path = resolve_model_path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such export file; {HOW_TO_EXPORT}")
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: the header's length (u64, little-endian), then its JSON
    if len(head) == 9 and int.from_bytes(head[:8], "little") < path.stat().st_size and head[8:] == b"{":
        return _read_safetensors(path)
    return _read_pickled(path)


def _read_safetensors(path: Path) -> Export:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"{path}: not a sparsegps export (unreadable: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}); {HOW_TO_EXPORT}") from None
    if header.get("format") != EXPORT_FORMAT or "sparsegps" not in header:
        raise UsageError(f"{path}: a safetensors file without sparsegps metadata; {HOW_TO_EXPORT}")
    recorded = header.get("content_hash")  # exports of earlier versions have none
    if recorded is not None and recorded != content_hash(state, header["sparsegps"]):
        raise UsageError(f"{path}: its weights or metadata differ from what was exported (the file is damaged or "
                         f"was edited); export the run again")
    try:
        info = ExportInfo.from_state(json.loads(header["sparsegps"]))
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{path}: its sparsegps metadata is not readable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}); export the run again") from None
    return Export(path, info, state)


def content_hash(tensors: dict[str, torch.Tensor], metadata: str) -> str:
    """A hash of every tensor (name, dtype, shape, bytes) and of the metadata: what an export records
    and `read_export` checks."""
    digest = hashlib.blake2b(metadata.encode(), digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_pickled(path: Path) -> Export:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickle with code in it
        raise UsageError(f"{path}: not a sparsegps export (unreadable: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]}); {HOW_TO_EXPORT}") from None
    if isinstance(blob, dict) and blob.get("format") != EXPORT_FORMAT and _is_pointcept(blob):
        return _read_pointcept(path, blob)
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{path}: not a sparsegps export (expected format {EXPORT_FORMAT!r}); {HOW_TO_EXPORT}")
    state = blob["state_dict"]
    if blob.get("task") == "segmentation":  # trained inside a loss wrapper: its keys began "model."
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return Export(path, ExportInfo.from_state(blob), state)


def _is_pointcept(blob: dict) -> bool:
    state = blob.get("state_dict", blob)
    return isinstance(state, dict) and any(str(k).endswith("conv_input.0.weight") for k in state)


def _read_pointcept(path: Path, blob: dict) -> Export:
    """A Pointcept SpUNet-v1m1 checkpoint (a training checkpoint, a `{"config", "state_dict"}` file,
    or a bare state dict) as the export of its U-Net (task "backbone")."""
    from sparsegps.models.pointcept import PointceptMismatch, from_pointcept

    try:
        cfg, state = from_pointcept(blob.get("state_dict", blob), str(path))
    except PointceptMismatch as e:
        raise UsageError(str(e)) from None
    ours = blob.get("sparsegps", {}) if isinstance(blob.get("sparsegps"), dict) else {}
    info = ExportInfo(task="backbone", model_config={"backbone": dataclasses.asdict(cfg)},
                      voxel_size=ours.get("voxel_size"), source=f"Pointcept SpUNet-v1m1 checkpoint {path}",
                      preset=ours.get("preset"), labels_consumed=list(ours.get("labels_consumed", [])))
    return Export(path, info, {f"backbone.{k}": v for k, v in state.items()})


def save_pointcept(export: Export, path: str | os.PathLike) -> Path:
    """The U-Net of `export` as a Pointcept SpUNet-v1m1 checkpoint: `{"config": SpUNet-v1m1's keyword
    arguments, "state_dict": its weights, "sparsegps": where they come from and what they expect}`,
    written atomically."""
    from sparsegps.config import from_dict
    from sparsegps.files import fsync_dir
    from sparsegps.models.backbone import SpUNetConfig
    from sparsegps.models.pointcept import INPUT_FEATURES, pointcept_config, to_pointcept

    backbone = export.info.model_config.get("backbone")
    if backbone is None:
        raise UsageError(f"{export.path}: a {export.info.task} export without a U-Net")
    cfg = from_dict(SpUNetConfig, backbone)
    state = {k.removeprefix("backbone."): v for k, v in export.state_dict.items() if k.startswith("backbone.")}
    info = export.info
    blob = {"config": pointcept_config(cfg), "state_dict": to_pointcept(state, cfg),
            "sparsegps": {"source": str(export.path), "task": info.task, "preset": info.preset,
                          "labels_consumed": list(info.labels_consumed), "voxel_size": info.voxel_size,
                          "input_features": INPUT_FEATURES, "step": info.step,
                          "sparsegps_version": info.sparsegps_version or __version__}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def load_weights(module: nn.Module, state_dict: dict, path: str | os.PathLike, strict: bool = True) -> None:
    """`module.load_state_dict`, failing with one line naming the export when the shapes differ."""
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UsageError(f"{path}: its weights do not fit this model ({detail[:300]}); use an export of the same "
                         f"architecture, or the config it was trained with") from None


def expect_task(export: Export, tasks: tuple[str, ...], purpose: str) -> None:
    """One line when the export's task is not one of `tasks`."""
    if export.info.task not in tasks:
        raise UsageError(f"{export.path}: a {export.info.task} export; {purpose} needs a "
                         f"{' or '.join(tasks)} export")


def read_starting_export(path: str | os.PathLike, tasks: tuple[str, ...], purpose: str,
                         voxel_size: float) -> Export:
    """The export a training run starts from (`purpose` names the option): one of `tasks`, with a
    warning when it was trained at another voxel size than the run's (its features were learnt at
    that scale)."""
    import warnings

    export = read_export(path)
    expect_task(export, tasks, purpose)
    trained_at = export.info.voxel_size
    if trained_at is not None and abs(trained_at - voxel_size) > 1e-9:
        warnings.warn(f"{path} was trained at voxel size {trained_at}; this run reads scenes at {voxel_size} "
                      f"(data.transforms.voxel_size)", stacklevel=2)
    return export


def build_model(export: Export, device: torch.device | str = "cpu") -> nn.Module:
    """The model an export describes, with its weights, in eval mode: a `GPSModel` for pre-training
    and grounding exports, a `SegmentationModel` for segmentation ones."""
    from sparsegps.config import from_dict

    info = export.info
    if info.task == "segmentation":
        from sparsegps.models.seg_heads import LanguageSegHead, SegmentationModel, SegModelConfig

        cfg = from_dict(SegModelConfig, info.model_config)
        head = None
        if cfg.head == "language":  # its class embeddings are in the export: no text encoder to build
            head = LanguageSegHead(cfg.backbone.dec_channels[-1], export.state_dict["head.class_embeddings"])
        model = SegmentationModel(cfg, info.vocabulary, head=head)
    else:
        from sparsegps.models.gps import GPSModel, ModelConfig

        model = GPSModel(from_dict(ModelConfig, info.model_config))
    load_weights(model, export.state_dict, export.path)
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu",
               tasks: tuple[str, ...] = TASKS, purpose: str = "this") -> tuple[nn.Module, ExportInfo]:
    """The model of the export at `path` and its metadata; an export of a task not in `tasks` is
    refused in one line."""
    export = read_export(path)
    expect_task(export, tasks, purpose)
    return build_model(export, device), export.info


__all__ = ["EXPORT_NAME", "Export", "ExportInfo", "TASKS", "build_model", "expect_task",
           "load_model", "load_weights", "read_export", "save_export"]
