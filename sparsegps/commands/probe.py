"""Probes that isolate one skill of a model.

relations: the model's spatial transformer, text encoder, grounding encoder and grounding head
trained on ground-truth object tokens (class, colour, box) instead of U-Net tokens, on the
grounding cross-entropy alone. Held-out accuracy then measures relational reasoning alone: what
the architecture and the data can learn about relations when recognition is perfect.

    sparsegps synth --preset demo --scenes 2000 --seed 5 --out runs/probe/rooms
    sparsegps probe relations --train runs/probe/rooms --val runs/demo/data/val

Writes OUT/summary.json (with the learning curve), OUT/grounding.{json,md,png} (held-out
diagnostics: accuracy, class and within-class accuracy against the class prior, by relation and
same-class count) and OUT/probe_curve.png."""
from __future__ import annotations

import json


def add_arguments(parser):
    parser.add_argument("probe", choices=["relations"], help="what to probe")
    parser.add_argument("--train", nargs="+", help="shards or directories of training rooms")
    parser.add_argument("--val", nargs="+", help="shards or directories of held-out rooms")
    parser.add_argument("--val-unseen", nargs="+", help="held-out rooms in the phrasings training never saw "
                        "(synth --set language.phrasings=unseen; config key: val_unseen)")
    parser.add_argument("--config", default=None, help="YAML config (default: configs/probe/relations.yaml "
                        "when it exists, else the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output-dir", help="output folder (overrides output_dir)")
    parser.add_argument("--device", default="cpu")


def run(args) -> int:
    from pathlib import Path

    from sparsegps.device import pick_device
    from sparsegps.eval.relation_probe import load_probe_config, run_probe

    config = args.config or ("configs/probe/relations.yaml" if Path("configs/probe/relations.yaml").exists() else None)
    flags = {"train": args.train, "val": args.val, "val_unseen": args.val_unseen, "output_dir": args.output_dir}
    cfg = load_probe_config(config, args.set, {k: v for k, v in flags.items() if v})
    summary = run_probe(cfg, pick_device(args.device))
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))
    return 0
