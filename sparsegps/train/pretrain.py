"""GPS pre-training on shards with DeepSpeed, from one CPU process to many GPUs on many nodes.

`pretrain(cfg)` runs the pre-training task (`sparsegps.train.task`): the training scenes (with any
classes held out), `GPSModel` and `GPSCriterion`, GPS's optimizer groups, `cfg.steps` optimizer steps
of `cfg.global_batch` scenes (micro-batches of `cfg.micro_batch` scenes per rank, accumulated over
`global_batch / (micro_batch * world)` micro-steps), held-out grounding and retrieval, and the export
the fine-tuning commands load (RUN/export.safetensors).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparsegps.config import from_dict, to_dict
from sparsegps.data import SceneStore, ScenesDataset
from sparsegps.errors import UsageError
from sparsegps.exports import ExportInfo, read_starting_export
from sparsegps.models.backbone import SpUNetConfig
from sparsegps.criterion import LOSS_NAMES, LossWeights, consumed_labels
from sparsegps.models.gps import ModelConfig

from .engine import OptimConfig
from .run import DataConfig, Run, RunConfig
from .task import GPSTrainingTask, run_task


@dataclass
class PretrainDataConfig(DataConfig):
    eval_max_scenes: int | None = 256
    # Classes held out of pre-training (for zero-shot evaluation of classes whose labels it never
    # saw): their points take the ignore label and their objects no class target (no "a <class>"
    # text either); the store is untouched. The export lists the classes trained on
    # (`trained_classes`), the held-out ones and the mode.
    holdout_classes: list[str] = field(default_factory=list)
    holdout: Literal["labels", "strict"] = "labels"
    """What the hold-out withholds. labels: the labels only; captions and referrals that name the
    classes stay (PLA's base/novel protocol: what language buys). strict: those texts are dropped
    too, so the classes' names never reach pre-training (`transforms.HoldOutClasses`)."""


@dataclass
class PretrainConfig(RunConfig):
    output_dir: str = "runs/pretrain"
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # all: every loss of model.loss. objects: GPS's first stage, object classification of the pooled
    # tokens against the class-name texts alone (model.loss is replaced by object_class=1); a second
    # run with `init_from: STAGE1/export.safetensors` then trains everything from those weights.
    stage: Literal["all", "objects"] = "all"
    # a pre-training export whose weights start this run, or a Pointcept SpUNet-v1m1 checkpoint (its U-Net)
    init_from: str | None = None


OBJECT_STAGE_LOSS = LossWeights(**{**{name: 0.0 for name in LOSS_NAMES}, "object_class": 1.0})
LABEL_KINDS = ("texts", "object_classes", "voxel_classes")


class PretrainTask(GPSTrainingTask):
    name = "pretrain"
    summary_prefix = "pretrain"

    def configure(self) -> None:
        cfg = self.cfg
        self.start_from = read_starting_export(cfg.init_from, ("pretraining", "backbone"), "init_from",
                                               cfg.data.transforms.voxel_size) if cfg.init_from else None
        if self.start_from is not None:
            if self.start_from.info.task == "backbone":  # the U-Net's shape comes from the checkpoint
                self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=from_dict(
                    SpUNetConfig, self.start_from.info.model_config["backbone"])))
        self.vocabulary = SceneStore(cfg.data.train).vocabulary  # held-out classes are checked by `dataset`
        self.cfg = cfg = with_class_names(cfg, [c for c in self.vocabulary if c not in cfg.data.holdout_classes])
        if cfg.model.mlm_vocabulary == "corpus" and not cfg.model.mlm_token_ids:
            self.cfg = cfg = with_corpus_tokens(cfg, training_texts(cfg))
        if cfg.stage == "objects":
            self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss=OBJECT_STAGE_LOSS))
        self.diagnostics: list[dict] = []

    def dataset(self) -> ScenesDataset:
        return training_set(self.cfg)

    def export_info(self, dataset) -> ExportInfo:
        cfg, labels = self.cfg, consumed_labels(self.cfg.model)
        return ExportInfo("pretraining", to_dict(cfg.model), vocabulary=list(self.vocabulary),
                          voxel_size=cfg.data.transforms.voxel_size, trained_classes=list(cfg.model.class_names),
                          holdout_classes=list(cfg.data.holdout_classes),
                          holdout=cfg.data.holdout if cfg.data.holdout_classes else None, preset=preset_name(labels),
                          labels_consumed=labels)

    def monitor(self, run: Run, model) -> dict | None:
        if not self.cfg.data.val or not self.cfg.eval_every:
            return None
        return self._held_out(run, model)

    def evaluate(self, run: Run, model, export: Path) -> dict:
        if not self.cfg.data.val:
            return {}
        result = self._held_out(run, model)
        if run.rank == 0 and self.diagnostics[-1]["referrals"]:
            from sparsegps.eval.grounding_diagnostics import save_diagnostics

            save_diagnostics(self.diagnostics[-1], run.out, "grounding", "held-out grounding after pre-training")
        return result

    def _held_out(self, run: Run, model) -> dict:
        from sparsegps.eval.pretrain import evaluate_pretraining

        cfg = self.cfg
        result = evaluate_pretraining(model, cfg.data.val, cfg.data.transforms, run.device, run.precision,
                                      cfg.micro_batch, cfg.data.eval_max_scenes, progress=False)
        self.diagnostics.append(result.pop("grounding_diagnostics"))
        return result


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Run pre-training (or continue it, as `cfg.resume` says); returns a summary (steps, scenes/s,
    final losses, held-out metrics). With held-out data, the grounding diagnostics go to
    RUN/grounding.{json,md,png}. A stop signal raises `sparsegps.errors.Preempted` after a complete
    checkpoint."""
    return run_task(PretrainTask(cfg), progress)


def training_set(cfg: PretrainConfig) -> ScenesDataset:
    """The training scenes with the run's transforms; with `data.holdout_classes`, labels index the
    classes trained on (the store's vocabulary without the held-out ones) and the held-out classes'
    labels and names never reach a batch."""
    from sparsegps.data.transforms import HoldOutClasses, build_transforms
    from sparsegps.language.templates import class_words

    vocabulary = SceneStore(cfg.data.train).vocabulary
    holdout = list(cfg.data.holdout_classes)
    unknown = [c for c in holdout if c not in vocabulary]
    if unknown:
        raise UsageError(f"data.holdout_classes: {unknown} not in the training shards' vocabulary {vocabulary}")
    transforms = build_transforms(cfg.data.transforms)
    if holdout:
        words = [w for c in holdout for w in class_words(c)]
        transforms.transforms.insert(0, HoldOutClasses(holdout, words, cfg.data.holdout))
    return ScenesDataset(cfg.data.train, transforms, seed=cfg.seed,
                         classes=[c for c in vocabulary if c not in holdout], verify=cfg.data.verify,
                         on_corrupt=cfg.data.on_corrupt)


def training_texts(cfg: PretrainConfig) -> list[str]:
    """The training store's texts that reach a batch (under a strict hold-out, not those naming a
    held-out class)."""
    from sparsegps.data.transforms import HoldOutClasses
    from sparsegps.language.templates import class_words

    holdout = list(cfg.data.holdout_classes)
    names = HoldOutClasses(holdout, [w for c in holdout for w in class_words(c)], cfg.data.holdout)
    store = SceneStore(cfg.data.train)
    try:
        return [t for t in store.texts() if names.keeps(t)]
    finally:
        store.close()


def with_corpus_tokens(cfg: PretrainConfig, texts: list[str]) -> PretrainConfig:
    """The config with `model.mlm_token_ids` set to the tokens `texts` use: what MLM predicts with
    `model.mlm_vocabulary: corpus` (unchanged for `full`, or when ids are given)."""
    from sparsegps.models.text_encoder import corpus_token_ids, load_tokenizer

    if cfg.model.mlm_vocabulary != "corpus" or cfg.model.mlm_token_ids:
        return cfg
    ids = corpus_token_ids(texts, load_tokenizer(cfg.model.text))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlm_token_ids=ids))


def with_class_names(cfg: PretrainConfig, classes: list[str]) -> PretrainConfig:
    """The config with `model.class_names` set to the classes trained on (the label ids of its
    batches index them); a different list given by the user is refused."""
    names = list(cfg.model.class_names)
    if names and names != list(classes):
        raise UsageError(f"model.class_names {names[:5]}... differs from the classes trained on "
                         f"{list(classes)[:5]}...; leave it empty to use the shards' vocabulary")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_names=list(classes)))


def preset_name(labels: list[str]) -> str:
    """The preset a pre-training belongs to, named by the labels it consumed: language (texts only,
    GPS's signals), objects (+ object classes), dense (+ per-voxel classes)."""
    return "dense" if "voxel_classes" in labels else "objects" if "object_classes" in labels else "language"


__all__ = ["OBJECT_STAGE_LOSS", "PretrainConfig", "PretrainDataConfig", "PretrainTask", "pretrain",
           "preset_name", "training_set", "with_class_names"]
