"""One export format: an export of each task round-trips through `sparsegps.load_model` with equal
outputs and its metadata; an earlier version's pickled `.pt` export still loads; the safetensors
file holds tensors and JSON only (no pickle)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import sparsegps
from sparsegps.config import to_dict
from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, write_scenes
from sparsegps.exports import EXPORT_FORMAT, ExportInfo, save_export
from sparsegps.models.backbone import SpUNetConfig
from sparsegps.models.gps import GPSModel
from sparsegps.models.seg_heads import SegmentationModel, SegModelConfig

from helpers import TINY_MODEL, VOCAB, make_scene, tiny_model_config


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("export-data")
    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"s{i}", 400, 3) for i in range(2)], out, vocabulary=VOCAB, progress=False)
    ds = ScenesDataset(out, TransformConfig(voxel_size=0.1, augment=False))
    return collate_scenes([ds[0], ds[1]])


def gps_model() -> GPSModel:
    torch.manual_seed(0)
    return GPSModel(tiny_model_config()).eval()


def segmentation_model() -> SegmentationModel:
    torch.manual_seed(0)
    cfg = SegModelConfig(backbone=SpUNetConfig(**TINY_MODEL["backbone"]))
    return SegmentationModel(cfg, VOCAB).eval()


def outputs(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(batch)
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("task", ["pretraining", "grounding", "segmentation"])
def test_an_export_of_each_task_round_trips_with_equal_outputs(task, batch, tmp_path):
    model = segmentation_model() if task == "segmentation" else gps_model()
    info = ExportInfo(task=task, model_config=to_dict(model.cfg), vocabulary=VOCAB, voxel_size=0.1, trained_classes=VOCAB[:4],
                      holdout_classes=VOCAB[4:], preset="dense", labels_consumed=["texts", "voxel_classes"], step=7)
    path = save_export(tmp_path / "export.safetensors", model.state_dict(), info)
    loaded, got = sparsegps.load_model(path, device="cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert (got.task, got.voxel_size, got.preset, got.step, got.trained_classes, got.holdout_classes) == (
        task, 0.1, "dense", 7, VOCAB[:4], VOCAB[4:])
    assert got.sparsegps_version == sparsegps.__version__
    expected, actual = outputs(model, batch), outputs(loaded, batch)
    assert expected.keys() == actual.keys() and len(expected) > 0
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_an_earlier_pickled_export_still_loads(batch, tmp_path):
    model = gps_model()
    old = tmp_path / "export.pt"  # as earlier versions wrote it
    torch.save({"format": EXPORT_FORMAT, "task": "pretraining", "model_config": to_dict(model.cfg),
                "vocabulary": VOCAB, "voxel_size": 0.1, "state_dict": model.state_dict()}, old)
    loaded, info = sparsegps.load_model(old)
    assert info.task == "pretraining" and info.voxel_size == 0.1 and info.vocabulary == VOCAB
    expected, actual = outputs(model, batch), outputs(loaded, batch)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_the_safetensors_file_is_tensors_and_json_only(tmp_path):
    model = gps_model()
    path = save_export(tmp_path / "export.safetensors", model.state_dict(),
                       ExportInfo(task="pretraining", model_config=to_dict(model.cfg)))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__")
    assert set(metadata) == {"format", "sparsegps", "content_hash"} and json.loads(metadata["sparsegps"])["task"] == "pretraining"
    # every byte after the header belongs to exactly one tensor, laid end to end: nothing else is stored
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - length
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert set(header) == set(model.state_dict())
    assert all(set(entry) == {"dtype", "shape", "data_offsets"} for entry in header.values())


def test_a_damaged_or_edited_export_is_refused_and_non_finite_weights_are_not_written(tmp_path):
    """An export records a hash of its tensors and metadata: random bytes in a tensor, or the voxel
    size edited in its header, are refused on load in one line; weights with a NaN are not exported."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparsegps.errors import UsageError
    from sparsegps.exports import ExportInfo, read_export, save_export

    state = {"w": torch.randn(64, 64), "n": torch.tensor(3)}
    path = save_export(tmp_path / "a.safetensors", state, ExportInfo(task="pretraining", model_config={},
                                                                      voxel_size=0.1))
    assert torch.equal(read_export(path).state_dict["w"], state["w"])
    raw = bytearray(path.read_bytes())
    raw[-100:-96] = bytes(b ^ 0xFF for b in raw[-100:-96])  # inside the last tensor's data
    (tmp_path / "b.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="differ from what was exported"):
        read_export(tmp_path / "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edited = json.loads(header["sparsegps"])
    edited["voxel_size"] = 0.05
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={**header, "sparsegps": json.dumps(edited)})
    with pytest.raises(UsageError, match="differ from what was exported"):
        read_export(tmp_path / "c.safetensors")
    no_hash = {k: v for k, v in header.items() if k != "content_hash"}  # as earlier versions wrote them
    save_file(tensors, str(tmp_path / "e.safetensors"), metadata={**no_hash, "sparsegps": "{half-writ"})
    with pytest.raises(UsageError, match="e.safetensors: its sparsegps metadata is not readable"):
        read_export(tmp_path / "e.safetensors")
    with pytest.raises(UsageError, match="w holds non-finite values"):
        save_export(tmp_path / "d.safetensors", {"w": torch.tensor([1.0, float("nan")])},
                    ExportInfo(task="pretraining", model_config={}))
    assert not (tmp_path / "d.safetensors").exists()
