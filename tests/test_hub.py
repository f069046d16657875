"""Hub-style model folders: an export written as a folder (weights, config.json, a model card whose
numbers are the run's), loaded back by path or by repo id from the local cache only."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import TINY_MODEL, pretrain_config, write_pretrain_shards

from sparsegps import cli
from sparsegps.errors import UsageError
from sparsegps.exports import load_model, read_export
from sparsegps.train.pretrain import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    shards = write_pretrain_shards(root / "data")
    cfg = pretrain_config(shards, root / "run", steps=2, checkpoint_every=2, model=TINY_MODEL)
    cfg.data.holdout_classes = ["bed"]
    pretrain(cfg, progress=False)
    return root / "run"


def test_a_hub_folder_round_trips_and_its_card_states_the_run(run, tmp_path):
    assert cli.main(["export", str(run / "export.safetensors"), "--hub", str(tmp_path / "hub")]) == 0
    folder = tmp_path / "hub"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    original, folded = read_export(run / "export.safetensors"), read_export(folder)
    assert folded.info == original.info
    assert folded.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(folded.state_dict[k], v) for k, v in original.state_dict.items())
    config = json.loads((folder / "config.json").read_text())
    assert config["task"] == "pretraining" and config["holdout_classes"] == ["bed"]
    model, info = load_model(folder)
    assert info == original.info and model.training is False

    card = (folder / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: sparsegps")
    assert f"| optimizer steps | {summary['pretrain_steps']} |" in card
    assert f"| pretrain_scenes_per_s | {summary['pretrain_scenes_per_s']:.4g} | training throughput |" in card
    assert f"| loss | {summary['loss']:.4g} | final training loss |" in card
    assert "| held-out classes | bed (hold-out: labels) |" in card
    assert f"| labels consumed | {', '.join(original.info.labels_consumed)} |" in card


def test_a_repo_id_resolves_from_the_local_cache_only(run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "cache" / "models--acme--tiny-gps"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copyfile(run / "export.safetensors", repo / "snapshots" / commit / "model.safetensors")
    assert read_export("acme/tiny-gps").info == read_export(run / "export.safetensors").info
    with pytest.raises(UsageError, match="never downloads at run time: `huggingface-cli download acme/other`"):
        read_export("acme/other")
    with pytest.raises(UsageError, match="a folder without model.safetensors"):
        read_export(tmp_path)
