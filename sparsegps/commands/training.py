"""Arguments shared by the training commands (pretrain, finetune-seg, finetune-ground)."""
from __future__ import annotations


def add_training_arguments(parser, config_help: str, pretrained: bool = True) -> None:
    parser.add_argument("--config", required=True, help=config_help)
    if pretrained:
        parser.add_argument("--pretrained", help="export of a pre-training run (RUN/export.safetensors); omit for "
                            "scratch (config key: pretrained)")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output-dir", help="run directory (overrides output_dir)")
    parser.add_argument("--resume", nargs="?", const="must", choices=["auto", "must"],
                        help="auto: continue from the newest complete checkpoint, or start afresh when there is "
                             "none (one command starts and restarts a run); must (the default of a bare --resume): "
                             "continue, refusing a run folder without checkpoints (config key: resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run folder that holds an earlier run's checkpoints, removing them "
                             "(refused without it; config key: overwrite)")


def load_training_config(cls, args):
    """The run's config from --config, --set, and the flags that are shortcuts for config keys
    (--pretrained, --deepspeed, --output-dir, --resume, --overwrite; taken as given, after --set); a
    bad one raises ConfigError before any work starts (the command line prints it as one line)."""
    from sparsegps.config import load_config

    flags = {"pretrained": getattr(args, "pretrained", None), "deepspeed": args.deepspeed,
             "output_dir": args.output_dir, "resume": args.resume, "overwrite": args.overwrite or None}
    return load_config(cls, args.config, args.set, {k: v for k, v in flags.items() if v is not None})
