"""Fine-tune GPS for 3D visual grounding (Nr3D, Sr3D, ScanRefer) from a pre-training export
(--pretrained) or from scratch, then score the held-out shards of the config with the benchmark's
metrics (report in OUTPUT_DIR/ground_report.json and .md).

    sparsegps finetune-ground --pretrained runs/pretrain/export.safetensors --config configs/ground/nr3d.yaml
    torchrun --nproc_per_node 8 -m sparsegps.cli finetune-ground --pretrained runs/pretrain/export.safetensors \\
        --config configs/ground/scanrefer.yaml --deepspeed configs/deepspeed/zero2.json
    sparsegps finetune-ground --config configs/ground/synthetic_cpu.yaml --set loss.referral_object=0.5"""
from __future__ import annotations

import json

from .training import add_training_arguments, load_training_config


def add_arguments(parser):
    add_training_arguments(parser, "YAML config (configs/ground/*.yaml)")


def run(args) -> int:
    from pathlib import Path

    from sparsegps.eval.grounding import format_table
    from sparsegps.train.finetune_ground import GroundConfig, finetune_grounding

    cfg = load_training_config(GroundConfig, args)
    summary = finetune_grounding(cfg)
    print(json.dumps(summary, indent=1))
    if "report" in summary:
        print()
        print(format_table(json.loads(Path(summary["report"]).read_text())))
    return 0
