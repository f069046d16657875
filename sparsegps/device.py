"""Which torch device a command runs on."""
from __future__ import annotations

import os

import torch


def pick_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; a CUDA device follows the launcher's LOCAL_RANK."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(requested)
