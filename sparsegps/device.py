"""Which torch device a command runs on."""
from __future__ import annotations

import os

import torch


def pick_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU. A CUDA device follows the launcher's LOCAL_RANK
    among the GPUs this process sees; where the scheduler shows each task only its own GPUs
    (`srun --gpus-per-task=1`, CUDA_VISIBLE_DEVICES per task), the local rank wraps around them."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(requested)
