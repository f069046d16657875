"""GPS's object encoder (PointNet++ as used by SceneVerse) and its input pipeline, in plain PyTorch.

The baseline the sparse backbone is measured against, built to be faithful and fast rather than a
strawman:

- architecture and settings of GPS's `PointNetPP` (SceneVerse `modules/layers/pointnet.py`,
  built in `modules/vision/pcd_openvocab_encoder.py`): three set-abstraction levels with
  farthest-point sampling, ball query and a shared MLP (1x1 conv without bias, batch norm, ReLU),
  max-pooled over neighbours; relative neighbour xyz concatenated to the features (`use_xyz`);
  the last level groups all points with their absolute xyz; a final Linear(768, 768);
- sampling and grouping semantics of the Pointnet2_PyTorch CUDA ops GPS calls: FPS starts at
  point 0 and takes the point farthest (squared distance) from the chosen set; a ball query keeps
  the first `nsample` points (in index order) strictly inside the radius and pads with the first
  one found. (The CUDA FPS kernel also skips points within 0.03 of the origin as candidates; that
  quirk is not reproduced: it changes which centres are picked, not the cost.)
- vectorised over every object of every scene at once ([O, 1024, 3 + 3]); the only Python loop
  is FPS's loop over the centres it picks, which is inherent to the algorithm.

`gps_object_points` is GPS's per-item data path for the same objects (crop by instance mask,
resample to 1024 points, centre and scale to the unit sphere, colours to [-1, 1]), written with
the per-object Python loop GPS uses, so batch-preparation cost is measured as GPS pays it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class PointNet2Config:
    """GPS's settings. `sa_mlps[i]` lists the output widths of level i's shared MLP; its input
    width is the previous level's output (or `in_features`) plus 3 for the neighbour xyz."""

    num_points: int = 1024
    in_features: int = 3  # rgb
    sa_centres: tuple[int | None, ...] = (32, 16, None)  # None: group all points
    sa_neighbours: tuple[int | None, ...] = (32, 32, None)
    sa_radii: tuple[float | None, ...] = (0.2, 0.4, None)
    sa_mlps: tuple[tuple[int, ...], ...] = ((64, 64, 128), (128, 128, 256), (256, 512, 768))

    @property
    def out_features(self) -> int:
        return self.sa_mlps[-1][-1]


def farthest_point_sample(xyz: torch.Tensor, num_centres: int) -> torch.Tensor:
    """Indices [B, num_centres] of iterative farthest-point samples of xyz [B, N, 3], from point 0."""
    batch, n, _ = xyz.shape
    if num_centres > n:
        raise ValueError(f"cannot sample {num_centres} centres from {n} points")
    chosen = torch.zeros(batch, num_centres, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(num_centres):
        chosen[:, i] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)
        nearest = torch.minimum(nearest, ((xyz - centre) ** 2).sum(-1))
        farthest = nearest.argmax(-1)
    return chosen


def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, num_neighbours: int) -> torch.Tensor:
    """Indices [B, S, K] of the first K points of xyz [B, N, 3] (in index order) with squared
    distance < radius^2 to each centre [B, S, 3]; short lists repeat their first entry, and an
    empty ball gives index 0 (as the CUDA op, whose output starts zeroed)."""
    n = xyz.shape[1]
    dist2 = ((centres.unsqueeze(2) - xyz.unsqueeze(1)) ** 2).sum(-1)  # [B, S, N]
    position = torch.arange(n, device=xyz.device).expand_as(dist2)
    key = torch.where(dist2 < radius * radius, position, torch.full_like(position, n))
    k = min(num_neighbours, n)
    first = key.topk(k, dim=-1, largest=False, sorted=True).values  # in-ball indices, ascending
    if k < num_neighbours:
        first = torch.cat([first, first.new_full(first.shape[:-1] + (num_neighbours - k,), n)], dim=-1)
    head = first[..., :1]
    head = torch.where(head == n, torch.zeros_like(head), head)
    return torch.where(first == n, head, first)


def gather_points(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, N, C] at index [B, ...] -> [B, ..., C]."""
    batch = values.shape[0]
    flat = index.reshape(batch, -1)
    out = torch.gather(values, 1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return out.reshape(*index.shape, values.shape[-1])


class SharedMLP(nn.Sequential):
    """Pointwise layers (bias-free linear, batch norm, ReLU) on channels-last [..., C] tensors:
    the 1x1 Conv2d + BatchNorm2d + ReLU stack of PointNet++, laid out for fast matmuls."""

    def __init__(self, widths: list[int]):
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(*shape[:-1], -1)


class SetAbstraction(nn.Module):
    """One PointNet++ level: sample centres, group neighbours (relative xyz + features), shared MLP,
    max over neighbours. With `num_centres=None` it groups every point around the origin."""

    def __init__(self, num_centres: int | None, radius: float | None, num_neighbours: int | None,
                 in_features: int, widths: tuple[int, ...]):
        super().__init__()
        self.num_centres, self.radius, self.num_neighbours = num_centres, radius, num_neighbours
        self.mlp = SharedMLP([in_features + 3, *widths])

    def forward(self, xyz: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """xyz [B, N, 3], features [B, N, C] -> centres [B, S, 3] (None when grouping all), [B, S, C']."""
        if self.num_centres is None:
            grouped = torch.cat([xyz, features], dim=-1).unsqueeze(1)  # [B, 1, N, 3 + C]
            return None, self.mlp(grouped).amax(dim=2)
        with torch.no_grad():
            centre_index = farthest_point_sample(xyz, self.num_centres)
        centres = gather_points(xyz, centre_index)
        with torch.no_grad():
            neighbours = ball_query(xyz, centres, self.radius, self.num_neighbours)
        relative = gather_points(xyz, neighbours) - centres.unsqueeze(2)
        grouped = torch.cat([relative, gather_points(features, neighbours)], dim=-1)  # [B, S, K, 3 + C]
        return centres, self.mlp(grouped).amax(dim=2)


class PointNet2ObjectEncoder(nn.Module):
    """GPS's object encoder: points [O, P, 3 + C] (xyz in the object's unit sphere, rgb in [-1, 1])
    -> one feature [O, 768] per object."""

    def __init__(self, cfg: PointNet2Config | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PointNet2Config()
        levels, width = [], cfg.in_features
        for centres, radius, neighbours, widths in zip(cfg.sa_centres, cfg.sa_radii, cfg.sa_neighbours, cfg.sa_mlps):
            levels.append(SetAbstraction(centres, radius, neighbours, width, widths))
            width = widths[-1]
        self.levels = nn.ModuleList(levels)
        last_centres = cfg.sa_centres[-1] or 1
        self.head = nn.Linear(last_centres * width, cfg.out_features)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        xyz, features = points[..., :3].contiguous(), points[..., 3:]
        for level in self.levels:
            xyz, features = level(xyz, features)
        return self.head(features.reshape(features.shape[0], -1))


# ------------------------------------------------------------------------------ GPS's data path

def gps_crop_objects(xyz: np.ndarray, rgb: np.ndarray, instance: np.ndarray,
                     inst_to_label: dict[int, str], skip_labels=("wall", "floor", "ceiling")) -> list[np.ndarray]:
    """GPS's start-up step: per labelled instance, the [n, 6] array (xyz, rgb/127.5 - 1) of its
    points, cropped by its instance mask in a Python loop; walls, floors and ceilings dropped."""
    points = np.concatenate([xyz, rgb / 127.5 - 1], axis=1)
    objects = []
    for inst_id, label in inst_to_label.items():
        if label in skip_labels:
            continue
        mask = instance == inst_id
        if mask.sum() == 0:
            continue
        objects.append(points[mask])
    return objects


def gps_object_points(objects: list[np.ndarray], num_points: int, rng: np.random.Generator,
                      rotate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPS's per-item step (`_obj_processing_post`): with `rotate` (GPS's `rot_aug` in training),
    turn the scene about z by a random quarter turn; then for each object its location (centre,
    size), a resample to `num_points` (with replacement when it has fewer), and centring and
    scaling of xyz to the unit sphere. Returns points [O, num_points, 6] float32 and locations [O, 6]."""
    turn = None
    if rotate:
        theta = np.pi / 2 * rng.integers(4)
        if theta != 0:
            turn = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]],
                            dtype=np.float32)
    features, locations = [], []
    for obj in objects:
        obj = obj.copy()
        if turn is not None:
            obj[:, :3] = obj[:, :3] @ turn.T
        centre = obj[:, :3].mean(0)
        size = obj[:, :3].max(0) - obj[:, :3].min(0)
        locations.append(np.concatenate([centre, size]))
        obj = obj[rng.choice(len(obj), size=num_points, replace=len(obj) < num_points)]
        obj[:, :3] = obj[:, :3] - obj[:, :3].mean(0)
        max_dist = np.max(np.sqrt(np.sum(obj[:, :3] ** 2, 1)))
        if max_dist < 1e-6:
            max_dist = 1.0
        obj[:, :3] = obj[:, :3] / max_dist
        features.append(obj)
    if not features:
        return np.zeros((0, num_points, 6), np.float32), np.zeros((0, 6), np.float32)
    return np.stack(features).astype(np.float32), np.array(locations, np.float32)
