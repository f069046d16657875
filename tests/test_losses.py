"""GPS losses against hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from sparsegps import losses as L


def test_logit_scale_is_a_parameter_clamped_at_100():
    scale = L.LogitScale(init_temperature=0.07)
    assert [p for p in scale.parameters()] == [scale.log_scale]
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == 100.0


def test_symmetric_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = torch.tensor(2.0)
    # cosines: a0.b0 = 1, a0.b1 = 1/sqrt2, a1.b0 = 0, a1.b1 = 1/sqrt2
    c = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * c)))
    row1 = -math.log(math.exp(2 * c) / (math.exp(0) + math.exp(2 * c)))
    col0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    col1 = -math.log(math.exp(2 * c) / (math.exp(2 * c) + math.exp(2 * c)))
    per_row, count = L.symmetric_info_nce(a, b, s)
    assert count == 2
    assert per_row.tolist() == pytest.approx([(row0 + col0) / 2, (row1 + col1) / 2], rel=1e-6)


def test_multi_positive_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two objects of one class
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two class texts
    positive = torch.tensor([[True, False], [True, True]])
    s = torch.tensor(1.0)
    row0 = -math.log(math.e / (math.e + 1))
    row1 = -math.log((math.e + 1) / (math.e + 1))
    assert L.multi_positive_info_nce(a, b, positive, s).tolist() == pytest.approx([row0, row1], rel=1e-6)


def test_masked_object_cross_entropy_ignores_padding():
    logits = torch.tensor([[2.0, 1.0, 50.0], [0.0, 0.0, 0.0]])
    pad = torch.tensor([[False, False, True], [False, False, False]])
    target = torch.tensor([0, 2])
    expected = [-math.log(math.exp(2) / (math.exp(2) + math.e)), math.log(3)]
    assert L.masked_object_cross_entropy(logits, pad, target).tolist() == pytest.approx(expected, rel=1e-6)


def test_referral_contrastive_logits_are_scaled_cosines():
    objects = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    sentence = torch.tensor([[0.0, 5.0]])
    got = L.referral_contrastive_logits(objects, sentence, torch.tensor(10.0))
    assert torch.allclose(got, torch.tensor([[0.0, 10 / math.sqrt(2)]]))


def test_mask_tokens_follows_bert_80_10_10():
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (400, 64))
    attention = torch.ones_like(ids)
    attention[:, 60:] = 0
    special = torch.zeros_like(ids)
    special[:, 0] = 1
    masked, labels = L.mask_tokens(ids, attention, special, mask_token_id=3, vocab_size=1000, probability=0.15)
    chosen = labels != L.IGNORE_INDEX
    assert not chosen[:, 0].any() and not chosen[:, 60:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    frac = chosen.sum().item() / (400 * 59)
    assert 0.14 < frac < 0.16
    is_mask = (masked[chosen] == 3).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < is_mask < 0.83 and 0.08 < kept < 0.12


def test_mlm_loss_is_per_token_and_zero_where_ignored():
    logits = torch.randn(3, 7, requires_grad=True)
    loss = L.mlm_loss(logits, torch.full((3,), L.IGNORE_INDEX))
    loss.sum().backward()
    assert loss.tolist() == [0.0, 0.0, 0.0] and logits.grad is not None
    labels = torch.tensor([1, L.IGNORE_INDEX, 4])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]], reduction="none")
    got = L.mlm_loss(logits, labels)
    assert got[1] == 0 and torch.allclose(got[[0, 2]], expected)


def test_global_mean_share_in_one_process_is_the_mean_and_zero_without_terms():
    terms = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    share = L.global_mean_share(terms.sum(), torch.tensor(3.0))
    share.backward()
    assert share.item() == 3.0 and terms.grad.tolist() == pytest.approx([1 / 3] * 3)
    empty = torch.zeros(0, requires_grad=True)
    assert L.global_mean_share(empty.sum(), torch.tensor(0.0)).item() == 0.0


def test_contrastive_logits_are_fp32_under_bf16_autocast():
    """At scale 100 a bf16 matmul would move the loss by ~1e-2; computed in fp32 it does not move."""
    g = torch.Generator().manual_seed(0)
    a, b, objects = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g), torch.randn(6, 5, 32, generator=g)
    scale = torch.tensor(100.0)
    plain = L.symmetric_info_nce(a, b, scale)[0], L.referral_contrastive_logits(objects, b, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = L.symmetric_info_nce(a, b, scale)[0], L.referral_contrastive_logits(objects, b, scale)
    for p, m in zip(plain, mixed):
        assert m.dtype == torch.float32 and torch.allclose(p, m, rtol=1e-6, atol=1e-5)
