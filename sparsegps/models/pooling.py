"""Object tokens from voxel features: mean and max over each instance's voxels, plus a box embedding.

This replaces GPS's per-object PointNet++: the backbone has already seen the whole scene, so an
object's token is a reduction over its voxels. Voxels are sorted by object index and reduced
segment by segment (torch_scatter.segment_csr, or torch.segment_reduce where torch_scatter is
missing); the two backends give identical forward results.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn as nn

try:
    import torch_scatter
except ImportError:  # the native path below computes the same thing
    torch_scatter = None

PoolingBackend = Literal["auto", "torch_scatter", "native"]
# What of an object's box its token is given. centre_size: centre and size (GPS's location
# embedding); size: the size alone (no absolute position: where an object is reaches the model only
# through the pair geometry of the spatial and relational attention); none: no box.
BoxEmbedding = Literal["centre_size", "size", "none"]


def _check_backend(backend: PoolingBackend) -> str:
    if backend == "auto":
        return "torch_scatter" if torch_scatter is not None else "native"
    if backend == "torch_scatter" and torch_scatter is None:
        raise ImportError("pooling: backend='torch_scatter' but torch_scatter is not installed")
    if backend not in ("torch_scatter", "native"):
        raise ValueError(f"pooling: unknown backend {backend!r}; use 'auto', 'torch_scatter' or 'native'")
    return backend


class _Segments(NamedTuple):
    sorted_feats: torch.Tensor  # [V, C] fp32 or wider, voxels ordered by object (voxels without one first)
    indptr: torch.Tensor        # [O + 2]: segment 0 holds the voxels without an object, k + 1 object k
    counts: torch.Tensor        # [O] voxels per object


def _segments(voxel_feats: torch.Tensor, voxel_object: torch.Tensor, num_objects: int) -> _Segments:
    if voxel_feats.ndim != 2 or voxel_object.shape != voxel_feats.shape[:1]:
        raise ValueError(f"pooling: voxel_feats must be [V, C] and voxel_object [V], got "
                         f"{list(voxel_feats.shape)} and {list(voxel_object.shape)}")
    if voxel_object.dtype != torch.int64:
        raise ValueError(f"pooling: voxel_object must be int64, got {voxel_object.dtype}")
    if voxel_feats.dtype in (torch.float16, torch.bfloat16):
        voxel_feats = voxel_feats.float()
    segment = voxel_object + 1
    try:
        counts = torch.bincount(segment, minlength=num_objects + 1)
    except RuntimeError as e:
        raise ValueError(f"pooling: voxel_object has an index below -1 ({e})") from None
    if counts.numel() != num_objects + 1:
        raise ValueError(f"pooling: voxel_object has an index >= num_objects ({num_objects})")
    indptr = torch.zeros(num_objects + 2, dtype=torch.int64, device=voxel_feats.device)
    torch.cumsum(counts, dim=0, out=indptr[1:])
    return _Segments(voxel_feats[torch.argsort(segment, stable=True)], indptr, counts[1:])


def _reduce(segments: _Segments, reduce: str, backend: str) -> torch.Tensor:
    """One row per object; objects without voxels get zeros (torch.segment_reduce leaves them at
    nan for a mean and -inf for a max)."""
    if backend == "torch_scatter":
        return torch_scatter.segment_csr(segments.sorted_feats, segments.indptr, reduce=reduce)[1:]
    out = torch.segment_reduce(segments.sorted_feats, reduce, offsets=segments.indptr, axis=0)[1:]
    return out.masked_fill((segments.counts == 0).unsqueeze(1), 0.0)


def mean_by_instance(voxel_feats: torch.Tensor, voxel_object: torch.Tensor, num_objects: int,
                     backend: PoolingBackend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `voxel_feats` [V, C] over the voxels of each object, and each object's voxel count
    -> ([O, C], [O] int64); the arguments as for `pool_by_instance`."""
    backend = _check_backend(backend)
    segments = _segments(voxel_feats, voxel_object, num_objects)
    return _reduce(segments, "mean", backend), segments.counts


def pool_by_instance(voxel_feats: torch.Tensor, voxel_object: torch.Tensor, num_objects: int,
                     backend: PoolingBackend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of `voxel_feats` [V, C] over the voxels of each object -> ([O, C], [O, C]).

    `voxel_object` [V] int64 holds each voxel's object index in [0, num_objects), or -1 for voxels
    that belong to no object (they are ignored). Objects without voxels get zeros. Half-precision
    features are reduced (and returned) in fp32, so long sums cannot overflow.

    Where an object's maximum is tied between voxels, torch_scatter sends the whole gradient to
    one of them and the native path splits it among them; both are valid subgradients.
    """
    backend = _check_backend(backend)
    segments = _segments(voxel_feats, voxel_object, num_objects)
    return _reduce(segments, "mean", backend), _reduce(segments, "max", backend)


def pad_objects(flat: torch.Tensor, object_offsets: torch.Tensor,
                padding_value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object rows [O, ...] -> per-scene padded [B, L, ...] and a padding mask [B, L] (True = padding).

    Scene b owns rows object_offsets[b]:object_offsets[b + 1]; L is the largest scene's object count,
    at least 1 (a batch whose scenes have no objects gets one padded slot, so every layer after
    pooling runs on the same kind of input).
    """
    offsets = object_offsets.tolist()
    num_scenes = len(offsets) - 1
    if num_scenes < 1 or offsets[0] != 0 or offsets[-1] != flat.shape[0] or any(
            a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"pad_objects: object_offsets must rise from 0 to the number of objects "
                         f"({flat.shape[0]}), got {offsets}")
    counts = object_offsets.diff().to(flat.device)
    max_objects = max(1, *(b - a for a, b in zip(offsets, offsets[1:])))
    scene = torch.repeat_interleave(torch.arange(num_scenes, device=flat.device), counts, output_size=flat.shape[0])
    slot = torch.arange(flat.shape[0], device=flat.device) - object_offsets.to(flat.device)[scene]
    padded = flat.new_full((num_scenes, max_objects, *flat.shape[1:]), padding_value)
    padded[scene, slot] = flat
    padding_mask = torch.arange(max_objects, device=flat.device).unsqueeze(0) >= counts.unsqueeze(1)
    return padded, padding_mask


class ObjectTokens(NamedTuple):
    tokens: torch.Tensor        # [B, L, D]
    padding_mask: torch.Tensor  # [B, L] bool, True where padded
    centers: torch.Tensor       # [B, L, 3], zeros where padded
    sizes: torch.Tensor         # [B, L, 3], zeros where padded


class ObjectPooling(nn.Module):
    """Voxel features -> padded object tokens: [mean; max] -> Linear -> LayerNorm, plus a box embedding.

    The box embedding (centre and size -> Linear -> LayerNorm, as GPS's object encoder adds its
    location embedding; or the size alone, or none: `BoxEmbedding`) is added to the pooled feature.
    """

    def __init__(self, in_channels: int, d_model: int, backend: PoolingBackend = "auto",
                 box_embedding: BoxEmbedding = "centre_size"):
        super().__init__()
        self.backend, self.box_embedding = backend, box_embedding
        self.feature_proj = nn.Sequential(nn.Linear(2 * in_channels, d_model), nn.LayerNorm(d_model))
        width = {"centre_size": 6, "size": 3, "none": 0}[box_embedding]
        self.box_embed = nn.Sequential(nn.Linear(width, d_model), nn.LayerNorm(d_model)) if width else None

    def embed_boxes(self, center: torch.Tensor, size: torch.Tensor) -> torch.Tensor | float:
        """The box term of each token [..., d_model] from centres and sizes [..., 3] (0.0 without one)."""
        if self.box_embed is None:
            return 0.0
        return self.box_embed(torch.cat([center, size], dim=-1) if self.box_embedding == "centre_size" else size)

    def forward(self, voxel_feats: torch.Tensor, voxel_object: torch.Tensor, object_offsets: torch.Tensor,
                object_center: torch.Tensor, object_size: torch.Tensor) -> ObjectTokens:
        """voxel_feats [V, C], voxel_object [V], object_offsets [B+1], object_center/size [O, 3] -> ObjectTokens."""
        num_objects = object_center.shape[0]
        if object_size.shape != (num_objects, 3) or object_center.shape != (num_objects, 3):
            raise ValueError(f"ObjectPooling: object_center and object_size must be [O, 3], got "
                             f"{list(object_center.shape)} and {list(object_size.shape)}")
        mean, maximum = pool_by_instance(voxel_feats, voxel_object, num_objects, self.backend)
        flat_tokens = self.feature_proj(torch.cat([mean, maximum], dim=1))
        flat_tokens = flat_tokens + self.embed_boxes(object_center, object_size)
        tokens, padding_mask = pad_objects(flat_tokens, object_offsets)
        centers, _ = pad_objects(object_center, object_offsets)
        sizes, _ = pad_objects(object_size, object_offsets)
        return ObjectTokens(tokens, padding_mask, centers, sizes)


__all__ = ["BoxEmbedding", "ObjectPooling", "ObjectTokens", "mean_by_instance", "pad_objects", "pool_by_instance"]
