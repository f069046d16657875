"""Score a grounding model on shards with a benchmark's metrics: Nr3D / Sr3D accuracy (overall,
easy / hard, view-dependent / independent) or ScanRefer Acc@0.25 / Acc@0.5 (overall, unique /
multiple), with ground-truth boxes or detector proposals (--proposals). Writes
OUT/ground_report.json, OUT/ground_report.md, OUT/ground_predictions.jsonl and the benchmark's
submission file (ScanRefer: scanrefer_submission.json with scene_id, object_id, ann_id and the
predicted box's corners; Nr3D / Sr3D: nr3d_predictions.csv / sr3d_predictions.csv with the row ids
and predictions), and prints the table. With ground-truth boxes it also writes the grounding
diagnostics, OUT/grounding.{json,md,png}: class and within-class accuracy against the class prior
(1 / objects of the target's class), by relation, shape, same-class count and view dependence.

    sparsegps eval-ground --checkpoint runs/ground/nr3d/export.safetensors --data runs/data/scannet/nr3d_val \\
        --benchmark nr3d
    sparsegps eval-ground --checkpoint runs/ground/scanrefer/export.safetensors --data runs/data/scannet/scanrefer_val \\
        --benchmark scanrefer --proposals mask3d_val_boxes.json"""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(parser):
    from sparsegps.eval.grounding_model import BENCHMARKS

    parser.add_argument("--checkpoint", required=True, help="export of finetune-ground (or of pre-training)")
    parser.add_argument("--data", nargs="+", required=True, help="shards or directories of the evaluation split")
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="whose metrics to report")
    parser.add_argument("--proposals", help="ScanRefer: detector boxes per scan (JSON or .npz, see docs/IMPORTING.md)")
    parser.add_argument("--out", help="report folder (default: eval_ground_BENCHMARK next to the checkpoint)")
    parser.add_argument("--voxel-size", type=float, help="default: the voxel size the checkpoint was trained at")
    parser.add_argument("--batch-size", type=int, default=4, help="scenes per forward")
    parser.add_argument("--referral-chunk", type=int, default=64, help="referrals grounded per forward")
    parser.add_argument("--max-scenes", type=int, help="evaluate the first N scenes only")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")


def run(args) -> int:
    from sparsegps.eval.grounding import format_table, save_report, write_submission
    from sparsegps.eval.grounding_model import evaluate_grounding, save_predictions
    from sparsegps.device import pick_device
    from sparsegps.errors import UsageError
    from sparsegps.exports import load_model
    from sparsegps.train.run import resolve_precision

    if args.proposals and args.benchmark != "scanrefer":
        raise UsageError(f"--proposals is for ScanRefer (Acc@k of proposal boxes), not {args.benchmark}")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, info = load_model(args.checkpoint, device, ("pretraining", "grounding"), "eval-ground")
    task = info.task
    if task != "grounding":
        print(f"note: {args.checkpoint} is a {task} export (not fine-tuned for grounding)", file=sys.stderr)
    voxel_size = info.voxel_size_for(args.checkpoint, args.voxel_size)
    report, records = evaluate_grounding(
        model, args.data, args.benchmark, voxel_size, device, proposals_path=args.proposals,
        batch_size=args.batch_size, max_scenes=args.max_scenes, referral_chunk=args.referral_chunk,
        precision=precision, num_workers=args.workers)
    report.update(checkpoint=str(args.checkpoint), task=task, step=info.step)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_ground_{args.benchmark}"
    out.mkdir(parents=True, exist_ok=True)
    diagnostics = report.pop("grounding_diagnostics", None)
    json_path, md_path = save_report(report, out / "ground_report.json")
    if diagnostics is not None:
        from sparsegps.eval.grounding_diagnostics import format_diagnostics, save_diagnostics

        save_diagnostics(diagnostics, out, "grounding", f"{args.benchmark} grounding ({args.checkpoint})")
        print(format_diagnostics(diagnostics))
    save_predictions(records, out / "ground_predictions.jsonl")
    try:
        submission = write_submission(records, args.benchmark, out)
    except ValueError as e:
        submission = None
        print(f"note: no submission file written: {e}", file=sys.stderr)
    print(format_table(report))
    print(f"report: {json_path}  table: {md_path}  predictions: {out / 'ground_predictions.jsonl'}"
          + (f"  submission: {submission}" if submission else ""))
    return 0
