"""Pre-train GPS on packed scenes with DeepSpeed.

Single process (no launcher):    sparsegps pretrain --config configs/pretrain/tiny_cpu.yaml
ZeRO-2 on 8 GPUs of one node:    torchrun --nproc_per_node 8 -m sparsegps.cli pretrain \\
                                     --config configs/pretrain/base_gpu.yaml --deepspeed configs/deepspeed/zero2.json
Several nodes:                   deepspeed --hostfile hosts --module sparsegps.cli pretrain ..., torchrun on
                                 every node, or srun (configs/slurm/pretrain.sbatch); README: Running on a cluster

--resume auto continues from the newest complete checkpoint or starts afresh: one command starts and
restarts a run. SIGTERM or SIGUSR1 saves a checkpoint after the current step and exits 128 + signal.
Any config key can be overridden: --set steps=200 --set data.train=[runs/data/train].

GPS's two stages: `--stage objects` trains object classification of the pooled tokens alone; a second
run with `--set init_from=STAGE1/export.safetensors` trains everything from those weights."""
from __future__ import annotations

import json

from .training import add_training_arguments, load_training_config


def add_arguments(parser):
    add_training_arguments(parser, "YAML config (configs/pretrain/*.yaml)", pretrained=False)
    parser.add_argument("--stage", choices=["all", "objects"], help="objects: object classification alone (GPS's "
                        "first stage); default: the config's stage (all)")


def run(args) -> int:
    from sparsegps.train.pretrain import PretrainConfig, pretrain

    if args.stage:
        args.set = [*args.set, f"stage={args.stage}"]
    cfg = load_training_config(PretrainConfig, args)
    print(json.dumps(pretrain(cfg, progress=True), indent=1))
    return 0
