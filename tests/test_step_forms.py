"""The cheaper forms of a pre-training step against the forms they replace.

Exact equivalences (the same function, computed with less work) are checked against an oracle that
computes the replaced form: the text encoder in length groups against one padded call, the packed
grounding layers against `nn.TransformerEncoderLayer` on every referral's padded row, the pair
terms per scene against per row, the cosine without normalising the large side against
`F.normalize`; then the whole model's losses and gradients with every replaced form swapped back
in, on batches with and without referrals, captions and objects. Named options (MLM over the
corpus vocabulary) are checked against their definition and through a config and an export."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsegps import losses as L
from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, write_scenes
from sparsegps.models.gps import GPSModel
from sparsegps.train.pretrain import pretrain
from sparsegps.models.grounding import GroundingEncoder, MLMHead, PackedEncoderLayer, TokenPacking
from sparsegps.models.relation_attention import box_pair_features
from sparsegps.models.text_encoder import TextEncoder, TextEncoderConfig, corpus_token_ids, length_groups

from helpers import TINY_MODEL, VOCAB, make_scene, tiny_model_config
from multirank import LACKS, without


# ------------------------------------------------------------------------------ text encoder

def test_length_groups_are_the_cheapest_split_of_the_sorted_lengths():
    """Brute force over every split of the sorted distinct lengths into consecutive groups."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = rng.integers(2, 20, size=int(rng.integers(1, 12))).tolist()
        cost = 7
        groups = length_groups(lengths, cost)
        assert sorted(i for rows, _ in groups for i in rows) == list(range(len(lengths)))
        for rows, longest in groups:
            assert longest == max(lengths[i] for i in rows)
        got = sum(len(rows) * longest + cost for rows, longest in groups)
        distinct = sorted(set(lengths))
        best = math.inf
        for cuts in itertools.product([False, True], repeat=len(distinct) - 1):
            total, members = 0, 0
            for k, value in enumerate(distinct):
                members += lengths.count(value)
                if k == len(distinct) - 1 or cuts[k]:
                    total += members * value + cost
                    members = 0
            best = min(best, total)
        assert got == best


def test_the_text_encoder_in_length_groups_gives_one_padded_call_s_features_and_gradients():
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(num_layers=2, max_length=24)).eval()
    texts = ["a chair", "the table next to the bed by the window on the left", "", "the lamp", "a bed",
             "the chair that is closest to the door and farthest from the table"] * 3
    tok = encoder.tokenize(texts, torch.device("cpu"))
    assert len(length_groups(tok["attention_mask"].sum(1).tolist())) > 1  # the grouped path runs
    real = tok["attention_mask"].bool()
    grouped = encoder(tok["input_ids"], tok["attention_mask"])
    grouped[real].square().sum().backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    padded = encoder.bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    padded[real].square().sum().backward()
    torch.testing.assert_close(grouped[real], padded[real], atol=2e-5, rtol=1e-5)
    for name, p in encoder.named_parameters():
        if p.grad is not None:
            # summed over thousands of terms in another order: rounding, scaled by the gradient's size
            atol = max(1e-4, 1e-5 * float(p.grad.abs().max()))
            torch.testing.assert_close(grads[name], p.grad, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------- grounding layers

def test_packed_layer_is_nn_transformer_encoder_layer_on_the_real_tokens():
    torch.manual_seed(3)
    reference = nn.TransformerEncoderLayer(16, 4, 32, 0.0, activation="gelu", batch_first=True)
    torch.manual_seed(3)
    packed = PackedEncoderLayer(16, 4, 32, 0.0)
    # the same parameters, names and initial values at the same seed: old checkpoints load
    assert list(reference.state_dict()) == list(packed.state_dict())
    for (name, a), b in zip(reference.state_dict().items(), packed.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(5, 7, 16, requires_grad=True)
    pad = torch.rand(5, 7) < 0.35
    pad[:, 0] = False
    tokens = TokenPacking(pad)
    got = tokens.unpack(packed(tokens.pack(x), tokens))
    got[~pad].square().sum().backward()
    grads, x_grad = [p.grad.clone() for p in packed.parameters()], x.grad.clone()
    x.grad = None
    want = reference(x, src_key_padding_mask=pad)
    want[~pad].square().sum().backward()
    torch.testing.assert_close(got[~pad], want[~pad], atol=1e-5, rtol=1e-5)
    assert not got[pad].any()
    torch.testing.assert_close(x_grad, x.grad, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, reference.parameters()):
        torch.testing.assert_close(a, b.grad, atol=1e-5, rtol=1e-5)


def test_joined_packing_is_the_packing_of_the_layouts_side_by_side():
    text_pad = torch.tensor([[False, False, True], [False, True, True]])
    object_pad = torch.tensor([[False, True], [False, False]])
    a, b = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    joined = TokenPacking.joined(TokenPacking(text_pad), TokenPacking(object_pad))
    h = torch.cat([TokenPacking(text_pad).pack(a), TokenPacking(object_pad).pack(b)])
    both = torch.cat([a, b], dim=1)
    keep = ~torch.cat([text_pad, object_pad], dim=1)
    torch.testing.assert_close(joined.unpack(h)[keep], both[keep])
    assert not joined.unpack(h)[~keep].any()


def _shared_reference_layer(packed: PackedEncoderLayer) -> nn.TransformerEncoderLayer:
    """An nn.TransformerEncoderLayer whose parameters are `packed`'s own (gradients land on them)."""
    d, ffn = packed.linear1.in_features, packed.linear1.out_features
    reference = nn.TransformerEncoderLayer(d, packed.self_attn.num_heads, ffn, packed.self_attn.dropout,
                                           activation="gelu", batch_first=True)
    for name, parameter in packed.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(reference.get_submodule(owner), attr, parameter)
    return reference.train(packed.training)


def reference_grounding(encoder: GroundingEncoder):
    """The grounding encoder as it was: every referral's row built from its scene (location
    embedding, pair geometry per row), nn.TransformerEncoderLayer over the padded rows."""
    layers = [_shared_reference_layer(layer) for layer in encoder.layers]

    def forward(text, text_pad, objects, object_pad, boxes, scene_index):
        boxes = boxes[scene_index]
        objects = objects[scene_index] + encoder.token_type[1] + encoder.location(boxes)
        object_pad = object_pad[scene_index]
        x = torch.cat([text + encoder.token_type[0], objects], dim=1)
        pad = torch.cat([text_pad, object_pad], dim=1)
        t = text.shape[1]
        if encoder.attention == "spatial":
            centers, lengths = boxes[..., :3], (~object_pad).sum(dim=1)
            inv_max_dist = encoder.object_layers[0].attn.pair_distance_scale(objects, centers, lengths)
            object_args = (centers, lengths, inv_max_dist)
        else:
            object_args = (box_pair_features(boxes), object_pad)
        for k, layer in enumerate(layers):
            x = layer(x, src_key_padding_mask=pad)
            if len(encoder.object_layers):
                x = torch.cat([x[:, :t], encoder.object_layers[k](x[:, t:], *object_args)], dim=1)
        return x[:, :t], x[:, t:]
    return forward


def reference_scaled_cosine(a, b, scale):
    return scale.float() * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def test_scaled_cosine_is_the_cosine_of_normalised_rows():
    torch.manual_seed(0)
    a = torch.randn(50, 8)
    a[3] = 0.0  # a zero row: F.normalize's floor
    b, weight, scale = torch.randn(6, 8), torch.randn(50, 6), torch.tensor(12.0)
    results = []
    for cosine in (L.scaled_cosine, reference_scaled_cosine):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        logits = cosine(a_, b_, scale)
        (logits * weight).sum().backward()
        results.append((logits, a_.grad, b_.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ whole model

@pytest.fixture(scope="module")
def lacking_batches(tmp_path_factory):
    """Batches of 2 scenes: complete, and lacking each kind of content in turn."""
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, f"s{i}", 400, int(rng.integers(2, 5))) for i in range(2 * len(LACKS))]
    for k, lack in enumerate(LACKS):
        scenes[2 * k + 1] = without(scenes[2 * k + 1], lack, rng)
    out = tmp_path_factory.mktemp("lacking")
    write_scenes(scenes, out, vocabulary=VOCAB, progress=False)
    dataset = ScenesDataset(out, TransformConfig(voxel_size=0.15, augment=False))
    return {lack: collate_scenes([dataset[2 * k], dataset[2 * k + 1]]) for k, lack in enumerate(LACKS)}


def _losses_and_grads(model, batch):
    from sparsegps.criterion import GPSCriterion

    model.zero_grad()
    torch.manual_seed(0)  # the same MLM masks
    losses = GPSCriterion.of(model.cfg)(model(batch), batch)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("attention", ["plain", "spatial", "relational"])
def test_the_model_s_losses_and_gradients_equal_those_of_the_forms_replaced(lacking_batches, attention, monkeypatch):
    torch.manual_seed(0)
    model = GPSModel(tiny_model_config(grounding_attention=attention, class_names=VOCAB,
                                       loss={"object_class": 0.5, "dense_text": 1.0})).train()
    for lack, batch in lacking_batches.items():
        got, got_grads = _losses_and_grads(model, batch)
        with monkeypatch.context() as patch:
            patch.setattr(model.grounding, "forward", reference_grounding(model.grounding))
            patch.setattr(model.text, "forward", lambda ids, mask: model.text.bert(
                input_ids=ids, attention_mask=mask).last_hidden_state)
            patch.setattr(L, "scaled_cosine", reference_scaled_cosine)
            model._text_cache.clear()
            want, want_grads = _losses_and_grads(model, batch)
        model._text_cache.clear()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=2e-5, msg=f"{lack}: {name}")
        assert set(got_grads) == set(want_grads)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=5e-5, rtol=5e-4, msg=f"{lack}: {name}")


# ----------------------------------------------------------------------- MLM over the corpus

def test_mlm_over_the_corpus_is_the_full_softmax_restricted_to_its_tokens():
    torch.manual_seed(0)
    full = MLMHead(8, 6, vocab_size=50)
    corpus = MLMHead(8, 6, vocab_size=50, token_ids=[7, 3, 41, 3, 12])
    corpus.load_state_dict(full.state_dict())  # the same parameters, names and shapes
    with torch.no_grad():
        full.bias.normal_()
        corpus.bias.copy_(full.bias)
    x, embeddings = torch.randn(4, 8), torch.randn(50, 6)
    ids = torch.tensor([3, 7, 12, 41])
    torch.testing.assert_close(corpus(x, embeddings), full(x, embeddings)[:, ids])
    targets = torch.tensor([41, 3, 9, 12])
    classes = corpus.targets(targets)
    assert classes.tolist() == [3, 0, L.IGNORE_INDEX, 2]
    loss = L.mlm_loss(corpus(x, embeddings), classes)
    want = F.cross_entropy(full(x, embeddings)[:, ids][[0, 1, 3]], torch.tensor([3, 0, 2]), reduction="none")
    torch.testing.assert_close(loss[[0, 1, 3]], want)
    assert loss[2] == 0
    with pytest.raises(ValueError, match="must lie in"):
        MLMHead(8, 6, vocab_size=50, token_ids=[50])


def test_corpus_token_ids_are_every_token_the_texts_use_and_nothing_else():
    from sparsegps.models.text_encoder import load_tokenizer

    tokenizer = load_tokenizer(TextEncoderConfig())
    texts = ["the chair next to the table", "a lamp", "the chair next to the table"]
    want = set()
    for text in texts:
        want.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    got = corpus_token_ids(texts, tokenizer, batch=2)
    assert got == sorted(want)
    assert not set(got) & set(tokenizer.all_special_ids)


def test_pretraining_fills_the_corpus_vocabulary_and_exports_it(tmp_path):
    """The tokens of the training texts (under a strict hold-out, without the texts naming held-out
    classes, which never reach a batch; under a labels hold-out, with them)."""
    from helpers import pretrain_config, write_pretrain_shards

    from sparsegps.data import SceneStore
    from sparsegps.exports import load_model
    from sparsegps.models.text_encoder import load_tokenizer
    from sparsegps.train.pretrain import training_texts, with_corpus_tokens

    shards = write_pretrain_shards(tmp_path / "data")
    cfg = pretrain_config(shards, tmp_path / "run", steps=2, checkpoint_every=2,
                          model={**TINY_MODEL, "mlm_vocabulary": "corpus"})
    cfg.data.holdout_classes, cfg.data.holdout = ["bed"], "strict"
    pretrain(cfg, progress=False)
    exported, info = load_model(tmp_path / "run" / "export.safetensors", torch.device("cpu"), ("pretraining",), "test")
    assert exported.mlm_head.restricted and exported.cfg.mlm_vocabulary == "corpus"
    assert info.holdout == "strict" and info.holdout_classes == ["bed"]
    tokenizer = load_tokenizer(exported.cfg.text)
    texts = SceneStore(shards / "train").texts()

    def tokens(kept):
        used = set()
        for text in kept:
            used.update(tokenizer(text, add_special_tokens=False)["input_ids"])
        return sorted(used - set(tokenizer.all_special_ids))

    bed = tokenizer.convert_tokens_to_ids("bed")
    assert exported.cfg.mlm_token_ids == tokens([t for t in texts if "bed" not in t]) and bed not in tokens(
        [t for t in texts if "bed" not in t])
    cfg.data.holdout = "labels"
    cfg.model.mlm_token_ids = []
    filled = with_corpus_tokens(cfg, training_texts(cfg)).model.mlm_token_ids
    assert filled == tokens(texts) and bed in filled
