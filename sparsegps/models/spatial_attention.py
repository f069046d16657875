"""Pairwise spatial self-attention over the objects of a scene (GPS's MultiHeadAttentionSpatial).

Every attention logit between a query object i and a key object j gets a geometric term: five
features of the offset c_i - c_j between the two object centers (normalized distance, sine and
cosine of the elevation, sine and cosine of the azimuth) are mapped by per-head weights to a gate
s in (0, 1] ('cond': sigmoid of weights predicted from the query token; 'mul': relu of weights
shared by all objects), and log(max(s, 1e-6)) is added to the scaled dot product.

`reference_spatial_attention` is the readable PyTorch oracle: it materializes the B x L x L x 5
feature tensor. `sparsegps.kernels.spatial_attention` computes the same thing in fused Triton
kernels without it. `SpatialSelfAttention` is the layer the spatial transformer stacks.
"""
from __future__ import annotations

import importlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsegps.spatial_attention_spec import (
    GATE_FLOOR,
    KERNEL_MAX_HEAD_DIM,
    NUM_GATE_WEIGHTS,
    NUM_PAIR_FEATURES,
    PAIR_EPS,
    GateMode,
    check_attention_inputs,
)

Backend = Literal["auto", "triton", "reference"]


GPS_OBJECT_SLOTS = 80  # GPS pads every scene's objects to 80 slots (max_obj_len)


def valid_object_mask(key_lengths: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, L] bool: slot l of scene b holds a real object (l < key_lengths[b])."""
    lengths = key_lengths.to(torch.long).clamp(0, num_slots)
    return torch.arange(num_slots, device=key_lengths.device)[None, :] < lengths[:, None]


def inverse_max_pair_distance(centers: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    """1 / max_dist per scene, fp32 [B]: max_dist is the largest sqrt(|c_i - c_j|^2 + eps) over
    pairs of valid objects (padding never changes it); 1 for a scene without objects.

    It depends on the centers alone, so a network computes it once and shares it across layers.
    """
    c = centers.float()
    offsets = c[:, :, None, :] - c[:, None, :, :]
    dist = torch.sqrt((offsets * offsets).sum(-1) + PAIR_EPS)
    valid = valid_object_mask(key_lengths, c.shape[1])
    pair_valid = valid[:, :, None] & valid[:, None, :]
    max_dist = dist.masked_fill(~pair_valid, 0.0).amax(dim=(1, 2))
    return 1.0 / torch.where(max_dist > 0, max_dist, torch.ones_like(max_dist))


def gps_inverse_max_pair_distance(centers: torch.Tensor, key_lengths: torch.Tensor,
                                  slots: int = GPS_OBJECT_SLOTS) -> torch.Tensor:
    """1 / max_dist per scene as GPS computes it (SceneVerse modules/utils.py calc_pairwise_locs):
    over all `slots` slots of its padded batch, whose padding centers are zeros. A scene with fewer
    than `slots` objects thus also counts each object's distance to the origin, sqrt(|c_i|^2 + eps)
    (and sqrt(eps) between two padding slots)."""
    c = centers.float()
    valid = valid_object_mask(key_lengths, c.shape[1])
    to_origin = torch.sqrt((c * c).sum(-1) + PAIR_EPS).masked_fill(~valid, 0.0).amax(dim=1)
    padded = torch.maximum(to_origin, torch.full_like(to_origin, PAIR_EPS ** 0.5))
    among = 1.0 / inverse_max_pair_distance(centers, key_lengths)
    max_dist = torch.where(key_lengths.to(c.device) < slots, torch.maximum(among, padded), among)
    return torch.where(valid.any(dim=1), 1.0 / max_dist, torch.ones_like(max_dist))  # no objects: 1


def pairwise_features(centers: torch.Tensor, key_lengths: torch.Tensor,
                      inv_max_dist: torch.Tensor | None = None) -> torch.Tensor:
    """The five GPS pair features f[b, i, j] = [dn, dz/d, d2/d, dy/d2, dx/d2] of D = c_i - c_j.

    d = sqrt(|D|^2 + eps), d2 = sqrt(dx^2 + dy^2 + eps) and dn = d * inv_max_dist (default:
    `inverse_max_pair_distance`). Returns fp32 [B, L, L, 5].
    """
    if inv_max_dist is None:
        inv_max_dist = inverse_max_pair_distance(centers, key_lengths)
    c = centers.float()
    offsets = c[:, :, None, :] - c[:, None, :, :]
    dx, dy, dz = offsets.unbind(-1)
    dist = torch.sqrt((offsets * offsets).sum(-1) + PAIR_EPS)
    dist_xy = torch.sqrt(dx * dx + dy * dy + PAIR_EPS)
    return torch.stack(
        [dist * inv_max_dist.float()[:, None, None], dz / dist, dist_xy / dist, dy / dist_xy, dx / dist_xy], dim=-1
    )


def spatial_log_gate(features: torch.Tensor, weights: torch.Tensor, mode: GateMode) -> torch.Tensor:
    """log(max(s, 1e-6)) per head, [B, H, L, L], with s = gate(w . f + b) (see module docstring)."""
    if mode == "cond":  # weights [B, L, H, 6], one row per query object
        w = weights.float()
        z = torch.einsum("bihm,bijm->bhij", w[..., 1:], features) + w[..., 0].transpose(1, 2)[..., None]
        gate = torch.sigmoid(z)
    elif mode == "mul":  # weights [H, 6], shared by all objects
        w = weights.float()
        z = torch.einsum("hm,bijm->bhij", w[:, 1:], features) + w[:, 0][None, :, None, None]
        gate = F.relu(z)
    else:
        raise ValueError(f"spatial attention mode must be 'cond' or 'mul', got {mode!r}")
    return torch.log(torch.clamp(gate, min=GATE_FLOOR))


def reference_spatial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centers: torch.Tensor,
    weights: torch.Tensor,
    key_lengths: torch.Tensor,
    mode: GateMode = "cond",
    inv_max_dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spatial attention computed naively in fp32; the oracle for the Triton kernel.

    q, k, v: [B, H, L, Dh]; centers: [B, L, 3]; weights: [B, L, H, 6] ('cond') or [H, 6] ('mul'),
    bias first; key_lengths: [B] integers, objects 0..len-1 are real, the rest padding (lengths
    are clamped to [0, L]). Every query row, padded ones included, attends to the real objects
    only; a scene without objects gives zeros. inv_max_dist [B] (`inverse_max_pair_distance`)
    may be passed in when several layers share the centers. Returns [B, H, L, Dh] in q's dtype.
    """
    check_attention_inputs(q, k, v, centers, weights, key_lengths, mode, inv_max_dist)
    length, head_dim = q.shape[2], q.shape[3]
    with torch.autocast(q.device.type, enabled=False):  # fp32 throughout, even inside autocast
        features = pairwise_features(centers, key_lengths, inv_max_dist)
        logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) / math.sqrt(head_dim)
        logits = logits + spatial_log_gate(features, weights, mode)
        key_valid = valid_object_mask(key_lengths, length)
        has_keys = key_valid.any(dim=1)
        # A scene without objects attends to all slots and is zeroed afterwards: no NaN anywhere.
        attend = key_valid | ~has_keys[:, None]
        logits = logits.masked_fill(~attend[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1) * has_keys[:, None, None, None]
        out = torch.einsum("bhij,bhjd->bhid", probs, v.float())
    return out.to(q.dtype)


_kernels_module = None  # the kernels' module once imported; False when Triton is unavailable


def _triton_kernels():
    """The fused kernel's module, or None where Triton is unavailable. Imported lazily, so that
    importing the model never imports Triton, and looked up once, so that torch.compile traces a
    plain global read."""
    global _kernels_module
    if _kernels_module is None:
        try:
            _kernels_module = importlib.import_module("sparsegps.kernels.spatial_attention")
        except ImportError:
            _kernels_module = False
    return _kernels_module or None


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over object tokens with GPS's pairwise spatial gate.

    'cond' (GPS default) predicts the gate's bias and five feature weights per query object and
    head from the query token; 'mul' learns one [H, 6] table shared by all objects. `backend`
    picks the attention implementation: "triton" (fused kernel), "reference" (PyTorch oracle) or
    "auto" (the kernel for CUDA inputs when Triton imports and heads are at most 128 wide, the
    reference otherwise). `dropout` applies to the projected output.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mode: GateMode = "cond",
        dropout: float = 0.0,
        backend: Backend = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if mode not in ("cond", "mul"):
            raise ValueError(f"mode must be 'cond' or 'mul', got {mode!r}")
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.mode = mode
        self.backend = backend
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        if mode == "cond":
            self.gate_proj = nn.Linear(d_model, n_heads * NUM_GATE_WEIGHTS)
        else:
            # Initialized like GPS's Linear(5 -> H): uniform in +-1/sqrt(fan_in), bias in column 0.
            bound = 1.0 / math.sqrt(NUM_PAIR_FEATURES)
            self.gate_weights = nn.Parameter(torch.empty(n_heads, NUM_GATE_WEIGHTS).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def _uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `backend` picks the fused kernel for input x."""
        if self.backend == "reference":
            return False
        if self.backend == "auto" and not (x.is_cuda and self.head_dim <= KERNEL_MAX_HEAD_DIM):
            return False
        if _triton_kernels() is not None:
            return True
        if self.backend == "triton":
            raise RuntimeError("backend='triton' needs Triton (sparsegps.kernels.spatial_attention failed to import)")
        return False

    def attention_fn(self, x: torch.Tensor):
        """The attention implementation `backend` selects for input x."""
        return _triton_kernels().spatial_attention if self._uses_kernel(x) else reference_spatial_attention

    def pair_distance_scale(self, x: torch.Tensor, centers: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
        """1 / max pair distance per scene ([B] fp32), from the implementation `attention_fn` picks;
        layers over the same centers share it (`forward(..., inv_max_dist=...)`)."""
        if self._uses_kernel(x):
            return _triton_kernels().inverse_max_pair_distance(centers, key_lengths)
        return inverse_max_pair_distance(centers, key_lengths)

    def forward(self, x: torch.Tensor, centers: torch.Tensor, key_lengths: torch.Tensor,
                inv_max_dist: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, d_model] object tokens; centers: [B, L, 3]; key_lengths: [B]; inv_max_dist:
        [B] from `pair_distance_scale`, computed here when None. -> [B, L, d_model]."""
        batch, length, _ = x.shape
        heads, head_dim = self.n_heads, self.head_dim

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, H, L, Dh] (a view)
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        if self.mode == "cond":
            weights = self.gate_proj(x).view(batch, length, heads, NUM_GATE_WEIGHTS)
        else:
            weights = self.gate_weights
        attended = self.attention_fn(x)(q, k, v, centers, weights, key_lengths, mode=self.mode,
                                        inv_max_dist=inv_max_dist)
        attended = attended.transpose(1, 2).reshape(batch, length, self.d_model)
        return self.dropout(self.out_proj(attended))
