"""Write the export of a training run's checkpoint (any ZeRO stage): its consolidated fp32 weights and
the metadata that rebuilds the model (task, model config, classes, voxel size...), as safetensors.
Every command that takes a trained model loads it (`sparsegps.load_model`)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("checkpoints", help="checkpoint directory of a run (RUN/checkpoints)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--out", required=True, help="output file (.safetensors)")


def run(args) -> int:
    from sparsegps.exports import export_checkpoint

    path = export_checkpoint(args.checkpoints, args.out, tag=args.tag)
    print(f"wrote {path}")
    return 0
