"""Object pooling: segment reductions against a per-object loop, backend agreement, padding."""
import pytest
import torch

from sparsegps.models import pooling
from sparsegps.models.pooling import ObjectPooling, mean_by_instance, pad_objects, pool_by_instance

BACKENDS = ["native"] + (["torch_scatter"] if pooling.torch_scatter is not None else [])


def _voxels(num_voxels=300, channels=5, num_objects=8, empty=(3, 7), seed=0, dtype=torch.float32):
    """Random voxel features and object ids: -1 voxels included, objects in `empty` get no voxel."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(num_voxels, channels, generator=g, dtype=dtype)
    present = torch.tensor([k for k in range(num_objects) if k not in empty] + [-1])
    voxel_object = present[torch.randint(len(present), (num_voxels,), generator=g)]
    return feats, voxel_object, num_objects


def _loop_pool(feats, voxel_object, num_objects):
    mean = torch.zeros(num_objects, feats.shape[1], dtype=feats.dtype)
    maximum = torch.zeros_like(mean)
    for k in range(num_objects):
        rows = feats[voxel_object == k]
        if len(rows):
            mean[k] = rows.mean(dim=0)
            maximum[k] = rows.max(dim=0).values
    return mean, maximum


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_matches_per_object_loop(backend):
    feats, voxel_object, num_objects = _voxels()
    assert (voxel_object == -1).any() and not (voxel_object == 3).any()
    mean, maximum = pool_by_instance(feats, voxel_object, num_objects, backend=backend)
    ref_mean, ref_max = _loop_pool(feats, voxel_object, num_objects)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(maximum, ref_max)
    assert torch.equal(mean[3], torch.zeros(5)) and torch.equal(maximum[7], torch.zeros(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_alone_matches_loop_and_counts_voxels(backend):
    feats, voxel_object, num_objects = _voxels(seed=1)
    mean, counts = mean_by_instance(feats, voxel_object, num_objects, backend=backend)
    torch.testing.assert_close(mean, _loop_pool(feats, voxel_object, num_objects)[0], rtol=1e-6, atol=1e-6)
    assert counts.tolist() == [int((voxel_object == k).sum()) for k in range(num_objects)]
    assert counts[3] == 0 and counts[7] == 0


def test_pool_all_voxels_unassigned_gives_zeros():
    feats = torch.randn(10, 4)
    mean, maximum = pool_by_instance(feats, torch.full((10,), -1), 3, backend="native")
    assert torch.equal(mean, torch.zeros(3, 4)) and torch.equal(maximum, torch.zeros(3, 4))


@pytest.mark.skipif(pooling.torch_scatter is None, reason="torch_scatter not installed")
def test_backends_agree_exactly_and_gradients_match():
    feats, voxel_object, num_objects = _voxels(num_voxels=5000, channels=32, num_objects=40, empty=(0, 17, 39))
    grads = {}
    results = {}
    for backend in ("torch_scatter", "native"):
        x = feats.clone().requires_grad_(True)
        mean, maximum = pool_by_instance(x, voxel_object, num_objects, backend=backend)
        (mean.sum() * 3 + (maximum * torch.arange(32.0)).sum()).backward()
        results[backend] = (mean.detach(), maximum.detach())
        grads[backend] = x.grad
    assert torch.equal(results["torch_scatter"][0], results["native"][0])
    assert torch.equal(results["torch_scatter"][1], results["native"][1])
    # Continuous random features have no tied maxima, so both backends route max gradients alike.
    torch.testing.assert_close(grads["torch_scatter"], grads["native"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_gradcheck(backend):
    feats, voxel_object, num_objects = _voxels(num_voxels=40, channels=3, num_objects=5, empty=(2,),
                                               dtype=torch.float64)
    x = feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: pool_by_instance(f, voxel_object, num_objects, backend=backend), (x,))


def test_pool_half_precision_reduces_in_fp32():
    feats, voxel_object, num_objects = _voxels()
    mean, maximum = pool_by_instance(feats.bfloat16(), voxel_object, num_objects, backend="native")
    ref_mean, ref_max = _loop_pool(feats.bfloat16().float(), voxel_object, num_objects)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(maximum, ref_max)


def test_pool_rejects_bad_object_index():
    feats = torch.randn(4, 2)
    with pytest.raises(ValueError, match="num_objects"):
        pool_by_instance(feats, torch.tensor([0, 1, 3, -1]), 3)
    with pytest.raises(ValueError, match="below -1"):
        pool_by_instance(feats, torch.tensor([0, -2, 1, -1]), 3)
    with pytest.raises(ValueError, match="unknown backend"):
        pool_by_instance(feats, torch.tensor([0, 1, 1, -1]), 3, backend="cuda")


def test_pad_objects_matches_loop():
    offsets = torch.tensor([0, 3, 3, 7, 8])
    flat = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2) + 1
    padded, mask = pad_objects(flat, offsets)
    assert padded.shape == (4, 4, 2) and mask.shape == (4, 4)
    for b in range(4):
        n = int(offsets[b + 1] - offsets[b])
        assert torch.equal(padded[b, :n], flat[offsets[b]:offsets[b + 1]])
        assert torch.equal(padded[b, n:], torch.zeros(4 - n, 2))
        assert mask[b].tolist() == [False] * n + [True] * (4 - n)
    labels, _ = pad_objects(torch.arange(8), offsets, padding_value=-100)
    assert labels.tolist() == [[0, 1, 2, -100], [-100] * 4, [3, 4, 5, 6], [7, -100, -100, -100]]


def test_pad_objects_rejects_bad_offsets():
    with pytest.raises(ValueError, match="object_offsets"):
        pad_objects(torch.zeros(5, 2), torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="object_offsets"):
        pad_objects(torch.zeros(5, 2), torch.tensor([0, 4, 2, 5]))


def _scene_batch(seed=0):
    """Two scenes: 3 and 5 objects (object 6 of scene 1 without voxels), voxels in scene order."""
    g = torch.Generator().manual_seed(seed)
    object_offsets = torch.tensor([0, 3, 8])
    voxel_object = torch.cat([torch.randint(-1, 3, (50,), generator=g),
                              torch.tensor([3, 4, 5, 7] * 15 + [-1] * 5)])
    feats = torch.randn(len(voxel_object), 16, generator=g)
    centers = torch.randn(8, 3, generator=g)
    sizes = torch.rand(8, 3, generator=g) + 0.1
    return feats, voxel_object, object_offsets, centers, sizes


def test_object_pooling_tokens_and_padding():
    torch.manual_seed(0)
    layer = ObjectPooling(in_channels=16, d_model=24)
    feats, voxel_object, object_offsets, centers, sizes = _scene_batch()
    out = layer(feats, voxel_object, object_offsets, centers, sizes)
    assert out.tokens.shape == (2, 5, 24)
    assert out.padding_mask.tolist() == [[False] * 3 + [True] * 2, [False] * 5]

    mean, maximum = _loop_pool(feats, voxel_object, 8)
    expected = layer.feature_proj(torch.cat([mean, maximum], 1)) + layer.box_embed(torch.cat([centers, sizes], 1))
    torch.testing.assert_close(out.tokens[0, :3], expected[:3])
    torch.testing.assert_close(out.tokens[1], expected[3:])
    assert torch.equal(out.tokens[0, 3:], torch.zeros(2, 24))
    assert torch.equal(out.centers[1], centers[3:]) and torch.equal(out.sizes[0, :3], sizes[:3])
    assert torch.equal(out.centers[0, 3:], torch.zeros(2, 3)) and torch.equal(out.sizes[0, 3:], torch.zeros(2, 3))


def test_padding_never_changes_a_valid_token():
    """Scene 0's tokens are the same alone (no padding) and batched with a larger scene (padded)."""
    torch.manual_seed(0)
    layer = ObjectPooling(in_channels=16, d_model=24)
    feats, voxel_object, object_offsets, centers, sizes = _scene_batch()
    batched = layer(feats, voxel_object, object_offsets, centers, sizes)
    alone = layer(feats[:50], voxel_object[:50], torch.tensor([0, 3]), centers[:3], sizes[:3])
    assert alone.tokens.shape == (1, 3, 24) and not alone.padding_mask.any()
    torch.testing.assert_close(batched.tokens[0, :3], alone.tokens[0])


def test_object_pooling_backward_reaches_voxels_and_parameters():
    torch.manual_seed(0)
    layer = ObjectPooling(in_channels=16, d_model=24)
    feats, voxel_object, object_offsets, centers, sizes = _scene_batch()
    feats.requires_grad_(True)
    out = layer(feats, voxel_object, object_offsets, centers, sizes)
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assigned = voxel_object >= 0
    assert feats.grad[assigned].abs().sum(dim=1).gt(0).any()
    assert torch.equal(feats.grad[~assigned], torch.zeros_like(feats.grad[~assigned]))


@pytest.mark.parametrize("box_embedding, reads_centre, reads_size", [("centre_size", True, True), ("size", False, True),
                                                                     ("none", False, False)])
def test_object_tokens_read_what_their_box_embedding_says(box_embedding, reads_centre, reads_size):
    torch.manual_seed(0)
    feats, voxel_object, num_objects = _voxels(empty=())
    pooling = ObjectPooling(5, 16, box_embedding=box_embedding)
    offsets = torch.tensor([0, 3, num_objects])
    center, size = torch.randn(num_objects, 3), torch.rand(num_objects, 3) + 0.1
    base = pooling(feats, voxel_object, offsets, center, size).tokens
    moved = pooling(feats, voxel_object, offsets, center + 1.0, size).tokens
    grown = pooling(feats, voxel_object, offsets, center, size * 2).tokens
    assert (not torch.allclose(base, moved)) == reads_centre and (not torch.allclose(base, grown)) == reads_size
