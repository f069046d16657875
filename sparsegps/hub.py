"""Hub-style model folders: what a Hugging Face Hub model repository holds, written from an export,
and found again by path or by repo id in the local cache (never downloaded at run time).

    DIR/model.safetensors   the export itself (weights and `ExportInfo` in its header)
    DIR/config.json         the same `ExportInfo` as JSON (what the Hub shows and tools read)
    DIR/README.md           a model card: preset, labels consumed, held-out classes, training data,
                            steps, and the numbers measured in the run folder, each with its conditions

`sparsegps.load_model` (every command that takes a model) accepts such a folder or a repo id
("owner/name") cached by `huggingface-cli download`, as well as an export file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from sparsegps.errors import UsageError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The export file that `path` names: the file itself, a Hub-style folder's weights, or those of
    a repo id in the local Hugging Face cache (offline; one line when it is not cached)."""
    p = Path(path)
    if p.is_dir():
        if not (p / WEIGHTS_NAME).is_file():
            raise UsageError(f"{p}: a folder without {WEIGHTS_NAME}; write one with `sparsegps export EXPORT --hub DIR`")
        return p / WEIGHTS_NAME
    if p.exists() or not _REPO_ID.fullmatch(str(path)):
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(str(path), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise UsageError(f"{path}: neither a file nor a model in the local Hugging Face cache ({HF_HUB_CACHE}); "
                         f"sparsegps never downloads at run time: `huggingface-cli download {path}` first") from None
    return resolve_model_path(folder)


def write_hub_folder(export_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """`folder` as a Hub model repository of the export at `export_path`; the model card reads the
    numbers of the export's run folder (summary.json, grounding.json, config.yaml) where they exist."""
    from sparsegps.exports import read_export
    from sparsegps.files import atomic_write_text, fsync_dir

    export = read_export(export_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    shutil.copyfile(export.path, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / WEIGHTS_NAME)
    fsync_dir(folder)
    info = dataclasses.asdict(export.info)
    atomic_write_text(folder / CONFIG_NAME, json.dumps({"library_name": "sparsegps", **info}, indent=1))
    atomic_write_text(folder / CARD_NAME, model_card(info, Path(export.path).parent, export.state_dict))
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_card(info: dict, run: Path, state_dict: dict) -> str:
    """The model card: what the model is, what it consumed, and what was measured, with conditions."""
    import yaml

    config = {}
    if (run / "config.yaml").is_file():
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    summary, grounding = _read_json(run / "summary.json"), _read_json(run / "grounding.json")
    parameters = sum(t.numel() for k, t in state_dict.items() if t.dtype.is_floating_point and "running" not in k)
    data = config.get("data", {})
    steps = summary.get("pretrain_steps", summary.get("seg_steps", summary.get("ground_steps", info.get("step"))))
    rows = [("task", info["task"]), ("preset", info.get("preset") or "-"),
            ("labels consumed", ", ".join(info.get("labels_consumed") or []) or "-"),
            ("held-out classes", (", ".join(info.get("holdout_classes") or []) or "none")
             + (f" (hold-out: {info['holdout']})" if info.get("holdout") else "")),
            ("training data", ", ".join(map(str, data.get("train", []))) or info.get("source") or "-"),
            ("training scenes", summary.get("train_scenes", "-")), ("optimizer steps", steps if steps is not None else "-"),
            ("global batch", config.get("global_batch", "-")), ("voxel size (m)", info.get("voxel_size")),
            ("parameters", f"{parameters / 1e6:.2f} M"), ("sparsegps version", info.get("sparsegps_version") or "-")]
    lines = ["---", "library_name: sparsegps", "tags: [3d, point-cloud, vision-language, sparse-convolution]", "---", "",
             f"# {info.get('preset') or info['task']} model (sparsegps)", "",
             "Load with `sparsegps.load_model(\"<this folder or repo id>\")`; fine-tune with "
             "`sparsegps finetune-seg --pretrained <this folder>`.", "",
             "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "", "## Measured", ""]
    measured = []
    val = ", ".join(map(str, data.get("val", []))) or "the validation data of the run"
    for key, value in summary.items():
        if isinstance(value, float) and (key.endswith(("_miou", "_accuracy", "scenes_per_s")) or key == "loss"):
            where = ("training throughput" if key.endswith("scenes_per_s") else
                     "final training loss" if key == "loss" else f"on {val}")
            measured.append(f"| {key} | {value:.4g} | {where} |")
    if grounding:
        referrals = grounding.get("referrals", "?")
        for key in ("accuracy", "class_prior", "within_class_accuracy"):
            if isinstance(grounding.get(key), (int, float)):
                measured.append(f"| grounding {key} | {grounding[key]:.4g} | {referrals} referrals of "
                                f"{grounding.get('data', 'the evaluated rooms')} |")
    lines += (["| number | value | conditions |", "| --- | ---: | --- |", *measured] if measured
              else ["Nothing was measured in the run folder."])
    return "\n".join(lines) + "\n"
