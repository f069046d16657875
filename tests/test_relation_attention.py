"""Relational attention: its box-pair features by hand, their invariance to the augmentations the
relations are invariant to, and the attention against an element-by-element oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsegps.data import Scene, SceneObject
from sparsegps.data.transforms import RandomRotateZ, RandomScale, scene_to_sample
from sparsegps.models.relation_attention import RelationalAttention, box_pair_features
from sparsegps.models.spatial_attention import pairwise_features


def test_box_pair_features_by_hand():
    # a 1 m cube on the floor and a 0.5 x 0.5 x 0.2 box resting on it, 0.3 m to the side
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0, 1.0], [0.3, 0.0, 1.1, 0.5, 0.5, 0.2]]])
    f = box_pair_features(boxes)[0]
    d = math.sqrt(0.3 ** 2 + 0.6 ** 2)
    expected_01 = [d, 0.3, 0.3 - 0.5 - 0.25, -0.6, 0.0 - 1.2, 1.0 - 1.0, math.log(1.0 / 0.05)]
    np.testing.assert_allclose(f[0, 1].numpy(), expected_01, atol=1e-4)
    # i above j: the upper box's bottom clears the cube's top by 0 (it rests on it)
    expected_10 = [d, 0.3, -0.45, 0.6, 1.0 - 1.0, 0.0 - 1.2, math.log(0.05)]
    np.testing.assert_allclose(f[1, 0].numpy(), expected_10, atol=1e-4)
    assert f[0, 0, 0].item() == pytest.approx(0.0, abs=1e-3)  # an object to itself: no distance


def _scene(rng) -> Scene:
    objects = [SceneObject(i, "chair", rng.uniform(-3, 3, 3), rng.uniform(0.3, 1.5, 3)) for i in range(6)]
    xyz = rng.uniform(-3, 3, (50, 3)).astype(np.float32)
    return Scene("s", xyz, np.zeros((50, 3), np.uint8), np.full(50, -1, np.int32), np.full(50, -1, np.int16), objects)


def _boxes(sample) -> torch.Tensor:
    return torch.tensor(np.array([np.concatenate([o.center, o.size]) for o in sample["objects"]]))[None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relation_features_are_invariant_to_turning_the_scene_and_scale_only_multiplies_metres(seed):
    """Turning a scene about the vertical axis (any angle, box sizes kept) leaves every box-pair
    feature and GPS's distance and elevation features unchanged (to 1e-4); a scale factor s
    multiplies the metric features by s and leaves the normalised ones unchanged. The azimuth
    features turn with the scene: our relations are view-independent and never read them."""
    rng = np.random.default_rng(seed)
    scene = _scene(rng)
    before = _boxes(scene_to_sample(scene))
    turned = RandomRotateZ(box_sizes="kept")(scene_to_sample(scene), rng)
    after = _boxes(turned)
    assert not torch.allclose(before[..., :2], after[..., :2], atol=1e-2)  # it did turn
    torch.testing.assert_close(box_pair_features(after), box_pair_features(before), atol=1e-4, rtol=1e-4)
    lengths = torch.tensor([6])
    gps_before, gps_after = pairwise_features(before[..., :3], lengths), pairwise_features(after[..., :3], lengths)
    torch.testing.assert_close(gps_after[..., :3], gps_before[..., :3], atol=1e-4, rtol=1e-4)

    scaled = RandomScale(1.25, 1.25)(scene_to_sample(scene), rng)
    f, g = box_pair_features(_boxes(scaled)), box_pair_features(before)
    torch.testing.assert_close(f[..., :6], 1.25 * g[..., :6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f[..., 6], g[..., 6], atol=1e-4, rtol=1e-4)  # volume ratios unchanged
    torch.testing.assert_close(pairwise_features(_boxes(scaled)[..., :3], lengths)[..., :3], gps_before[..., :3],
                               atol=1e-4, rtol=1e-4)


def test_enclosing_box_sizes_change_with_the_angle():
    """The documented cost of `box_sizes: enclosing` (GPS's pipeline): at 45 degrees a square box's
    footprint grows by sqrt(2), so size features depend on the pose."""
    from sparsegps.data.transforms import rotate_z

    scene = _scene(np.random.default_rng(0))
    square = SceneObject(0, "table", [0, 0, 0], [1.0, 1.0, 0.5])
    sample = {**scene_to_sample(scene), "objects": [square]}
    enclosing = rotate_z(dict(sample), math.pi / 4, "enclosing")["objects"][0].size
    kept = rotate_z(dict(sample), math.pi / 4, "kept")["objects"][0].size
    np.testing.assert_allclose(enclosing, [math.sqrt(2), math.sqrt(2), 0.5], rtol=1e-5)
    np.testing.assert_allclose(kept, [1.0, 1.0, 0.5], rtol=1e-6)


def _oracle(attn: RelationalAttention, x, boxes, pad):
    """The attention element by element, from its definition."""
    r, length, d = x.shape
    h, dh, rank = attn.heads, attn.head_dim, attn.rank
    qkv = attn.qkv(x)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    pair = attn.pair(box_pair_features(boxes))
    out = torch.zeros(r, length, d)
    for b in range(r):
        for head in range(h):
            sl = slice(head * dh, (head + 1) * dh)
            for i in range(length):
                logits = []
                for j in range(length):
                    logit = (q[b, i, sl] @ k[b, j, sl]) / math.sqrt(dh) + pair[b, i, j, head * (1 + rank)]
                    logits.append(logit if not pad[b, j] else torch.tensor(float("-inf")))
                weights = torch.softmax(torch.stack(logits), 0)
                for j in range(length):
                    e = pair[b, i, j, head * (1 + rank) + 1:(head + 1) * (1 + rank)]
                    out[b, i, sl] += weights[j] * (v[b, j, sl] + e @ attn.pair_value[head])
    return attn.out(out)


def test_relational_attention_matches_an_element_by_element_oracle_and_ignores_padding():
    torch.manual_seed(0)
    attn = RelationalAttention(d_model=8, num_heads=2, rank=3, hidden=5).eval()
    x = torch.randn(2, 4, 8)
    boxes = torch.cat([torch.randn(2, 4, 3), torch.rand(2, 4, 3) + 0.1], dim=-1)
    pad = torch.tensor([[False, False, False, True], [False, False, False, False]])
    got = attn(x, box_pair_features(boxes), pad)
    torch.testing.assert_close(got, _oracle(attn, x, boxes, pad), atol=1e-5, rtol=1e-5)
    # what sits in a padded slot never changes a real object's output
    x2, boxes2 = x.clone(), boxes.clone()
    x2[0, 3], boxes2[0, 3] = 100.0, 7.0
    torch.testing.assert_close(attn(x2, box_pair_features(boxes2), pad)[0, :3], got[0, :3])
    # a row without any real object gives zeros before the output projection
    empty = attn(x[:1], box_pair_features(boxes[:1]), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(empty, attn.out.bias.expand_as(empty))


def test_pair_terms_computed_per_scene_equal_those_of_every_row():
    """Rows that share a scene read its pair terms, computed once: the same outputs and gradients
    as computing them for every row."""
    torch.manual_seed(0)
    attn = RelationalAttention(d_model=8, num_heads=2, rank=3, hidden=5).eval()
    boxes = torch.cat([torch.randn(3, 4, 3), torch.rand(3, 4, 3) + 0.1], dim=-1)
    scene_index = torch.tensor([2, 0, 2, 1, 2])
    x = torch.randn(5, 4, 8, requires_grad=True)
    pad = torch.rand(5, 4) < 0.3
    shared = attn(x, box_pair_features(boxes), pad, scene_index)
    shared.square().sum().backward()
    grads_shared = [p.grad.clone() for p in attn.parameters()] + [x.grad.clone()]
    attn.zero_grad(), x.grad.zero_()
    every_row = attn(x, box_pair_features(boxes[scene_index]), pad)
    every_row.square().sum().backward()
    torch.testing.assert_close(shared, every_row, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_shared, [p.grad for p in attn.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("angle", [0.3, math.pi / 4, 2.0])
def test_enclosing_boxes_move_only_gap_and_volume_and_by_the_documented_amount(angle):
    """Under `box_sizes: enclosing` a turn by theta keeps five features and moves the other two by
    the amounts `box_pair_features` documents, derived from each box's own footprint w x d:
    gap by -(r_i + r_j)(|cos| + |sin| - 1), log_volume by log g_i - log g_j with
    g = 1 + (w/d + d/w)|cos sin|."""
    from sparsegps.data.transforms import rotate_z

    rng = np.random.default_rng(7)
    scene = _scene(rng)
    before = _boxes(scene_to_sample(scene))
    after = _boxes(rotate_z(scene_to_sample(scene), angle, "enclosing"))
    f, g = box_pair_features(before)[0], box_pair_features(after)[0]
    keep = [0, 1, 3, 4, 5]  # d, d_xy, dz, clear_above, clear_below
    torch.testing.assert_close(g[..., keep], f[..., keep], atol=1e-4, rtol=1e-4)
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    w, d = before[0, :, 3].double(), before[0, :, 4].double()
    radius = (w + d) / 4
    gap_shift = -(radius[:, None] + radius[None, :]) * (c + s - 1)
    torch.testing.assert_close((g[..., 2] - f[..., 2]).double(), gap_shift, atol=1e-4, rtol=1e-4)
    growth = torch.log(1 + (w / d + d / w) * c * s)
    torch.testing.assert_close((g[..., 6] - f[..., 6]).double(), growth[:, None] - growth[None, :], atol=1e-4, rtol=1e-4)
    if angle == math.pi / 4:  # the largest gap shift: 0.41 (r_i + r_j)
        assert (g[..., 2] - f[..., 2]).abs().max() > 0.3 * (radius.max() * 2 * (math.sqrt(2) - 1)).item()
