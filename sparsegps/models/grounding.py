"""GPS's grounding encoder: plain self-attention over [text tokens; object tokens], and its heads."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .relation_attention import RelationalLayer
from .spatial_transformer import SpatialTransformerLayer, location_embedding


class GroundingEncoder(nn.Module):
    """Fuses a sentence with its scene's objects.

    Inputs: text [R,T,D] with text_pad [R,T] (True = padding), objects [R,L,D] with object_pad
    [R,L] and boxes [R,L,6]. Token-type embeddings tell text from objects; the location embedding
    is added to object tokens. Returns the fused (text, objects).

    attention "plain" (GPS): self-attention layers over [text; objects]. "spatial": after each of
    them, the object tokens also pass a spatial transformer layer (GPS's pairwise spatial attention
    over the scene's objects, its gates predicted from each object's token): the tokens have just
    read the sentence, so which geometry an object attends by depends on what the sentence asks.
    "relational": the same with `RelationalLayer`s, whose values carry the pair geometry."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, ffn_dim: int, dropout: float = 0.1,
                 activation_checkpointing: bool = False, attention: str = "plain", spatial_mode: str = "cond",
                 backend: str = "auto"):
        super().__init__()
        if attention not in ("plain", "spatial", "relational"):
            raise ValueError(f"unknown grounding attention {attention!r} (plain, spatial or relational)")
        self.attention = attention
        self.token_type = nn.Parameter(torch.randn(2, d_model) * 0.02)  # text, object
        self.location = location_embedding(d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, num_heads, ffn_dim, dropout, activation="gelu", batch_first=True)
            for _ in range(num_layers))
        if attention == "spatial":
            self.object_layers = nn.ModuleList(SpatialTransformerLayer(d_model, num_heads, ffn_dim, dropout,
                                                                       spatial_mode, backend)
                                               for _ in range(num_layers))
        elif attention == "relational":
            self.object_layers = nn.ModuleList(RelationalLayer(d_model, num_heads, ffn_dim, dropout)
                                               for _ in range(num_layers))
        else:
            self.object_layers = nn.ModuleList()
        self.activation_checkpointing = activation_checkpointing

    def forward(self, text, text_pad, objects, object_pad, boxes):
        text = text + self.token_type[0]
        objects = objects + self.token_type[1] + self.location(boxes)
        x = torch.cat([text, objects], dim=1)
        pad = torch.cat([text_pad, object_pad], dim=1)
        t = text.shape[1]
        if self.attention == "spatial":
            centers, lengths = boxes[..., :3], (~object_pad).sum(dim=1)
            inv_max_dist = self.object_layers[0].attn.pair_distance_scale(objects, centers, lengths)
            object_args = (centers, lengths, inv_max_dist)
        else:
            object_args = (boxes, object_pad)
        for k, layer in enumerate(self.layers):
            x = self._run(layer, x, None, pad)
            if self.object_layers:
                x = torch.cat([x[:, :t], self._run(self.object_layers[k], x[:, t:], *object_args)], dim=1)
        return x[:, :t], x[:, t:]

    def _run(self, layer, *args):
        if self.activation_checkpointing and self.training:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class GroundingHead(nn.Module):
    """MLP scoring each fused object token: [R,L,D] -> [R,L].

    form "mlp": Linear, GELU, Dropout, Linear. form "gps": GPS's og3d head (SceneVerse
    modules/utils.py get_mlp_head): Linear, ReLU, LayerNorm (eps 1e-12), Dropout, Linear."""

    def __init__(self, d_model: int, dropout: float = 0.1, form: str = "mlp"):
        super().__init__()
        if form == "mlp":
            layers = [nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_model, 1)]
        elif form == "gps":
            layers = [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model, eps=1e-12), nn.Dropout(dropout),
                      nn.Linear(d_model, 1)]
        else:
            raise ValueError(f"unknown grounding head {form!r} (mlp or gps)")
        self.mlp = nn.Sequential(*layers)

    def forward(self, objects: torch.Tensor) -> torch.Tensor:
        return self.mlp(objects).squeeze(-1)


class MLMHead(nn.Module):
    """BERT's prediction head with the decoder tied to the text encoder's word embeddings."""

    def __init__(self, d_model: int, hidden: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """x [N, D], word_embeddings [vocab, hidden] (passed in, not owned: one tied copy) -> [N, vocab]."""
        return self.transform(x) @ word_embeddings.T + self.bias
