"""The relation probe: can the model's spatial transformer and grounding encoder learn the relations
our referrals state when recognition is perfect?

Object tokens are built from ground truth instead of the U-Net: a learned embedding of the object's
class, its mean colour and its box, in the place of the pooled voxel features. The model's own
spatial transformer, text encoder, grounding encoder and grounding head (as `model` configures them)
do the rest, trained with the grounding cross-entropy alone. Accuracy here isolates relational
reasoning from recognition (the classes are given) and from the U-Net's cost: it is how a user
checks a new architecture, text encoder or data set for what it can learn about relations, in
minutes on a CPU.

Rooms are read once into memory (boxes, classes, colours, referrals); each step draws
`rooms_per_step` training rooms, turns them about the vertical axis and scales them as pre-training
does, and trains on their referrals. Held-out rooms are evaluated without augmentation, with the
grounding diagnostics (accuracy, class and within-class accuracy against the class prior, by
relation and same-class count).

    sparsegps probe relations --train runs/probe/rooms --val runs/demo/data/val
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsegps.models.gps import GPSModel, ModelConfig
from sparsegps.train.engine import lr_factor

from .grounding_diagnostics import flat_summary, grounding_diagnostics, save_diagnostics


@dataclass
class ProbeConfig:
    train: list[str] = field(default_factory=list)  # shards or directories of training rooms
    val: list[str] = field(default_factory=list)  # held-out rooms, evaluated without augmentation
    # Held-out rooms whose texts use the phrasings training never saw (`sparsegps synth --set
    # language.phrasings=unseen`, training rooms `seen`): evaluated at the end beside `val`
    val_unseen: list[str] = field(default_factory=list)
    # The architecture probed: the `model` section of this pre-training config (relative to the probe
    # config's folder), with the probe config's own `model` keys written over it.
    model_config: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = "runs/probe"
    steps: int = 3000
    max_minutes: float | None = None  # stop training after this long (then evaluate)
    rooms_per_step: int = 8
    max_referrals: int | None = None  # per room and step (a random subset); None: all of them
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    gradient_clipping: float = 5.0
    eval_every: int = 250
    train_eval_rooms: int = 200  # training rooms also evaluated (memorisation shows as a gap)
    seed: int = 0
    rotation: Literal["uniform", "right_angles", "none"] = "uniform"
    scale: tuple[float, float] | None = (0.9, 1.1)
    # Box sizes under a rotation. enclosing: the axis-aligned box of the turned box, as the data
    # pipeline's `rotate_z` does (grows by up to 1.41); kept: the object's own extents.
    box_sizes: Literal["enclosing", "kept"] = "enclosing"


def load_probe_config(path: str | Path | None, overrides: list[str] = (),
                      values: dict | None = None) -> ProbeConfig:
    """The probe's config from YAML (its `model_config` read first for the model), `key=value`
    overrides and `values` (a command's flags, as given); a bad one raises ConfigError before any
    work starts."""
    from sparsegps.config import ConfigError, apply_overrides, from_dict, merge_mappings, read_config_file, set_value

    data = read_config_file(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    for key, value in (values or {}).items():
        set_value(data, key, value)
    if data.get("model_config"):
        source = Path(data["model_config"])
        if path is not None and not source.is_absolute():
            source = Path(path).parent / source
        model = read_config_file(source).get("model", {})
        data["model"] = merge_mappings(model, data.get("model") or {})
        data["model_config"] = str(source)
    try:
        return from_dict(ProbeConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


@dataclass
class ProbeRoom:
    """What the probe keeps of a scene: its objects' boxes, classes and mean colours, its referrals."""

    scene_id: str
    centers: np.ndarray  # float32 [n, 3], relative to the centre of the room's object boxes
    sizes: np.ndarray  # float32 [n, 3]
    labels: np.ndarray  # int64 [n], index into the vocabulary (-1: unknown)
    colors: np.ndarray  # float32 [n, 3] in [-1, 1]
    classes: list[str]
    referrals: list[dict]  # text, target (object index), relation, shape, source


def load_rooms(paths, vocabulary: list[str] | None = None, progress: bool = True) -> tuple[list[ProbeRoom], list[str]]:
    """The rooms of a store with at least one referral, and the vocabulary their labels index."""
    from tqdm.auto import tqdm

    from sparsegps.data import SceneStore

    store = SceneStore(paths)
    vocabulary = list(vocabulary or store.vocabulary)
    index = {name: i for i, name in enumerate(vocabulary)}
    rooms = []
    for i in tqdm(range(len(store)), desc=f"reading {len(store)} rooms", unit="room", disable=not progress):
        scene = store[i]
        if not scene.objects:
            continue
        row = {o.instance_id: k for k, o in enumerate(scene.objects)}
        referrals = [{"text": t.text, "target": row[t.target_id], "relation": t.relation, "shape": t.shape,
                      "source": t.source} for t in scene.texts if t.kind == "referral" and t.target_id in row]
        if not referrals:
            continue
        centers = np.stack([o.center for o in scene.objects]).astype(np.float32)
        sizes = np.stack([o.size for o in scene.objects]).astype(np.float32)
        lo, hi = (centers - sizes / 2).min(axis=0), (centers + sizes / 2).max(axis=0)
        ids = np.array([o.instance_id for o in scene.objects])
        slot = np.full(int(max(ids.max(), scene.instance.max(initial=0))) + 2, -1)
        slot[ids] = np.arange(len(ids))
        point_slot = slot[np.where(scene.instance >= 0, scene.instance, -1)]
        keep = point_slot >= 0
        counts = np.bincount(point_slot[keep], minlength=len(ids)).clip(min=1)[:, None]
        colors = np.stack([np.bincount(point_slot[keep], scene.rgb[keep, c], minlength=len(ids)) for c in range(3)], 1)
        rooms.append(ProbeRoom(scene.scene_id, centers - (lo + hi) / 2, sizes,
                               np.array([index.get(o.label, -1) for o in scene.objects], np.int64),
                               (colors / counts / 127.5 - 1.0).astype(np.float32), [o.label for o in scene.objects],
                               referrals))
    store.close()
    return rooms, vocabulary


def _augment(room: ProbeRoom, cfg: ProbeConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The room's centres and sizes turned about z and scaled as pre-training's transforms do."""
    centers, sizes = room.centers, room.sizes
    if cfg.rotation != "none":
        angle = rng.integers(4) * math.pi / 2 if cfg.rotation == "right_angles" else rng.uniform(-math.pi, math.pi)
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], np.float32)
        centers = centers @ rot.T
        if cfg.box_sizes == "enclosing":
            sizes = sizes @ np.abs(rot).T
    if cfg.scale is not None:
        factor = np.float32(rng.uniform(*cfg.scale))
        centers, sizes = centers * factor, sizes * factor
    return centers, sizes


def collate_rooms(rooms: list[ProbeRoom], cfg: ProbeConfig, rng: np.random.Generator | None,
                  device: torch.device) -> dict:
    """Padded object fields [B, L, ...] and the referrals of `rooms` (augmented when `rng` is given)."""
    length = max(len(r.classes) for r in rooms)
    b = len(rooms)
    centers, sizes = np.zeros((b, length, 3), np.float32), np.zeros((b, length, 3), np.float32)
    colors = np.zeros((b, length, 3), np.float32)
    labels = np.full((b, length), -1, np.int64)
    texts, scene, target, records = [], [], [], []
    for k, room in enumerate(rooms):
        n = len(room.classes)
        c, s = _augment(room, cfg, rng) if rng is not None else (room.centers, room.sizes)
        centers[k, :n], sizes[k, :n], colors[k, :n], labels[k, :n] = c, s, room.colors, room.labels
        referrals = room.referrals
        if rng is not None and cfg.max_referrals is not None and len(referrals) > cfg.max_referrals:
            referrals = [referrals[i] for i in sorted(rng.choice(len(referrals), cfg.max_referrals, replace=False))]
        for r in referrals:
            texts.append(r["text"])
            scene.append(k)
            target.append(r["target"])
            records.append({**r, "classes": room.classes, "boxes": np.concatenate([c, s], axis=1)})
    tensor = (lambda a: torch.from_numpy(a).to(device))
    return {"centers": tensor(centers), "sizes": tensor(sizes), "colors": tensor(colors), "labels": tensor(labels),
            "lengths": torch.tensor([len(r.classes) for r in rooms], device=device), "texts": texts,
            "scene": torch.tensor(scene, device=device), "target": torch.tensor(target, device=device),
            "records": records}


class RelationProbe(nn.Module):
    """Ground-truth object tokens into the model's spatial transformer, grounding encoder and head.

    With a frozen text encoder (`model.freeze_text`) each distinct text is encoded once and its
    token features kept (in fp16): the text encoder's forward is then no part of a training step."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if cfg.mlm_vocabulary == "corpus" and not cfg.mlm_token_ids:  # the probe trains no MLM: any head will do
            cfg = dataclasses.replace(cfg, mlm_vocabulary="full")
        self.model = GPSModel(cfg)
        d = cfg.d_model
        self.class_embedding = nn.Embedding(num_classes + 1, d)  # the last row: a class not in the vocabulary
        self.color = nn.Linear(3, d)
        self.norm = nn.LayerNorm(d)
        self.num_classes = num_classes
        self._text_cache: dict[str, torch.Tensor] = {}

    def encode_text(self, texts: list[str], device) -> dict:
        """Token features [N, T, hidden] and padding [N, T] of `texts` (cached when frozen)."""
        m = self.model
        if not m.cfg.freeze_text:
            return m.encode_text(texts, device)
        missing = sorted(set(texts) - set(self._text_cache))
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            with torch.no_grad():
                encoded = m.encode_text(chunk, device)
            for text, feats, pad in zip(chunk, encoded["feats"], encoded["pad"]):
                self._text_cache[text] = feats[~pad].to(torch.float16).cpu()
        rows = [self._text_cache[t] for t in texts]
        feats = nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device=device, dtype=torch.float32)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        return {"feats": feats, "pad": torch.arange(feats.shape[1], device=device)[None] >= lengths[:, None]}

    def forward(self, batch: dict) -> torch.Tensor:
        """Grounding logits [R, L] (-inf on padded slots) of the batch's referrals."""
        m = self.model
        labels = batch["labels"].where(batch["labels"] >= 0, self.num_classes)
        boxes = torch.cat([batch["centers"], batch["sizes"]], dim=-1)
        tokens = self.norm(self.class_embedding(labels) + self.color(batch["colors"])) + m.pooling.embed_boxes(
            batch["centers"], batch["sizes"])
        pad = torch.arange(tokens.shape[1], device=tokens.device)[None] >= batch["lengths"][:, None]
        tokens = m.spatial(tokens, batch["centers"], batch["sizes"], batch["lengths"])
        objects = {"tokens": tokens, "pad": pad, "boxes": boxes}
        return m.ground(self.encode_text(batch["texts"], tokens.device), batch["scene"], objects)[2]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the probe trains: the spatial transformer, the grounding encoder and head, the
        text projection (and the text encoder unless frozen), and the ground-truth token embeddings."""
        m = self.model
        modules = [m.spatial, m.grounding, m.grounding_head, m.text_to_model, self.class_embedding, self.color,
                   self.norm] + ([m.pooling.box_embed] if m.pooling.box_embed is not None else []) + (
                   [] if m.cfg.freeze_text else [m.text])
        return [p for module in modules for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate_probe(probe: RelationProbe, rooms: list[ProbeRoom], cfg: ProbeConfig, device, batch_rooms: int = 16) -> dict:
    """Grounding diagnostics of the probe on `rooms` (no augmentation)."""
    was_training = probe.training
    probe.eval()
    records = []
    for start in range(0, len(rooms), batch_rooms):
        batch = collate_rooms(rooms[start:start + batch_rooms], cfg, None, device)
        logits = probe(batch).float().cpu().numpy()
        for row, record in zip(logits, batch["records"]):
            n = len(record["classes"])
            records.append({**record, "scores": row[:n]})
    probe.train(was_training)
    return grounding_diagnostics(records)


def run_probe(cfg: ProbeConfig, device: torch.device | str = "cpu", progress: bool = True,
              rooms: tuple[list[ProbeRoom], list[ProbeRoom], list[str]] | None = None) -> dict:
    """Train the probe on `cfg.train`, evaluate on `cfg.val`; writes OUT/summary.json, the held-out
    diagnostics (OUT/grounding.{json,md,png}) and the learning curve (OUT/probe_curve.png).
    `rooms` = (train, val, vocabulary) skips reading the stores."""
    from tqdm.auto import tqdm

    from sparsegps.config import save_config
    from sparsegps.errors import UsageError
    from sparsegps.files import atomic_write_text

    device = torch.device(device)
    if rooms is None:
        if not cfg.train or not cfg.val:
            raise UsageError("the relation probe needs training rooms (train) and held-out rooms (val)")
        train, vocabulary = load_rooms(cfg.train, progress=progress)
        val, _ = load_rooms(cfg.val, vocabulary, progress=progress)
    else:
        train, val, vocabulary = rooms
    if len(train) < cfg.rooms_per_step:
        raise UsageError(f"{len(train)} training rooms with referrals cannot fill a step of {cfg.rooms_per_step}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    probe = RelationProbe(cfg.model, len(vocabulary)).to(device)
    params = probe.trainable_parameters()
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    train_eval = [train[i] for i in rng.permutation(len(train))[:cfg.train_eval_rooms]]
    curve, start, losses = [], time.perf_counter(), []

    def record(step: int) -> dict:
        held_out = evaluate_probe(probe, val, cfg, device)
        seen = evaluate_probe(probe, train_eval, cfg, device)
        point = {"step": step, "minutes": (time.perf_counter() - start) / 60,
                 "loss": float(np.mean(losses)) if losses else None, **flat_summary(held_out, "val_"),
                 "train_accuracy": seen["accuracy"], "train_within_class_accuracy": seen["within_class_accuracy"]}
        curve.append(point)
        losses.clear()
        return held_out

    order = rng.permutation(len(train))
    cursor, step = 0, 0
    bar = tqdm(total=cfg.steps, desc="probe", unit="step", disable=not progress)
    probe.train()
    while step < cfg.steps:
        if cursor + cfg.rooms_per_step > len(order):
            order, cursor = rng.permutation(len(train)), 0
        batch = collate_rooms([train[i] for i in order[cursor:cursor + cfg.rooms_per_step]], cfg, rng, device)
        cursor += cfg.rooms_per_step
        loss = F.cross_entropy(probe(batch).float(), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.gradient_clipping)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and not out_of_time:
            record(step)
            point = curve[-1]
            bar.set_postfix(within=f"{point['val_within_class_accuracy']:.3f}", acc=f"{point['val_accuracy']:.3f}")
        if out_of_time:
            break
    bar.close()
    report = record(step)
    summary = {"steps": step, "minutes": curve[-1]["minutes"], "train_rooms": len(train), "val_rooms": len(val),
               "train_referrals": sum(len(r.referrals) for r in train), **flat_summary(report, "val_"),
               "train_accuracy": curve[-1]["train_accuracy"], "curve": curve}
    if cfg.val_unseen:
        unseen_rooms, _ = load_rooms(cfg.val_unseen, vocabulary, progress=progress)
        unseen = evaluate_probe(probe, unseen_rooms, cfg, device)
        summary.update(val_unseen_rooms=len(unseen_rooms), **flat_summary(unseen, "val_unseen_"))
        save_diagnostics(unseen, out, "grounding_unseen", f"relation probe, held-out rooms, unseen phrasings, "
                                                          f"step {step}")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    save_diagnostics(report, out, "grounding", f"relation probe, held-out rooms, step {step}")
    plot_curve(curve, out / "probe_curve.png")
    return summary


def plot_curve(curve: list[dict], path: Path) -> Path:
    """Held-out accuracy and within-class accuracy (against the class prior) and training-room
    accuracy by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsegps.files import atomic_save_figure

    steps = [p["step"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, [p["val_accuracy"] for p in curve], "o-", label="held-out accuracy")
    ax.plot(steps, [p["val_within_class_accuracy"] for p in curve], "o-", label="held-out within-class accuracy")
    ax.plot(steps, [p["train_accuracy"] for p in curve], "--", color="grey", label="training-room accuracy")
    ax.axhline(curve[-1]["val_class_prior"], color="#d62728", ls=":", label="class prior")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("relation probe")
    fig.tight_layout()
    return atomic_save_figure(fig, path)

