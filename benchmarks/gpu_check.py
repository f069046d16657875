"""`make gpu-check`: everything on sparsegps's GPU path in one command, one report.

On a CUDA machine with sparsegps installed (from a source checkout: the tests and configs are
read from it), in about 8 minutes on one H100/H200:

1. `sparsegps doctor` (torch, driver, GPU, spconv, torch-scatter, Triton, DeepSpeed ops);
2. `pytest -m gpu` (the kernel's bf16/fp16/fp32 comparisons, spconv on CUDA, ...);
3. the attention kernel's compile report: registers, spills and shared memory per kernel and tile
   configuration, for GPS's sizes (L 80 and 1024, head dims 64 and 128);
4. `bench attention` (B=64, H=12, Dh=64; L 80, 256, 1024);
5. `bench encoder --device cuda` (tiny and base SpUNet; spconv under fp16 autocast);
6. `bench train-step` on configs/pretrain/base_gpu.yaml with ZeRO-0 and ZeRO-2 (bf16, the Triton
   kernel in the model);
7. the backbone's parameter gradients under bf16 autocast (the U-Net in fp16), without and with
   gradient scaling, against fp32: relative error and share of zero gradients, at gradients the
   size of global batches of 8, 64 and 512 scenes.

Writes OUT/gpu_check.json and OUT/gpu_check.md (each step's status, time and output tail, the
compile report and the benchmark tables) and every step's log under OUT/logs/. A failing step
is recorded and the next one runs; the exit status is 1 when any step failed. Without a GPU it
says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""
    reports: list[str] = field(default_factory=list)
    """Markdown files the step wrote (benchmark tables), embedded in the report."""


def steps(out: Path) -> list[Step]:
    """The checks in order, each with its time budget (510 s in all)."""
    py = sys.executable
    cli = [py, "-m", "sparsegps.cli"]
    config = REPO / "configs" / "pretrain" / "base_gpu.yaml"
    return [
        Step("doctor", [*cli, "doctor"], 60),
        Step("pytest -m gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")],
             120),
        Step("kernel compile report", [py, "-m", "sparsegps.benchmarks.gpu_check", "--compile-report",
                                       "--out", str(out)], 60, reports=[str(out / "compile_report.md")]),
        Step("bench attention", [*cli, "bench", "attention", "--device", "cuda", "--sizes", "64x80", "64x256",
                                 "64x1024", "--out", str(out / "attention")], 90,
             reports=[str(out / "attention" / "attention.md")]),
        Step("bench encoder", [*cli, "bench", "encoder", "--device", "cuda", "--presets", "tiny", "base",
                               "--objects", "80", "--voxel-sizes", "0.02", "--out", str(out / "encoder")], 60,
             reports=[str(out / "encoder" / "encoder.md")]),
        Step("bench train-step", [*cli, "bench", "train-step", "--device", "cuda", "--config", str(config),
                                  "--zero-stages", "0", "2", "--micro-batches", "16", "--repeats", "3",
                                  "--set", "precision=bf16", "--set", "model.attention_backend=triton",
                                  "--out", str(out / "train_step")], 90,
             reports=[str(out / "train_step" / "train_step.md")]),
        Step("backbone gradients in fp16", [py, "-m", "sparsegps.benchmarks.gpu_check", "--grad-precision",
                                            "--out", str(out)], 30, reports=[str(out / "grad_precision.md")]),
    ]


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def run_step(step: Step, logs: Path) -> None:
    start = time.perf_counter()
    log = logs / f"{step.name.replace(' ', '_').replace('-', '')}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(step.command, cwd=REPO, capture_output=True, text=True, timeout=step.timeout_s, env=env)
        output, step.status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as e:  # its captured output comes as bytes even with text=True
        output = _text(e.stdout) + _text(e.stderr)
        step.status = f"timed out after {step.timeout_s} s"
    step.seconds = time.perf_counter() - start
    log.write_text(output)
    step.tail = "\n".join(output.strip().splitlines()[-15:])


# ------------------------------------------------------------------------------ compile report

COMPILE_SIZES = [(80, 64), (80, 128), (1024, 64), (1024, 128)]


def _compiled_kernels(kernel) -> list:
    """The compiled variants a JIT kernel holds (Triton 3.x keeps them per device)."""
    found = []
    for cache in getattr(kernel, "device_caches", {}).values():
        entries = cache[0] if isinstance(cache, tuple) else cache
        found += list(entries.values())
    if not found:
        found = [c for per_device in getattr(kernel, "cache", {}).values() for c in per_device.values()]
    return found


def compile_report(out: Path) -> list[dict]:
    """Run the kernels forward and backward at GPS's sizes in bf16 and list what Triton compiled."""
    import torch

    from sparsegps.kernels import spatial_attention as kernels

    rows = []
    for length, head_dim in COMPILE_SIZES:
        batch, heads = 4, 12
        q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        centers = torch.rand(batch, length, 3, device="cuda") * 8
        weights = torch.randn(batch, length, heads, 6, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lengths = torch.tensor([length, length // 2, 3, 0], device="cuda")
        kernels.spatial_attention(q, k, v, centers, weights, lengths).sum().backward()
        torch.cuda.synchronize()
        configs = kernels.launch_configs(length, head_dim, heads)
        for name in ("_small_forward_kernel", "_small_backward_kernel", "_forward_kernel", "_backward_dkdv_kernel",
                     "_backward_dq_kernel", "_backward_preprocess_kernel", "_inverse_max_distance_kernel"):
            for compiled in _compiled_kernels(getattr(kernels, name)):
                constants = getattr(getattr(compiled, "src", None), "constants", {}) or {}
                blocks = {str(getattr(key, "name", key) if not isinstance(key, tuple) else key): value
                          for key, value in constants.items()}
                tiles = {k2: v2 for k2, v2 in blocks.items() if any(t in k2 for t in ("BLOCK", "HEADS", "IS_COND"))}
                row = {"kernel": name, "tiles": json.dumps(tiles, default=str) if tiles else "-",
                       "registers": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
                       "shared_bytes": getattr(getattr(compiled, "metadata", None), "shared", None),
                       "num_warps": getattr(getattr(compiled, "metadata", None), "num_warps", None)}
                if row not in rows:
                    rows.append(row)
        rows.append({"kernel": f"(after L={length}, Dh={head_dim}: {'small-L' if configs.small else 'tiled'} path)",
                     "tiles": "", "registers": None, "spills": None, "shared_bytes": None, "num_warps": None})
    lines = [f"### kernel compile report ({torch.cuda.get_device_name()})", "",
             "| kernel | tiles | registers | spills | shared bytes | warps |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['kernel']} | {r['tiles']} | {r['registers']} | {r['spills']} | {r['shared_bytes']} | "
              f"{r['num_warps']} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "compile_report.md", "\n".join(lines) + "\n")
    _write(out / "compile_report.json", json.dumps(rows, indent=1))
    print("\n".join(lines))
    return rows


# ------------------------------------------------------------------- backbone gradients in fp16

GRAD_PRECISION_PRESETS = ("tiny", "base")
GRAD_PRECISION_GLOBAL_BATCHES = (8, 64, 512)
GRAD_PRECISION_SCENES = 8  # synth demo rooms at 0.1 m in the batch


def _backbone_parameter_gradients(model, batch: dict, upstream, autocast: bool):
    """The backbone's parameter gradients, flattened, for the loss sum(output * upstream), and
    whether the scaled backward overflowed."""
    import torch

    model.zero_grad(set_to_none=True)
    device_type = batch["feats"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        out = model(batch["coords"], batch["feats"], batch["batch_size"], batch["spatial_shape"])
    (out * upstream).sum().backward()
    overflowed = bool(model.grad_scaler.found_overflow)
    model.grad_scaler.finish_step()
    return torch.cat([p.grad.flatten().float() for p in model.parameters()]), overflowed


def grad_precision(out: Path, device: str = "cuda") -> list[dict]:
    """The SpUNet's parameter gradients under bf16 autocast (on CUDA the U-Net runs in fp16) with
    `grad_scale` none and constant (S = grad_scale_init), against fp32 on the same batch: the
    gradient at the output is a global-batch mean's (1 / voxels of the global batch), for global
    batches of 8, 64 and 512 scenes. On CPU both run in fp32 (a check of this function only)."""
    import torch

    from sparsegps.benchmarks.bench_grad_underflow import demo_batch
    from sparsegps.data import move_batch
    from sparsegps.data.transforms import TransformConfig
    from sparsegps.models.backbone import SpUNet, SpUNetConfig

    batch = move_batch(demo_batch(GRAD_PRECISION_SCENES, TransformConfig(voxel_size=0.1), seed=0), device)
    voxels = int(batch["coords"].shape[0])
    rows = []
    for preset in GRAD_PRECISION_PRESETS:
        torch.manual_seed(0)
        model = SpUNet(SpUNetConfig.preset(preset, grad_scale="constant")).to(device).train()
        scale = model.config.grad_scale_init
        direction = torch.randn(voxels, model.out_channels, device=device)
        for global_batch in GRAD_PRECISION_GLOBAL_BATCHES:
            upstream = direction / (voxels * global_batch / GRAD_PRECISION_SCENES)
            reference, _ = _backbone_parameter_gradients(model, batch, upstream, autocast=False)
            nonzero = reference != 0
            for mode in ("none", "constant"):
                model.grad_scaler.mode = mode
                grads, overflowed = _backbone_parameter_gradients(model, batch, upstream, autocast=True)
                lost = (grads == 0) & nonzero
                rows.append({"preset": preset, "global_batch": global_batch,
                             "scaling": "none" if mode == "none" else f"S={scale:g}",
                             "relative_error": float((grads - reference).norm() / reference.norm()),
                             "zero_where_fp32_nonzero_pct": 100.0 * float(lost.sum() / nonzero.sum()),
                             "overflow": overflowed})
            model.grad_scaler.mode = "constant"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU: fp32 both ways"
    lines = [f"### backbone gradients in fp16 ({where})", "",
             f"{GRAD_PRECISION_SCENES} synth demo rooms at 0.1 m ({voxels:,} voxels); loss sum(output x g), g random "
             f"/ (voxels x global batch / {GRAD_PRECISION_SCENES}); parameter gradients under bf16 autocast (U-Net in "
             "fp16) against fp32 on the same batch.", "",
             "| preset | global batch | scaling | relative error | zero where fp32 is not (%) | overflow |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['preset']} | {r['global_batch']} | {r['scaling']} | {r['relative_error']:.3g} | "
              f"{r['zero_where_fp32_nonzero_pct']:.3g} | {r['overflow']} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "grad_precision.md", "\n".join(lines) + "\n")
    _write(out / "grad_precision.json", json.dumps(rows, indent=1))
    print("\n".join(lines))
    return rows


# ---------------------------------------------------------------------------------- report

def _write(path: Path, text: str) -> None:
    from sparsegps.files import atomic_write_text

    atomic_write_text(path, text)


def write_report(out: Path, done: list[Step], gpu: str, total_s: float) -> None:
    data = {"gpu": gpu, "seconds": total_s, "ok": all(s.status == "ok" for s in done),
            "steps": [asdict(s) for s in done], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write(out / "gpu_check.json", json.dumps(data, indent=1))
    verdict = "every step passed" if data["ok"] else "FAILURES"
    lines = [f"## gpu-check on {gpu}", "", f"{total_s:.0f} s in all; {verdict}.",
             "", "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in done]
    for s in done:
        lines += ["", f"### {s.name}: {s.status}", "", "```", s.tail, "```"]
        for report in s.reports:
            if Path(report).is_file():
                lines += ["", Path(report).read_text()]
    _write(out / "gpu_check.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--compile-report", action="store_true", help="only the kernel's compile report")
    parser.add_argument("--grad-precision", action="store_true",
                        help="only the backbone's gradients under bf16 autocast, without and with scaling")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no GPU (torch.cuda.is_available() is False): nothing to check")
        return 0
    if args.compile_report:
        compile_report(args.out)
        return 0
    if args.grad_precision:
        grad_precision(args.out)
        return 0
    gpu = torch.cuda.get_device_name()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = []
    for step in steps(args.out):
        print(f"gpu-check: {step.name} ...", flush=True)
        run_step(step, logs)
        print(f"gpu-check: {step.name}: {step.status} ({step.seconds:.0f} s)", flush=True)
        done.append(step)
        write_report(args.out, done, gpu, time.perf_counter() - start)
    print(f"gpu-check: report in {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'}")
    return 0 if all(s.status == "ok" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
