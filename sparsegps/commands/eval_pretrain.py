"""Held-out grounding accuracy (against the class prior and uniform chance, with class and
within-class accuracy) and scene/object-text retrieval recall@1 of a pre-trained model export.

With --out, the grounding diagnostics (by relation, shape and same-class count) are written as
OUT/grounding.{json,md,png}."""
from __future__ import annotations

import json


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="export written by pretrain or `sparsegps export`")
    parser.add_argument("--data", nargs="+", required=True, help="shards or directories of held-out scenes")
    parser.add_argument("--voxel-size", type=float, default=None, help="default: the run's voxel size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-scenes", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for the grounding diagnostics (grounding.json, .md, .png)")


def run(args) -> int:
    from sparsegps.data import TransformConfig
    from sparsegps.eval.pretrain import evaluate_pretraining
    from sparsegps.device import pick_device
    from sparsegps.exports import load_model

    device = pick_device(args.device)
    model, info = load_model(args.checkpoint, device, ("pretraining", "grounding"), "eval-pretrain")
    voxel = info.voxel_size_for(args.checkpoint, args.voxel_size)
    result = evaluate_pretraining(model, args.data, TransformConfig(voxel_size=voxel, augment=False), device,
                                  batch_size=args.batch_size, max_scenes=args.max_scenes)
    report = result.pop("grounding_diagnostics")
    if args.out and report["referrals"]:
        from sparsegps.eval.grounding_diagnostics import save_diagnostics

        paths = save_diagnostics(report, args.out, "grounding", f"held-out grounding ({args.checkpoint})")
        result["grounding_report"] = [str(p) for p in paths]
    print(json.dumps(result, indent=1))
    return 0
