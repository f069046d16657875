"""GPS's PointNet++ baseline: sampling and grouping against naive references, architecture, gradients,
and GPS's object preprocessing."""
import numpy as np
import pytest
import torch

from sparsegps.benchmarks.pointnet2_gps import (PointNet2Config, PointNet2ObjectEncoder, ball_query,
                                                farthest_point_sample, gps_crop_objects, gps_object_points)


def naive_fps(points: np.ndarray, k: int) -> list[int]:
    """Farthest-point sampling one point at a time, as the CUDA kernel: start at 0, then the point
    whose squared distance to the chosen set is largest (first such point on ties)."""
    chosen = [0]
    nearest = [float("inf")] * len(points)
    while len(chosen) < k:
        last = points[chosen[-1]]
        for i, p in enumerate(points):
            nearest[i] = min(nearest[i], float(((p - last) ** 2).sum()))
        best = max(range(len(points)), key=lambda i: (nearest[i], -i))
        chosen.append(best)
    return chosen


def naive_ball_query(points: np.ndarray, centre: np.ndarray, radius: float, k: int) -> list[int]:
    """The CUDA ball query for one centre: walk the points in order, keep those strictly inside the
    radius until k are found, pad with the first found (or 0 if none)."""
    found = []
    for i, p in enumerate(points):
        if ((p - centre) ** 2).sum() < radius ** 2:
            found.append(i)
            if len(found) == k:
                break
    if not found:
        return [0] * k
    return found + [found[0]] * (k - len(found))


def test_farthest_point_sample_matches_naive_reference():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(3, 40, 3)).astype(np.float32)
    got = farthest_point_sample(torch.from_numpy(xyz), 12)
    assert got.shape == (3, 12)
    for b in range(3):
        assert got[b].tolist() == naive_fps(xyz[b], 12)
    assert len(set(got[0].tolist())) == 12  # distinct points


def test_farthest_point_sample_spreads_out_known_points():
    # Four corners of a square and a point near the centre: FPS from corner 0 picks the opposite
    # corner, then the two others, and the centre last.
    xyz = torch.tensor([[[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0.5, 0.45, 0]]], dtype=torch.float32)
    assert farthest_point_sample(xyz, 5)[0].tolist() == [0, 3, 1, 2, 4]


@pytest.mark.parametrize("radius,k", [(0.3, 4), (0.6, 8), (2.0, 5)])
def test_ball_query_matches_naive_reference(radius, k):
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-1, 1, size=(2, 30, 3)).astype(np.float32)
    centres = np.concatenate([xyz[:, :5], rng.uniform(-1, 1, size=(2, 3, 3)).astype(np.float32)], axis=1)
    got = ball_query(torch.from_numpy(xyz), torch.from_numpy(centres), radius, k)
    assert got.shape == (2, 8, k)
    for b in range(2):
        for s in range(8):
            assert got[b, s].tolist() == naive_ball_query(xyz[b], centres[b, s], radius, k), (b, s)


def test_ball_query_empty_ball_gives_zeros_and_fewer_points_than_k():
    xyz = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [5.0, 0, 0]]])
    centres = torch.tensor([[[0.0, 0, 0], [100.0, 0, 0]]])
    got = ball_query(xyz, centres, 0.5, 6)
    assert got[0, 0].tolist() == [0, 1, 0, 0, 0, 0]
    assert got[0, 1].tolist() == [0] * 6


def test_encoder_shape_and_gps_parameter_count():
    model = PointNet2ObjectEncoder()
    out = model.eval()(torch.randn(3, 1024, 6))
    assert out.shape == (3, 768)
    # GPS's PointNetPP: shared MLPs [3+3,64,64,128], [128+3,128,128,256], [256+3,256,512,768] as
    # bias-free 1x1 convs with batch norm (weight + bias per channel), then Linear(768, 768).
    convs = (6 * 64 + 64 * 64 + 64 * 128) + (131 * 128 + 128 * 128 + 128 * 256) + (259 * 256 + 256 * 512 + 512 * 768)
    norms = 2 * (64 + 64 + 128 + 128 + 128 + 256 + 256 + 512 + 768)
    head = 768 * 768 + 768
    assert sum(p.numel() for p in model.parameters()) == convs + norms + head


def test_encoder_output_does_not_depend_on_other_objects_in_eval_mode():
    model = PointNet2ObjectEncoder().eval()
    points = torch.randn(4, 1024, 6)
    together = model(points)
    alone = model(points[2:3])
    torch.testing.assert_close(together[2:3], alone, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    cfg = PointNet2Config(num_points=256)
    model = PointNet2ObjectEncoder(cfg).train()
    points = torch.cat([torch.rand(4, 256, 3) * 2 - 1, torch.rand(4, 256, 3) * 2 - 1], dim=-1)
    points.requires_grad_(True)
    model(points).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert points.grad.abs().sum() > 0


def test_gps_crop_objects_skips_background_and_maps_colours():
    xyz = np.arange(18, dtype=np.float32).reshape(6, 3)
    rgb = np.array([[0, 0, 0], [255, 255, 255], [127.5, 127.5, 127.5]] * 2, dtype=np.float32)
    instance = np.array([0, 1, 1, 2, 2, 5])
    crops = gps_crop_objects(xyz, rgb, instance, {0: "wall", 1: "chair", 2: "table", 3: "sofa"})
    assert len(crops) == 2  # wall skipped, sofa has no points, 5 is not labelled
    np.testing.assert_array_equal(crops[0][:, :3], xyz[1:3])
    np.testing.assert_allclose(crops[0][:, 3:], [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(crops[1][:, :3], xyz[3:5])


def test_gps_object_points_resamples_centres_and_scales():
    rng = np.random.default_rng(0)
    big = np.concatenate([rng.uniform(2, 4, size=(3000, 3)), rng.uniform(-1, 1, size=(3000, 3))], axis=1)
    small = np.concatenate([rng.uniform(0, 1, size=(10, 3)), rng.uniform(-1, 1, size=(10, 3))], axis=1)
    point = np.zeros((1, 6))
    points, locations = gps_object_points([big, small, point], 64, np.random.default_rng(1))
    assert points.shape == (3, 64, 6) and locations.shape == (3, 6)
    for obj, out, loc in zip((big, small, point), points, locations):
        np.testing.assert_allclose(out[:, :3].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(loc[:3], obj[:, :3].mean(0), rtol=1e-5)
        np.testing.assert_allclose(loc[3:], obj[:, :3].max(0) - obj[:, :3].min(0), rtol=1e-5)
        # every resampled colour is one of the object's own
        assert all(any(np.allclose(c, o) for o in obj[:, 3:]) for c in out[:8, 3:])
    np.testing.assert_allclose(np.linalg.norm(points[0, :, :3], axis=1).max(), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(points[1, :, :3], axis=1).max(), 1, rtol=1e-5)
    np.testing.assert_array_equal(points[2, :, :3], 0)  # a single point stays at the origin (no division by 0)
    assert len(np.unique(points[1, :, 0])) <= 10  # 64 drawn with replacement from 10


def test_gps_object_points_rotation_is_a_quarter_turn_of_the_scene():
    rng = np.random.default_rng(3)
    obj = np.concatenate([rng.uniform([0, 0, 0], [2, 1, 0.5], size=(500, 3)), np.zeros((500, 3))], axis=1)
    _, plain_loc = gps_object_points([obj], 128, np.random.default_rng(0))
    seen = set()
    for seed in range(12):
        points, loc = gps_object_points([obj], 128, np.random.default_rng(seed), rotate=True)
        centre = obj[:, :3].mean(0)
        turns = [np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ centre
                 for t in np.pi / 2 * np.arange(4)]
        match = [k for k, c in enumerate(turns) if np.allclose(loc[0, :3], c, atol=1e-5)]
        assert len(match) == 1
        seen.add(match[0])
        expected_size = plain_loc[0, 3:] if match[0] % 2 == 0 else plain_loc[0, 3:][[1, 0, 2]]
        np.testing.assert_allclose(loc[0, 3:], expected_size, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(points[0, :, :3], axis=1).max(), 1, rtol=1e-5)
    assert seen == {0, 1, 2, 3}
