"""GPSModel: the grounded pre-training model of SceneVerse on a sparse voxel backbone.

    voxels --SpUNet--> voxel features --ObjectPooling--> object tokens [B,L,D]
           --SpatialTransformer--> scene-aware object tokens
    texts  --TextEncoder--> token features --proj--> [N,T,D]
    (referral, its scene's objects) --GroundingEncoder--> fused objects --GroundingHead--> logits

The model computes features, tokens and logits; `sparsegps.criterion.GPSCriterion` turns them into
the losses (weights in `LossWeights`: object-text and scene-text InfoNCE, referral-object contrast,
grounding cross-entropy, MLM on the fused text tokens, object classification, dense voxel-text
alignment), with the cross-rank gathers and the normalisation over the global batch.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import hashlib

import torch
from torch import nn

from sparsegps import losses as L
from sparsegps.criterion import LossWeights

from .backbone import SpUNet, SpUNetConfig
from .grounding import GroundingEncoder, GroundingHead, MLMHead
from .pooling import BoxEmbedding, ObjectPooling, mean_by_instance
from .spatial_transformer import SpatialTransformer
from .text_encoder import TextEncoder, TextEncoderConfig


@dataclass
class ModelConfig:
    backbone: SpUNetConfig = field(default_factory=SpUNetConfig)
    d_model: int = 768
    num_heads: int = 12
    spatial_layers: int = 4
    # Spatial attention's gate: cond (GPS), weights predicted per query object; mul, one table
    spatial_mode: Literal["cond", "mul"] = "cond"
    # auto: the Triton kernel on CUDA, else the PyTorch reference; triton or reference force one
    attention_backend: Literal["auto", "triton", "reference"] = "auto"
    grounding_layers: int = 4
    # The grounding encoder's attention. plain: GPS's self-attention over [text; objects]. spatial:
    # each layer also runs GPS's pairwise spatial attention over the objects, gated by their
    # sentence-aware tokens; relational: relational attention, whose values carry the pair geometry
    # (see GroundingEncoder, models/relation_attention.py).
    grounding_attention: Literal["plain", "spatial", "relational"] = "plain"
    # What of its box each object token is given (models/pooling.py `BoxEmbedding`): centre_size
    # (GPS), size (no absolute position), none
    box_embedding: BoxEmbedding = "centre_size"
    ffn_dim: int = 2048
    dropout: float = 0.1
    embed_dim: int = 256  # shared space of the contrastive losses
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    freeze_text: bool = False
    object_text: Literal["caption", "class_name"] = "caption"  # caption: object captions; class_name: "a <class>"
    # Referral-object contrast. gps: the grounding encoder's fused objects against its fused [CLS]
    # by plain cosine (GPS's TextObjWithinBatch); projected: fused objects and the unfused sentence
    # through 256-d projections with a learnable temperature. Measured no better than GPS's form on
    # the demo (README, "What differs from GPS and why"), so GPS's is the default.
    referral_contrast: Literal["gps", "projected"] = "gps"
    sentence_pooling: Literal["mean", "cls"] = "mean"  # mean of the tokens, or the [CLS] token (GPS)
    # Grounding head. mlp: Linear-GELU-Dropout-Linear; gps: GPS's og3d head, Linear-ReLU-LayerNorm-
    # Dropout-Linear (GPS: dropout 0.3). GPS's measured no better on the demo's held-out grounding.
    grounding_head: Literal["mlp", "gps"] = "mlp"
    grounding_head_dropout: float | None = None  # None: `dropout`
    # Contrastive temperatures. learnable: CLIP's, one per loss, clamped at 100. fixed: frozen at
    # their initial 1/0.07, as GPS's loss modules keep theirs (they are not in its optimizer).
    temperatures: Literal["learnable", "fixed"] = "learnable"
    # Scene-text candidates from the other ranks. autograd: gathered with gradients. gps: GPS's
    # plain all_gather, which carries none, so on several ranks the loss trains nothing (the value
    # is the same); on one rank the two are identical.
    scene_text_gather: Literal["autograd", "gps"] = "autograd"
    # Normalisation of the pair distances of the spatial attention. valid: the largest distance
    # between a scene's objects. gps: GPS's, the largest over its 80 zero-padded slots, so the
    # distance of each object to the origin counts too when a scene has fewer than 80 objects.
    spatial_max_dist: Literal["valid", "gps"] = "valid"
    mlm_probability: float = 0.15
    # The tokens MLM predicts. full: BERT's whole vocabulary (GPS). corpus: the tokens of the training
    # texts (`mlm_token_ids`), so the softmax runs over the words the corpus uses (202 of 30,522 for
    # the synthetic rooms) instead of every word piece, most of which never occur; masking is the
    # same. Chosen for the CPU presets by measurement (benchmarks/RESULTS.md, "step").
    mlm_vocabulary: Literal["full", "corpus"] = "full"
    # With mlm_vocabulary corpus: the token ids MLM predicts. Empty: pre-training fills in the tokens
    # of the training store's texts (without those naming held-out classes).
    mlm_token_ids: list[int] = field(default_factory=list)
    activation_checkpointing: bool = False  # transformer layers and the backbone decoder
    # Classes of the object_class and dense_text losses, as "a <class>" prompts; label ids of the
    # batch index this list. Empty: pre-training fills in the training store's vocabulary.
    class_names: list[str] = field(default_factory=list)
    object_class_smoothing: float = 0.3  # GPS's label smoothing for object classification
    # dense_text weights each voxel by its class's share of the global batch's labelled voxels to
    # the power -dense_class_balance (0: plain mean; 0.5: inverse square root of the frequency), so
    # rare classes are learnt, not drowned by walls and floors. Chosen by the demo's zero-shot mIoU.
    dense_class_balance: float = 0.0
    loss: LossWeights = field(default_factory=LossWeights)


TEXT_CACHE_SIZE = 4096  # distinct texts whose frozen-encoder features a model keeps


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
        self.pooling = ObjectPooling(self.backbone.out_channels, d, box_embedding=cfg.box_embedding)
        self.spatial = SpatialTransformer(d, cfg.num_heads, cfg.spatial_layers, cfg.ffn_dim, cfg.dropout,
                                          cfg.spatial_mode, cfg.attention_backend, cfg.activation_checkpointing,
                                          cfg.spatial_max_dist)
        self.text = TextEncoder(cfg.text)
        if cfg.freeze_text:
            self.text.requires_grad_(False)
            self.text.eval()
        self._text_cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        # features kept from other weights would be stale
        self.register_load_state_dict_pre_hook(lambda *args, **kwargs: self._text_cache.clear())
        hidden = self.text.hidden_size
        self.text_to_model = nn.Sequential(nn.Linear(hidden, d), nn.LayerNorm(d))
        self.grounding = GroundingEncoder(d, cfg.num_heads, cfg.grounding_layers, cfg.ffn_dim, cfg.dropout,
                                          cfg.activation_checkpointing, cfg.grounding_attention, cfg.spatial_mode,
                                          cfg.attention_backend)
        head_dropout = cfg.dropout if cfg.grounding_head_dropout is None else cfg.grounding_head_dropout
        self.grounding_head = GroundingHead(d, head_dropout, cfg.grounding_head)
        if cfg.mlm_vocabulary == "corpus" and not cfg.mlm_token_ids:
            raise ValueError("model.mlm_vocabulary is corpus but model.mlm_token_ids is empty: pre-training fills "
                             "it from the training texts")
        self.mlm_head = MLMHead(d, hidden, self.text.vocab_size,
                                cfg.mlm_token_ids if cfg.mlm_vocabulary == "corpus" else None)
        e = cfg.embed_dim
        self.object_proj, self.scene_proj = _mlp(d, e), _mlp(d, e)
        self.text_proj = _mlp(hidden, e)
        self.object_scale, self.scene_scale = L.LogitScale(), L.LogitScale()
        if cfg.referral_contrast == "projected":  # GPS's form compares the fused tokens directly
            self.fused_proj, self.referral_scale = _mlp(d, e), L.LogitScale()
        self.object_class_proj = _mlp(d, e)
        self.dense_proj = _mlp(self.backbone.out_channels, e)
        self.class_scale, self.dense_scale = L.LogitScale(), L.LogitScale()
        if cfg.loss.region_text > 0:  # exports without the loss have no such parameter
            self.region_scale = L.LogitScale()
        if cfg.temperatures == "fixed":
            for module in self.modules():
                if isinstance(module, L.LogitScale):
                    module.requires_grad_(False)

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

    def encode_text(self, texts: list[str], device, mask: bool = False, max_length: int | None = None) -> dict:
        """Token features of `texts` (cut at `max_length` tokens, default `text.max_length`); with
        `mask`, BERT-masked input ids and MLM labels too."""
        if self.cfg.freeze_text and not mask:
            return self._encode_frozen(texts, device, max_length)
        tok = self.text.tokenize(texts, device, max_length)
        ids, labels = tok["input_ids"], None
        if mask:
            ids, labels = L.mask_tokens(ids, tok["attention_mask"], tok["special_tokens_mask"],
                                        self.text.tokenizer.mask_token_id, self.text.vocab_size,
                                        self.cfg.mlm_probability)
        feats = self.text(ids, tok["attention_mask"])
        pad = tok["attention_mask"] == 0
        return {"feats": feats, "pad": pad, "labels": labels, "sentence": self.sentence_embedding(feats, pad)}

    def _encode_frozen(self, texts: list[str], device, max_length: int | None) -> dict:
        """Unmasked texts through the frozen text encoder (kept in eval mode, so a text's features
        never change): each distinct text is encoded once and its token features kept, the
        `TEXT_CACHE_SIZE` most recently used. The encoder still runs once per call, on the texts not
        kept yet or on one empty text, so every rank makes the same module calls (ZeRO-3)."""
        length = max_length or self.text.max_length
        cache = self._text_cache
        missing = list(dict.fromkeys(t for t in texts if (t, length) not in cache))
        tok = self.text.tokenize(missing or [""], device, max_length)
        with torch.no_grad():
            encoded = self.text(tok["input_ids"], tok["attention_mask"])
        for text, feats, keep in zip(missing, encoded, tok["attention_mask"].bool()):
            cache[text, length] = feats[keep]
        rows = []
        for text in texts:
            cache.move_to_end((text, length))
            rows.append(cache[text, length].to(device))
        while len(cache) > TEXT_CACHE_SIZE:
            cache.popitem(last=False)
        feats = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        pad = torch.arange(feats.shape[1], device=device)[None] >= torch.tensor([len(r) for r in rows], device=device)[:, None]
        return {"feats": feats, "pad": pad, "labels": None, "sentence": self.sentence_embedding(feats, pad)}

    def train(self, mode: bool = True) -> "GPSModel":
        """A frozen text encoder stays in eval mode: a fixed feature extractor, without dropout."""
        super().train(mode)
        if self.cfg.freeze_text:
            self.text.eval()
        return self

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
        fused_text, fused_obj = self.grounding(text, referral_text["pad"], objects["tokens"], objects["pad"],
                                               objects["boxes"], scene_index)
        pad = objects["pad"][scene_index]
        return fused_text, fused_obj, self.grounding_head(fused_obj).masked_fill(pad, float("-inf"))

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> dict:
        """The features and logits of one micro-batch that the losses of `cfg.loss` read
        (`sparsegps.criterion.GPSCriterion` turns them into losses), and the retrieval embeddings.

        Whatever the batch holds (no referrals, no captions, no objects), the same modules run in
        the same order: a missing kind of text is replaced by one empty placeholder text (a
        referral with `real` False), so ranks with different data make the same module calls, under
        ZeRO-3 too. The model issues no collective; the criterion does.

        Keys: objects (tokens, pad, boxes, voxel_feats); referrals (`Referrals`), grounding_logits
        [R, L] (-inf on padded objects), referral_logits [R, L] (referral-object contrast); with MLM,
        mlm_logits and mlm_labels of the masked tokens; with object_text, object_text_embedding (the
        objects that have a text), object_text_keys (their texts' keys), text_embedding and text_keys
        (the batch's distinct object texts; key 0: the placeholder), object_scale; with scene_text,
        scene_embedding and caption_embedding of the scenes with a caption (caption_scene: their
        index in the batch), scene_scale; with object_class, object_class_logits of the valid objects;
        with dense_text, dense_logits of every voxel; with region_text, region_embedding of the
        captioned objects (region_keys: their captions' keys), region_text_embedding and
        region_text_keys (the batch's distinct object captions), region_scale."""
        device, w = batch["feats"].device, self.cfg.loss
        objects = self.encode_objects(batch)
        referrals = Referrals.of(batch, device)
        text = self.encode_text(referrals.texts, device, mask=self.training and w.mlm > 0)
        fused_text, fused_obj, logits = self.ground(text, referrals.scene_index, objects)
        out = {"objects": objects, "referrals": referrals, "grounding_logits": logits,
               "referral_logits": self._referral_logits(fused_text, fused_obj, text)}
        if text["labels"] is not None:
            masked = text["labels"] != L.IGNORE_INDEX
            out["mlm_logits"] = self.mlm_head(fused_text[masked], self.text.word_embeddings.weight)
            out["mlm_labels"] = self.mlm_head.targets(text["labels"][masked])
        if w.object_text > 0:
            out.update(self._object_text(batch, objects, device))
        if w.scene_text > 0:
            out.update(self._scene_text(batch, objects, device))
        voxel_embedding = self.dense_proj(objects["voxel_feats"]) if w.dense_text > 0 or w.region_text > 0 else None
        if w.object_class > 0 or w.dense_text > 0:
            classes = self.class_embeddings(self.cfg.class_names, device)
            if w.object_class > 0:
                out["object_class_logits"] = L.scaled_cosine(
                    self.object_class_proj(objects["tokens"][~objects["pad"]]), classes, self.class_scale())
            if w.dense_text > 0:
                out["dense_logits"] = L.scaled_cosine(voxel_embedding, classes, self.dense_scale())
        if w.region_text > 0:
            out.update(self._region_text(batch, voxel_embedding, device))
        return out

    def _referral_logits(self, fused_text: torch.Tensor, fused_obj: torch.Tensor, text: dict) -> torch.Tensor:
        """Referral-object contrast [R, L]: GPS's fused objects against the fused [CLS] by plain
        cosine, or the projected form (sentence vs fused objects, learnable temperature)."""
        if self.cfg.referral_contrast == "gps":
            return L.referral_contrastive_logits(fused_obj, fused_text[:, 0], torch.ones((), device=fused_obj.device))
        return L.referral_contrastive_logits(self.fused_proj(fused_obj), self.text_proj(text["sentence"]),
                                             self.referral_scale())

    def class_embeddings(self, class_names: list[str], device) -> torch.Tensor:
        """Text-space embeddings [K, E] of the "a <class>" prompts."""
        if not class_names:
            raise ValueError("model.class_names is empty: the object_class and dense_text losses need the classes")
        return self.text_proj(self.encode_text([f"a {name}" for name in class_names], device)["sentence"])

    def dense_class_logits(self, voxel_feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Each voxel's scaled cosine [V, K] with the class embeddings: segmentation by naming classes."""
        return L.scaled_cosine(self.dense_proj(voxel_feats), classes, self.dense_scale())

    @staticmethod
    def _first_captions(batch: dict) -> tuple[list[int], list[str]]:
        """The objects (batch object order) that have an object caption, and their first one."""
        caption: dict[int, str] = {}
        for t in batch["texts"]:
            if t["kind"] == "object_caption" and t["target"] >= 0:
                caption.setdefault(t["target"], t["text"])
        rows = sorted(caption)
        return rows, [caption[r] for r in rows]

    def _object_text_pairs(self, batch: dict) -> tuple[list[int], list[str]]:
        """The objects (rows of the flattened valid tokens) that have a text, and that text: their
        first caption ("caption") or "a <class>" ("class_name"; objects whose class name was held
        out have none)."""
        if self.cfg.object_text == "caption":
            return self._first_captions(batch)
        rows = [i for i, name in enumerate(batch["object_names"]) if name]  # "": a class held out of training
        return rows, [f"a {batch['object_names'][i]}" for i in rows]

    def _texts_to_contrast(self, texts: list[str], device) -> dict:
        """The distinct `texts` in the contrastive space with their keys (`text_key`, by which the
        criterion matches rows to texts gathered from every rank), and each text's key; no text: one
        placeholder (key 0)."""
        unique = sorted(set(texts))
        return {"embedding": self.text_proj(self.encode_text(unique or [""], device)["sentence"]),
                "keys": torch.tensor([text_key(t) for t in unique] or [0], device=device, dtype=torch.int64),
                "row_keys": torch.tensor([text_key(t) for t in texts], device=device, dtype=torch.int64)}

    def _object_text(self, batch: dict, objects: dict, device) -> dict:
        """Embeddings of the objects that have a text, and of the batch's distinct object texts, with
        the keys that match them."""
        rows, texts = self._object_text_pairs(batch)
        flat = objects["tokens"][~objects["pad"]]  # [O, D] in batch object order
        encoded = self._texts_to_contrast(texts, device)
        return {"object_text_embedding": self.object_proj(flat[rows]), "object_text_keys": encoded["row_keys"],
                "text_embedding": encoded["embedding"], "text_keys": encoded["keys"],
                "object_scale": self.object_scale()}

    def _region_text(self, batch: dict, voxel_embedding: torch.Tensor, device) -> dict:
        """The mean projected voxel of each captioned object that kept voxels, and the batch's
        distinct object captions, with the keys that match them."""
        rows, texts = self._first_captions(batch)
        means, counts = mean_by_instance(voxel_embedding, batch["voxel_object"].to(device),
                                         int(batch["object_offsets"][-1]), self.pooling.backend)
        has_voxels = counts.tolist()
        kept = [k for k, r in enumerate(rows) if has_voxels[r] > 0]  # a crop can drop an object
        rows, texts = [rows[k] for k in kept], [texts[k] for k in kept]
        encoded = self._texts_to_contrast(texts, device)
        index = torch.tensor(rows, device=device, dtype=torch.int64)
        return {"region_embedding": means[index],
                "region_keys": encoded["row_keys"], "region_text_embedding": encoded["embedding"],
                "region_text_keys": encoded["keys"], "region_scale": self.region_scale()}

    def _scene_text(self, batch: dict, objects: dict, device) -> dict:
        """The mean of each scene's valid object tokens and its scene caption, in the contrastive
        space, for the scenes that have a caption (`caption_scene`: their index in the batch; a
        batch without captions encodes one placeholder, which `caption_embedding` leaves out)."""
        caption: dict[int, str] = {}
        for t in batch["texts"]:
            if t["kind"] == "scene_caption":
                caption.setdefault(t["scene"], t["text"])
        scenes = sorted(caption)
        valid = (~objects["pad"]).unsqueeze(-1).to(objects["tokens"].dtype)
        pooled = (objects["tokens"] * valid).sum(1) / valid.sum(1).clamp(min=1)
        text = self.text_proj(self.encode_text([caption[s] for s in scenes] or [""], device,
                                               max_length=self.cfg.text.scene_caption_max_length)["sentence"])
        return {"scene_embedding": self.scene_proj(pooled[scenes]), "caption_embedding": text[: len(scenes)],
                "caption_placeholder": text[len(scenes):], "scene_scale": self.scene_scale(),
                "caption_scene": torch.tensor(scenes, device=device, dtype=torch.int64)}

@dataclass
class Referrals:
    """The referrals of a micro-batch, or one placeholder (an empty text, `real` False) when it has
    none: texts, scene of each [R], target object within its scene [R], `real` [R]."""

    texts: list[str]
    scene_index: torch.Tensor
    target: torch.Tensor
    real: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.real.sum())

    @classmethod
    def of(cls, batch: dict, device) -> "Referrals":
        rows = [t for t in batch["texts"] if t["kind"] == "referral" and t["target"] >= 0]
        real = torch.arange(max(len(rows), 1), device=device) < len(rows)
        scene = torch.tensor([t["scene"] for t in rows] or [0], device=device)
        target = torch.tensor([t["target"] for t in rows] or [0], device=device)
        target = (target - batch["object_offsets"].to(device)[scene]).where(real, 0)
        return cls([t["text"] for t in rows] or [""], scene, target, real)


def text_key(text: str) -> int:
    """A nonzero 63-bit key of a string, equal on every rank (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1 | 1


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["GPSModel", "ModelConfig", "count_parameters"]
