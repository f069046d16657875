"""GPS's pre-training losses: object-, scene- and referral-level alignment, grounding, and MLM.

Every function takes plain tensors, so each can be checked against a hand-computed case, and
returns one loss per term (referral, object, scene, masked token). The model adds a rank's terms
and divides by the number of terms over all ranks (`global_mean_share`), so the loss is the same
however a batch is split over ranks. Contrastive logits are computed in fp32 under autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsegps.distributed import all_reduce_sum, gather_rows, world_size

IGNORE_INDEX = -100


class LogitScale(nn.Module):
    """CLIP's learnable temperature: a parameter `log(1/t)`, used as `exp(.)` clamped at `max_scale`."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        # shape [1], not a 0-dim tensor: DeepSpeed broadcasts parameters as byte views
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)[0]


def global_mean_share(terms_sum: torch.Tensor, global_count: torch.Tensor | int) -> torch.Tensor:
    """This rank's share of a mean over the terms of all ranks: world * (local sum) / (global count).

    DeepSpeed averages gradients over ranks, so these shares average to the global mean, and its
    gradient is the global mean's: a rank with few terms is not over-weighted, a rank with none
    contributes exactly zero, and splitting a batch over more ranks changes nothing but speed.
    With no term anywhere the share is zero (still attached to the graph)."""
    count = torch.as_tensor(global_count, dtype=terms_sum.dtype, device=terms_sum.device).clamp(min=1)
    return terms_sum * world_size() / count


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                       gather_grad: bool = True) -> tuple[torch.Tensor, int]:
    """CLIP loss between paired rows of `a` and `b` [N, E], each row's partner the positive.

    The candidates are the rows of every rank (gathered with gradients); each rank scores its own
    rows. Returns the per-row losses [N] (mean of the a->b and b->a terms) and the number of rows
    over all ranks. Logits are computed in fp32 (the scale reaches 100) even under autocast.
    `gather_grad=False` is GPS's form: on several ranks every row comes from a gather without
    gradient (the same loss value, no gradient)."""
    with torch.autocast(a.device.type, enabled=False):
        a, b, scale = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1), scale.float()
        all_a, offset = gather_rows(a, gather_grad)
        all_b, _ = gather_rows(b, gather_grad)
        if not gather_grad:  # this rank's rows as gathered (on one rank, `a` and `b` themselves)
            a, b = all_a[offset:offset + a.shape[0]], all_b[offset:offset + b.shape[0]]
        target = torch.arange(a.shape[0], device=a.device) + offset
        loss_ab = F.cross_entropy(scale * a @ all_b.T, target, reduction="none")
        loss_ba = F.cross_entropy(scale * b @ all_a.T, target, reduction="none")
        # keeps every gathered row in the graph when this rank has none of its own
        anchor = (all_a.sum() + all_b.sum() + scale) * 0.0
    return (loss_ab + loss_ba) / 2 + anchor, all_a.shape[0]


def multi_positive_info_nce(a: torch.Tensor, b: torch.Tensor, positive: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE of rows of `a` [N, E] against rows of `b` [M, E] where `positive` [N, M] marks every
    matching pair (e.g. objects against texts, where same-class objects share a class-name text):
    per row, -log(sum of exp over positives / sum of exp over all). Returns [N], computed in fp32."""
    with torch.autocast(a.device.type, enabled=False):
        logits = scale.float() * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
        log_all = torch.logsumexp(logits, dim=-1)
        log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=-1)
    return log_all - log_pos


def scaled_cosine(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * cos(a_i, b_j): a [N, E], b [K, E] -> [N, K], in fp32.

    The rows of `a` are not normalised: their products with the normalised `b` are divided by their
    norms (as `F.normalize`, at least 1e-12), the same values with fewer passes over a large [N, E]
    (every voxel's feature) in forward and backward."""
    with torch.autocast(a.device.type, enabled=False):
        a = a.float()
        inverse_norm = scale.float() / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-12)
        return (a @ F.normalize(b.float(), dim=-1).T) * inverse_norm


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy [N] of rows with a label (>= 0; 0 for rows labelled -1), with label smoothing."""
    with torch.autocast(logits.device.type, enabled=False):
        loss = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none", label_smoothing=smoothing)
    return loss * (labels >= 0)


def class_balance_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor:
    """Per-row weights [N] that balance classes: share_k ** -power for a row of class k, where share_k
    is k's share of the labelled rows of all ranks (one all_reduce), scaled so that the weights of
    all ranks' labelled rows sum to their count (a weighted mean stays a mean); 0 for unlabelled
    rows (-1). power 0: every labelled row 1; 0.5: inverse square root of the frequency."""
    labelled = labels >= 0
    counts = all_reduce_sum(torch.bincount(labels[labelled], minlength=num_classes).to(torch.float64))
    share = counts / counts.sum().clamp(min=1)
    per_class = torch.where(counts > 0, share.clamp(min=1e-12) ** -power, torch.zeros_like(share))
    per_class = per_class * counts.sum() / (per_class * counts).sum().clamp(min=1e-12)
    return per_class.to(torch.float32)[labels.clamp(min=0)] * labelled


def masked_object_cross_entropy(logits: torch.Tensor, padding_mask: torch.Tensor,
                                target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over a scene's objects, per referral: logits [R, L], padding_mask [R, L]
    (True = padded), target [R] -> [R], in fp32."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float().masked_fill(padding_mask, float("-inf")), target, reduction="none")


def referral_contrastive_logits(objects: torch.Tensor, sentence: torch.Tensor,
                                scale: torch.Tensor) -> torch.Tensor:
    """scale * cos(object, sentence): objects [R, L, E], sentence [R, E] -> [R, L], in fp32."""
    with torch.autocast(objects.device.type, enabled=False):
        return scale.float() * torch.einsum("rle,re->rl", F.normalize(objects.float(), dim=-1),
                                            F.normalize(sentence.float(), dim=-1))


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor,
                mask_token_id: int, vocab_size: int, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `probability` of the real, non-special tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with IGNORE_INDEX elsewhere)."""
    def rand(shape):
        return torch.rand(shape, generator=generator, device=generator.device if generator else input_ids.device)

    eligible = attention_mask.bool() & ~special_mask.bool()
    chosen = (rand(input_ids.shape).to(input_ids.device) < probability) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = rand(input_ids.shape).to(input_ids.device)
    ids = input_ids.clone()
    ids[chosen & (roll < 0.8)] = mask_token_id
    random_tokens = (rand(input_ids.shape).to(input_ids.device) * vocab_size).long()
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[swap] = random_tokens[swap]
    return ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy [N] of the masked positions (labels != IGNORE_INDEX; 0 elsewhere)."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none")


def first_occurrences(keys: torch.Tensor) -> torch.Tensor:
    """[N] bool: True at the first position of each distinct value of `keys`."""
    _, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((int(inverse.max()) + 1 if keys.numel() else 0,), keys.shape[0], device=keys.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    keep = torch.zeros_like(keys, dtype=torch.bool)
    keep[first] = True
    return keep
