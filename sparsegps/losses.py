"""GPS's pre-training losses: object-, scene- and referral-level alignment, grounding, and MLM.

Every function takes plain tensors, so each can be checked against a hand-computed case.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [N_r, ...] over ranks, keeping the gradient path to every rank's rows.

    Ranks may hold different N_r. GPS gathers with plain `all_gather`, which returns tensors that
    carry no gradient, so its scene-text loss trains nothing on several GPUs; the autograd-aware
    collective fixes that.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0]))
    parts = all_gather(padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def rank_offset(n_local: int, device) -> int:
    """Index of this rank's first row in `gather_with_grad`'s output."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    n = torch.tensor([n_local], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return int(sum(s.item() for s in sizes[: dist.get_rank()]))


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss between paired rows of `a` and `b` [N, E], each row's partner the positive.

    With several ranks, the candidates are the rows of every rank (gathered with gradients) and
    each rank scores its own rows against them."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    target = torch.arange(a.shape[0], device=a.device) + rank_offset(a.shape[0], a.device)
    if a.shape[0] == 0:  # nothing to score on this rank (it still took part in the gathers)
        return (all_a.sum() + all_b.sum() + scale) * 0.0
    loss_ab = F.cross_entropy(scale * a @ all_b.T, target)
    loss_ba = F.cross_entropy(scale * b @ all_a.T, target)
    return (loss_ab + loss_ba) / 2


def multi_positive_info_nce(a: torch.Tensor, b: torch.Tensor, positive: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE of rows of `a` [N, E] against rows of `b` [M, E] where `positive` [N, M] marks every
    matching pair (e.g. objects against texts, where same-class objects share a class-name text):
    mean over rows of -log(sum of exp over positives / sum of exp over all)."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    log_all = torch.logsumexp(logits, dim=-1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=-1)
    return (log_all - log_pos).mean()


def masked_object_cross_entropy(logits: torch.Tensor, padding_mask: torch.Tensor,
                                target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over a scene's objects: logits [R, L], padding_mask [R, L] (True = padded)."""
    return F.cross_entropy(logits.masked_fill(padding_mask, float("-inf")), target)


def referral_contrastive_logits(objects: torch.Tensor, sentence: torch.Tensor,
                                scale: torch.Tensor) -> torch.Tensor:
    """scale * cos(fused object, sentence CLS): objects [R, L, E], sentence [R, E] -> [R, L]."""
    return scale * torch.einsum("rle,re->rl", F.normalize(objects, dim=-1), F.normalize(sentence, dim=-1))


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
    """Token cross-entropy over masked positions; zero (with gradient) when nothing was masked."""
    if (labels != IGNORE_INDEX).any():
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return logits.sum() * 0.0
