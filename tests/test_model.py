"""GPSModel end to end on CPU: gradients, padding invariance, the text encoder, the optimizer groups."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, write_scenes
from sparsegps.models.backbone import SpUNetConfig
from sparsegps.criterion import LossWeights
from sparsegps.models.gps import GPSModel, ModelConfig, count_parameters
from sparsegps.models.text_encoder import TextEncoder, TextEncoderConfig

from helpers import VOCAB, make_scene, outputs_and_losses
from sparsegps.train.engine import gps_role, optimizer_groups


def tiny_config(**overrides) -> ModelConfig:
    if isinstance(overrides.get("loss"), dict):
        overrides["loss"] = LossWeights(**overrides["loss"])
    base = dict(backbone=SpUNetConfig.preset("tiny"), d_model=64, num_heads=4, spatial_layers=2,
                grounding_layers=1, ffn_dim=128, embed_dim=32, dropout=0.0,
                text=TextEncoderConfig(num_layers=1, max_length=24))
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def batch_and_dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("shards")
    write_scenes([make_scene(rng, f"s{i}", 800, 3 + i) for i in range(3)], out, vocabulary=VOCAB, progress=False)
    ds = ScenesDataset(out, TransformConfig(voxel_size=0.1, augment=False))
    return collate_scenes([ds[0], ds[1], ds[2]]), ds


GPS_FORMS = {"referral_contrast": "gps", "sentence_pooling": "cls", "grounding_head": "gps", "temperatures": "fixed",
             "scene_text_gather": "gps", "spatial_max_dist": "gps"}


@pytest.mark.parametrize("forms", [{"referral_contrast": "projected"}, GPS_FORMS], ids=["projected", "gps-forms"])
def test_every_trainable_parameter_gets_a_gradient(batch_and_dataset, forms):
    torch.manual_seed(0)
    batch, _ = batch_and_dataset
    model = GPSModel(tiny_config(class_names=VOCAB, loss={"object_class": 1.0, "dense_text": 1.0, "region_text": 1.0},
                                 **forms))
    out = outputs_and_losses(model, batch)
    for name in ("object_text", "scene_text", "referral_object", "grounding", "mlm", "object_class", "dense_text",
                 "region_text"):
        assert torch.isfinite(out[f"loss_{name}"]) and out[f"loss_{name}"].item() > 0, name
    out["loss"].backward()
    # The grounding head's output bias shifts every object's logit of a referral alike: the softmax
    # cross-entropy does not see it, so its gradient is zero but for rounding (asserting it non-zero
    # would test rounding noise). Every other trainable parameter must get a measured gradient.
    head = model.grounding_head.mlp
    shift_invariant = {f"grounding_head.mlp.{len(head) - 1}.bias"}
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and n not in shift_invariant and (p.grad is None or not p.grad.any())]
    # the word embeddings of tokens absent from the batch legitimately get zero rows, not a zero tensor
    assert missing == []


def test_padding_never_changes_a_valid_objects_output(batch_and_dataset):
    torch.manual_seed(0)
    _, ds = batch_and_dataset
    model = GPSModel(tiny_config()).eval()
    alone = collate_scenes([ds[0]])
    together = collate_scenes([ds[0], ds[2]])  # scene 2 has more objects: scene 0 gets padding
    with torch.no_grad():
        a = model.encode_objects(alone)
        b = model.encode_objects(together)
    n = int(alone["object_offsets"][1])
    assert b["pad"][0, n:].all() and not b["pad"][0, :n].any()
    assert torch.allclose(a["tokens"][0, :n], b["tokens"][0, :n], atol=1e-5)


def test_grounding_logits_mask_padded_objects(batch_and_dataset):
    batch, _ = batch_and_dataset
    model = GPSModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(batch)
    counts = batch["object_offsets"].diff()
    for row, scene in enumerate(out["referrals"].scene_index.tolist()):
        finite = torch.isfinite(out["grounding_logits"][row])
        assert finite.sum() == counts[scene] and finite[: counts[scene]].all()


def test_fixed_temperatures_stay_out_of_the_optimizer_and_keep_1_over_0_07():
    from sparsegps.losses import LogitScale

    projected = {"referral_contrast": "projected"}  # the form with its own referral temperature
    learnable = GPSModel(tiny_config(**projected))
    fixed = GPSModel(tiny_config(temperatures="fixed", **projected))
    names = {n for n, m in fixed.named_modules() if isinstance(m, LogitScale)}
    assert names == {"object_scale", "scene_scale", "referral_scale", "class_scale", "dense_scale"}
    trainable = {n for group in optimizer_groups(fixed, gps_role).values() for n, p in fixed.named_parameters()
                 if any(p is q for q in group)}
    assert not any(n.removesuffix(".log_scale") in names for n in trainable)
    assert all(learnable.get_submodule(n).log_scale.requires_grad for n in names)
    assert fixed.scene_scale().item() == pytest.approx(1 / 0.07)


def test_gps_grounding_head_is_linear_relu_layernorm_linear_by_hand():
    """grounding_head=gps is GPS's og3d head: Linear, ReLU, LayerNorm (eps 1e-12), Dropout, Linear."""
    from sparsegps.models.grounding import GroundingHead

    torch.manual_seed(0)
    head = GroundingHead(8, dropout=0.3, form="gps").eval()
    first, norm, last = head.mlp[0], head.mlp[2], head.mlp[4]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 8)
    h = torch.clamp(x @ first.weight.T + first.bias, min=0)
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + 1e-12) * norm.weight + norm.bias
    expected = (h @ last.weight.T + last.bias).squeeze(-1)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    model = GPSModel(tiny_config(dropout=0.1, grounding_head="gps", grounding_head_dropout=0.3))
    assert isinstance(model.grounding_head.mlp[2], torch.nn.LayerNorm) and model.grounding_head.mlp[3].p == 0.3


@pytest.mark.parametrize("rule", ["gps", "norms_embeddings", "none"])
def test_parameter_groups_cover_the_model_once_and_exempt_exactly_the_rule_s_set(rule):
    model = GPSModel(tiny_config())
    groups = optimizer_groups(model, gps_role, rule)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    # independent oracles: GPS's name test (SceneVerse optim/utils.py), and by module type
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding)
    exempt = set()
    for module_name, module in model.named_modules():
        for n, _ in module.named_parameters(prefix=module_name, recurse=False):
            if rule == "gps" and any(nd in n for nd in ["bias", "LayerNorm.bias", "LayerNorm.weight"]):
                exempt.add(n)
            if rule == "norms_embeddings" and (isinstance(module, norms)
                                               or n.endswith(("bias", "log_scale", "token_type"))):
                exempt.add(n)
    for group, members in by_group.items():
        for n in members:
            assert group.endswith("/no_decay") == (n in exempt), (group, n)
    assert "backbone.stem.conv.weight" in by_group["backbone"]
    assert "spatial.layers.0.attn.q_proj.weight" in by_group["transformers"]
    if rule != "none":
        assert "text.bert.embeddings.LayerNorm.weight" in by_group["text_encoder/no_decay"]
        assert ("scene_scale.log_scale" in by_group["heads/no_decay"]) == (rule == "norms_embeddings")


def test_optimizer_gives_each_role_its_learning_rate_and_no_decay_groups_none():
    from sparsegps.train.engine import OptimConfig, build_optimizer

    model = GPSModel(tiny_config())
    cfg = OptimConfig(lr_text_encoder=1e-5, lr_backbone=1e-3, lr_transformers=1e-4, lr_heads=5e-4, weight_decay=0.05)
    optimizer = build_optimizer(optimizer_groups(model, gps_role), cfg, global_batch=64, device_type="cpu")
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert got["backbone"] == (1e-3, 0.05) and got["backbone/no_decay"] == (1e-3, 0.0)
    assert got["transformers"] == (1e-4, 0.05) and got["heads/no_decay"] == (5e-4, 0.0)


def test_text_encoder_is_truncated_pretrained_minilm():
    enc = TextEncoder(TextEncoderConfig(num_layers=2))
    assert len(enc.bert.encoder.layer) == 2 and enc.hidden_size == 384
    tok = enc.tokenize(["a chair next to the table", "a red sofa"], torch.device("cpu"))
    with torch.no_grad():
        feats = enc(tok["input_ids"], tok["attention_mask"])
    assert feats.shape[:2] == tok["input_ids"].shape and feats.shape[2] == 384
    random = TextEncoder(TextEncoderConfig(num_layers=2, pretrained=False))
    emb_pre = enc.word_embeddings.weight
    assert not torch.allclose(emb_pre, random.word_embeddings.weight)  # the shipped weights were loaded


def test_parameter_counts_of_presets():
    tiny = GPSModel(tiny_config())
    assert count_parameters(tiny.backbone) < count_parameters(GPSModel(tiny_config(
        backbone=SpUNetConfig.preset("base"))).backbone)


@pytest.mark.slow
def test_overfits_four_synthetic_scenes_to_95_percent_referral_accuracy(tmp_path):
    from sparsegps.synth import SYNTH_VOCABULARY, generate_scene, preset

    torch.manual_seed(0)
    cfg = preset("demo")
    write_scenes([generate_scene(cfg, i) for i in range(4)], tmp_path, vocabulary=SYNTH_VOCABULARY, progress=False)
    ds = ScenesDataset(tmp_path, TransformConfig(voxel_size=0.15, augment=False))
    batch = collate_scenes([ds[i] for i in range(4)])
    referrals = sum(t["kind"] == "referral" for t in batch["texts"])
    assert referrals >= 20
    model = GPSModel(tiny_config(freeze_text=True, object_text="class_name", grounding_layers=2,
                                 loss={"object_text": 1.0, "scene_text": 0.0, "referral_object": 1.0,
                                       "grounding": 1.0, "mlm": 0.0}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    accuracy = 0.0
    for step in range(300):
        out = outputs_and_losses(model, batch)
        target, n = out["referrals"].target, out["referrals"].count
        accuracy = (out["grounding_logits"][:n].argmax(1) == target[:n]).float().mean().item()
        if accuracy >= 0.95:
            break
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert accuracy >= 0.95, f"referral accuracy {accuracy:.2f} after {step} steps"
