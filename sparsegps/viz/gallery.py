"""A gallery of held-out referrals and one segmentation, drawn from trained exports.

The rule that picks the pictures is fixed, so the same models and data give the same gallery:
ground every referral of the first `max_scenes` scenes; keep those with at least one same-class
distractor (the ones that need the sentence); in store order, take the first `right` the model
gets right and the first `wrong` it gets wrong, at most one per scene. The segmentation picture is
of the first scene.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sparsegps.files import atomic_write_text

from .pictures import draw_scene, draw_segmentation


def pick_referrals(store, predictions, right: int, wrong: int) -> list[tuple[int, int, int, bool]]:
    """(scene index, text index, predicted instance, correct) of the referrals the rule picks."""
    picked, scenes_used = [], set()
    counts = {True: 0, False: 0}
    wanted = {True: right, False: wrong}
    for p in predictions:
        if p.scene_index in scenes_used:
            continue
        text = store[p.scene_index].texts[p.text_index]
        if not text.distractor_ids:
            continue
        correct = p.predicted_id == text.target_id
        if counts[correct] < wanted[correct]:
            counts[correct] += 1
            picked.append((p.scene_index, p.text_index, p.predicted_id, correct))
            scenes_used.add(p.scene_index)
        if counts[True] >= right and counts[False] >= wrong:
            break
    return picked


def write_gallery(out_dir: str | os.PathLike, data, grounding_export: str | os.PathLike,
                  segmentation_export: str | os.PathLike | None = None, max_scenes: int = 20, right: int = 3,
                  wrong: int = 3, device: str = "cpu", progress: bool = True) -> list[Path]:
    """Draw the picked referrals (and a segmentation comparison) into `out_dir`; writes
    `out_dir/index.json` describing each picture. Returns the picture paths."""
    from tqdm.auto import tqdm

    from sparsegps.data import SceneStore
    from sparsegps.eval.grounding_model import predict_referrals

    from sparsegps.exports import load_model

    from .predict import segment_points, truth_in_classes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = SceneStore(data)
    grounding, info = load_model(grounding_export, device, ("pretraining", "grounding"), "the gallery's referrals")
    predictions = predict_referrals(grounding, data, info.voxel_size_for(grounding_export), device,
                                    max_scenes=max_scenes, progress=False)
    picked = pick_referrals(store, predictions, right, wrong)
    entries, paths = [], []
    jobs = len(picked) + (segmentation_export is not None)
    bar = tqdm(total=jobs, desc="gallery", unit="picture", disable=not progress)
    for n, (scene_index, text_index, choice, correct) in enumerate(picked):
        scene = store[scene_index]
        path = out / f"referral_{n:02d}_{'right' if correct else 'wrong'}_{scene.scene_id}.png"
        draw_scene(scene, store.vocabulary, path, "rgb", text_index, choice)
        text = scene.texts[text_index]
        entries.append({"file": path.name, "kind": "referral", "scene": scene.scene_id, "text_index": text_index,
                        "text": text.text, "target_id": text.target_id, "predicted_id": choice, "correct": correct})
        paths.append(path)
        bar.update()
    if segmentation_export is not None:
        seg, seg_info = load_model(segmentation_export, device, ("segmentation",), "the gallery's segmentation")
        scene = store[0]
        predicted = segment_points(seg, scene, seg_info.voxel_size_for(segmentation_export), device)
        truth = truth_in_classes(scene, store.vocabulary, seg.class_names)
        path = out / f"segmentation_{scene.scene_id}.png"
        draw_segmentation(scene, seg.class_names, truth, predicted, path)
        entries.append({"file": path.name, "kind": "segmentation", "scene": scene.scene_id})
        paths.append(path)
        bar.update()
    bar.close()
    referrals = [p for p in predictions if store[p.scene_index].texts[p.text_index].distractor_ids]
    atomic_write_text(out / "index.json", json.dumps({
        "rule": "first right and wrong referrals with a same-class distractor, in store order, one per scene",
        "scenes_grounded": min(max_scenes, len(store)), "referrals_with_distractors": len(referrals),
        "pictures": entries}, indent=1))
    return paths
