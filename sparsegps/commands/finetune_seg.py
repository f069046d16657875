"""Fine-tune the backbone for semantic segmentation, from a pre-training export (--pretrained) or
from scratch, and evaluate mIoU on the held-out shards of the config.

    sparsegps finetune-seg --pretrained runs/pretrain/export.pt --config configs/seg/scannet20.yaml
    sparsegps finetune-seg --config configs/seg/synthetic_cpu.yaml --set freeze=encoder"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="YAML config (configs/seg/*.yaml)")
    parser.add_argument("--pretrained", help="export of a pre-training run (RUN/export.pt); omit for scratch")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output-dir", help="run directory (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)


def run(args) -> int:
    from sparsegps.config import ConfigError, load_config
    from sparsegps.train.finetune_seg import SegConfig, finetune_segmentation

    overrides = list(args.set)
    if args.deepspeed:
        overrides.append(f"deepspeed={args.deepspeed}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        cfg = load_config(SegConfig, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(finetune_segmentation(cfg, args.pretrained, resume=args.resume), indent=1))
    return 0
