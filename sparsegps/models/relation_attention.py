"""Relational attention over a scene's objects: attention that reads the geometry between two boxes.

GPS's spatial attention turns pair geometry into a gate on the attention weights; after the softmax
an object that attends mostly to one anchor receives that anchor's value whatever their distance, so
"the chair closest to the door" must be decoded from how attention is shared. Here each pair's
geometry also enters the value (relative-position values, as Shaw et al. 2018 for sequences): an
object that attends to the anchor a sentence names receives the geometry between them,

    logit_hij = q_hi . k_hj / sqrt(d_head) + b_h(f_ij)
    out_hi    = sum_j softmax_j(logit_hij) (v_hj + W_h e_h(f_ij))

where f_ij are metric features of the boxes of i and j, invariant to turning the scene about the
vertical axis (see `box_pair_features`), b and e a small MLP, W_h one projection per head.
Computed in PyTorch (memory R x L x L x (H x rank)), used by the grounding encoder's "relational"
form, whose object tokens have read the sentence: which anchor an object attends to is what the
sentence asks. The pair terms b and e depend on the boxes alone, so when R rows share the boxes of
B < R scenes (every referral of a scene) they are computed once per scene and indexed by
`scene_index`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

PAIR_EPS = 1e-8
NUM_BOX_PAIR_FEATURES = 7


def box_pair_features(boxes: torch.Tensor) -> torch.Tensor:
    """Metric features [R, L, L, 7] of the boxes [R, L, 6] (centre, size) of objects i and j:

        d      centre distance               dz           height of i's centre above j's
        d_xy   horizontal centre distance    clear_above  i's bottom above j's top
        gap    d_xy - r_i - r_j, r the mean  clear_below  j's bottom above i's top
               horizontal half-extent        log_volume   log(volume_i / volume_j)

    All in metres (log_volume in nats). Turning the scene about the vertical axis by theta leaves
    all seven unchanged when box sizes are kept (`TransformConfig.box_sizes: kept`). With enclosing
    boxes (the default, GPS's) a box of footprint w x d grows to the axis-aligned box around it:
    d, d_xy, dz and both clearances stay unchanged, gap shrinks by (r_i + r_j)(|cos| + |sin| - 1)
    (up to 0.41 (r_i + r_j) at 45 degrees) and log_volume moves by log g_i - log g_j, with
    g = 1 + (w/d + d/w)|cos sin| (up to 1.3 nats between a square and a 5:1 footprint); the
    relation probe learns as well either way (README, `data.transforms.box_sizes`). A uniform scale
    s multiplies the six metric features by s and leaves log_volume unchanged."""
    c, s = boxes[..., :3].float(), boxes[..., 3:].float()
    offset = c[:, :, None, :] - c[:, None, :, :]
    d = torch.sqrt((offset * offset).sum(-1) + PAIR_EPS)
    d_xy = torch.sqrt((offset[..., :2] ** 2).sum(-1) + PAIR_EPS)
    bottom, top = c[..., 2] - s[..., 2] / 2, c[..., 2] + s[..., 2] / 2
    radius = s[..., :2].mean(-1) / 2
    log_volume = torch.log(s.clamp(min=1e-3).prod(-1))
    return torch.stack([d, d_xy, d_xy - radius[:, :, None] - radius[:, None, :], offset[..., 2],
                        bottom[:, :, None] - top[:, None, :], bottom[:, None, :] - top[:, :, None],
                        log_volume[:, :, None] - log_volume[:, None, :]], dim=-1)


class RelationalAttention(nn.Module):
    """Multi-head attention over objects with pair geometry in the logits and in the values.

    `forward(x [R,L,D], pair_features [B,L,L,7], pad [R,L] True = padding, scene_index [R]) -> [R,L,D]`:
    row r reads the pair features of scene `scene_index[r]` (`box_pair_features` of the scenes'
    boxes; without `scene_index`, B = R and row r reads its own). Padded keys are never attended to
    (a row without any real key gets zeros)."""

    def __init__(self, d_model: int, num_heads: int, rank: int = 8, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.heads, self.head_dim, self.rank = num_heads, d_model // num_heads, rank
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.pair = nn.Sequential(nn.Linear(NUM_BOX_PAIR_FEATURES, hidden), nn.GELU(),
                                  nn.Linear(hidden, num_heads * (1 + rank)))
        # per head: rank -> head_dim, the pair geometry's contribution to the value
        self.pair_value = nn.Parameter(torch.randn(num_heads, rank, self.head_dim) / math.sqrt(rank))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pair_features: torch.Tensor, pad: torch.Tensor,
                scene_index: torch.Tensor | None = None) -> torch.Tensor:
        r, length, d_model = x.shape
        h, dh = self.heads, self.head_dim
        q, k, v = self.qkv(x).view(r, length, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [R, H, L, dh]
        pair = self.pair(pair_features)  # once per scene
        if scene_index is not None:
            pair = pair[scene_index]
        pair = pair.view(r, length, length, h, 1 + self.rank)
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh) + pair[..., 0].permute(0, 3, 1, 2).to(q.dtype)
        has_keys = (~pad).any(dim=1)
        keys = ~pad | ~has_keys[:, None]  # a row with no real key attends to all, then is zeroed
        logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
        attn = torch.softmax(logits.float(), dim=-1).to(v.dtype) * has_keys[:, None, None, None]
        attn = self.dropout(attn)
        geometry = torch.einsum("rhij,rijhk->rhik", attn, pair[..., 1:].to(attn.dtype))  # [R, H, L, rank]
        out = attn @ v + torch.einsum("rhik,hkd->rhid", geometry, self.pair_value.to(attn.dtype))
        return self.out(out.transpose(1, 2).reshape(r, length, d_model))


class RelationalLayer(nn.Module):
    """Post-norm transformer layer around `RelationalAttention`: attention and a GELU feed-forward,
    each with a residual and LayerNorm (as the spatial transformer's layers)."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.attn = RelationalAttention(d_model, num_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pair_features: torch.Tensor, pad: torch.Tensor,
                scene_index: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attn(x, pair_features, pad, scene_index)))
        return self.norm2(x + self.dropout(self.ffn(x)))
