"""The contract of GPS's pairwise spatial attention that both implementations follow: the PyTorch
reference (`sparsegps.models.spatial_attention`) and the fused Triton kernel
(`sparsegps.kernels.spatial_attention`). Constants and input checks only; imports torch alone, so
neither implementation imports the other.
"""
from __future__ import annotations

from typing import Literal

import torch

GateMode = Literal["cond", "mul"]

PAIR_EPS = 1e-10
"""Added under every square root of the pairwise geometry, as GPS does (makes i == j finite)."""
GATE_FLOOR = 1e-6
"""The gate is clamped here before the log, so a closed gate costs log(1e-6), never -inf."""
NUM_PAIR_FEATURES = 5
NUM_GATE_WEIGHTS = NUM_PAIR_FEATURES + 1  # bias first, then one weight per feature
KERNEL_MAX_HEAD_DIM = 128
"""Widest head the fused kernel takes; wider heads use the reference under backend='auto'."""


def check_attention_inputs(q, k, v, centers, weights, key_lengths, mode: str,
                           inv_max_dist: torch.Tensor | None = None) -> None:
    """Raise a ValueError that names the argument whose shape or dtype does not fit."""
    if mode not in ("cond", "mul"):
        raise ValueError(f"spatial attention mode must be 'cond' or 'mul', got {mode!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, L, Dh], got shape {tuple(q.shape)}")
    batch, heads, length, _ = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if centers.shape != (batch, length, 3):
        raise ValueError(f"centers must be [B, L, 3] = {(batch, length, 3)}, got {tuple(centers.shape)}")
    want = (batch, length, heads, NUM_GATE_WEIGHTS) if mode == "cond" else (heads, NUM_GATE_WEIGHTS)
    if tuple(weights.shape) != want:
        raise ValueError(f"weights for mode {mode!r} must have shape {want}, got {tuple(weights.shape)}")
    if key_lengths.shape != (batch,) or key_lengths.dtype.is_floating_point:
        raise ValueError(f"key_lengths must be an integer tensor [B] = [{batch}], "
                         f"got {key_lengths.dtype} {tuple(key_lengths.shape)}")
    if inv_max_dist is not None and inv_max_dist.shape != (batch,):
        raise ValueError(f"inv_max_dist must be [B] = [{batch}] (1 / the scene's max pair distance), "
                         f"got {tuple(inv_max_dist.shape)}")
