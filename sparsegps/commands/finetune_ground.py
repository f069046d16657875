"""Fine-tune GPS for 3D visual grounding (Nr3D, Sr3D, ScanRefer) from a pre-training export
(--pretrained) or from scratch, then score the held-out shards of the config with the benchmark's
metrics (report in OUTPUT_DIR/ground_report.json and .md).

    sparsegps finetune-ground --pretrained runs/pretrain/export.pt --config configs/ground/nr3d.yaml
    torchrun --nproc_per_node 8 -m sparsegps.cli finetune-ground --pretrained runs/pretrain/export.pt \\
        --config configs/ground/scanrefer.yaml --deepspeed configs/deepspeed/zero2.json
    sparsegps finetune-ground --config configs/ground/synthetic_cpu.yaml --set loss.referral_object=0.5"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="YAML config (configs/ground/*.yaml)")
    parser.add_argument("--pretrained", help="export of a pre-training run (RUN/export.pt); omit for scratch")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output-dir", help="run directory (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def run(args) -> int:
    from pathlib import Path

    from sparsegps.config import ConfigError, load_config
    from sparsegps.eval.grounding import format_table
    from sparsegps.train.finetune_ground import GroundConfig, finetune_grounding

    overrides = list(args.set)
    if args.deepspeed:
        overrides.append(f"deepspeed={args.deepspeed}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        cfg = load_config(GroundConfig, args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = finetune_grounding(cfg, args.pretrained, resume=args.resume)
    print(json.dumps(summary, indent=1))
    if "report" in summary:
        print()
        print(format_table(json.loads(Path(summary["report"]).read_text())))
    return 0
