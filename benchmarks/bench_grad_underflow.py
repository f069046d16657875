"""How much of the sparse U-Net's gradient fp16 loses, with and without gradient scaling.

Under bf16 training on a GPU the U-Net runs in fp16 (spconv has no bf16 kernels) and the losses
are means over the global batch, so the gradient per voxel shrinks as 1 / global batch and falls
out of fp16's range. This benchmark takes one fp32 forward and backward of the pre-training losses
(`GPSCriterion`, the config's loss weights) of a freshly initialised `GPSModel` (torch seed
`--seed`), or of a pre-training export (`--checkpoint`), on a global batch of `--scenes` synthetic
rooms (`sparsegps.synth`'s demo preset, the config's voxel size), on CPU, and captures with hooks:

- output: the gradient at the U-Net's output features (what enters its backward);
- input: the gradient at its input features (what leaves its backward);
- parameters: its parameter gradients.

The gradient is proportional to 1 / global batch, so it is rescaled to each of `--global-batches`
(g x scenes / batch) and counted against fp16's range, with S = 1 (no scaling) and with the default
scale of `SpUNetConfig.grad_scale_init` (g x S): the share of elements below fp16's smallest normal
(2**-14, 6.1e-5: fewer significant bits), lost (|g| < 2**-25: rounds to zero in fp16) and
overflowing (|g| > 65504). Shares are of the elements whose fp32 gradient is not exactly zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.report import Result, finish, save_figure, target

NAME = "grad-underflow"
FP16_SMALLEST_NORMAL = 2.0 ** -14
FP16_ROUNDS_TO_ZERO = 2.0 ** -25  # half the smallest subnormal (2**-24)
FP16_MAX = 65504.0
WHERE = ("output", "input", "parameters")
TARGET_LOST_PERCENT = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--scenes", type=int, default=None,
                        help="scenes in the measured batch, the global batch of the backward (default 8; quick 2)")
    parser.add_argument("--global-batches", type=int, nargs="+", default=[8, 64, 512],
                        help="global batches the gradient is rescaled to (default 8 64 512)")
    parser.add_argument("--config", type=Path, default=None,
                        help="pre-training YAML: model, losses and voxel size (default configs/pretrain/tiny_cpu.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pre-training config (e.g. data.transforms.voxel_size=0.1)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a pre-training export to measure instead of a freshly initialised model (its model "
                             "and loss weights; its voxel size when it records one)")


def demo_batch(scenes: int, transforms_cfg, seed: int) -> dict:
    """`scenes` rooms of the synth demo preset, transformed (no augmentation) and collated."""
    from sparsegps.benchmarks.bench_scaling import collate
    from sparsegps.synth import generate_scene, preset

    synth = dataclasses.replace(preset("demo"), seed=seed)
    return collate([generate_scene(synth, i) for i in range(scenes)], transforms_cfg, seed)


def backbone_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    """One fp32 forward and backward of the pre-training losses; the U-Net's gradients, flattened."""
    from sparsegps.criterion import GPSCriterion

    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(grad):
            captured[name] = grad.detach().flatten().clone()
        return hook

    def on_forward(module, args, output):
        args[1].register_hook(capture("input"))  # the features GPSModel hands in (they require grad)
        output.register_hook(capture("output"))

    handle = model.backbone.register_forward_hook(on_forward)
    try:
        model.zero_grad(set_to_none=True)
        criterion = GPSCriterion.of(model.cfg)
        criterion(model(batch), batch)["loss"].backward()
    finally:
        handle.remove()
    captured["parameters"] = torch.cat([p.grad.flatten() for p in model.backbone.parameters() if p.grad is not None])
    return captured


def fp16_shares(grad: torch.Tensor) -> dict:
    """Where the elements of `grad` (fp64) fall in fp16's range, in percent of its non-zero elements."""
    magnitude = grad.abs()
    nonzero = magnitude[magnitude > 0]
    n = max(int(nonzero.numel()), 1)
    percent = (lambda mask: 100.0 * int(mask.sum()) / n)
    return {"elements": int(grad.numel()), "zero_pct": 100.0 * (1 - nonzero.numel() / max(grad.numel(), 1)),
            "median_abs": float(nonzero.median()) if nonzero.numel() else 0.0,
            "max_abs": float(nonzero.max()) if nonzero.numel() else 0.0,
            "below_normal_pct": percent(nonzero < FP16_SMALLEST_NORMAL),
            "lost_pct": percent(nonzero < FP16_ROUNDS_TO_ZERO), "overflow_pct": percent(nonzero > FP16_MAX)}


def table_rows(gradients: dict[str, torch.Tensor], measured_batch: int, global_batches: list[int],
               scale: float) -> list[dict]:
    """One row per place, global batch and scale (1, `scale`)."""
    rows = []
    for where in WHERE:
        grad = gradients[where].double()
        for global_batch in global_batches:
            for s in (1.0, scale):
                scaled = grad * (measured_batch / global_batch) * s
                rows.append({"method": f"S={_power(s)}", "where": where, "global_batch": global_batch, "scale": s,
                             **fp16_shares(scaled)})
    return rows


def _power(s: float) -> str:
    exponent = int(np.log2(s))
    return "1" if exponent == 0 else f"2^{exponent}"


def run(args: argparse.Namespace) -> dict:
    from sparsegps.benchmarks.bench_scaling import default_config
    from sparsegps.benchmarks.scenes import demo_texts
    from sparsegps.config import ConfigError, load_config
    from sparsegps.exports import load_model
    from sparsegps.models.backbone import SpUNetConfig
    from sparsegps.models.gps import GPSModel
    from sparsegps.synth import SYNTH_VOCABULARY
    from sparsegps.train.pretrain import PretrainConfig, with_class_names, with_corpus_tokens

    resolve_common(args, repeats=1, warmup=0)
    if args.device != "cpu":
        raise SystemExit("error: grad-underflow measures fp32 gradients on CPU (--device cpu)")
    scenes = args.scenes or (2 if args.quick else 8)
    if scenes < 1 or min(args.global_batches) < 1:
        raise SystemExit("error: --scenes and --global-batches must be at least 1")
    config_path = args.config or default_config(torch.device("cpu"))
    try:
        cfg = load_config(PretrainConfig, config_path, list(args.set) + ["device=cpu", "precision=fp32"])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = with_corpus_tokens(with_class_names(cfg, SYNTH_VOCABULARY), demo_texts())
    scale = SpUNetConfig().grad_scale_init
    machine = machine_info("cpu")
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="S = 1 (no scaling), the same gradients")
    torch.manual_seed(args.seed)
    if args.checkpoint is None:
        model = GPSModel(cfg.model)
        source = f"a freshly initialised GPSModel of {config_path} (torch seed {args.seed})"
    else:
        model, info = load_model(args.checkpoint, "cpu", tasks=("pretraining",), purpose="grad-underflow")
        cfg = dataclasses.replace(cfg, model=model.cfg)
        if info.voxel_size is not None:
            cfg.data = dataclasses.replace(cfg.data, transforms=dataclasses.replace(cfg.data.transforms,
                                                                                   voxel_size=info.voxel_size))
        source = f"the export {args.checkpoint} (step {info.step})"
    model.train()
    batch = demo_batch(scenes, cfg.data.transforms, args.seed)
    gradients = backbone_gradients(model, batch)
    result.rows = table_rows(gradients, scenes, sorted(args.global_batches), scale)
    largest = max(args.global_batches)
    for where in ("output", "input"):
        row = next(r for r in result.rows if r["where"] == where and r["global_batch"] == largest and r["scale"] == scale)
        name = (f"percent of the {where} gradient lost at {largest} scenes with S={_power(scale)}: "
                f"{row['lost_pct']:.2g} (wanted below {TARGET_LOST_PERCENT:g})")
        result.targets.append(target(name, row["lost_pct"], TARGET_LOST_PERCENT, higher_is_better=False))
    voxels = int(batch["coords"].shape[0])
    result.config.update(scenes=scenes, voxels=voxels, pretrain_config=str(config_path), scale=scale,
                         voxel_size=cfg.data.transforms.voxel_size)
    result.notes += [
        f"gradients: one fp32 backward on CPU of the pre-training losses (weights "
        f"{ {k: v for k, v in dataclasses.asdict(cfg.model.loss).items() if v} }) of {source}, on {scenes} synth "
        f"demo rooms ({voxels:,} voxels at {cfg.data.transforms.voxel_size} m, no augmentation)",
        f"rescaled to each global batch as g x {scenes} / global batch (losses are means over the global batch), "
        f"then multiplied by S; S = {_power(scale)} is SpUNetConfig.grad_scale_init",
        "counted against fp16's range: below_normal |g| < 2^-14 (6.1e-5), lost |g| < 2^-25 (rounds to 0), "
        "overflow |g| > 65504; in percent of the elements whose fp32 gradient is not exactly zero (zero_pct: "
        "the others); median_abs, max_abs: median and largest |g x S| of those",
        "output: the gradient at the U-Net's output features; input: at its input features; parameters: its "
        "parameter gradients (under fp16 autocast the convolutions compute these in fp16)",
    ]
    return finish(result, machine, ["where", "global_batch", "method", "median_abs", "max_abs", "below_normal_pct",
                                    "lost_pct", "overflow_pct"], args.out, plot=_plot)


def _plot(data: dict, path: Path) -> None:
    """Percent lost against the global batch, one panel per place, S = 1 and the default S."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WHERE), figsize=(12, 3.8), sharey=True)
    for ax, where in zip(axes, WHERE):
        for method in dict.fromkeys(r["method"] for r in data["rows"]):
            rows = [r for r in data["rows"] if r["where"] == where and r["method"] == method]
            ax.plot([r["global_batch"] for r in rows], [r["lost_pct"] for r in rows], "o-", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch (scenes)")
        ax.set_title("parameter gradients" if where == "parameters" else f"gradient at the {where}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of elements lost in fp16")
    axes[0].legend()
    fig.suptitle(f"U-Net gradients in fp16 ({data['machine']['summary']})", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
