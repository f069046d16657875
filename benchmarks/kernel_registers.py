"""Registers and spills of the spatial-attention kernels, compiled for a GPU that need not be here.

`python -m sparsegps.benchmarks.kernel_registers [--arch 90] [--dtype bf16] [--out DIR]` compiles
every kernel the launcher would use at GPS's sizes (L 80, 128, 1024; head dims 64 and 128; 12
heads) for the given compute capability with Triton's own compiler and ptxas, and reads the
cubins' resource usage (`cuobjdump --dump-resource-usage`): registers per thread and stack bytes
(local memory, i.e. spills). Runs on a CPU-only machine; says nothing about speed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = [(80, 64), (80, 128), (128, 128), (1024, 64), (1024, 128)]
NUM_HEADS = 12


def _signature(fn, dtype: str, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    ints = ("num_heads", "seq_len", "head_dim")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") or name in ints:
            signature[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = pointer_types.get(name, f"*{dtype}")
    return signature


def resource_usage(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compile `fn` for sm_<arch> and return its registers and stack (spill) bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"Centers": "*fp32", "Lengths": "*i64", "InvMaxDist": "*fp32", "Lse": "*fp32", "Delta": "*fp32"}
    source = ASTSource(fn, _signature(fn, dtype, pointers, constexprs), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return {"registers": int(registers.group(1)), "stack_bytes": int(stack.group(1)) if stack else 0}


def report(arch: int, dtype: str, sizes=SIZES) -> list[dict]:
    kernels = importlib.import_module("sparsegps.kernels.spatial_attention")
    if not kernels.INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    rows = []
    for length, head_dim in sizes:
        configs = kernels.launch_configs(length, head_dim, NUM_HEADS)
        common = dict(IS_COND=True, FAST_LOG2=True, DOT_PRECISION="tf32", BLOCK_D=max(16, head_dim))
        if configs.small:
            plan = [("small forward", kernels._small_forward_kernel, configs.forward, {}),
                    ("small backward", kernels._small_backward_kernel, configs.backward_dq,
                     dict(NEED_GRAD_Q=True, NEED_GRAD_KV=True, NEED_GRAD_W=True))]
        else:
            plan = [("forward", kernels._forward_kernel, configs.forward, {}),
                    ("backward dK dV", kernels._backward_dkdv_kernel, configs.backward_dkdv, {}),
                    ("backward dQ dW", kernels._backward_dq_kernel, configs.backward_dq,
                     dict(NEED_GRAD_Q=True, NEED_GRAD_W=True))]
        for name, fn, tile, flags in plan:
            constexprs = dict(common, **flags, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
            if configs.small:
                constexprs["HEADS_PER_PROGRAM"] = tile.heads_per_program
            usage = resource_usage(fn, dtype, constexprs, tile.num_warps, tile.num_stages, arch)
            rows.append({"length": length, "head_dim": head_dim, "kernel": name,
                         "tile": f"{tile.block_m}x{tile.block_n}, {tile.heads_per_program} head(s), "
                                 f"{tile.num_warps} warps, {tile.num_stages} stage(s)", **usage})
    return rows


def markdown(rows: list[dict], arch: int, dtype: str) -> str:
    lines = [f"### kernel registers (sm_{arch}, {dtype}, 'cond' gate)", "",
             "| L | Dh | kernel | tile | registers | stack (spill) bytes |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['length']} | {r['head_dim']} | {r['kernel']} | {r['tile']} | {r['registers']} | "
              f"{r['stack_bytes']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel_registers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--out", type=Path, default=None, help="folder for kernel_registers.json and .md")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.dtype)
    text = markdown(rows, args.arch, args.dtype)
    print(text)
    if args.out is not None:
        from sparsegps.files import atomic_write_text

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "kernel_registers.json", json.dumps(rows, indent=1))
        atomic_write_text(args.out / "kernel_registers.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
