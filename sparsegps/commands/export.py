"""Write the export of a training run's checkpoint (any ZeRO stage): its consolidated fp32 weights and
the metadata that rebuilds the model (task, model config, classes, voxel size...), as safetensors.
Every command that takes a trained model loads it (`sparsegps.load_model`).

--format pointcept writes the U-Net of an export as a Pointcept SpUNet-v1m1 checkpoint
(`{"config", "state_dict"}`, `torch.load`-able) that Pointcept's `SpUNetBase` loads strictly.
--hub DIR writes an export as a Hugging Face Hub model folder (weights, config.json, a model card
with the numbers measured in its run folder; `sparsegps.hub`)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("source", help="checkpoint directory of a run (RUN/checkpoints); with --format pointcept, "
                                       "an export (RUN/export.safetensors)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--out", help="output file (.safetensors; .pth for pointcept)")
    parser.add_argument("--format", choices=["sparsegps", "pointcept"], default="sparsegps")
    parser.add_argument("--hub", metavar="DIR", help="write the export SOURCE as a Hub-style model folder")


def run(args) -> int:
    from sparsegps.errors import UsageError
    from sparsegps.exports import read_export, save_pointcept
    from sparsegps.train.checkpoint import export_checkpoint
    from sparsegps.hub import write_hub_folder

    if (args.hub is None) == (args.out is None):
        raise UsageError("export: give --out FILE, or --hub DIR (with an export as SOURCE)")
    if args.hub is not None:
        path = write_hub_folder(args.source, args.hub)
    elif args.format == "pointcept":
        path = save_pointcept(read_export(args.source), args.out)
    else:
        path = export_checkpoint(args.source, args.out, tag=args.tag)
    print(f"wrote {path}")
    return 0
