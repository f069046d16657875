"""The PyTorch spatial attention (the kernel's oracle) and the layer built on it.

Checked against numbers worked out by hand, against an independent transcription of GPS's
MultiHeadAttentionSpatial / calc_pairwise_locs, and against symmetries the formula must have.
"""
import math

import numpy as np
import pytest
import torch

from sparsegps.models.spatial_attention import (
    SpatialSelfAttention,
    inverse_max_pair_distance,
    pairwise_features,
    reference_spatial_attention,
)
from sparsegps.models.spatial_transformer import SpatialTransformer

EPS = 1e-10


def _random_inputs(batch, heads, length, head_dim, mode, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    centers = torch.rand(batch, length, 3, generator=gen) * 4.0
    if mode == "cond":
        weights = torch.randn(batch, length, heads, 6, generator=gen)
    else:
        weights = torch.randn(heads, 6, generator=gen) * 0.5
        weights[:, 0] += 0.5  # keep a fair share of relu gates open
    return q, k, v, centers, weights


# ---------------------------------------------------------------------------------------------
# Hand-computed example
# ---------------------------------------------------------------------------------------------

# Three objects: the origin, one at (3, 4, 0) and one 12 above the origin. Pair distances are
# 5, 12 and 13, so max_dist = 13.
HAND_CENTERS = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 12.0]])


def test_pairwise_features_of_a_right_triangle():
    f = pairwise_features(torch.tensor(HAND_CENTERS, dtype=torch.float32)[None], torch.tensor([3]))[0]
    # i = 1, j = 0: D = (3, 4, 0), d = 5, d2 = 5
    np.testing.assert_allclose(f[1, 0].numpy(), [5 / 13, 0.0, 1.0, 4 / 5, 3 / 5], atol=1e-6)
    # i = 0, j = 2: D = (0, 0, -12), d = 12, d2 = sqrt(eps): cos elevation ~ 0, azimuth terms 0
    np.testing.assert_allclose(f[0, 2].numpy(), [12 / 13, -1.0, 0.0, 0.0, 0.0], atol=1e-6)
    # i = 2, j = 1: D = (-3, -4, 12), d = 13, d2 = 5
    np.testing.assert_allclose(f[2, 1].numpy(), [1.0, 12 / 13, 5 / 13, -4 / 5, -3 / 5], atol=1e-6)
    # i = j: d = d2 = sqrt(eps), so only the cos elevation is 1
    np.testing.assert_allclose(f[1, 1].numpy(), [math.sqrt(EPS) / 13, 0.0, 1.0, 0.0, 0.0], atol=1e-6)


def _hand_features(centers):
    """Per-pair features in plain numpy scalar arithmetic over valid objects."""
    n = len(centers)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dx, dy, dz = centers[i] - centers[j]
            dist[i, j] = math.sqrt(dx * dx + dy * dy + dz * dz + EPS)
    max_dist = dist.max()
    feats = np.zeros((n, n, 5))
    for i in range(n):
        for j in range(n):
            dx, dy, dz = centers[i] - centers[j]
            d = dist[i, j]
            d2 = math.sqrt(dx * dx + dy * dy + EPS)
            feats[i, j] = [d / max_dist, dz / d, d2 / d, dy / d2, dx / d2]
    return feats


def _hand_attention(q, k, v, feats, gate_weights_for_row, mode):
    """One head of spatial attention with explicit loops; gate_weights_for_row(i) -> 6 numbers."""
    n, dh = q.shape
    out = np.zeros_like(q)
    for i in range(n):
        w = gate_weights_for_row(i)
        logits = np.zeros(n)
        for j in range(n):
            z = w[0] + float(np.dot(w[1:], feats[i, j]))
            gate = 1.0 / (1.0 + math.exp(-z)) if mode == "cond" else max(z, 0.0)
            logits[j] = float(np.dot(q[i], k[j])) / math.sqrt(dh) + math.log(max(gate, 1e-6))
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[i] = p @ v
    return out


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_reference_matches_hand_computed_three_objects(mode):
    rng = np.random.default_rng(3)
    heads, head_dim = 2, 4
    q, k, v = (rng.normal(size=(1, heads, 3, head_dim)) for _ in range(3))
    if mode == "cond":
        weights = rng.normal(size=(1, 3, heads, 6))
    else:
        weights = np.array([[0.4, 1.0, -0.5, 0.3, 0.2, -0.1], [0.1, -2.0, 0.5, 0.5, 0.0, 0.3]])
    feats = _hand_features(HAND_CENTERS)
    expected = np.stack([
        _hand_attention(q[0, h], k[0, h], v[0, h], feats,
                        (lambda i, h=h: weights[0, i, h]) if mode == "cond" else (lambda i, h=h: weights[h]),
                        mode)
        for h in range(heads)
    ])[None]
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = reference_spatial_attention(t(q), t(k), t(v), t(HAND_CENTERS)[None], t(weights), torch.tensor([3]),
                                      mode=mode)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Against GPS's own formulation
# ---------------------------------------------------------------------------------------------


def _gps_pairwise_locs(obj_centers):
    """GPS's 'center' pairwise locations, spatial_dim 5, max over all L x L slots."""
    diff = obj_centers.unsqueeze(2) - obj_centers.unsqueeze(1)  # [b, l, t, 3], c_l - c_t
    dists = torch.sqrt((diff ** 2).sum(3) + EPS)
    max_per_scene = dists.flatten(1).max(dim=1).values
    dists_2d = torch.sqrt((diff[..., :2] ** 2).sum(3) + EPS)
    return torch.stack([dists / max_per_scene[:, None, None], diff[..., 2] / dists, dists_2d / dists,
                        diff[..., 1] / dists_2d, diff[..., 0] / dists_2d], dim=3)


def _gps_attention(q, k, v, pairwise_locs, mode, cond_weights=None, loc_fc_weight=None, loc_fc_bias=None):
    """GPS's fused logits with heads first ([h, b, l, d] tensors), no padding."""
    attn = torch.einsum("hbld,hbtd->hblt", q, k) / math.sqrt(q.shape[-1])
    if mode == "cond":  # cond_weights [h, b, l, 6]
        loc = torch.einsum("hbld,bltd->hblt", cond_weights[..., 1:], pairwise_locs) + cond_weights[..., :1]
        loc = torch.sigmoid(loc)
    else:  # Linear(5 -> h) on the pair features, then relu
        loc = torch.relu(pairwise_locs @ loc_fc_weight.T + loc_fc_bias).permute(3, 0, 1, 2)
    fused = torch.softmax(torch.log(torch.clamp(loc, min=1e-6)) + attn, dim=3)
    return torch.einsum("hblt,hbtv->hblv", fused, v)


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_reference_matches_gps_formulation_on_unpadded_batch(mode):
    batch, heads, length, head_dim = 2, 3, 9, 8
    q, k, v, centers, weights = _random_inputs(batch, heads, length, head_dim, mode, seed=1)
    lengths = torch.full((batch,), length)
    ours = reference_spatial_attention(q, k, v, centers, weights, lengths, mode=mode)
    to_gps = lambda t: t.permute(1, 0, 2, 3)  # noqa: E731  [b, h, l, d] -> [h, b, l, d]
    locs = _gps_pairwise_locs(centers)
    if mode == "cond":
        gps = _gps_attention(to_gps(q), to_gps(k), to_gps(v), locs, mode, cond_weights=weights.permute(2, 0, 1, 3))
    else:
        gps = _gps_attention(to_gps(q), to_gps(k), to_gps(v), locs, mode,
                             loc_fc_weight=weights[:, 1:], loc_fc_bias=weights[:, 0])
    torch.testing.assert_close(ours, to_gps(gps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_layer_matches_gps_module_math(mode):
    """The layer's projections and head split follow GPS's MultiHeadAttentionSpatial."""
    torch.manual_seed(0)
    batch, length, d_model, heads = 2, 7, 24, 3
    layer = SpatialSelfAttention(d_model, heads, mode=mode, backend="reference")
    x = torch.randn(batch, length, d_model)
    centers = torch.rand(batch, length, 3) * 3
    ours = layer(x, centers, torch.full((batch,), length))

    def heads_first(t):  # GPS: 'b l (head k) -> head b l k'
        return t.view(batch, length, heads, -1).permute(2, 0, 1, 3)

    q, k, v = heads_first(layer.q_proj(x)), heads_first(layer.k_proj(x)), heads_first(layer.v_proj(x))
    locs = _gps_pairwise_locs(centers)
    if mode == "cond":
        cond = layer.gate_proj(x).view(batch, length, heads, 6).permute(2, 0, 1, 3)  # 'b l (h d) -> h b l d'
        attended = _gps_attention(q, k, v, locs, mode, cond_weights=cond)
    else:
        attended = _gps_attention(q, k, v, locs, mode, loc_fc_weight=layer.gate_weights[:, 1:],
                                  loc_fc_bias=layer.gate_weights[:, 0])
    gps = layer.out_proj(attended.permute(1, 2, 0, 3).reshape(batch, length, d_model))
    torch.testing.assert_close(ours, gps, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Symmetries and padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_permuting_objects_permutes_outputs(mode):
    batch, heads, length, head_dim = 2, 2, 11, 8
    q, k, v, centers, weights = _random_inputs(batch, heads, length, head_dim, mode, seed=2)
    lengths = torch.full((batch,), length)
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(5))
    out = reference_spatial_attention(q, k, v, centers, weights, lengths, mode=mode)
    permuted_weights = weights[:, perm] if mode == "cond" else weights
    out_perm = reference_spatial_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], centers[:, perm],
                                           permuted_weights, lengths, mode=mode)
    torch.testing.assert_close(out_perm, out[:, :, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_padding_objects_leave_valid_outputs_unchanged(mode):
    batch, heads, length, head_dim, extra = 2, 2, 8, 8, 5
    q, k, v, centers, weights = _random_inputs(batch, heads, length, head_dim, mode, seed=3)
    lengths = torch.tensor([length, 5])
    out = reference_spatial_attention(q, k, v, centers, weights, lengths, mode=mode)

    gen = torch.Generator().manual_seed(9)
    pad = lambda t, dim: torch.cat(  # noqa: E731  random junk in the new slots
        [t, torch.randn(*t.shape[:dim], extra, *t.shape[dim + 1:], generator=gen) * 50], dim=dim)
    padded_weights = pad(weights, 1) if mode == "cond" else weights
    out_padded = reference_spatial_attention(pad(q, 2), pad(k, 2), pad(v, 2), pad(centers, 1), padded_weights,
                                             lengths, mode=mode)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out_padded[b, :, :n], out[b, :, :n], rtol=1e-5, atol=1e-6)


def test_scene_without_objects_gives_zeros_and_finite_gradients():
    q, k, v, centers, weights = _random_inputs(2, 2, 6, 8, "cond", seed=4)
    for t in (q, k, v, weights):
        t.requires_grad_(True)
    out = reference_spatial_attention(q, k, v, centers, weights, torch.tensor([0, 6]), mode="cond")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.square().sum().backward()
    for t in (q, k, v, weights):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))


def test_reference_rejects_mismatched_weights():
    q, k, v, centers, weights = _random_inputs(1, 2, 4, 8, "cond")
    with pytest.raises(ValueError, match="weights for mode 'mul'"):
        reference_spatial_attention(q, k, v, centers, weights, torch.tensor([4]), mode="mul")


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_layer_runs_and_every_parameter_gets_gradient(mode):
    torch.manual_seed(1)
    layer = SpatialSelfAttention(32, 4, mode=mode, backend="auto")
    x = torch.randn(3, 10, 32)
    centers = torch.rand(3, 10, 3) * 5
    lengths = torch.tensor([10, 4, 7])
    out = layer(x, centers, lengths)
    assert out.shape == (3, 10, 32)
    assert torch.isfinite(out).all()
    valid = torch.arange(10)[None, :] < lengths[:, None]
    out[valid].square().sum().backward()
    expected = {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                "out_proj.weight", "out_proj.bias"}
    expected |= {"gate_proj.weight", "gate_proj.bias"} if mode == "cond" else {"gate_weights"}
    assert {name for name, _ in layer.named_parameters()} == expected
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_layer_auto_backend_uses_reference_on_cpu():
    layer = SpatialSelfAttention(16, 2)
    assert layer.attention_fn(torch.zeros(1, 1, 16)) is reference_spatial_attention


def test_layer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        SpatialSelfAttention(30, 4)
    with pytest.raises(ValueError, match="mode"):
        SpatialSelfAttention(32, 4, mode="add")
    with pytest.raises(ValueError, match="backend"):
        SpatialSelfAttention(32, 4, backend="cuda")


def test_inverse_max_pair_distance_of_the_hand_example_and_edge_cases():
    centers = torch.tensor(np.stack([HAND_CENTERS, HAND_CENTERS, HAND_CENTERS]), dtype=torch.float32)
    got = inverse_max_pair_distance(centers, torch.tensor([3, 1, 0]))
    # 13 over all three; one object: only the pair (0, 0), d = sqrt(eps); none: 1
    assert torch.allclose(got, torch.tensor([1 / 13, 1 / math.sqrt(EPS), 1.0]), rtol=1e-6)


def test_gps_max_distance_is_gps_s_over_eighty_zero_padded_slots():
    """spatial_max_dist=gps against a transcription of GPS's calc_pairwise_locs normalisation: the
    largest sqrt(|c_i - c_j|^2 + eps) over a batch padded to 80 slots with zero centers."""
    from sparsegps.models.spatial_attention import gps_inverse_max_pair_distance

    g = torch.Generator().manual_seed(3)
    centers = torch.randn(4, 6, 3, generator=g) * 2 + torch.tensor([3.0, 1.0, 0.5])  # rooms away from the origin
    lengths = torch.tensor([6, 3, 1, 6])
    gps_padded = torch.zeros(4, 80, 3)
    for b, n in enumerate(lengths.tolist()):
        gps_padded[b, :n] = centers[b, :n]
    gps_padded[3] = 0.0
    gps_padded[3, :6] = centers[3] * 0.01  # a tiny scene: the origin dominates
    centers[3] = centers[3] * 0.01
    offsets = gps_padded[:, :, None] - gps_padded[:, None]
    expected = torch.sqrt((offsets ** 2).sum(-1) + 1e-10).view(4, -1).max(dim=1).values
    got = 1.0 / gps_inverse_max_pair_distance(centers, lengths)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got >= 1.0 / inverse_max_pair_distance(centers, lengths) - 1e-6).all()
    assert not torch.allclose(got, 1.0 / inverse_max_pair_distance(centers, lengths))  # the option matters here
    full = torch.randn(1, 80, 3, generator=g)  # 80 objects: no padding, the two agree
    torch.testing.assert_close(gps_inverse_max_pair_distance(full, torch.tensor([80])),
                               inverse_max_pair_distance(full, torch.tensor([80])))


def test_spatial_transformer_shares_one_max_distance_across_layers(monkeypatch):
    """The network computes 1 / max_dist once per forward; every layer gets it and gives what it
    would compute itself."""
    import sparsegps.models.spatial_attention as attention_module

    torch.manual_seed(2)
    transformer = SpatialTransformer(32, 4, num_layers=3, ffn_dim=64, dropout=0.0).eval()
    tokens, centers, sizes = torch.randn(2, 9, 32), torch.rand(2, 9, 3) * 6, torch.rand(2, 9, 3)
    lengths = torch.tensor([9, 5])
    calls = []
    real = attention_module.inverse_max_pair_distance
    monkeypatch.setattr(attention_module, "inverse_max_pair_distance", lambda *a: calls.append(1) or real(*a))
    shared = transformer(tokens, centers, sizes, lengths)
    assert len(calls) == 1
    monkeypatch.setattr(attention_module, "inverse_max_pair_distance", real)

    x = tokens
    boxes = torch.cat([centers, sizes], dim=-1)
    for layer, location in zip(transformer.layers, transformer.locations):
        x = layer(x + location(boxes), centers, lengths)  # each layer computes its own
    assert torch.allclose(shared, x, atol=1e-6)
