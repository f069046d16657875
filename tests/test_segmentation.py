"""Segmentation transfer: metrics on a hand-computed case, voxel-to-point projection, the
language-aligned head, fine-tuning beats the majority class, and export loading."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsegps.config import from_dict
from sparsegps.eval.segmentation import confusion_matrix, evaluate_segmentation, segmentation_metrics
from sparsegps.models.backbone import SpUNetConfig
from sparsegps.models.seg_heads import LanguageSegHead, SegmentationModel, SegModelConfig
from sparsegps.exports import ExportInfo, load_model, read_export, save_export
from sparsegps.train.finetune_seg import SegConfig, finetune_segmentation

TINY = {"stem_channels": 8, "enc_channels": [8, 16, 16], "dec_channels": [16, 16, 16], "enc_blocks": [1, 1, 1],
        "dec_blocks": [1, 1, 1]}


def test_metrics_equal_a_hand_computed_confusion_case():
    # classes: 0 present, 1 present, 2 predicted but absent from the ground truth, 3 absent everywhere
    target = np.array([0, 0, 0, 1, 1, -1, -1, 1])
    pred = np.array([0, 0, 1, 1, 2, 3, 0, 1])
    conf = confusion_matrix(pred, target, 4)
    assert conf.tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(conf, ["a", "b", "c", "d"])
    # IoU_a = 2/(3+2-2) = 2/3; IoU_b = 2/(3+3-2) = 1/2; IoU_c = 0/(0+1-0) = 0; d absent
    assert m["per_class_iou"]["a"] == pytest.approx(2 / 3)
    assert m["per_class_iou"]["b"] == pytest.approx(1 / 2)
    assert m["per_class_iou"]["c"] == 0.0 and m["per_class_iou"]["d"] is None
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["points"] == 6
    assert m["mean_class_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_zero_shot_report_splits_base_and_novel_with_hiou_and_beatable_baselines():
    from sparsegps.eval.segmentation import zero_shot_report

    names = ["wall", "chair", "sofa", "lamp"]  # lamp: absent from the ground truth
    # rows: truth (wall 6, chair 3, sofa 1 points), columns: prediction
    conf = np.array([[5, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    report = segmentation_metrics(conf, names)
    got = zero_shot_report(report, conf, seen=["wall", "chair", "lamp"], names=names)
    wall, chair, sofa = 5 / 6, 2 / 4, 1 / 2  # TP / (TP + FP + FN)
    assert got["unseen_classes"] == ["sofa"]
    assert got["miou_seen"] == pytest.approx((wall + chair) / 2) and got["miou_unseen"] == pytest.approx(sofa)
    assert got["hiou"] == pytest.approx(2 * got["miou_seen"] * sofa / (got["miou_seen"] + sofa))
    q = np.array([0.6, 0.3, 0.1])  # point shares; guessing by them: IoU q / (2 - q)
    assert got["prior_miou_seen"] == pytest.approx((q[0] / (2 - q[0]) + q[1] / (2 - q[1])) / 2)
    assert got["prior_miou_unseen"] == pytest.approx(q[2] / (2 - q[2])) and got["prior_miou_unseen"] > 0
    assert got["majority_miou_seen"] == pytest.approx(0.6 / 2) and got["majority_miou_unseen"] == 0.0
    assert got["majority_hiou"] == 0.0
    # the prior's expected IoU is what random labelling by the shares scores, on average
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], [6000, 3000, 1000])
    guess = confusion_matrix(rng.choice(3, size=truth.size, p=q), truth, 3)
    sampled = segmentation_metrics(guess, names[:3])["per_class_iou"]
    for k, name in enumerate(names[:3]):
        assert sampled[name] == pytest.approx(q[k] / (2 - q[k]), abs=0.01)


def test_labelled_points_keep_n_labelled_points_per_room_the_same_every_time(tmp_path):
    """Of each room's labelled points exactly N are kept (all where it has fewer), chosen by the room
    alone: the same for every epoch and run seed; each voxel's label comes from a kept point."""
    from helpers import VOCAB, make_scene

    from sparsegps.data import ScenesDataset, TransformConfig, write_scenes
    from sparsegps.data.transforms import LabelledPoints, build_transforms

    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, f"room{i}", 600, 4) for i in range(3)]
    scenes[2].semantic[:] = -1
    scenes[2].semantic[:7] = 2  # only 7 labelled points
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    keep = LabelledPoints(20)

    def dataset(seed):
        transforms = build_transforms(TransformConfig(voxel_size=0.1))
        transforms.transforms.append(keep)
        return ScenesDataset(tmp_path, transforms, seed=seed)

    a, b = dataset(0), dataset(5)
    for i, scene in enumerate(scenes):
        chosen = keep.chosen(scene.scene_id, scene.semantic)
        assert len(chosen) == min(20, int((scene.semantic >= 0).sum())) and (scene.semantic[chosen] >= 0).all()
        first, other = a[(0, i)], b[(3, i)]  # another run seed, another epoch
        np.testing.assert_array_equal(keep.chosen(scene.scene_id, scene.semantic), chosen)
        for sample in (first, other):
            labelled = np.flatnonzero(sample["voxel_semantic"] >= 0)
            assert set(labelled.tolist()) == set(sample["inverse"][chosen].tolist())
            np.testing.assert_array_equal(sample["voxel_semantic"][sample["inverse"][chosen]], scene.semantic[chosen])
    with pytest.raises(ValueError, match="at least 1"):
        LabelledPoints(0)


def test_language_head_logits_are_scaled_cosines():
    torch.manual_seed(0)
    classes = torch.randn(5, 12)
    head = LanguageSegHead(8, classes)
    feats = torch.randn(30, 8)
    v = head.proj(feats)
    expected = (1 / 0.07) * torch.stack([torch.stack([torch.dot(a, c) / (a.norm() * c.norm()) for c in classes])
                                         for a in v])
    assert torch.allclose(head(feats), expected, atol=1e-4)
    head.set_classes(classes[:2])  # a new vocabulary: zero-shot
    assert head(feats).shape == (30, 2)
    assert head.scale.log_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_language_head_gradients_match_the_direct_formula():
    """The head scores in its hidden width; gradients must be those of normalising the [V, E]
    projection (in float64, the direct formula as the oracle), also under bf16 autocast."""
    torch.manual_seed(1)
    head = LanguageSegHead(8, torch.randn(5, 48))
    feats = torch.randn(40, 8) * 3
    upstream = torch.randn(40, 5)
    (head(feats) * upstream).sum().backward()
    mine = {n: p.grad.clone() for n, p in head.named_parameters()}
    head64 = copy.deepcopy(head).double()
    head64.zero_grad()
    direct = head64.scale() * F.normalize(head64.proj(feats.double()), dim=-1) @ head64.class_embeddings.T
    (direct * upstream.double()).sum().backward()
    for name, p in head64.named_parameters():
        assert torch.allclose(mine[name].double(), p.grad, rtol=1e-4, atol=1e-6), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), direct.detach(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    from sparsegps.data import write_scenes
    from sparsegps.synth import SYNTH_VOCABULARY, generate_scene, preset

    root = tmp_path_factory.mktemp("seg")
    cfg = preset("demo")
    write_scenes([generate_scene(cfg, i, with_language=False) for i in range(10)], root / "train",
                 vocabulary=SYNTH_VOCABULARY, progress=False)
    write_scenes([generate_scene(cfg, 100 + i, with_language=False) for i in range(3)], root / "val",
                 vocabulary=SYNTH_VOCABULARY, progress=False)
    return root


def seg_config(root, out, **overrides) -> SegConfig:
    raw = {"micro_batch": 5, "global_batch": 5, "steps": 40, "device": "cpu", "output_dir": str(out),
           "checkpoint_every": 40, "log_every": 10, "num_workers": 0,
           "data": {"train": [str(root / "train")], "val": [str(root / "val")],
                    "transforms": {"voxel_size": 0.15, "augment": False}},
           "model": {"backbone": TINY}, "optim": {"warmup_steps": 0, "lr_backbone": 3e-3, "lr_heads": 3e-3}}
    raw.update(overrides)
    return from_dict(SegConfig, raw)


def test_every_point_gets_one_prediction(synthetic_shards):
    from sparsegps.data import SceneStore
    from sparsegps.synth import SYNTH_VOCABULARY

    model = SegmentationModel(SegModelConfig(backbone=from_dict(SpUNetConfig, TINY)), SYNTH_VOCABULARY)
    report, conf = evaluate_segmentation(model, synthetic_shards / "val", 0.15, torch.device("cpu"),
                                         len(SYNTH_VOCABULARY), SYNTH_VOCABULARY, tta_rotations=2, progress=False)
    store = SceneStore(synthetic_shards / "val")
    labelled = sum(int((store[i].semantic >= 0).sum()) for i in range(len(store)))
    assert conf.sum() == report["points"] == labelled


@pytest.mark.slow
def test_finetuning_beats_the_majority_class_and_exports(synthetic_shards, tmp_path):
    from sparsegps.data import SceneStore

    torch.manual_seed(0)
    summary = finetune_segmentation(seg_config(synthetic_shards, tmp_path), progress=False)
    store = SceneStore(synthetic_shards / "val")
    labels = np.concatenate([store[i].semantic for i in range(len(store))])
    labels = labels[labels >= 0]
    counts = np.bincount(labels)
    majority_iou = counts.max() / len(labels)  # predicting the majority class everywhere: 1 class, IoU = share
    majority_miou = majority_iou / (counts > 0).sum()
    assert summary["seg_miou"] > 2 * majority_miou, (summary, majority_miou)
    assert summary["seg_accuracy"] > majority_iou
    assert (tmp_path / "confusion.png").stat().st_size > 0 and (tmp_path / "seg_report.json").exists()
    model, info = load_model(tmp_path / "export.safetensors")
    assert info.task == "segmentation" and model.class_names[0] == "wall" and info.voxel_size == 0.15


def test_pretraining_export_restores_backbone_weights_exactly(synthetic_shards, tmp_path):
    from sparsegps.config import to_dict
    from sparsegps.models.gps import GPSModel, ModelConfig
    from sparsegps.models.text_encoder import TextEncoderConfig

    torch.manual_seed(1)
    gps_cfg = ModelConfig(backbone=from_dict(SpUNetConfig, TINY), d_model=32, num_heads=2, spatial_layers=1,
                          grounding_layers=1, ffn_dim=32, embed_dim=16, text=TextEncoderConfig(num_layers=1))
    gps = GPSModel(gps_cfg)
    export = tmp_path / "pretrain.pt"  # an export written by an earlier version (a pickled dict)
    torch.save({"format": "sparsegps-export", "state_dict": gps.state_dict(), "model_config": to_dict(gps_cfg),
                "vocabulary": [], "voxel_size": 0.15}, export)
    read = read_export(export)
    assert (read.info.task, read.info.voxel_size) == ("pretraining", 0.15)
    seg = SegmentationModel(SegModelConfig(backbone=from_dict(SpUNetConfig, TINY)), ["a", "b"])
    seg.load_backbone(read.state_dict)
    for name, tensor in gps.backbone.state_dict().items():
        assert torch.equal(seg.backbone.state_dict()[name], tensor), name
    seg.freeze("encoder")
    trainable = {n for n, p in seg.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") for n in trainable)


def test_finetuning_from_the_zero_shot_head_starts_at_the_zero_shot_segmenter(synthetic_shards, tmp_path):
    """head_init=zero_shot: a run that changes nothing (frozen backbone, learning rate 0) exports the
    pre-trained zero-shot segmenter, logit for logit; the export loads without a text encoder."""
    from sparsegps.config import to_dict
    from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes
    from sparsegps.errors import UsageError
    from sparsegps.models.gps import GPSModel, ModelConfig
    from sparsegps.models.seg_heads import ZeroShotSegmenter
    from sparsegps.synth import SYNTH_VOCABULARY

    torch.manual_seed(2)
    gps_cfg = from_dict(ModelConfig, {"backbone": TINY, "d_model": 32, "num_heads": 2, "spatial_layers": 1,
                                      "grounding_layers": 1, "ffn_dim": 32, "embed_dim": 16,
                                      "text": {"num_layers": 1}, "class_names": list(SYNTH_VOCABULARY),
                                      "loss": {"dense_text": 1.0}})
    gps = GPSModel(gps_cfg).eval()
    with torch.no_grad():  # a temperature and projection of its own, not the initial ones
        gps.dense_scale.log_scale.fill_(1.5)
        gps.dense_proj[2].weight.mul_(3.0)
    export = save_export(tmp_path / "pretrain.safetensors", gps.state_dict(),
                         ExportInfo("pretraining", to_dict(gps_cfg), list(SYNTH_VOCABULARY), 0.15))

    model = {"backbone": TINY, "head": "language", "head_init": "zero_shot"}
    frozen = {"warmup_steps": 0, "lr_backbone": 0.0, "lr_heads": 0.0, "weight_decay": 0.0}
    finetune_segmentation(seg_config(synthetic_shards, tmp_path / "seg", steps=1, freeze="backbone", model=model,
                                     optim=frozen, data={"train": [str(synthetic_shards / "train")],
                                                                   "transforms": {"voxel_size": 0.15}},
                                     pretrained=str(export)), progress=False)
    seg, _ = load_model(tmp_path / "seg/export.safetensors")
    batch = collate_scenes([ScenesDataset(synthetic_shards / "val", TransformConfig(voxel_size=0.15, augment=False))[i]
                            for i in range(2)])
    with torch.no_grad():
        expected = ZeroShotSegmenter(gps, SYNTH_VOCABULARY)(batch)
        got = seg.eval()(batch)
    assert expected.std() > 0.3  # logits that tell classes apart, so equality means something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(UsageError, match="model.head=language"):
        finetune_segmentation(seg_config(synthetic_shards, tmp_path / "bad", model={**model, "head": "linear"},
                                         pretrained=str(export)), progress=False)
    plain = save_export(tmp_path / "plain.safetensors", gps.state_dict(), ExportInfo(
        "pretraining", to_dict(ModelConfig(**{**vars(gps_cfg), "loss": from_dict(ModelConfig, {}).loss}))))
    with pytest.raises(UsageError, match="without the dense_text loss"):
        finetune_segmentation(seg_config(synthetic_shards, tmp_path / "bad2", model=model, pretrained=str(plain)),
                              progress=False)


def test_class_balanced_segmentation_loss_is_the_weighted_mean_by_hand():
    from sparsegps.criterion import SegmentationCriterion

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    stored = torch.tensor([0, 0, 1, 3, -1])  # store label 3 maps to class 2; -1 is unlabelled
    remap = torch.tensor([0, 1, 2, 2])
    loss = SegmentationCriterion(remap, class_balance=1.0)(logits, {"voxel_semantic": stored})["loss"]
    # classes 0, 1, 2 hold 2, 1, 1 of the 4 labelled voxels: weights 1/share, scaled to sum to 4
    weights = torch.tensor([2.0, 4.0, 4.0]) * 4 / (2 * 2.0 + 4.0 + 4.0)
    target = torch.tensor([0, 0, 1, 2])
    ce = torch.nn.functional.cross_entropy(logits[:4], target, reduction="none")
    assert loss.item() == pytest.approx((ce * weights[target]).sum().item() / 4, rel=1e-6)
    plain = SegmentationCriterion(remap)(logits, {"voxel_semantic": stored})["loss"]
    assert plain.item() == pytest.approx(ce.mean().item(), rel=1e-6)


def test_limited_rooms_train_on_the_first_rooms_of_the_store(synthetic_shards, tmp_path):
    """`data.rooms: N`: the training set is the store's first N rooms (in store order, whatever the
    seed); 0 is refused naming the key."""
    from sparsegps.data import SceneStore
    from sparsegps.errors import UsageError
    from sparsegps.train.finetune_seg import SegmentationTask

    task = SegmentationTask(seg_config(synthetic_shards, tmp_path, data={
        "train": [str(synthetic_shards / "train")], "rooms": 3, "transforms": {"voxel_size": 0.15, "augment": False}},
        seed=7))
    task.configure()
    dataset = task.dataset()
    store = SceneStore(synthetic_shards / "train")
    assert len(store) == 10 and len(dataset) == 3
    assert [dataset[(0, i)]["scene_id"] for i in range(3)] == store.scene_ids()[:3]
    with pytest.raises(UsageError, match=r"data.rooms: 0 is out of range; allowed: >= 1"):
        seg_config(synthetic_shards, tmp_path, data={"train": [str(synthetic_shards / "train")], "rooms": 0})
