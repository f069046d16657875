"""Draw one packed scene: an oblique and a top-down view side by side, points in depth order, object
boxes and class labels. With --text N the scene's text N is the title and its target (and the
same-class distractors) are boxed; with --checkpoint a GPS export also shows the object the model
picks for that text, and a segmentation export shows predicted classes against the ground truth.
--ply writes the same colouring as a coloured point cloud, with the boxes as a line set beside it.

    sparsegps show runs/demo/data/val --scene synth_0001_000003 --list
    sparsegps show runs/demo/data/val --scene synth_0001_000003 --text 5 --checkpoint runs/demo/pretrain/export.safetensors
    sparsegps show runs/demo/data/val --scene synth_0001_000003 --checkpoint runs/demo/seg_few/export.safetensors
    sparsegps show runs/demo/data/val --scene synth_0001_000003 --color semantic --ply scene.ply"""
from __future__ import annotations

import difflib
import time
from pathlib import Path


def add_arguments(parser):
    from sparsegps.viz.pictures import COLOR_MODES

    parser.add_argument("shards", nargs="+", help="shard files or directories")
    parser.add_argument("--scene", required=True, metavar="ID", help="scene id")
    parser.add_argument("--text", type=int, metavar="N", help="index of one of the scene's texts (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scene's texts with their indices and stop")
    parser.add_argument("--color", choices=COLOR_MODES, default=None,
                        help="point colours: rgb (default), semantic, instance, prediction (a segmentation "
                             "export's classes; the default with one)")
    parser.add_argument("--checkpoint", metavar="EXPORT", help="export of pre-training or grounding (the model's pick for --text) "
                                             "or of finetune-seg (predicted classes)")
    parser.add_argument("--out", metavar="PNG", help="PNG to write (default: SCENE.png, SCENE_textN.png or SCENE_seg.png)")
    parser.add_argument("--ply", metavar="PLY", help="also write the coloured points here (scene.ply), the boxes beside them (scene.boxes.ply)")
    parser.add_argument("--width", type=int, default=1800, help="picture width in pixels (default 1800)")
    parser.add_argument("--voxel-size", type=float, default=None,
                        help="with --checkpoint: default, the voxel size the export was trained at")
    parser.add_argument("--device", default="auto")


def _find_scene(store, scene_id: str) -> int:
    ids = store.scene_ids()
    try:
        return ids.index(scene_id)
    except ValueError:
        close = difflib.get_close_matches(scene_id, ids, n=5, cutoff=0.5) or ids[:5]
        raise LookupError(f"no scene {scene_id!r} in {', '.join(map(str, store.paths[:3]))}"
                          f"{' ...' if len(store.paths) > 3 else ''} ({len(ids)} scenes; e.g. {', '.join(close)})")


def run(args) -> int:
    from sparsegps.data import SceneStore
    from sparsegps.errors import UsageError
    from sparsegps.viz.pictures import ViewConfig, point_colors, referral_boxes

    try:
        store = SceneStore(args.shards)
        index = _find_scene(store, args.scene)
        scene = store[index]
    except LookupError as e:
        raise UsageError(str(e)) from None
    vocabulary = store.vocabulary
    print(f"scene {scene.scene_id}: {scene.num_points:,} points, {len(scene.objects)} objects, "
          f"{len(scene.texts)} texts ({store.paths[store.locate(index)[0]]})")
    if args.list:
        objects = scene.object_by_id()
        for k, t in enumerate(scene.texts):
            about = f" -> {objects[t.target_id].label} {t.target_id}" if t.target_id in objects else ""
            print(f"  {k:>3}  {t.kind:<15}{about}: {t.text}")
        return 0
    if args.text is not None and not 0 <= args.text < len(scene.texts):
        raise UsageError(f"scene {scene.scene_id!r} has {len(scene.texts)} texts (0..{len(scene.texts) - 1}); "
                         f"--text {args.text} does not exist (see --list)")
    if args.width < 600:
        raise UsageError("--width must be at least 600 pixels")
    view = ViewConfig(width=args.width)

    model, choice, predicted = None, None, None
    if args.checkpoint:
        from sparsegps.device import pick_device
        from sparsegps.exports import load_model
        from sparsegps.viz.predict import ground_text, segment_points

        device = pick_device(args.device)
        model, info = load_model(args.checkpoint, device)
        voxel_size = info.voxel_size_for(args.checkpoint, args.voxel_size)
        if info.task == "segmentation":
            if args.text is not None:
                raise UsageError(f"{args.checkpoint} is a segmentation export: it draws classes, not a text's "
                                 f"object; drop --text or give a pre-training or grounding export")
            if args.color not in (None, "prediction"):
                raise UsageError(f"a segmentation export draws its predicted classes; --color {args.color} "
                                 f"does not apply")
            predicted = segment_points(model, scene, voxel_size, device)
        else:
            if args.text is None:
                raise UsageError(f"{args.checkpoint} grounds sentences: pass --text N (see --list)")
            if args.color == "prediction":
                raise UsageError("--color prediction needs a segmentation export (sparsegps finetune-seg)")
            try:
                choice = ground_text(model, scene, args.text, voxel_size, device)
            except ValueError as e:
                raise UsageError(str(e)) from None
            target = scene.texts[args.text].target_id
            label = scene.object_by_id()[choice].label
            print(f"model's choice: {label} {choice} ({'right' if choice == target else f'wrong; target {target}'})")
    elif args.color == "prediction":
        raise UsageError("--color prediction needs --checkpoint with a segmentation export")

    start = time.perf_counter()
    if predicted is not None:
        from sparsegps.viz.pictures import draw_segmentation
        from sparsegps.viz.predict import truth_in_classes

        truth = truth_in_classes(scene, vocabulary, model.class_names)
        out = Path(args.out or f"{scene.scene_id}_seg.png")
        draw_segmentation(scene, model.class_names, truth, predicted, out, view)
        colors, _ = point_colors(scene, "prediction", model.class_names, predicted)
    else:
        from sparsegps.viz.pictures import draw_scene

        color = args.color or "rgb"
        suffix = "" if args.text is None else f"_text{args.text}"
        out = Path(args.out or f"{scene.scene_id}{suffix}.png")
        draw_scene(scene, vocabulary, out, color, args.text, choice, view=view)
        colors, _ = point_colors(scene, color, vocabulary)
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    if args.ply:
        from sparsegps.viz.ply import boxes_path, write_boxes_ply, write_points_ply

        boxes, _ = referral_boxes(scene, args.text, choice)
        write_points_ply(args.ply, scene.xyz, colors)
        write_boxes_ply(boxes_path(args.ply), boxes)
        print(f"wrote {args.ply} and {boxes_path(args.ply)}")
    return 0
