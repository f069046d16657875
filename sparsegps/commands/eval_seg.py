"""Evaluate a fine-tuned segmentation model on shards: predictions mapped from voxels to every
original point, mIoU, per-class IoU and accuracy (ignore index honoured), a confusion-matrix PNG
and a JSON report in --out.

--zero-shot evaluates a pre-training export with no segmentation head: voxels are labelled by the
class whose name ("a <class>") their text-space feature is closest to (the dense_text loss). The
classes are the pre-training vocabulary, or --classes "chair,table,..."; the report gives the mIoU
of the base classes (labelled in pre-training) and of the novel ones (held out of it), their
harmonic mean (hIoU, as PLA and RegionPLC report open-vocabulary segmentation), and the same for
two baselines: guessing each point's class by the classes' point shares, and the majority class."""
from __future__ import annotations

import sys
from pathlib import Path

from sparsegps.errors import UsageError


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="export of a finetune-seg run (RUN/export.safetensors); with --zero-shot, of a "
                             "pre-training run")
    parser.add_argument("--zero-shot", action="store_true", help="segment with the pre-trained model by class names")
    parser.add_argument("--classes", default=None, help="comma-separated class names (--zero-shot)")
    parser.add_argument("--data", nargs="+", required=True, help="shards or directories")
    parser.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    parser.add_argument("--tta", type=int, default=1, help="rotations about z averaged (test-time augmentation)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-scenes", type=int, default=None)
    parser.add_argument("--voxel-size", type=float, default=None,
                        help="default: the voxel size the export was trained at")
    parser.add_argument("--device", default="auto")


def run(args) -> int:
    import numpy as np

    from sparsegps.data import SceneStore
    from sparsegps.eval.segmentation import evaluate_segmentation, format_table, write_report, zero_shot_report
    from sparsegps.device import pick_device
    from sparsegps.exports import load_model

    device = pick_device(args.device)
    if args.zero_shot:
        model, info, seen = zero_shot_model(args.checkpoint, args.classes, device)
    else:
        if args.classes:
            raise UsageError("--classes goes with --zero-shot (a fine-tuned head has its own classes)")
        model, info = load_model(args.checkpoint, device, ("segmentation",),
                                 "eval-seg (without --zero-shot; run `sparsegps finetune-seg` first)")
    names = model.class_names
    vocabulary = SceneStore(args.data).vocabulary
    index = {n: i for i, n in enumerate(names)}
    remap = np.array([index.get(v, -1) for v in vocabulary], dtype=np.int64)
    report, conf = evaluate_segmentation(model, args.data, info.voxel_size_for(args.checkpoint, args.voxel_size), device,
                                         len(names), names, remap,
                                         args.tta, args.batch_size, args.max_scenes)
    if args.zero_shot:
        report.update(zero_shot_report(report, np.asarray(conf), seen, names))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / ("eval_zero_shot" if args.zero_shot
                                                                           else "eval_seg")
    write_report(report, conf, names, out, f"segmentation: {', '.join(map(str, args.data))}")
    print(format_table(report))
    if args.zero_shot:
        print(f"zero-shot: mIoU of the base classes (labelled in pre-training) {report['miou_seen']:.3f}, of the "
              f"novel ones (held out) {report['miou_unseen']:.3f} ({', '.join(report['unseen_classes']) or 'none'}), "
              f"hIoU {report['hiou']:.3f}; guessing by the classes' point shares {report['prior_miou_seen']:.3f} / "
              f"{report['prior_miou_unseen']:.3f}, hIoU {report['prior_hiou']:.3f}; the majority class "
              f"{report['majority_miou_seen']:.3f} / {report['majority_miou_unseen']:.3f}")
    print(f"report: {out / 'seg_report.json'}  confusion matrix: {out / 'confusion.png'}")
    return 0


def zero_shot_model(path: str, classes: str | None, device):
    """The pre-trained model as a `ZeroShotSegmenter`, its export's metadata, and the classes it was
    trained on."""
    from sparsegps.exports import load_model
    from sparsegps.models.seg_heads import ZeroShotSegmenter

    gps, info = load_model(path, device, ("pretraining", "grounding"), "eval-seg --zero-shot")
    if gps.cfg.loss.dense_text <= 0:
        print(f"warning: {path} was pre-trained without the dense_text loss; its voxel features were never "
              f"aligned with class names", file=sys.stderr)
    seen = list(info.trained_classes or gps.cfg.class_names or info.vocabulary)
    # every class of the pre-training store, those held out of pre-training (`trained_classes` lacks
    # them) included
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else list(info.vocabulary or seen)
    if not names:
        raise UsageError(f"{path}: no class names stored; pass --classes")
    return ZeroShotSegmenter(gps, names).to(device), info, seen
