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
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert L.symmetric_info_nce(a, b, s).item() == pytest.approx(expected, rel=1e-6)


def test_multi_positive_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two objects of one class
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two class texts
    positive = torch.tensor([[True, False], [True, True]])
    s = torch.tensor(1.0)
    row0 = -math.log(math.e / (math.e + 1))
    row1 = -math.log((math.e + 1) / (math.e + 1))
    assert L.multi_positive_info_nce(a, b, positive, s).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_masked_object_cross_entropy_ignores_padding():
    logits = torch.tensor([[2.0, 1.0, 50.0], [0.0, 0.0, 0.0]])
    pad = torch.tensor([[False, False, True], [False, False, False]])
    target = torch.tensor([0, 2])
    expected = (-math.log(math.exp(2) / (math.exp(2) + math.e)) + math.log(3)) / 2
    assert L.masked_object_cross_entropy(logits, pad, target).item() == pytest.approx(expected, rel=1e-6)


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


def test_mlm_loss_without_masked_tokens_is_zero_with_gradient():
    logits = torch.randn(3, 7, requires_grad=True)
    loss = L.mlm_loss(logits, torch.full((3,), L.IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
    labels = torch.tensor([1, L.IGNORE_INDEX, 4])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(L.mlm_loss(logits, labels), expected)
