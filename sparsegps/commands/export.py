"""Write a consolidated fp32 state dict (plus the model config and label vocabulary) from a
DeepSpeed checkpoint of any ZeRO stage; fine-tuning commands load it with --pretrained."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("checkpoints", help="checkpoint directory of a run (RUN/checkpoints)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--out", required=True, help="output file (.pt)")


def run(args) -> int:
    from sparsegps.train.checkpoint import export_state_dict

    path = export_state_dict(args.checkpoints, args.out, tag=args.tag)
    print(f"wrote {path}")
    return 0
