"""Write the export of a training run's checkpoint (any ZeRO stage): its consolidated fp32 weights and
the metadata that rebuilds the model (task, model config, classes, voxel size...), as safetensors.
Every command that takes a trained model loads it (`sparsegps.load_model`).

--format pointcept writes the U-Net of an export as a Pointcept SpUNet-v1m1 checkpoint
(`{"config", "state_dict"}`, `torch.load`-able) that Pointcept's `SpUNetBase` loads strictly."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("source", help="checkpoint directory of a run (RUN/checkpoints); with --format pointcept, "
                                       "an export (RUN/export.safetensors)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--out", required=True, help="output file (.safetensors; .pth for pointcept)")
    parser.add_argument("--format", choices=["sparsegps", "pointcept"], default="sparsegps")


def run(args) -> int:
    from sparsegps.exports import export_checkpoint, read_export, save_pointcept

    if args.format == "pointcept":
        path = save_pointcept(read_export(args.source), args.out)
    else:
        path = export_checkpoint(args.source, args.out, tag=args.tag)
    print(f"wrote {path}")
    return 0
