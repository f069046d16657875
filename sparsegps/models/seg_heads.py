"""Semantic segmentation on the backbone's per-voxel decoder features.

- `LinearSegHead`: a linear classifier, Pointcept's SpUNet head.
- `LanguageSegHead`: projects voxel features into the text space and scores them against text
  embeddings of the class names, `logit_k = scale * cos(W v, t_k)` with a learnable temperature;
  naming a new vocabulary (`set_classes`) segments classes never seen in fine-tuning.
- `SegmentationModel`: backbone + head, loading backbone weights from a pre-training export.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsegps.losses import LogitScale

from .backbone import SpUNet, SpUNetConfig
from .text_encoder import TextEncoder, TextEncoderConfig


class LinearSegHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, voxel_feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(voxel_feats)


@torch.no_grad()
def class_name_embeddings(text: TextEncoder, names: list[str], template: str = "a {}") -> torch.Tensor:
    """Mean-pooled, L2-normalised text-encoder embeddings of `template.format(name)` per class."""
    device = next(text.parameters()).device
    tok = text.tokenize([template.format(n) for n in names], device)
    feats = text(tok["input_ids"], tok["attention_mask"])
    mask = tok["attention_mask"].unsqueeze(-1).to(feats.dtype)
    return F.normalize((feats * mask).sum(1) / mask.sum(1), dim=-1)


class LanguageSegHead(nn.Module):
    """Voxel features scored against fixed class-name embeddings [K, E] by scaled cosine."""

    def __init__(self, in_channels: int, class_embeddings: torch.Tensor):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_channels, in_channels), nn.GELU(),
                                  nn.Linear(in_channels, class_embeddings.shape[1]))
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.scale = LogitScale(init_temperature=0.07)

    @classmethod
    @torch.no_grad()
    def from_zero_shot(cls, gps_model: nn.Module, class_names: list[str]) -> "LanguageSegHead":
        """The head that `ZeroShotSegmenter(gps_model, class_names)` is: the pre-trained model's dense
        projection and temperature, and its text-space embeddings of the class names."""
        device = next(gps_model.parameters()).device
        head = cls(gps_model.backbone.out_channels, gps_model.class_embeddings(list(class_names), device))
        head.proj.load_state_dict(gps_model.dense_proj.state_dict())
        head.scale.load_state_dict(gps_model.dense_scale.state_dict())
        return head

    def set_classes(self, class_embeddings: torch.Tensor) -> None:
        """Swap the vocabulary (zero-shot segmentation of classes named only now)."""
        self.class_embeddings = F.normalize(class_embeddings.float(), dim=-1).to(self.class_embeddings.device)

    def forward(self, voxel_feats: torch.Tensor) -> torch.Tensor:
        """`scale * cos(proj(v), t_k)`, scored in the projection's hidden width H: with u = W h + b
        (h the hidden features, W [E, H] the last layer), u . t = h . (W^T t) + b . t and |u|^2 =
        h^T (W^T W) h + 2 (W^T b) . h + b . b, so no [voxels, E] tensor is made (E is the text width,
        384 for MiniLM, H the backbone's, 32 for tiny). fp32 whatever the autocast: the squared norm
        needs it."""
        first, activation, last = self.proj
        with torch.autocast(voxel_feats.device.type, enabled=False):
            h = activation(first(voxel_feats.float()))
            w, b, t = last.weight.float(), last.bias.float(), self.class_embeddings
            dots = h @ (w.T @ t.T) + t @ b
            squared = ((h @ (w.T @ w)) * h).sum(-1) + 2 * (h @ (w.T @ b)) + b @ b
            norm = squared.clamp_min(1e-24).sqrt()  # F.normalize's eps, 1e-12, on the norm
            return self.scale() * dots / norm[:, None]


@dataclass
class SegModelConfig:
    backbone: SpUNetConfig = field(default_factory=SpUNetConfig)
    head: Literal["linear", "language"] = "linear"
    # How the language head starts. text: the mean-pooled class-name embeddings of `text`, a fresh
    # projection. zero_shot: the pre-trained export's zero-shot segmenter (its dense projection,
    # temperature and class-name embeddings; needs --pretrained from a run with the dense_text
    # loss), so fine-tuning starts where `eval-seg --zero-shot` ends.
    head_init: Literal["text", "zero_shot"] = "text"
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # head_init text: class-name embeddings
    class_template: str = "a {}"


class SegmentationModel(nn.Module):
    """`forward(batch) -> per-voxel logits [V, K]` (batch from `collate_scenes`)."""

    def __init__(self, cfg: SegModelConfig, class_names: list[str], head: nn.Module | None = None):
        """`head`: a ready head (a loaded or zero-shot one) instead of a new one of `cfg.head`."""
        super().__init__()
        self.cfg = cfg
        self.frozen = "none"
        self.class_names = list(class_names)
        self.backbone = SpUNet(cfg.backbone)
        if head is not None:
            self.head = head
        elif cfg.head == "linear":
            self.head = LinearSegHead(self.backbone.out_channels, len(class_names))
        elif cfg.head == "language":
            self.head = LanguageSegHead(self.backbone.out_channels,
                                        class_name_embeddings(TextEncoder(cfg.text), class_names, cfg.class_template))
        else:
            raise ValueError(f"unknown segmentation head {cfg.head!r} (linear or language)")

    def forward(self, batch: dict) -> torch.Tensor:
        feats = self.backbone(batch["coords"], batch["feats"], batch["batch_size"], batch["spatial_shape"])
        return self.head(feats)

    def load_backbone(self, state_dict: dict, prefix: str = "backbone.") -> None:
        """Copy backbone weights from a (pre-training) state dict; every backbone tensor must be there."""
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.backbone.load_state_dict(own, strict=True)

    def freeze(self, mode: str) -> None:
        """none: train all; encoder: freeze the stem and encoder stages (decoder + head train);
        backbone: freeze the whole backbone (linear probe)."""
        if mode not in ("none", "encoder", "backbone"):
            raise ValueError(f"unknown freeze mode {mode!r} (none, encoder, backbone)")
        self.frozen = mode
        for name, p in self.backbone.named_parameters():
            if mode == "backbone" or (mode == "encoder" and not name.startswith("decoder.")):
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode, so their batch-norm statistics stay those loaded."""
        super().train(mode)
        if self.frozen == "backbone":
            self.backbone.eval()
        elif self.frozen == "encoder":
            for name, module in self.backbone.named_children():
                if name != "decoder":
                    module.eval()
        return self


class ZeroShotSegmenter(nn.Module):
    """A pre-trained GPS model segmenting by naming classes, with no segmentation head and no
    segmentation labels: each voxel's dense text-space feature (the `dense_text` pre-training loss)
    against the "a <class>" embeddings of any class list. `forward(batch) -> [V, K]` logits."""

    def __init__(self, gps_model: nn.Module, class_names: list[str]):
        super().__init__()
        self.gps = gps_model
        self.set_classes(class_names)

    @torch.no_grad()
    def set_classes(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        device = next(self.gps.parameters()).device
        self.register_buffer("classes", self.gps.class_embeddings(self.class_names, device), persistent=False)

    def forward(self, batch: dict) -> torch.Tensor:
        feats = self.gps.backbone(batch["coords"], batch["feats"], batch["batch_size"], batch["spatial_shape"])
        return self.gps.dense_class_logits(feats, self.classes)
