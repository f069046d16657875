"""The relation probe: ground-truth object tokens through the model's spatial transformer and grounding
encoder learn a tiny set of rooms; the command writes its report."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sparsegps.cli import main as cli_main
from sparsegps.config import from_dict
from sparsegps.data import write_scenes
from sparsegps.eval.relation_probe import ProbeConfig, collate_rooms, load_rooms, run_probe
from sparsegps.models.gps import ModelConfig
from sparsegps.synth import SYNTH_VOCABULARY, generate_scenes, preset

from helpers import TINY_MODEL


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_scenes(list(generate_scenes(dataclasses.replace(preset("demo"), seed=11), 6)), root,
                 vocabulary=SYNTH_VOCABULARY, progress=False)
    return root


def test_rooms_keep_boxes_classes_colours_and_referrals(rooms):
    loaded, vocabulary = load_rooms(rooms, progress=False)
    assert vocabulary == SYNTH_VOCABULARY and len(loaded) == 6
    room = loaded[0]
    assert room.centers.shape == room.sizes.shape == room.colors.shape == (len(room.classes), 3)
    assert [vocabulary[i] for i in room.labels] == room.classes
    assert -1 <= room.colors.min() and room.colors.max() <= 1
    assert room.referrals and all(room.classes[r["target"]] for r in room.referrals)
    # the objects are centred on the room: boxes span both sides of 0
    lo, hi = (room.centers - room.sizes / 2).min(0), (room.centers + room.sizes / 2).max(0)
    np.testing.assert_allclose(lo, -hi, atol=1e-4)
    batch = collate_rooms(loaded[:2], ProbeConfig(), None, "cpu")
    assert batch["centers"].shape[:2] == batch["labels"].shape and len(batch["texts"]) == len(batch["records"])


@pytest.mark.slow
def test_the_probe_learns_a_tiny_set_of_rooms(rooms, tmp_path):
    """Trained and evaluated on the same six rooms (no augmentation): the relational grounding
    encoder fits their referrals, relations and all (>= 0.95)."""
    model = from_dict(ModelConfig, {**TINY_MODEL, "grounding_attention": "relational", "freeze_text": True,
                                    "d_model": 64, "num_heads": 4, "ffn_dim": 128})
    cfg = ProbeConfig(train=[str(rooms)], val=[str(rooms)], model=model, output_dir=str(tmp_path), steps=300,
                      rooms_per_step=6, lr=2e-3, warmup_steps=20, eval_every=0, rotation="none", scale=None,
                      train_eval_rooms=6)
    summary = run_probe(cfg, progress=False)
    assert summary["val_accuracy"] >= 0.95, summary
    assert summary["val_class_prior"] < 0.7  # the referrals do need the relation
    for name in ("summary.json", "grounding.json", "grounding.md", "grounding.png", "probe_curve.png", "config.yaml"):
        assert (tmp_path / name).exists(), name


def test_command_refuses_a_probe_without_rooms(tmp_path, capsys):
    assert cli_main(["probe", "relations", "--output-dir", str(tmp_path)]) == 2
    assert "needs training rooms" in capsys.readouterr().err


def test_the_probe_reports_the_unseen_phrasings_beside_the_seen(rooms, tmp_path):
    """val_unseen rooms (their texts in the held-out phrasings) are scored with the same probe: every
    referral of theirs counted, their diagnostics written apart."""
    unseen = tmp_path / "unseen"
    cfg_rooms = dataclasses.replace(preset("demo"), seed=12)
    cfg_rooms.language.phrasings = "unseen"
    write_scenes(list(generate_scenes(cfg_rooms, 4)), unseen, vocabulary=SYNTH_VOCABULARY, progress=False)
    model = from_dict(ModelConfig, {**TINY_MODEL, "grounding_attention": "relational", "freeze_text": True})
    cfg = ProbeConfig(train=[str(rooms)], val=[str(rooms)], val_unseen=[str(unseen)], model=model,
                      output_dir=str(tmp_path / "out"), steps=3, rooms_per_step=3, eval_every=0, train_eval_rooms=2)
    summary = run_probe(cfg, progress=False)
    loaded, _ = load_rooms(unseen, SYNTH_VOCABULARY, progress=False)
    assert summary["val_unseen_referrals"] == sum(len(r.referrals) for r in loaded) > 0
    assert 0.0 <= summary["val_unseen_accuracy"] <= 1.0 and summary["val_unseen_rooms"] == len(loaded)
    assert (tmp_path / "out" / "grounding_unseen.json").exists()


def test_the_shipped_probe_config_builds_its_probe():
    """configs/probe/relations.yaml names tiny_cpu's model, whose MLM predicts the corpus's tokens:
    the probe (which trains no MLM) builds without them."""
    from pathlib import Path

    from sparsegps.eval.relation_probe import RelationProbe, load_probe_config

    cfg = load_probe_config(Path(__file__).resolve().parents[1] / "configs/probe/relations.yaml")
    assert cfg.model.mlm_vocabulary == "corpus" and cfg.model.grounding_attention == "relational"
    probe = RelationProbe(cfg.model, len(SYNTH_VOCABULARY))
    assert probe.model.cfg.grounding_attention == "relational"
