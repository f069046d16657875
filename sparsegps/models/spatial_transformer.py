"""GPS's object-level spatial transformer: spatial self-attention layers over object tokens.

Each layer: pairwise spatial attention ('cond' fusion by default) with a residual and post-
LayerNorm, then a GELU feed-forward with a residual and post-LayerNorm. The object location
embedding (box centre and size -> Linear -> LayerNorm) is re-added before every layer, as GPS does.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .spatial_attention import SpatialSelfAttention, gps_inverse_max_pair_distance


def location_embedding(d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, d_model), nn.LayerNorm(d_model))


class SpatialTransformerLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.1, mode: str = "cond",
                 backend: str = "auto"):
        super().__init__()
        self.attn = SpatialSelfAttention(d_model, num_heads, mode=mode, backend=backend)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, centers: torch.Tensor, key_lengths: torch.Tensor,
                inv_max_dist: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attn(x, centers, key_lengths, inv_max_dist)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class SpatialTransformer(nn.Module):
    """`forward(tokens [B,L,D], centers [B,L,3], sizes [B,L,3], key_lengths [B]) -> [B,L,D]`.

    Objects of scene b are the first `key_lengths[b]` slots; padded slots attend to valid objects
    only and never influence them."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, ffn_dim: int, dropout: float = 0.1,
                 mode: str = "cond", backend: str = "auto", activation_checkpointing: bool = False,
                 max_dist: str = "valid"):
        """max_dist: "valid" (over a scene's objects) or "gps" (over GPS's 80 zero-padded slots); see
        `inverse_max_pair_distance` and `gps_inverse_max_pair_distance`."""
        super().__init__()
        if max_dist not in ("valid", "gps"):
            raise ValueError(f"unknown max_dist {max_dist!r} (valid or gps)")
        self.max_dist = max_dist
        self.layers = nn.ModuleList(SpatialTransformerLayer(d_model, num_heads, ffn_dim, dropout, mode, backend)
                                    for _ in range(num_layers))
        self.locations = nn.ModuleList(location_embedding(d_model) for _ in range(num_layers))
        self.activation_checkpointing = activation_checkpointing

    def forward(self, tokens, centers, sizes, key_lengths):
        boxes = torch.cat([centers, sizes], dim=-1)
        x = tokens
        # the distance normalisation depends on the centers alone: once for all layers
        if not self.layers:
            inv_max_dist = None
        elif self.max_dist == "gps":
            inv_max_dist = gps_inverse_max_pair_distance(centers, key_lengths)
        else:
            inv_max_dist = self.layers[0].attn.pair_distance_scale(x, centers, key_lengths)
        for layer, location in zip(self.layers, self.locations):
            x = x + location(boxes)
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, centers, key_lengths, inv_max_dist, use_reentrant=False)
            else:
                x = layer(x, centers, key_lengths, inv_max_dist)
        return x
