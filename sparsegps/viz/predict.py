"""What a trained model makes of one scene: the object a GPS model grounds a sentence to, and the
class a segmentation model gives every point. Both voxelize the stored scene as evaluation does
(no augmentation) and run the model in eval mode."""
from __future__ import annotations

import numpy as np
import torch

from sparsegps.data import Scene, SceneText, collate_scenes, move_batch
from sparsegps.data.transforms import model_input, scene_to_sample


def _batch(scene: Scene, voxel_size: float, texts: list[SceneText], device) -> dict:
    sample = model_input(scene_to_sample(scene), voxel_size)
    sample["texts"] = texts
    return move_batch(collate_scenes([sample]), device)


@torch.no_grad()
def ground_text(model, scene: Scene, text_index: int, voxel_size: float, device="cpu") -> int:
    """Instance id of the object `model` (a GPSModel) picks for text `text_index` of `scene`
    (its grounding head over the scene's objects, as for a referral)."""
    text = scene.texts[text_index]
    if text.target_id < 0:
        raise ValueError(f"scene {scene.scene_id!r}: text {text_index} is a {text.kind.replace('_', ' ')} "
                         f"about no object; the model grounds referrals and object captions")
    if not scene.objects:
        raise ValueError(f"scene {scene.scene_id!r} has no objects to choose from")
    device = torch.device(device)
    batch = _batch(scene, voxel_size, [SceneText("referral", text.text, text.target_id, text.distractor_ids)],
                   device)
    was_training = model.training
    model.eval()
    out = model(batch)
    model.train(was_training)
    slot = int(out["grounding_logits"][0].float().argmax())
    return int(batch["object_instance"][int(batch["object_offsets"][0]) + slot])


@torch.no_grad()
def segment_points(model, scene: Scene, voxel_size: float, device="cpu") -> np.ndarray:
    """Predicted class index of every point of `scene` (int64 [N]) from a segmentation model."""
    device = torch.device(device)
    batch = _batch(scene, voxel_size, [], device)
    was_training = model.training
    model.eval()
    logits = model(batch).float().cpu()
    model.train(was_training)
    return logits.argmax(dim=-1).numpy()[batch["inverse"][0]]


def truth_in_classes(scene: Scene, vocabulary: list[str], class_names: list[str]) -> np.ndarray:
    """The scene's semantic labels (indices into the store `vocabulary`) as indices into a model's
    `class_names` (-1 where a label is ignored or not one of its classes)."""
    index = {n: i for i, n in enumerate(class_names)}
    remap = np.array([index.get(v, -1) for v in vocabulary] + [-1], np.int64)
    labels = scene.semantic.astype(np.int64)
    return remap[np.where(labels >= 0, labels, len(vocabulary))]
