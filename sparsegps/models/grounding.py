"""GPS's grounding encoder: self-attention over [text tokens; object tokens], and its heads.

The self-attention layers run on the real tokens only (`TokenPacking`): every per-token part of a
layer (projections, feed-forward, norms, dropout) sees a [tokens, D] matrix without the padding of
the shorter sentences and scenes, and only the attention itself is laid out padded. A real token's
output is what `nn.TransformerEncoderLayer` gives on the padded batch (same parameters, same
initialisation, same names in a state dict); padded positions hold zeros.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsegps.losses import IGNORE_INDEX

from .relation_attention import RelationalLayer, box_pair_features
from .spatial_transformer import SpatialTransformerLayer, location_embedding


class TokenPacking:
    """The real tokens of a padded layout [R, S] (`pad` True at padding), in a chosen order:
    `pack` [R, S, D] -> [M, D], `unpack` back (zeros at padding). Without `index` the order is row
    by row; `index` gives the flat position (r * S + s) of each packed token instead."""

    def __init__(self, pad: torch.Tensor, index: torch.Tensor | None = None):
        self.pad = pad
        self.shape = tuple(pad.shape)
        self.index = (~pad).flatten().nonzero().squeeze(1) if index is None else index

    @classmethod
    def joined(cls, first: "TokenPacking", second: "TokenPacking") -> "TokenPacking":
        """The layout [R, S1 + S2] of two layouts side by side, its tokens packed as `first`'s then
        `second`'s: a matrix packed as `cat([first.pack(a), second.pack(b)])` is its packing."""
        s1, s2 = first.shape[1], second.shape[1]
        width = s1 + s2
        index = torch.cat([first.index // s1 * width + first.index % s1,
                           second.index // s2 * width + s1 + second.index % s2])
        return cls(torch.cat([first.pad, second.pad], dim=1), index)

    def __len__(self) -> int:
        return self.index.shape[0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        padded = h.new_zeros(self.shape[0] * self.shape[1], h.shape[-1]).index_copy(0, self.index, h)
        return padded.view(*self.shape, h.shape[-1])


class PackedSelfAttention(nn.Module):
    """`nn.MultiheadAttention`'s self-attention (its parameters, names and initialisation) over
    packed tokens: the projections on [M, D], the attention on the padded layout, padded keys never
    attended to."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        # created and initialised in nn.MultiheadAttention's order, so a seed gives the same weights
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, h: torch.Tensor, packing: TokenPacking) -> torch.Tensor:
        r, s = packing.shape
        d = h.shape[-1]
        heads = self.num_heads
        qkv = packing.unpack(F.linear(h, self.in_proj_weight, self.in_proj_bias))  # [R, S, 3D]
        q, k, v = qkv.view(r, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each [R, H, S, dh]
        keys = ~packing.pad[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(packing.pack(out.transpose(1, 2).reshape(r, s, d)))


class PackedEncoderLayer(nn.Module):
    """`nn.TransformerEncoderLayer(d_model, num_heads, ffn_dim, dropout, activation="gelu",
    batch_first=True)` (post-norm) over packed tokens: `forward(h [M, D], packing) -> [M, D]`."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = PackedSelfAttention(d_model, num_heads, dropout)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, packing: TokenPacking) -> torch.Tensor:
        h = self.norm1(h + self.dropout1(self.self_attn(h, packing)))
        return self.norm2(h + self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(h))))))


class GroundingEncoder(nn.Module):
    """Fuses each sentence with its scene's objects.

    Inputs: text [R,T,D] with text_pad [R,T] (True = padding); the scenes' objects [B,L,D] with
    object_pad [B,L] and boxes [B,L,6]; scene_index [R], the scene of each sentence. Token-type
    embeddings tell text from objects; the location embedding is added to object tokens. Returns the
    fused (text [R,T,D], objects [R,L,D]).

    attention "plain" (GPS): self-attention layers over [text; objects]. "spatial": after each of
    them, the object tokens also pass a spatial transformer layer (GPS's pairwise spatial attention
    over the scene's objects, its gates predicted from each object's token): the tokens have just
    read the sentence, so which geometry an object attends by depends on what the sentence asks.
    "relational": the same with `RelationalLayer`s, whose values carry the pair geometry. What
    depends on the scene alone (location embeddings, pair geometry) is computed once per scene."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, ffn_dim: int, dropout: float = 0.1,
                 activation_checkpointing: bool = False, attention: str = "plain", spatial_mode: str = "cond",
                 backend: str = "auto"):
        super().__init__()
        if attention not in ("plain", "spatial", "relational"):
            raise ValueError(f"unknown grounding attention {attention!r} (plain, spatial or relational)")
        self.attention = attention
        self.token_type = nn.Parameter(torch.randn(2, d_model) * 0.02)  # text, object
        self.location = location_embedding(d_model)
        self.layers = nn.ModuleList(PackedEncoderLayer(d_model, num_heads, ffn_dim, dropout)
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

    def forward(self, text, text_pad, objects, object_pad, boxes, scene_index):
        text = text + self.token_type[0]
        objects = (objects + self.token_type[1] + self.location(boxes))[scene_index]
        object_pad = object_pad[scene_index]
        # packed as every text token, then every object token: the object layers take a slice
        text_tokens, object_tokens = TokenPacking(text_pad), TokenPacking(object_pad)
        tokens = TokenPacking.joined(text_tokens, object_tokens)
        m = len(text_tokens)
        if self.attention == "spatial":
            centers, lengths = boxes[scene_index][..., :3], (~object_pad).sum(dim=1)
            inv_max_dist = self.object_layers[0].attn.pair_distance_scale(objects, centers, lengths)
            object_args = (centers, lengths, inv_max_dist)
        else:
            object_args = (box_pair_features(boxes), object_pad, scene_index)
        h = torch.cat([text_tokens.pack(text), object_tokens.pack(objects)])
        for k, layer in enumerate(self.layers):
            h = self._run(layer, h, tokens)
            if self.object_layers:
                fused = self._run(self.object_layers[k], object_tokens.unpack(h[m:]), *object_args)
                h = torch.cat([h[:m], object_tokens.pack(fused)])
        return text_tokens.unpack(h[:m]), object_tokens.unpack(h[m:])

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
    """BERT's prediction head with the decoder tied to the text encoder's word embeddings.

    With `token_ids` the head predicts only those tokens (the words a corpus uses): the decoder is
    the embeddings' rows of those tokens and the softmax runs over them; `targets` maps a token id
    to its class among them (IGNORE_INDEX for a token outside). Without, over the whole vocabulary."""

    def __init__(self, d_model: int, hidden: int, vocab_size: int, token_ids: list[int] | None = None):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # full size: checkpoints of both forms match
        self.restricted = bool(token_ids)
        if self.restricted:
            ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ValueError(f"MLM token ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
            classes = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.int64)
            classes[ids] = torch.arange(len(ids))
            self.register_buffer("token_ids", ids, persistent=False)
            self.register_buffer("classes", classes, persistent=False)

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """x [N, D], word_embeddings [vocab, hidden] (passed in, not owned: one tied copy) -> [N, classes]."""
        if self.restricted:
            return self.transform(x) @ word_embeddings[self.token_ids].T + self.bias[self.token_ids]
        return self.transform(x) @ word_embeddings.T + self.bias

    def targets(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The class of each target token id (itself over the whole vocabulary)."""
        return self.classes[token_ids] if self.restricted else token_ids
