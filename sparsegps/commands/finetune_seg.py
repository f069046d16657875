"""Fine-tune the backbone for semantic segmentation, from a pre-training export (--pretrained) or
from scratch, and evaluate mIoU on the held-out shards of the config.

    sparsegps finetune-seg --pretrained runs/pretrain/export.safetensors --config configs/seg/scannet20.yaml
    sparsegps finetune-seg --config configs/seg/synthetic_cpu.yaml --set freeze=encoder"""
from __future__ import annotations

import json

from .training import add_training_arguments, load_training_config


def add_arguments(parser):
    add_training_arguments(parser, "YAML config (configs/seg/*.yaml)")


def run(args) -> int:
    from sparsegps.train.finetune_seg import SegConfig, finetune_segmentation

    cfg = load_training_config(SegConfig, args)
    print(json.dumps(finetune_segmentation(cfg), indent=1))
    return 0
