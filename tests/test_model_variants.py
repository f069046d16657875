"""Every model a config can name trains: each choice of a `Literal` field of ModelConfig (one at a
time, every loss on) and the model section of every shipped pre-training config (its choices kept,
its sizes shrunk to the tests' tiny model) builds, gives finite losses, finite gradients, and lowers
its own loss on a fixed batch in a few optimizer steps (timm's test over every model)."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsegps.config import from_dict, load_config, merge_mappings, to_dict
from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, write_scenes
from sparsegps.criterion import LOSS_NAMES
from sparsegps.models.gps import GPSModel, ModelConfig
from sparsegps.models.text_encoder import corpus_token_ids, load_tokenizer

from helpers import TINY_MODEL, VOCAB, make_scene, outputs_and_losses, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
# "triton" needs CUDA or the interpreter; the kernel's own tests compare it with the reference
NOT_ON_CPU = {("attention_backend", "triton")}


def literal_choices(cls, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted field, value) for every value of every Literal field that is not its default."""
    hints = typing.get_type_hints(cls)
    choices = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Literal:
            default = f.default
            choices += [(prefix + f.name, v) for v in typing.get_args(hint) if v != default]
        elif dataclasses.is_dataclass(hint):
            choices += literal_choices(hint, prefix + f.name + ".")
    return [c for c in choices if c not in NOT_ON_CPU]


def nested(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: nested(rest, value) if rest else value}


VARIANTS = literal_choices(ModelConfig)
EVERY_LOSS = {name: 1.0 for name in LOSS_NAMES}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Three scenes of 2, 4 and 6 objects (padding in every object layer), with every kind of text."""
    rng = np.random.default_rng(4)
    out = tmp_path_factory.mktemp("shards")
    write_scenes([make_scene(rng, f"s{i}", 700, 2 + 2 * i) for i in range(3)], out, vocabulary=VOCAB, progress=False)
    ds = ScenesDataset(out, TransformConfig(voxel_size=0.1, augment=False))
    return collate_scenes([ds[i] for i in range(3)])


def batch_texts(batch: dict) -> list[str]:
    return [t["text"] for t in batch["texts"]] + [f"a {name}" for name in VOCAB]


def trains(cfg: ModelConfig, batch: dict, steps: int = 4) -> None:
    """Builds `cfg`, checks its losses and gradients are finite and its loss falls in `steps` Adam steps."""
    if cfg.mlm_vocabulary == "corpus" and not cfg.mlm_token_ids:
        cfg = dataclasses.replace(cfg, mlm_token_ids=corpus_token_ids(batch_texts(batch), load_tokenizer(cfg.text)))
    torch.manual_seed(0)
    model = GPSModel(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=2e-3)
    totals = []
    for step in range(steps + 1):
        torch.manual_seed(1)  # the same MLM masks every step: the loss is one function of the weights
        out = outputs_and_losses(model, batch)
        for name in LOSS_NAMES:
            if getattr(cfg.loss, name) > 0:
                assert torch.isfinite(out[f"loss_{name}"]), name
        totals.append(out["loss"].item())
        if step == steps:
            break
        optimizer.zero_grad()
        out["loss"].backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert bad == []
        optimizer.step()
    assert totals[-1] < totals[0], totals


@pytest.mark.parametrize("field,value", VARIANTS, ids=[f"{f}={v}" for f, v in VARIANTS])
def test_every_model_choice_trains(batch, field, value):
    trains(tiny_model_config(**merge_mappings(nested(field, value), {"class_names": VOCAB, "loss": EVERY_LOSS})),
           batch)


def test_the_sweep_covers_every_choice():
    names = {f for f, _ in VARIANTS}
    assert {"grounding_attention", "spatial_mode", "backbone.stem_kernel", "mlm_vocabulary", "object_text"} <= names
    assert ("grounding_attention", "spatial") in VARIANTS and ("grounding_attention", "relational") in VARIANTS


SIZES = {k: v for k, v in TINY_MODEL.items() if k != "object_text"}  # the tiny model's sizes, not its choices


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs/pretrain").glob("*.yaml")))
def test_every_shipped_pretraining_model_trains(batch, config):
    from sparsegps.train.pretrain import PretrainConfig

    shipped = to_dict(load_config(PretrainConfig, ROOT / "configs/pretrain" / config).model)
    model = merge_mappings(shipped, {**SIZES, "class_names": VOCAB, "mlm_token_ids": [],
                                     "attention_backend": "reference"})
    trains(from_dict(ModelConfig, model), batch)
