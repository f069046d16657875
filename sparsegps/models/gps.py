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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Literal

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from sparsegps import losses as L
from sparsegps.distributed import all_reduce_sum, gather_rows

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
    # Not in GPS's pre-training: GPS trains its object encoder beforehand on object classification
    # against class-name text embeddings (label smoothing 0.3); here that signal can train the
    # pooled object tokens end to end.
    object_class: float = 0.0
    # Not in GPS: every labelled voxel's feature, projected into the text space, against the
    # class-name texts, so a pre-trained model segments by naming classes (eval-seg --zero-shot).
    dense_text: float = 0.0


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


LOSS_NAMES = tuple(f.name for f in dataclasses.fields(LossWeights))
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
        self.pooling = ObjectPooling(self.backbone.out_channels, d)
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
        self.mlm_head = MLMHead(d, hidden, self.text.vocab_size)
        e = cfg.embed_dim
        self.object_proj, self.scene_proj = _mlp(d, e), _mlp(d, e)
        self.text_proj = _mlp(hidden, e)
        self.object_scale, self.scene_scale = L.LogitScale(), L.LogitScale()
        if cfg.referral_contrast == "projected":  # GPS's form compares the fused tokens directly
            self.fused_proj, self.referral_scale = _mlp(d, e), L.LogitScale()
        self.object_class_proj = _mlp(d, e)
        self.dense_proj = _mlp(self.backbone.out_channels, e)
        self.class_scale, self.dense_scale = L.LogitScale(), L.LogitScale()
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
        pad = objects["pad"][scene_index]
        fused_text, fused_obj = self.grounding(text, referral_text["pad"], objects["tokens"][scene_index], pad,
                                               objects["boxes"][scene_index])
        return fused_text, fused_obj, self.grounding_head(fused_obj).masked_fill(pad, float("-inf"))

    # ------------------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> dict:
        """Every loss of one micro-batch, the grounding logits and the retrieval embeddings.

        Whatever the batch holds (no referrals, no captions, no objects), the same modules run in
        the same order and the same collectives are issued: a missing kind of text is replaced by
        one empty placeholder text whose terms have weight zero. So ranks with different data stay
        in step, under ZeRO-3 too. Each loss is this rank's share of the mean of its terms over all
        ranks (`losses.global_mean_share`): the counts of terms are summed over ranks once per
        forward."""
        device, w = batch["feats"].device, self.cfg.loss
        objects = self.encode_objects(batch)
        referrals = Referrals.of(batch, device)
        text = self.encode_text(referrals.texts, device, mask=self.training and w.mlm > 0)
        object_rows, object_texts = self._object_text_pairs(batch, objects)
        masked = text["labels"] != L.IGNORE_INDEX if text["labels"] is not None else torch.zeros_like(text["pad"])
        counts = global_counts(referrals=referrals.count, masked_tokens=masked.sum(), object_texts=len(object_rows),
                               labelled_objects=(batch["object_label"] >= 0).sum(),
                               labelled_voxels=(batch["voxel_semantic"] >= 0).sum(), device=device)

        out = {"objects": objects, **self._referral_losses(referrals, text, masked, objects, counts)}
        if w.object_text > 0:
            out["loss_object_text"] = self._object_text_loss(objects, object_rows, object_texts,
                                                             counts["object_texts"], device)
        if w.scene_text > 0:
            out.update(self._scene_text(batch, objects, device))
        if w.object_class > 0 or w.dense_text > 0:
            out.update(self._class_losses(batch, objects, counts, device))
        total = objects["tokens"].sum() * 0.0
        for name in LOSS_NAMES:
            value = out.setdefault(f"loss_{name}", total * 0.0)
            total = total + getattr(w, name) * value
        out["loss"] = total
        return out

    def _referral_losses(self, referrals: "Referrals", text: dict, masked: torch.Tensor, objects: dict,
                         counts: dict) -> dict:
        """Grounding cross-entropy, referral-object contrast and MLM over the fused referrals."""
        real, scene, target = referrals.real, referrals.scene_index, referrals.target
        fused_text, fused_obj, logits = self.ground(text, scene, objects)
        # padding is masked on real rows only: the placeholder's row stays finite (weight zero)
        obj_pad = objects["pad"][scene] & real[:, None]
        grounding = L.masked_object_cross_entropy(logits.masked_fill(~real[:, None], 0.0), obj_pad, target)
        if self.cfg.referral_contrast == "gps":
            contrast = L.referral_contrastive_logits(fused_obj, fused_text[:, 0], torch.ones((), device=real.device))
        else:
            contrast = L.referral_contrastive_logits(self.fused_proj(fused_obj), self.text_proj(text["sentence"]),
                                                     self.referral_scale())
        referral = L.masked_object_cross_entropy(contrast, obj_pad, target)
        n = referrals.count
        out = {"loss_grounding": L.global_mean_share((grounding * real).sum(), counts["referrals"]),
               "loss_referral_object": L.global_mean_share((referral * real).sum(), counts["referrals"]),
               "grounding_logits": logits[:n], "grounding_target": target[:n], "grounding_scene": scene[:n]}
        if text["labels"] is not None:
            mlm_logits = self.mlm_head(fused_text[masked], self.text.word_embeddings.weight)
            mlm = L.mlm_loss(mlm_logits, text["labels"][masked])
            out["loss_mlm"] = L.global_mean_share(mlm.sum() + mlm_logits.sum() * 0.0, counts["masked_tokens"])
        return out

    def _class_losses(self, batch: dict, objects: dict, counts: dict, device) -> dict:
        """Object classification and dense voxel alignment against the class-name embeddings."""
        w, out = self.cfg.loss, {}
        classes = self.class_embeddings(self.cfg.class_names, device)
        if w.object_class > 0:
            logits = L.scaled_cosine(self.object_class_proj(objects["tokens"][~objects["pad"]]), classes,
                                     self.class_scale())
            per_object = L.labelled_cross_entropy(logits, batch["object_label"].to(device),
                                                  self.cfg.object_class_smoothing)
            out["loss_object_class"] = L.global_mean_share(per_object.sum(), counts["labelled_objects"])
        if w.dense_text > 0:
            logits = self.dense_class_logits(objects["voxel_feats"], classes)
            labels = batch["voxel_semantic"].to(device)
            per_voxel = L.labelled_cross_entropy(logits, labels)
            if self.cfg.dense_class_balance > 0:
                per_voxel = per_voxel * L.class_balance_weights(labels, len(classes), self.cfg.dense_class_balance)
            out["loss_dense_text"] = L.global_mean_share(per_voxel.sum(), counts["labelled_voxels"])
        return out

    def class_embeddings(self, class_names: list[str], device) -> torch.Tensor:
        """Text-space embeddings [K, E] of the "a <class>" prompts."""
        if not class_names:
            raise ValueError("model.class_names is empty: the object_class and dense_text losses need the classes")
        return self.text_proj(self.encode_text([f"a {name}" for name in class_names], device)["sentence"])

    def dense_class_logits(self, voxel_feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Each voxel's scaled cosine [V, K] with the class embeddings: segmentation by naming classes."""
        return L.scaled_cosine(self.dense_proj(voxel_feats), classes, self.dense_scale())

    def _object_text_pairs(self, batch: dict, objects: dict) -> tuple[list[int], list[str]]:
        """The objects (rows of the flattened valid tokens) that have a text, and that text: their
        first caption ("caption") or "a <class>" ("class_name"; objects whose class name was held
        out have none)."""
        if self.cfg.object_text == "caption":
            caption: dict[int, str] = {}
            for t in batch["texts"]:
                if t["kind"] == "object_caption" and t["target"] >= 0:
                    caption.setdefault(t["target"], t["text"])
            rows = sorted(caption)
            return rows, [caption[r] for r in rows]
        rows = [i for i, name in enumerate(batch["object_names"]) if name]  # "": a class held out of training
        return rows, [f"a {batch['object_names'][i]}" for i in rows]

    def _object_text_loss(self, objects: dict, rows: list[int], texts: list[str], global_rows: torch.Tensor,
                          device) -> torch.Tensor:
        """Object tokens against the texts of all ranks' objects (multi-positive InfoNCE).

        Each rank encodes its distinct texts; the candidates are the distinct texts over all ranks
        (gathered with gradients, a text held by several ranks counted once), so the loss does not
        depend on how the batch is split over ranks."""
        flat = objects["tokens"][~objects["pad"]]  # [O, D] in batch object order
        unique = sorted(set(texts))
        encoded = self.text_proj(self.encode_text(unique or [""], device)["sentence"])
        keys = torch.tensor([text_key(s) for s in unique] or [0], device=device)  # 0: the placeholder
        all_encoded, _ = gather_rows(encoded)
        all_keys, _ = gather_rows(keys)
        keep = first_occurrences(all_keys) & (all_keys != 0)
        row_keys = torch.tensor([text_key(s) for s in texts], device=device, dtype=torch.int64)
        positive = row_keys[:, None] == all_keys[keep][None, :]
        per_row = L.multi_positive_info_nce(self.object_proj(flat[rows]), all_encoded[keep], positive,
                                            self.object_scale())
        anchor = all_encoded.sum() * 0.0  # the placeholder and duplicates stay in the graph
        return L.global_mean_share(per_row.sum() + anchor, global_rows)

    def _scene_text(self, batch: dict, objects: dict, device) -> dict:
        """Mean of a scene's valid object tokens against its scene caption, candidates from all ranks.

        Returns the loss and, for retrieval metrics, the normalised scene and caption embeddings of
        the scenes that have a caption (`caption_scene`: their index in the batch)."""
        caption: dict[int, str] = {}
        for t in batch["texts"]:
            if t["kind"] == "scene_caption":
                caption.setdefault(t["scene"], t["text"])
        scenes = sorted(caption)
        valid = (~objects["pad"]).unsqueeze(-1).to(objects["tokens"].dtype)
        pooled = (objects["tokens"] * valid).sum(1) / valid.sum(1).clamp(min=1)
        scene_emb = self.scene_proj(pooled[scenes])
        text = self.text_proj(self.encode_text([caption[s] for s in scenes] or [""], device,
                                               max_length=self.cfg.text.scene_caption_max_length)["sentence"])
        per_row, global_rows = L.symmetric_info_nce(scene_emb, text[: len(scenes)], self.scene_scale(),
                                                    gather_grad=self.cfg.scene_text_gather == "autograd")
        loss = L.global_mean_share(per_row.sum() + text.sum() * 0.0, global_rows)
        return {"loss_scene_text": loss, "caption_scene": torch.tensor(scenes, device=device, dtype=torch.int64),
                "scene_embedding": F.normalize(scene_emb.float(), dim=-1),
                "caption_embedding": F.normalize(text[: len(scenes)].float(), dim=-1)}

    # ------------------------------------------------------------------------------ helpers
    def parameter_groups(self, no_decay: NoDecayRule = "gps") -> dict[str, list[nn.Parameter]]:
        """Optimizer groups by role: text encoder, U-Net backbone, transformers (pooling, spatial,
        grounding), heads. Parameters exempt from weight decay by `no_decay` (see
        `no_decay_parameter_names`) go to "<role>/no_decay" groups."""
        body = ("pooling.", "spatial.", "grounding.", "text_to_model.")

        def role(name: str) -> str:
            return ("text_encoder" if name.startswith("text.") else "backbone" if name.startswith("backbone.")
                    else "transformers" if name.startswith(body) else "heads")

        return optimizer_groups(self, role, no_decay)


NoDecayRule = Literal["gps", "norms_embeddings", "none"]


def optimizer_groups(model: nn.Module, role: Callable[[str], str],
                     no_decay: NoDecayRule = "gps") -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of `model` by `role(name)`, those exempt from weight decay (see
    `no_decay_parameter_names`) in "<role>/no_decay" groups."""
    exempt = no_decay_parameter_names(model, no_decay)
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(role(name) + ("/no_decay" if name in exempt else ""), []).append(p)
    return groups


def no_decay_parameter_names(model: nn.Module, rule: NoDecayRule = "gps") -> set[str]:
    """Parameters exempt from weight decay.

    gps: GPS's `no_decay_param_group` (SceneVerse optim/utils.py): names containing "bias" or
    "LayerNorm." (BERT's norms; other norms and embeddings are decayed). norms_embeddings: every
    parameter of fewer than 2 dimensions (biases, norm weights, temperatures), embedding tables and
    token-type embeddings, the common practice since. none: decay everything."""
    names = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if rule == "gps":
                exempt = "bias" in full or "LayerNorm." in full
            elif rule == "norms_embeddings":
                exempt = p.ndim < 2 or isinstance(module, nn.Embedding) or name == "token_type"
            else:
                exempt = False
            if exempt:
                names.add(full)
    return names


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


def global_counts(device, **local) -> dict[str, torch.Tensor]:
    """Each count summed over ranks, in one collective."""
    values = torch.tensor([float(v) for v in local.values()], device=device, dtype=torch.float64)
    return dict(zip(local, all_reduce_sum(values).unbind()))


def text_key(text: str) -> int:
    """A nonzero 63-bit key of a string, equal on every rank (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1 | 1


def first_occurrences(keys: torch.Tensor) -> torch.Tensor:
    """[N] bool: True at the first position of each distinct value of `keys`."""
    _, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((int(inverse.max()) + 1 if keys.numel() else 0,), keys.shape[0], device=keys.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    keep = torch.zeros_like(keys, dtype=torch.bool)
    keep[first] = True
    return keep


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["GPSModel", "LossWeights", "ModelConfig", "count_parameters"]
