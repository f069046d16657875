"""Process groups, DeepSpeed engines, GPS's optimizer groups and the learning-rate schedule."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from sparsegps.launch import export_local_rank, export_world


NoDecayRule = Literal["gps", "norms_embeddings", "none"]


@dataclass
class OptimConfig:
    """AdamW with GPS's parameter groups; warmup then cosine decay.

    Learning-rate scaling for large batches: every group's lr is multiplied by
    (global_batch / reference_batch) ** power (power 1: linear rule, 0.5: square-root rule, 0: off),
    with `warmup_steps` of linear warmup from zero, as large-batch training needs."""
    # allowed values, checked on load (`sparsegps.config.check_limits`)
    LIMITS: ClassVar[dict[str, str]] = {"lr_text_encoder": ">= 0", "lr_backbone": ">= 0", "lr_transformers": ">= 0",
                                        "lr_heads": ">= 0", "weight_decay": ">= 0", "warmup_steps": ">= 0",
                                        "min_lr_ratio": ">= 0", "gradient_clipping": ">= 0",
                                        "reference_batch": ">= 1", "lr_scaling_power": ">= 0"}

    # adamw, or lamb (DeepSpeed's fused LAMB, GPU only, without ZeRO) for the largest batches
    optimizer: Literal["adamw", "lamb"] = "adamw"
    lr_text_encoder: float = 1e-5
    lr_backbone: float = 1e-4  # the U-Net (GPS: its frozen, separately trained PointNet++ had none)
    lr_transformers: float | None = None  # pooling, spatial and grounding transformers; None: lr_backbone
    lr_heads: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    # which parameters get no weight decay: gps (biases and BERT's LayerNorms, as GPS), or
    # norms_embeddings (also every norm, embedding table and temperature), or none
    no_decay: NoDecayRule = "gps"
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0
    gradient_clipping: float = 5.0
    reference_batch: int = 64
    lr_scaling_power: float = 0.0


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join (or create) the process group: NCCL on GPU, gloo on CPU.

    The world comes from the launcher's environment (`sparsegps.launch.discover_world`: torchrun,
    the deepspeed launcher, srun; a plain process is a world of one on a free local port), which is
    written back as RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A collective that
    waits more than `timeout_s` fails (gloo raises; NCCL's watchdog aborts the process).

    A group the caller made already (a script, an earlier run in this process) is joined as it is;
    DeepSpeed's engine still reads LOCAL_RANK, so a group of one without it gets 0, and a larger
    group without it is an error naming the variable."""
    if dist.is_initialized():
        export_local_rank(dist.get_rank(), dist.get_world_size())
    else:
        world = export_world()
        if world.launcher == "slurm" and world.size > 1 and world.rank == 0:
            print(f"joining {world.size} SLURM tasks at {world.master_addr}:{world.master_port}", flush=True)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# GPSModel's parameters by role: each role has its learning rate (OptimConfig.lr_<role>).
GPS_TRANSFORMERS = ("pooling.", "spatial.", "grounding.", "text_to_model.")


def gps_role(name: str) -> str:
    """The optimizer role of a GPSModel parameter: text encoder, U-Net backbone, transformers
    (pooling, spatial, grounding), heads."""
    return ("text_encoder" if name.startswith("text.") else "backbone" if name.startswith("backbone.")
            else "transformers" if name.startswith(GPS_TRANSFORMERS) else "heads")


def segmentation_role(name: str) -> str:
    """The optimizer role of a segmentation model's parameter: backbone or head."""
    return "backbone" if name.startswith("backbone.") else "heads"


def optimizer_groups(model: nn.Module, role: Callable[[str], str],
                     no_decay: NoDecayRule = "gps") -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of `model` by `role(name)`, those exempt from weight decay (see
    `no_decay_parameter_names`) in "<role>/no_decay" groups."""
    exempt = no_decay_parameter_names(model, no_decay)
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(role(name) + ("/no_decay" if name in exempt else ""), []).append(p)
    return groups


def no_decay_parameter_names(model: nn.Module, rule: NoDecayRule = "gps") -> set[str]:
    """Parameters exempt from weight decay.

    gps: GPS's `no_decay_param_group` (SceneVerse optim/utils.py): names containing "bias" or
    "LayerNorm." (BERT's norms; other norms and embeddings are decayed). norms_embeddings: every
    parameter of fewer than 2 dimensions (biases, norm weights, temperatures), embedding tables and
    token-type embeddings, the common practice since. none: decay everything."""
    names = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if rule == "gps":
                exempt = "bias" in full or "LayerNorm." in full
            elif rule == "norms_embeddings":
                exempt = p.ndim < 2 or isinstance(module, nn.Embedding) or name == "token_type"
            else:
                exempt = False
            if exempt:
                names.add(full)
    return names


def build_optimizer(groups: dict[str, list], cfg: OptimConfig, global_batch: int, device_type: str):
    """The optimizer over `groups` ({role or role/no_decay: parameters}); a role's learning rate
    comes from `cfg`, and "/no_decay" groups get no weight decay."""
    scale = (global_batch / cfg.reference_batch) ** cfg.lr_scaling_power
    lrs = {"text_encoder": cfg.lr_text_encoder, "backbone": cfg.lr_backbone, "heads": cfg.lr_heads,
           "transformers": cfg.lr_backbone if cfg.lr_transformers is None else cfg.lr_transformers}
    params = [{"params": p, "lr": lrs[name.split("/")[0]] * scale, "name": name,
               "weight_decay": 0.0 if name.endswith("/no_decay") else cfg.weight_decay}
              for name, p in groups.items() if p]
    if cfg.optimizer == "adamw":
        # On CPU torch's fused AdamW (one kernel over every tensor) is 3.6x faster than its default
        # loop over tensors, with the same update; on GPUs torch's default (foreach) is kept.
        return torch.optim.AdamW(params, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                 fused=True if device_type == "cpu" else None)
    if cfg.optimizer == "lamb":
        if device_type != "cuda":
            raise ValueError("optim.optimizer=lamb needs a GPU (DeepSpeed's fused LAMB); use adamw on CPU")
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(params, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or lamb)")


MONITOR_KEYS = {"csv": "csv_monitor", "tensorboard": "tensorboard", "wandb": "wandb"}


def read_deepspeed_json(json_path: str | None) -> dict:
    """The DeepSpeed JSON at `json_path` as written; without one, ZeRO stage 0."""
    return json.loads(Path(json_path).read_text()) if json_path else {"zero_optimization": {"stage": 0}}


def deepspeed_config(json_path: str | None, *, micro_batch: int, grad_accum: int, clipping: float,
                     precision: str, monitor: str = "none", monitor_dir: Path | None = None) -> dict:
    """The DeepSpeed JSON (ZeRO stage etc.) with batch, clipping, precision and the monitor filled
    in from our config."""
    ds = read_deepspeed_json(json_path)
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
              gradient_clipping=clipping, zero_allow_untested_optimizer=True, steps_per_print=10 ** 9,
              wall_clock_breakdown=False)
    ds.pop("train_batch_size", None)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    if monitor != "none":
        check_monitor_installed(monitor)
        key = MONITOR_KEYS[monitor]
        ds[key] = {"enabled": True, "project": "sparsegps"} if monitor == "wandb" else {
            "enabled": True, "output_path": str(monitor_dir), "job_name": "train"}
    return ds


def check_monitor_installed(monitor: str) -> None:
    from sparsegps.errors import UsageError

    needs = {"tensorboard": ("tensorboard", "pip install 'sparsegps[tensorboard]'"),
             "wandb": ("wandb", "pip install wandb (WANDB_MODE=offline without network)")}
    if monitor in needs:
        import importlib.util

        module, fix = needs[monitor]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"monitor: {monitor} needs the {module} package: {fix}")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def check_optimizer_fits_zero(optimizer: str, stage: int) -> None:
    """Refuse LAMB under ZeRO: ZeRO 1-3 hand the optimizer each rank's flat partition of the
    parameters, so LAMB's trust ratio (weight norm / update norm, per parameter) would be computed
    per partition, spanning pieces of several parameters, and change with the number of GPUs."""
    from sparsegps.errors import UsageError

    if optimizer == "lamb" and stage >= 1:
        raise UsageError(f"optim.optimizer=lamb cannot run under ZeRO stage {stage}: ZeRO hands LAMB flat "
                         f"partitions, so its per-parameter trust ratio would be computed per partition and "
                         f"change with the number of GPUs; use adamw with ZeRO, or lamb without --deepspeed")


def initialize_engine(model, optimizer, scheduler, ds_config: dict):
    """`deepspeed.initialize`, preparing the model for ZeRO-3 first.

    ZeRO-3 gathers a module's partitioned parameters in hooks around its forward and backward,
    and finds the backward through the tensors a module returns. spconv layers pass
    `SparseConvTensor`s, which those hooks cannot see, so the sparse U-Net is made one ZeRO-3
    leaf (gathered whole around its tensor-in, tensor-out forward). The MLM head's tied word
    embeddings are read in the model's own forward, so they are registered with it."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from sparsegps.models.backbone import SpUNet

    if zero_stage(ds_config) == 3:
        set_z3_leaf_modules(model, [SpUNet], raise_if_not_found=False)
        if hasattr(model, "text"):
            deepspeed.zero.register_external_parameter(model, model.text.word_embeddings.weight)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler
