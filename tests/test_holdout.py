"""Classes held out of pre-training: no label, no class target and no text naming them reaches a batch,
and the export records what it was trained on."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from sparsegps.data import collate_scenes, write_scenes
from sparsegps.criterion import LossWeights, consumed_labels
from sparsegps.language.templates import class_words
from sparsegps.models.gps import ModelConfig
from sparsegps.synth import SYNTH_VOCABULARY, generate_scenes, preset
from sparsegps.train.pretrain import PretrainConfig, preset_name, training_set

HOLDOUT = ["chair", "bookshelf", "sink", "curtain"]


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    cfg = dataclasses.replace(preset("demo"), seed=3)
    scenes = list(generate_scenes(cfg, 12))
    write_scenes(scenes, root, vocabulary=SYNTH_VOCABULARY, progress=False)
    return root, scenes


@pytest.mark.parametrize("mode", ["labels", "strict"])
def test_a_batch_with_held_out_classes_has_no_label_or_target_of_them_and_texts_by_mode(rooms, mode):
    """Both modes withhold every label of the held-out classes; `labels` keeps the texts that name
    them (captions, referrals), `strict` drops those too."""
    root, scenes = rooms
    # the rooms do hold the held-out classes, in points, objects and texts
    assert all(any(o.label == c for s in scenes for o in s.objects) for c in HOLDOUT)
    cfg = PretrainConfig(data=dataclasses.replace(PretrainConfig().data, train=[str(root)], holdout_classes=HOLDOUT,
                                                  holdout=mode))
    dataset = training_set(cfg)
    trained = [c for c in SYNTH_VOCABULARY if c not in HOLDOUT]
    assert dataset.classes == trained
    words = re.compile(r"\b(" + "|".join(w for c in HOLDOUT for w in class_words(c)) + r")\b", re.IGNORECASE)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate_scenes(samples)
    # labels index the trained classes: no held-out class is ever a target
    for s in samples:
        kept = s["semantic"][s["semantic"] >= 0]
        assert set(np.unique(kept)) <= set(range(len(trained)))
    stored = [scenes[s["index"]] for s in samples]
    held_points = sum(int(np.isin(sc.semantic, [SYNTH_VOCABULARY.index(c) for c in HOLDOUT]).sum()) for sc in stored)
    assert held_points > 0 and sum(int((s["semantic"] < 0).sum()) for s in samples) >= held_points
    voxel = batch["voxel_semantic"][batch["voxel_semantic"] >= 0]
    assert not any(trained[i] in HOLDOUT for i in voxel.tolist())
    # held-out objects have no class name and no label id; every other object keeps both
    names, labels = batch["object_names"], batch["object_label"].tolist()
    assert "" in names and not any(n in HOLDOUT for n in names)
    assert all((n == "") == (lab < 0) for n, lab in zip(names, labels))
    assert all(trained[lab] == n for n, lab in zip(names, labels) if lab >= 0)
    plain = training_set(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_classes=[])))
    plain_texts = [t.text for i in range(len(plain)) for t in plain[i]["texts"]]
    assert any(words.search(t) for t in plain_texts)  # the rooms' texts do name them
    if mode == "strict":  # no text names a held-out class or is about a held-out object
        assert batch["texts"] and not any(words.search(t["text"]) for t in batch["texts"])
        assert not any(t["target"] >= 0 and names[t["target"]] == "" for t in batch["texts"])
    else:  # every text stays: those naming held-out classes and those about held-out objects
        assert sorted(t["text"] for t in batch["texts"]) == sorted(plain_texts)
        assert any(t["target"] >= 0 and names[t["target"]] == "" for t in batch["texts"])


def test_unknown_held_out_class_is_refused(rooms):
    from sparsegps.errors import UsageError

    cfg = PretrainConfig(data=dataclasses.replace(PretrainConfig().data, train=[str(rooms[0])],
                                                  holdout_classes=["unicorn"]))
    with pytest.raises(UsageError, match="unicorn"):
        training_set(cfg)


@pytest.mark.parametrize("loss, object_text, labels, name", [
    ({"object_class": 0.0, "dense_text": 0.0}, "caption", ["texts"], "language"),
    ({"object_class": 0.5, "dense_text": 0.0}, "caption", ["texts", "object_classes"], "objects"),
    ({"object_class": 0.0, "dense_text": 0.0}, "class_name", ["texts", "object_classes"], "objects"),
    ({"object_class": 0.5, "dense_text": 3.0}, "class_name", ["texts", "object_classes", "voxel_classes"], "dense"),
    # captions against object regions: texts alone, whatever else is off
    ({"object_text": 0.0, "scene_text": 0.0, "referral_object": 0.0, "grounding": 0.0, "mlm": 0.0, "object_class": 0.0,
      "dense_text": 0.0, "region_text": 1.0}, "class_name", ["texts"], "language"),
])
def test_presets_are_named_by_the_labels_their_losses_consume(loss, object_text, labels, name):
    model = ModelConfig(object_text=object_text, loss=dataclasses.replace(LossWeights(), **loss))
    assert consumed_labels(model) == labels and preset_name(labels) == name


def test_every_loss_declares_the_labels_it_consumes():
    """Each loss alone consumes what its table entry says: a loss added without an entry fails here."""
    from sparsegps.criterion import LABEL_KINDS, LABELS_CONSUMED, LOSS_NAMES

    assert set(LABELS_CONSUMED) == set(LOSS_NAMES)
    alone = {name: consumed_labels(ModelConfig(loss=LossWeights(**{n: float(n == name) for n in LOSS_NAMES})))
             for name in LOSS_NAMES}
    assert alone["dense_text"] == ["voxel_classes"] and alone["object_class"] == ["object_classes"]
    assert all(alone[name] == ["texts"] for name in ("scene_text", "referral_object", "grounding", "mlm",
                                                      "region_text", "object_text"))
    assert all(set(kinds) <= set(LABEL_KINDS) for kinds in alone.values())
