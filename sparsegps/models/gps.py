"""GPSModel: the grounded pre-training model of SceneVerse on a sparse voxel backbone.

    voxels --SpUNet--> voxel features --ObjectPooling--> object tokens [B,L,D]
           --SpatialTransformer--> scene-aware object tokens
    texts  --TextEncoder--> token features --proj--> [N,T,D]
    (referral, its scene's objects) --GroundingEncoder--> fused objects --GroundingHead--> logits

Losses (weights in `LossWeights`): object-text and scene-text InfoNCE, referral-object
contrast, grounding cross-entropy, and MLM on the fused text tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsegps import losses as L

from .backbone import SpUNet, SpUNetConfig
from .grounding import GroundingEncoder, GroundingHead, MLMHead
from .pooling import ObjectPooling
from .spatial_transformer import SpatialTransformer
from .text_encoder import TextEncoder, TextEncoderConfig


@dataclass
class LossWeights:
    object_text: float = 1.0
    scene_text: float = 1.0
    referral_object: float = 1.0
    grounding: float = 1.0
    mlm: float = 1.0


@dataclass
class ModelConfig:
    backbone: SpUNetConfig = field(default_factory=SpUNetConfig)
    d_model: int = 768
    num_heads: int = 12
    spatial_layers: int = 4
    spatial_mode: str = "cond"
    attention_backend: str = "auto"  # auto: the Triton kernel on CUDA, else the PyTorch reference
    grounding_layers: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.1
    embed_dim: int = 256  # shared space of the contrastive losses
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    freeze_text: bool = False
    object_text: str = "caption"  # caption: object captions; class_name: "a <class>" prompts
    sentence_pooling: str = "mean"  # mean of the tokens, or cls
    mlm_probability: float = 0.15
    activation_checkpointing: bool = False  # transformer layers and the backbone decoder
    loss: LossWeights = field(default_factory=LossWeights)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


class GPSModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        backbone_cfg = cfg.backbone
        if cfg.activation_checkpointing:
            backbone_cfg = dataclasses.replace(backbone_cfg, checkpoint_decoder=True)
        self.backbone = SpUNet(backbone_cfg)
        self.pooling = ObjectPooling(self.backbone.out_channels, d)
        self.spatial = SpatialTransformer(d, cfg.num_heads, cfg.spatial_layers, cfg.ffn_dim, cfg.dropout,
                                          cfg.spatial_mode, cfg.attention_backend, cfg.activation_checkpointing)
        self.text = TextEncoder(cfg.text)
        if cfg.freeze_text:
            self.text.requires_grad_(False)
        hidden = self.text.hidden_size
        self.text_to_model = nn.Sequential(nn.Linear(hidden, d), nn.LayerNorm(d))
        self.grounding = GroundingEncoder(d, cfg.num_heads, cfg.grounding_layers, cfg.ffn_dim, cfg.dropout,
                                          cfg.activation_checkpointing)
        self.grounding_head = GroundingHead(d, cfg.dropout)
        self.mlm_head = MLMHead(d, hidden, self.text.vocab_size)
        e = cfg.embed_dim
        self.object_proj, self.scene_proj, self.fused_proj = _mlp(d, e), _mlp(d, e), _mlp(d, e)
        self.text_proj = _mlp(hidden, e)
        self.object_scale, self.scene_scale, self.referral_scale = L.LogitScale(), L.LogitScale(), L.LogitScale()

    # ------------------------------------------------------------------------------ encoders
    def encode_objects(self, batch: dict) -> dict:
        """Scene-aware object tokens [B,L,D] with padding mask [B,L] and boxes [B,L,6]."""
        feats = batch["feats"]
        if torch.is_grad_enabled():
            # A module's full backward hook fires after its backward only when an input requires
            # grad; ZeRO-3 releases the backbone's gathered parameters in that hook.
            feats = feats.detach().requires_grad_()
        voxel_feats = self.backbone(batch["coords"], feats, batch["batch_size"], batch["spatial_shape"])
        tokens, pad, centers, sizes = self.pooling(voxel_feats, batch["voxel_object"], batch["object_offsets"],
                                                   batch["object_center"], batch["object_size"])
        lengths = (~pad).sum(dim=1)
        tokens = self.spatial(tokens, centers, sizes, lengths)
        return {"tokens": tokens, "pad": pad, "boxes": torch.cat([centers, sizes], dim=-1),
                "voxel_feats": voxel_feats}

    def encode_text(self, texts: list[str], device, mask: bool = False) -> dict:
        """Token features of `texts`; with `mask`, BERT-masked input ids and MLM labels too."""
        tok = self.text.tokenize(texts, device)
        ids, labels = tok["input_ids"], None
        if mask:
            ids, labels = L.mask_tokens(ids, tok["attention_mask"], tok["special_tokens_mask"],
                                        self.text.tokenizer.mask_token_id, self.text.vocab_size,
                                        self.cfg.mlm_probability)
        feats = self.text(ids, tok["attention_mask"])
        pad = tok["attention_mask"] == 0
        return {"feats": feats, "pad": pad, "labels": labels, "sentence": self.sentence_embedding(feats, pad)}

    def sentence_embedding(self, feats: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """One vector per text: the [CLS] token (GPS) or the mean of the real tokens (sentence-
        transformers' pooling for MiniLM; with a frozen or truncated encoder [CLS] says little)."""
        if self.cfg.sentence_pooling == "cls":
            return feats[:, 0]
        keep = (~pad).unsqueeze(-1).to(feats.dtype)
        return (feats * keep).sum(1) / keep.sum(1).clamp(min=1)

    def ground(self, referral_text: dict, scene_index: torch.Tensor, objects: dict) -> tuple:
        """Each referral fused with the objects of its scene by the grounding encoder.

        Returns (fused text [R,T,D], fused objects [R,L,D], grounding logits [R,L] with -inf on
        padded objects)."""
        text = self.text_to_model(referral_text["feats"])
        pad = objects["pad"][scene_index]
        fused_text, fused_obj = self.grounding(text, referral_text["pad"], objects["tokens"][scene_index], pad,
                                               objects["boxes"][scene_index])
        return fused_text, fused_obj, self.grounding_head(fused_obj).masked_fill(pad, float("-inf"))

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> dict:
        device = batch["feats"].device
        objects = self.encode_objects(batch)
        offsets = batch["object_offsets"]
        out: dict = {"objects": objects}
        zero = objects["tokens"].sum() * 0.0
        w = self.cfg.loss

        referrals = [t for t in batch["texts"] if t["kind"] == "referral" and t["target"] >= 0]
        if referrals:
            scene_index = torch.tensor([t["scene"] for t in referrals], device=device)
            target = torch.tensor([t["target"] for t in referrals], device=device) - offsets.to(device)[scene_index]
            use_mlm = self.training and w.mlm > 0
            ref = self.encode_text([t["text"] for t in referrals], device, mask=use_mlm)
            fused_text, fused_obj, logits = self.ground(ref, scene_index, objects)
            obj_pad = objects["pad"][scene_index]
            out["grounding_logits"] = logits
            out["grounding_target"] = target
            out["grounding_scene"] = scene_index
            out["loss_grounding"] = L.masked_object_cross_entropy(logits, obj_pad, target)
            contrast = L.referral_contrastive_logits(self.fused_proj(fused_obj), self.text_proj(ref["sentence"]),
                                                     self.referral_scale())
            out["loss_referral_object"] = L.masked_object_cross_entropy(contrast, obj_pad, target)
            if use_mlm:
                masked = ref["labels"] != L.IGNORE_INDEX
                mlm_logits = self.mlm_head(fused_text[masked], self.text.word_embeddings.weight)
                out["loss_mlm"] = L.mlm_loss(mlm_logits, ref["labels"][masked])
        out["loss_object_text"] = self._object_text_loss(batch, objects, device)
        out["loss_scene_text"] = self._scene_text_loss(batch, objects, device)

        total = zero
        for name in ("object_text", "scene_text", "referral_object", "grounding", "mlm"):
            value = out.get(f"loss_{name}")
            if value is None:
                out[f"loss_{name}"] = value = zero
            total = total + getattr(w, name) * value
        out["loss"] = total
        return out

    def _object_text_loss(self, batch: dict, objects: dict, device) -> torch.Tensor:
        """Object tokens against the text of their class name or of one of their captions."""
        flat = objects["tokens"][~objects["pad"]]  # [O, D] in batch object order
        if flat.shape[0] < 2 or self.cfg.loss.object_text == 0:
            return flat.sum() * 0.0
        if self.cfg.object_text == "caption":
            caption = {}
            for t in batch["texts"]:
                if t["kind"] == "object_caption" and t["target"] >= 0:
                    caption.setdefault(t["target"], t["text"])
            rows = sorted(caption)
            texts = [caption[r] for r in rows]
        else:
            rows = list(range(flat.shape[0]))
            texts = [f"a {name}" for name in batch["object_names"]]
        if len(rows) < 2:
            return flat.sum() * 0.0
        unique = sorted(set(texts))
        position = {s: i for i, s in enumerate(unique)}
        text_feats = self.encode_text(unique, device)["sentence"]
        positive = torch.zeros(len(rows), len(unique), dtype=torch.bool, device=device)
        positive[torch.arange(len(rows)), torch.tensor([position[s] for s in texts])] = True
        return L.multi_positive_info_nce(self.object_proj(flat[rows]), self.text_proj(text_feats), positive,
                                         self.object_scale())

    def _scene_text_loss(self, batch: dict, objects: dict, device) -> torch.Tensor:
        """Mean of a scene's valid object tokens against its scene caption, across all ranks."""
        caption = {}
        for t in batch["texts"]:
            if t["kind"] == "scene_caption":
                caption.setdefault(t["scene"], t["text"])
        scenes = sorted(caption)
        valid = (~objects["pad"]).unsqueeze(-1).float()
        pooled = (objects["tokens"] * valid).sum(1) / valid.sum(1).clamp(min=1)
        if self.cfg.loss.scene_text == 0:
            return pooled.sum() * 0.0
        if scenes:
            text_feats = self.encode_text([caption[s] for s in scenes], device)["sentence"]
        else:  # no caption here, but other ranks may have some: still join the gather
            text_feats = pooled.new_zeros(0, self.text.hidden_size)
        return L.symmetric_info_nce(self.scene_proj(pooled[scenes]), self.text_proj(text_feats), self.scene_scale())

    # ------------------------------------------------------------------------------ helpers
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """GPS's optimizer groups: text encoder, backbone + transformers, heads."""
        groups: dict[str, list[nn.Parameter]] = {"text_encoder": [], "backbone": [], "heads": []}
        body = ("backbone.", "pooling.", "spatial.", "grounding.", "text_to_model.")
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("text."):
                groups["text_encoder"].append(p)
            elif name.startswith(body):
                groups["backbone"].append(p)
            else:
                groups["heads"].append(p)
        return groups


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["GPSModel", "LossWeights", "ModelConfig", "count_parameters"]
