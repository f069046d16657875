"""Grounding fine-tuning and benchmark evaluation: forced choices against hand-computed accuracy,
proposal boxes, the fine-tune -> export -> eval-ground round trip, and the command-line entry points."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sparsegps import cli
from sparsegps.config import from_dict
from sparsegps.errors import UsageError
from sparsegps.data import SceneStore, write_scenes
from sparsegps.eval.grounding import box_iou
from sparsegps.eval.grounding_model import (ProposalError, assign_points_to_boxes, evaluate_grounding,
                                            predict_referrals)
from sparsegps.models.gps import GPSModel, ModelConfig
from sparsegps.exports import EXPORT_FORMAT, load_model, read_export
from sparsegps.train.finetune_ground import GroundConfig, finetune_grounding

from helpers import ROOT, TINY_MODEL, VOCAB, make_scene

VOXEL = 0.15
REFERIT3D_SPLITS = {"overall", "easy", "hard", "view_dependent", "view_independent"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("ground-data")
    write_scenes([make_scene(rng, f"t{i}", 300, 2 + i % 3) for i in range(4)], root / "train", vocabulary=VOCAB,
                 progress=False)
    write_scenes([make_scene(rng, f"v{i}", 300, [5, 2, 4, 3][i]) for i in range(4)], root / "val",
                 vocabulary=VOCAB, progress=False)
    return root


class ScoreBySlot(nn.Module):
    """A grounding head whose score is the object's slot (sign +1: the last object wins, -1: the first)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, objects: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(objects.shape[1], dtype=objects.dtype, device=objects.device)
        return (self.sign * slots).expand(objects.shape[:2])


def forced_model(sign: float) -> GPSModel:
    model = GPSModel(from_dict(ModelConfig, TINY_MODEL))
    model.grounding_head = ScoreBySlot(sign)
    return model


def test_points_go_to_the_smallest_box_holding_them():
    boxes = np.array([[0, 0, 0, 4, 4, 4],          # [-2, 2]^3
                      [1, 1, 1, 1, 1, 1],          # [0.5, 1.5]^3, inside box 0
                      [10, 10, 10, 1, 1, 1]])
    xyz = np.array([[0, 0, 0], [1, 1, 1], [2, 0, 0], [5, 5, 5], [10.2, 9.9, 10.5]], dtype=np.float32)
    assert assign_points_to_boxes(xyz, boxes).tolist() == [0, 1, 0, -1, 2]
    assert assign_points_to_boxes(xyz, np.zeros((0, 6))).tolist() == [-1] * 5


@pytest.mark.parametrize("sign, pick", [(1.0, -1), (-1.0, 0)])
def test_forced_choice_matches_hand_computed_accuracy(shards, sign, pick):
    """Scores that always prefer the last (or first) object of a scene: padding must never win, and
    chunks that cut across scenes must map slots back to the right scene's instance ids."""
    store = SceneStore(shards / "val")
    expected = []  # (scene index, text index, chosen instance id, target id, distractors)
    for s in range(len(store)):
        scene = store[s]
        for k, t in enumerate(scene.texts):
            if t.kind == "referral":
                expected.append((s, k, scene.objects[pick].instance_id, t.target_id, len(t.distractor_ids)))
    model = forced_model(sign)
    predictions = predict_referrals(model, shards / "val", VOXEL, "cpu", batch_size=3, referral_chunk=3,
                                    progress=False)
    assert [(p.scene_index, p.text_index, p.predicted_id) for p in predictions] == [e[:3] for e in expected]

    report, records = evaluate_grounding(model, shards / "val", "nr3d", VOXEL, "cpu", batch_size=2,
                                         referral_chunk=2, progress=False)
    # make_scene gives every object one referral, so exactly one referral per scene is right: 4 of 14.
    assert report["splits"]["overall"] == {"accuracy": 4 / 14, "correct": 4, "total": 14}
    easy = [e for e in expected if e[4] <= 1]
    assert report["splits"]["easy"]["total"] == len(easy)
    assert report["splits"]["easy"]["correct"] == sum(e[2] == e[3] for e in easy)
    assert report["splits"]["view_independent"]["total"] == 14  # "the chair number 12" is not view-dependent
    assert report["random_pick_accuracy"] == pytest.approx(np.mean([1 / 5] * 5 + [1 / 2] * 2 + [1 / 4] * 4
                                                                   + [1 / 3] * 3))
    assert report["dataset"] == "nr3d" and report["scenes"] == 4 and report["referrals"] == 14
    assert [r["predicted_id"] for r in records] == [e[2] for e in expected]


def test_scanrefer_with_proposals_scores_the_chosen_proposal_box(shards, tmp_path):
    store = SceneStore(shards / "val")
    proposals = {}
    for s in range(len(store)):
        scene = store[s]
        gt = [np.concatenate([o.center, o.size]).tolist() for o in scene.objects]
        proposals[scene.scene_id] = [[50.0, 50, 50, 1, 1, 1]] + gt[::-1]  # the last one is the first object's box
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(proposals))
    ious, unique = [], []
    for s in range(len(store)):
        scene = store[s]
        chosen = np.array(proposals[scene.scene_id][-1])
        for t in scene.texts:
            if t.kind == "referral":
                target = scene.object_by_id()[t.target_id]
                ious.append(float(box_iou(chosen, np.concatenate([target.center, target.size]))))
                unique.append(not t.distractor_ids)
    ious, unique = np.array(ious), np.array(unique)

    report, records = evaluate_grounding(forced_model(1.0), shards / "val", "scanrefer", VOXEL, "cpu",
                                         proposals_path=path, batch_size=2, referral_chunk=4, progress=False)
    assert {r["predicted_id"] for r in records} == {5, 2, 4, 3}  # the last proposal: index = objects in the scene
    overall = report["splits"]["overall"]
    assert overall["correct@0.5"] == int((ious >= 0.5).sum()) and overall["correct@0.25"] == int((ious >= 0.25).sum())
    assert report["splits"]["unique"]["total"] == int(unique.sum())
    assert report["box_source"] == f"proposals from {path}" and report["random_pick_accuracy"] is None

    del proposals["v2"]
    path.write_text(json.dumps(proposals))
    with pytest.raises(ProposalError, match=r"proposals.json: no proposals for 1 of the 4 .*'v2'"):
        evaluate_grounding(forced_model(1.0), shards / "val", "scanrefer", VOXEL, "cpu", proposals_path=path,
                           progress=False)


def cli_overrides(shards: Path) -> list[str]:
    transforms = {"voxel_size": VOXEL, "augment": False, "max_referrals": 2}
    settings = {"steps": 3, "micro_batch": 2, "global_batch": 2, "num_workers": 0, "log_every": 1,
                "checkpoint_every": 3, "data.train": [str(shards / "train")], "data.val": [str(shards / "val")],
                "data.transforms": transforms, "data.eval_max_scenes": None, "model": TINY_MODEL,
                "loss.referral_object": 0.5, "optim.warmup_steps": 0}
    return [arg for k, v in settings.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def finetuned(shards, tmp_path_factory):
    """A tiny model fine-tuned from scratch through `sparsegps finetune-ground`."""
    out = tmp_path_factory.mktemp("ground-run")
    torch.manual_seed(0)
    rc = cli.main(["finetune-ground", "--config", str(ROOT / "configs/ground/synthetic_cpu.yaml"),
                   "--output-dir", str(out), *cli_overrides(shards)])
    assert rc == 0
    return out


def test_finetune_exports_a_grounding_model_and_reports_the_benchmark(finetuned):
    info = read_export(finetuned / "export.safetensors").info
    assert info.task == "grounding" and info.vocabulary == VOCAB and info.voxel_size == VOXEL and info.step == 3
    assert info.model_config["d_model"] == 32
    assert info.model_config["loss"] == {"object_text": 0.0, "scene_text": 0.0, "referral_object": 0.5,
                                         "grounding": 1.0, "mlm": 0.0, "object_class": 0.0, "dense_text": 0.0,
                                         "region_text": 0.0}
    model, _ = load_model(finetuned / "export.safetensors")
    assert isinstance(model, GPSModel)

    rows = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(r["loss_grounding"] > 0 and r["loss_mlm"] == 0 for r in train)
    # only referrals reach the model: the scenes' captions would give a scene-text loss even at weight 0
    assert all(r["loss_scene_text"] == 0 for r in train)
    assert all(r["loss"] == pytest.approx(r["loss_grounding"] + 0.5 * r["loss_referral_object"], rel=1e-5)
               for r in train)

    report = json.loads((finetuned / "ground_report.json").read_text())
    assert set(report) >= {"benchmark", "splits", "dataset", "referrals", "scenes", "random_pick_accuracy",
                           "voxel_size", "data", "checkpoint"}
    assert set(report["splits"]) == REFERIT3D_SPLITS and report["referrals"] == 14
    assert (finetuned / "ground_report.md").read_text().startswith("|  | Overall | Easy | Hard |")
    lines = (finetuned / "ground_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 14 and set(json.loads(lines[0])) == {"scan_id", "text_index", "target_id", "predicted_id",
                                                              "num_distractors", "utterance", "source", "item_id"}
    summary = json.loads((finetuned / "summary.json").read_text())
    assert summary["ground_accuracy"] == report["splits"]["overall"]["accuracy"] and summary["ground_steps"] == 3


def test_eval_ground_reproduces_the_finetune_report(finetuned, shards, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["eval-ground", "--checkpoint", str(finetuned / "export.safetensors"), "--data", str(shards / "val"),
                     "--benchmark", "nr3d", "--out", str(tmp_path / "nr3d"), "--workers", "0",
                     "--referral-chunk", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| Accuracy (%) |" in printed and "| Referrals | 14 |" in printed
    report = json.loads((tmp_path / "nr3d" / "ground_report.json").read_text())
    assert report["splits"] == json.loads((finetuned / "ground_report.json").read_text())["splits"]
    assert report["task"] == "grounding" and report["step"] == 3

    assert cli.main(["eval-ground", "--checkpoint", str(finetuned / "export.safetensors"), "--data", str(shards / "val"),
                     "--benchmark", "scanrefer", "--out", str(tmp_path / "sr"), "--workers", "0"]) == 0
    assert "| Acc@0.25 (%) |" in capsys.readouterr().out
    scanrefer = json.loads((tmp_path / "sr" / "ground_report.json").read_text())
    assert set(scanrefer["splits"]) == {"unique", "multiple", "overall"}
    # the same choices, now scored by box: a right object has IoU 1 with its own box
    correct = report["splits"]["overall"]["correct"]
    assert scanrefer["splits"]["overall"]["correct@0.5"] >= correct and scanrefer["box_source"] == "ground_truth"
    assert ((tmp_path / "sr" / "ground_predictions.jsonl").read_text()
            == (tmp_path / "nr3d" / "ground_predictions.jsonl").read_text())


def test_finetune_from_an_export_keeps_its_architecture_and_weights(finetuned, shards, tmp_path):
    """With zero learning rates, fine-tuning from an export must leave its parameters untouched; the
    export's architecture wins over `model`, and the config's loss weights replace the export's."""
    raw = {"steps": 1, "micro_batch": 2, "global_batch": 2, "num_workers": 0, "device": "cpu",
           "output_dir": str(tmp_path), "checkpoint_every": 1,
           "data": {"train": [str(shards / "train")], "transforms": {"voxel_size": VOXEL, "augment": False,
                                                                     "max_referrals": 2}},
           "model": {**TINY_MODEL, "d_model": 48}, "loss": {"grounding": 1.0, "mlm": 0.25},
           "optim": {"lr_text_encoder": 0.0, "lr_backbone": 0.0, "lr_heads": 0.0, "warmup_steps": 0}}
    with pytest.warns(UserWarning, match=r"replaces 1 value\(s\) of the config: model.d_model 48 -> 32"):
        finetune_grounding(from_dict(GroundConfig, {**raw, "pretrained": str(finetuned / "export.safetensors")}),
                           progress=False)
    before, after = read_export(finetuned / "export.safetensors"), read_export(tmp_path / "export.safetensors")
    assert after.info.model_config["d_model"] == 32 and after.info.model_config["loss"]["mlm"] == 0.25
    assert before.state_dict.keys() == after.state_dict.keys()
    model, _ = load_model(finetuned / "export.safetensors")
    for name, _ in model.named_parameters():  # buffers such as batch-norm statistics move without a step
        assert torch.equal(before.state_dict[name], after.state_dict[name]), name


def test_bad_inputs_are_refused_with_clear_errors(finetuned, shards, tmp_path, capsys):
    segmentation = tmp_path / "seg.pt"  # an earlier version's export of another task
    torch.save({"format": EXPORT_FORMAT, "state_dict": {}, "task": "segmentation", "model_config": {}}, segmentation)
    cfg = from_dict(GroundConfig, {"data": {"train": [str(shards / "train")]}, "pretrained": str(segmentation)})
    with pytest.raises(UsageError, match="seg.pt: a segmentation export; finetune-ground --pretrained needs a "
                                         "pretraining or grounding export"):
        finetune_grounding(cfg)
    cfg = from_dict(GroundConfig, {"data": {"train": ["x"], "benchmark": "nr3d", "proposals": "p.json"}})
    with pytest.raises(UsageError, match="data.proposals is for ScanRefer"):
        finetune_grounding(cfg)
    capsys.readouterr()
    assert cli.main(["finetune-ground", "--config", str(ROOT / "configs/ground/synthetic_cpu.yaml"),
                     "--set", "data.benchmrk=nr3d"]) == 2
    assert "benchmrk" in capsys.readouterr().err
    assert cli.main(["eval-ground", "--checkpoint", str(finetuned / "export.safetensors"), "--data", str(shards / "val"),
                     "--benchmark", "nr3d", "--proposals", "p.json"]) == 2
    assert "--proposals is for ScanRefer" in capsys.readouterr().err
