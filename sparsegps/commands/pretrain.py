"""Pre-train GPS on packed scenes with DeepSpeed.

Single process (no launcher):    sparsegps pretrain --config configs/pretrain/tiny_cpu.yaml
ZeRO-2 on 8 GPUs of one node:    torchrun --nproc_per_node 8 -m sparsegps.cli pretrain \\
                                     --config configs/pretrain/base_gpu.yaml --deepspeed configs/deepspeed/zero2.json
Several nodes:                   deepspeed --hostfile hosts -m sparsegps.cli pretrain ... (or torchrun per node)

Any config key can be overridden: --set steps=200 --set data.train=[runs/data/train]."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="YAML config (configs/pretrain/*.yaml)")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output-dir", help="run directory (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def run(args) -> int:
    from sparsegps.config import ConfigError, load_config
    from sparsegps.train.pretrain import PretrainConfig, pretrain

    overrides = list(args.set)
    if args.deepspeed:
        overrides.append(f"deepspeed={args.deepspeed}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        cfg = load_config(PretrainConfig, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = pretrain(cfg, resume=args.resume, progress=True)
    print(json.dumps(summary, indent=1))
    return 0
