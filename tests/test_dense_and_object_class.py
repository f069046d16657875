"""The losses that train the backbone for what comes after pre-training: object classification
against class-name texts (GPS's object-encoder stage, here end to end) and language-aligned dense
voxel features, with the zero-shot segmentation they enable."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sparsegps import losses as L
from sparsegps.config import from_dict
from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, write_scenes
from sparsegps.models.gps import GPSModel, ModelConfig

from helpers import VOCAB, make_scene
from helpers import TINY_MODEL, outputs_and_losses


def test_labelled_cross_entropy_hand_computed_with_smoothing_and_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 1, -1])
    got = L.labelled_cross_entropy(logits, labels, smoothing=0.3)
    # smoothed target: (1 - 0.3) on the label + 0.3 / 3 on every class
    for row, label in ((0, 0), (1, 1)):
        logp = torch.log_softmax(logits[row], -1)
        expected = -(0.7 * logp[label] + 0.1 * logp.sum())
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-6)
    assert got[2].item() == 0.0
    assert L.scaled_cosine(torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor(10.0)).item() == \
        pytest.approx(10 / math.sqrt(2))


def tiny(**loss) -> ModelConfig:
    return from_dict(ModelConfig, {**TINY_MODEL, "class_names": VOCAB, "dropout": 0.0,
                                   "loss": {"object_text": 0, "scene_text": 0, "referral_object": 0, "grounding": 0,
                                            "mlm": 0, **loss}})


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("dense")
    write_scenes([make_scene(rng, f"r{i}", 400, 4) for i in range(3)], root, vocabulary=VOCAB, progress=False)
    return ScenesDataset(root, TransformConfig(voxel_size=0.15, augment=False))


def test_object_class_loss_is_the_smoothed_cross_entropy_over_class_prompts(rooms):
    torch.manual_seed(0)
    model = GPSModel(tiny(object_class=1.0)).eval()
    batch = collate_scenes([rooms[0], rooms[1]])
    out = outputs_and_losses(model, batch)
    objects = out["objects"]
    classes = model.class_embeddings(VOCAB, "cpu")
    logits = model.class_scale() * torch.nn.functional.normalize(
        model.object_class_proj(objects["tokens"][~objects["pad"]]), dim=-1) @ torch.nn.functional.normalize(
        classes, dim=-1).T
    labels = batch["object_label"]
    assert (labels >= 0).all() and len(labels) == 8
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.3)
    assert out["loss_object_class"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_region_text_is_each_captioned_objects_mean_projected_voxel_against_the_captions(rooms):
    """By hand, object by object: the mean of dense_proj over the object's voxels, InfoNCE against
    the batch's distinct object captions, positives the captions equal to the object's."""
    torch.manual_seed(0)
    model = GPSModel(tiny(region_text=1.0)).eval()
    samples = [rooms[0], rooms[1]]
    samples[1]["texts"] = [t for t in samples[1]["texts"] if t.kind != "object_caption" or t.target_id != 10]
    batch = collate_scenes(samples)
    out = outputs_and_losses(model, batch)
    voxel_embedding = model.dense_proj(out["objects"]["voxel_feats"])
    captions, regions = [], []
    for t in batch["texts"]:
        if t["kind"] == "object_caption" and t["target"] >= 0 and t["target"] not in [r for r, _ in regions]:
            regions.append((t["target"], t["text"]))
    assert len(regions) == 7  # 8 objects, one without a caption
    captions = sorted({text for _, text in regions})
    assert len(captions) < len(regions)  # two objects share a caption: both are its positives
    encoded = model.text_proj(model.encode_text(captions, "cpu")["sentence"])
    scale = model.region_scale()
    terms = []
    for obj, text in regions:
        region = voxel_embedding[batch["voxel_object"] == obj].mean(0)
        sims = torch.stack([scale * torch.nn.functional.cosine_similarity(region, c, dim=0) for c in encoded])
        positive = torch.tensor([c == text for c in captions])
        terms.append(torch.logsumexp(sims, 0) - torch.logsumexp(sims[positive], 0))
    expected = torch.stack(terms).mean()
    assert out["loss_region_text"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_balance_weights_hand_computed():
    labels = torch.tensor([0, 0, 0, 1, -1, 2])
    got = L.class_balance_weights(labels, 4, 0.5)
    # shares 3/5, 1/5, 1/5 (class 3 absent): raw share^-0.5, scaled so the 5 labelled rows sum to 5
    raw = torch.tensor([0.6 ** -0.5, 0.2 ** -0.5, 0.2 ** -0.5])
    raw = raw * 5 / (3 * raw[0] + raw[1] + raw[2])
    expected = torch.tensor([raw[0], raw[0], raw[0], raw[1], 0.0, raw[2]])
    torch.testing.assert_close(got, expected)
    assert got.sum().item() == pytest.approx(5.0)
    torch.testing.assert_close(L.class_balance_weights(labels, 4, 0.0), (labels >= 0).float())


def test_class_balanced_dense_loss_is_the_weighted_mean_by_hand(rooms):
    torch.manual_seed(0)
    model = GPSModel(dataclasses.replace(tiny(dense_text=1.0), dense_class_balance=0.5)).eval()
    batch = collate_scenes([rooms[0], rooms[1]])
    out = outputs_and_losses(model, batch)
    labels = batch["voxel_semantic"]
    logits = model.dense_class_logits(out["objects"]["voxel_feats"], model.class_embeddings(VOCAB, "cpu"))
    mine = labels[labels >= 0]
    counts = torch.bincount(mine, minlength=len(VOCAB)).double()
    weight = torch.where(counts > 0, (counts / counts.sum()) ** -0.5, 0.0)
    weight = weight * counts.sum() / (weight * counts).sum()
    ce = torch.nn.functional.cross_entropy(logits[labels >= 0], mine, reduction="none")
    expected = (ce * weight.float()[mine]).sum() / len(mine)
    assert len(mine.unique()) > 2  # several classes of different frequency
    assert out["loss_dense_text"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss_dense_text"].item() != pytest.approx(ce.mean().item(), rel=1e-3)


@pytest.mark.slow
def test_zero_shot_segmentation_of_a_model_overfit_with_the_dense_loss(rooms):
    """A tiny model trained only on dense_text for a few rooms names their voxels' classes."""
    from sparsegps.eval.segmentation import evaluate_segmentation
    from sparsegps.models.seg_heads import ZeroShotSegmenter

    torch.manual_seed(0)
    model = GPSModel(tiny(dense_text=1.0))
    batch = collate_scenes([rooms[i] for i in range(3)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        optimizer.zero_grad()
        loss = outputs_and_losses(model, batch)["loss"]
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3
    with torch.no_grad():  # BatchNorm's running statistics set to these rooms' (momentum 0.02 lags)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model(batch)
    segmenter = ZeroShotSegmenter(model, VOCAB)
    report, _ = evaluate_segmentation(segmenter, [str(rooms.store.paths[0].parent)], 0.15, torch.device("cpu"),
                                      len(VOCAB), VOCAB, progress=False)
    assert report["accuracy"] > 0.9, report
    # naming the classes in another order permutes the predictions, nothing else
    segmenter.set_classes(VOCAB[::-1])
    reversed_ids = np.arange(len(VOCAB))[::-1].copy()
    again, _ = evaluate_segmentation(segmenter, [str(rooms.store.paths[0].parent)], 0.15, torch.device("cpu"),
                                     len(VOCAB), VOCAB[::-1], reversed_ids, progress=False)
    assert again["accuracy"] == pytest.approx(report["accuracy"])


def test_gps_referral_contrast_equals_a_transcription_of_gps_text_obj_within_batch(rooms):
    """GPS (optim/loss/contra_loss.py, TextObjWithinBatch): fused objects against the fused [CLS]
    by plain cosine, padded objects at -inf, cross-entropy averaged over referrals."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = GPSModel(tiny(referral_object=1.0)).eval()
    model.cfg.referral_contrast = "gps"
    batch = collate_scenes([rooms[0], rooms[1]])
    out = outputs_and_losses(model, batch)
    referrals = [t for t in batch["texts"] if t["kind"] == "referral"]
    scene = torch.tensor([t["scene"] for t in referrals])
    target = torch.tensor([t["target"] for t in referrals]) - batch["object_offsets"][scene]
    fused_text, fused_obj, _ = model.ground(model.encode_text([t["text"] for t in referrals], "cpu"), scene,
                                            out["objects"])
    obj_feats, text_feats = F.normalize(fused_obj, dim=-1, p=2), F.normalize(fused_text[:, 0], dim=-1, p=2)
    logits = torch.einsum("bod,bd->bo", obj_feats, text_feats)
    logits = logits.masked_fill(out["objects"]["pad"][scene], -float("inf"))
    expected = F.cross_entropy(logits, target)
    assert len(referrals) == 8 and out["loss_referral_object"].item() == pytest.approx(expected.item(), rel=1e-5)
