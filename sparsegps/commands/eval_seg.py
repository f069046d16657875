"""Evaluate a fine-tuned segmentation model on shards: predictions mapped from voxels to every
original point, mIoU, per-class IoU and accuracy (ignore index honoured), a confusion-matrix PNG
and a JSON report in --out."""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="export of a finetune-seg run (RUN/export.pt)")
    parser.add_argument("--data", nargs="+", required=True, help="shards or directories")
    parser.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    parser.add_argument("--tta", type=int, default=1, help="rotations about z averaged (test-time augmentation)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-scenes", type=int, default=None)
    parser.add_argument("--device", default="auto")


def run(args) -> int:
    import numpy as np

    from sparsegps.data import SceneStore
    from sparsegps.eval.segmentation import evaluate_segmentation, format_table, write_report
    from sparsegps.device import pick_device
    from sparsegps.train.finetune_seg import load_segmentation_model

    device = pick_device(args.device)
    if device.type == "cpu":
        import torch
        torch.set_flush_denormal(True)
    model, blob = load_segmentation_model(args.checkpoint, device)
    names = model.class_names
    vocabulary = SceneStore(args.data).vocabulary
    index = {n: i for i, n in enumerate(names)}
    remap = np.array([index.get(v, -1) for v in vocabulary], dtype=np.int64)
    report, conf = evaluate_segmentation(model, args.data, blob["voxel_size"], device, len(names), names, remap,
                                         args.tta, args.batch_size, args.max_scenes)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval_seg"
    write_report(report, conf, names, out, f"segmentation: {', '.join(map(str, args.data))}")
    print(format_table(report))
    print(f"report: {out / 'seg_report.json'}  confusion matrix: {out / 'confusion.png'}")
    return 0
