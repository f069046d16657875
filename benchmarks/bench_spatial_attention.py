"""Pairwise spatial attention: the fused Triton kernel against GPS's own formulation and others.

For GPS's object-level shape (12 heads of 64 channels) at B = 64 scenes of L = 80, 256 and 1024
object slots and B = 4 scenes of L = 4096, measure forward (under no_grad), backward alone (of one
retained forward) and forward + backward (gradients for q, k, v and the gate weights) of

- eager GPS (the baseline): GPS's formulation as GPS runs it, the B x L x L x 5 pair features and
  the B x H x L x L gate and logits materialised, under autocast in the input dtype (bf16 on CUDA),
- eager fp32 reference: `reference_spatial_attention`, the same materialised in fp32,
- torch.compile GPS: the baseline through `torch.compile`,
- FlexAttention: `torch.nn.attention.flex_attention` (compiled) with a score_mod that computes
  the same gate from captured centers and weights, and a block mask for the padded keys (the mask
  and the per-scene max distance are built outside the timed call; their time is reported),
- Triton kernel: `sparsegps.kernels.spatial_attention` (max_dist included in every call),
- Triton kernel, CUDA graph: the same call captured once and replayed (CUDA only),

as seconds per call, scenes/s and peak memory. Scene i of a batch has between L/2 and L real
objects (the first scene all L), the rest is padding. Ratios are the baseline's time over each
method's at the same size and mode (above 1: faster than eager GPS). On CUDA every call is timed
by `triton.testing.do_bench` (CUDA events, L2 cache flushed before each call, median).

On CPU the kernel runs only in --quick mode, under the Triton interpreter (TRITON_INTERPRET=1 is
set here when the kernels have not been imported yet): interpreter timings mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.memory import memory_method, peak_memory
from sparsegps.benchmarks.report import Result, finish, ratio, target
from sparsegps.benchmarks.timing import synchronize, time_call
from sparsegps.models.spatial_attention import pairwise_features, reference_spatial_attention, valid_object_mask
from sparsegps.spatial_attention_spec import GATE_FLOOR, PAIR_EPS

NAME = "attention"
EAGER = "eager GPS"
FP32, COMPILED, FLEX = "eager fp32 reference", "torch.compile GPS", "FlexAttention"
KERNEL, GRAPH = "Triton kernel", "Triton kernel, CUDA graph"
METHODS = (EAGER, FP32, COMPILED, FLEX, KERNEL, GRAPH)
METHOD_FLAGS = {"eager": EAGER, "fp32": FP32, "compile": COMPILED, "flex": FLEX, "triton": KERNEL, "graph": GRAPH}
MODES = ("forward", "backward", "train")
DEFAULT_SIZES = ("64x80", "64x256", "64x1024", "4x4096")
QUICK_SIZES = ("2x20", "2x40")
# Speed targets (forward + backward vs eager GPS) by scene length, and vs FlexAttention.
SPEEDUP_TARGETS = {80: 3.0, 1024: 10.0}
FLEX_TARGET = 1.3
MEMORY_TARGET_LENGTH, MEMORY_TARGET = 1024, 0.2  # kernel peak memory / eager peak memory, at most
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--sizes", nargs="+", default=None,
                        help=f"BATCHxLENGTH pairs (default {' '.join(DEFAULT_SIZES)}; quick {' '.join(QUICK_SIZES)})")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 12; quick 2)")
    parser.add_argument("--head-dim", type=int, default=None, help="channels per head (default 64; quick 16)")
    parser.add_argument("--gate", choices=("cond", "mul"), default="cond",
                        help="spatial gate: per-query weights (GPS default) or shared weights")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="q/k/v dtype (default bf16 on cuda, fp32 on cpu: the interpreter has no bf16 matmul)")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHOD_FLAGS), default=list(METHOD_FLAGS),
                        help="what to measure (eager GPS is always measured: it is the baseline)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="forward: no_grad; backward: backward of one retained forward; train: both")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")


def parse_size(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --sizes takes BATCHxLENGTH pairs such as 64x80, got {text!r}") from None
    if batch < 1 or length < 1:
        raise SystemExit(f"error: --sizes needs positive batch and length, got {text!r}")
    return batch, length


# ---------------------------------------------------------------------------------------- inputs

def make_problem(batch: int, length: int, heads: int, head_dim: int, gate: str, dtype: torch.dtype,
                 device: str, seed: int) -> dict:
    """Random q, k, v, centers in a 10 m room, gate weights and key lengths for one size."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    q, k, v, grad_out = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(4))
    centers = torch.rand(batch, length, 3, generator=gen) * torch.tensor([10.0, 8.0, 3.0])
    if gate == "cond":
        weights = torch.randn(batch, length, heads, 6, generator=gen)
    else:
        weights = torch.randn(heads, 6, generator=gen) * 0.5 + torch.tensor([0.5, 0, 0, 0, 0, 0])
    key_lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=gen)
    key_lengths[0] = length
    problem = {"q": q, "k": k, "v": v, "weights": weights, "grad_out": grad_out}
    problem = {name: t.to(device=device, dtype=dtype) for name, t in problem.items()}
    problem.update(centers=centers.to(device), key_lengths=key_lengths.to(device))
    return problem


# ---------------------------------------------------------------------------------------- methods

def gps_spatial_attention(q, k, v, centers, weights, key_lengths, mode="cond"):
    """GPS's MultiHeadAttentionSpatial as GPS computes it: pair features in fp32, then the gate,
    logits and softmax materialised in whatever dtype autocast gives (the benchmark runs it under
    autocast in the input dtype). Same result as the reference up to that precision."""
    features = pairwise_features(centers, key_lengths)
    w = weights
    if mode == "cond":
        z = torch.einsum("bihm,bijm->bhij", w[..., 1:], features.to(w.dtype)) + w[..., 0].transpose(1, 2)[..., None]
        gate = torch.sigmoid(z)
    else:
        z = torch.einsum("hm,bijm->bhij", w[:, 1:], features.to(w.dtype)) + w[:, 0][None, :, None, None]
        gate = torch.relu(z)
    logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits + torch.log(torch.clamp(gate, min=GATE_FLOOR))
    key_valid = valid_object_mask(key_lengths, q.shape[2])
    has_keys = key_valid.any(dim=1)
    attend = key_valid | ~has_keys[:, None]
    probs = torch.softmax(logits.masked_fill(~attend[:, None, None, :], float("-inf")), dim=-1)
    return torch.matmul((probs * has_keys[:, None, None, None]).to(v.dtype), v)


def with_autocast(fn: Callable, device: str, dtype: torch.dtype) -> Callable:
    """fn under autocast in `dtype` (GPS trains under autocast); plain fn for fp32 inputs."""
    if dtype == torch.float32:
        return fn

    def call(*args, **kwargs):
        with torch.autocast(device, dtype=dtype):
            return fn(*args, **kwargs)
    return call


def load_kernel(device: str, quick: bool) -> tuple[Callable | None, str | None]:
    """The kernel's entry point, or None and why it is not measured."""
    if device == "cpu":
        if not quick:
            return None, "Triton kernel on CPU runs only in --quick mode (Triton interpreter)"
        if "sparsegps.kernels.spatial_attention" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module("sparsegps.kernels.spatial_attention")
    except ImportError as e:
        return None, f"Triton kernel not measured: {e}"
    if device == "cpu" and not module.INTERPRETED:
        return None, ("Triton kernel not measured: imported in this process without TRITON_INTERPRET=1, so it "
                      "cannot run on CPU")
    return module.spatial_attention, None


def chunked_max_pair_distance(centers: torch.Tensor, key_lengths: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """max over valid pairs of sqrt(|c_i - c_j|^2 + eps) per scene, O(B * chunk * L) memory."""
    length = centers.shape[1]
    valid = torch.arange(length, device=centers.device)[None, :] < key_lengths[:, None]
    best = torch.zeros(centers.shape[0], device=centers.device)
    for start in range(0, length, chunk):
        sq = torch.cdist(centers[:, start:start + chunk], centers).square()
        pair_valid = valid[:, start:start + chunk, None] & valid[:, None, :]
        best = torch.maximum(best, sq.masked_fill(~pair_valid, 0.0).flatten(1).amax(dim=1))
    return torch.sqrt(best + PAIR_EPS)


def make_flex_attention(problem: dict, gate: str, compiled: bool) -> tuple[Callable, float]:
    """flex_attention with the spatial gate as a score_mod over captured centers and weights, and
    the seconds its block mask took to build (here, outside the timed call, like the per-scene max
    distance)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    centers, key_lengths = problem["centers"], problem["key_lengths"]
    batch, length = centers.shape[:2]
    inv_max_dist = 1.0 / chunked_max_pair_distance(centers, key_lengths)
    log_floor = math.log(GATE_FLOOR)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < key_lengths[b]

    synchronize(centers.device)
    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod, batch, None, length, length, device=centers.device)
    synchronize(centers.device)
    setup_seconds = time.perf_counter() - start
    attend = torch.compile(flex_attention) if compiled else flex_attention

    def call(q, k, v, centers, weights, _key_lengths, mode):  # padding comes from block_mask
        def gate_weight(b, h, q_idx, m):
            return weights[b, q_idx, h, m] if gate == "cond" else weights[h, m]

        def score_mod(score, b, h, q_idx, kv_idx):
            dx = centers[b, q_idx, 0] - centers[b, kv_idx, 0]
            dy = centers[b, q_idx, 1] - centers[b, kv_idx, 1]
            dz = centers[b, q_idx, 2] - centers[b, kv_idx, 2]
            sq_xy = dx * dx + dy * dy + PAIR_EPS
            dist = torch.sqrt(sq_xy + dz * dz)
            dist_xy = torch.sqrt(sq_xy)
            z = (gate_weight(b, h, q_idx, 0) + gate_weight(b, h, q_idx, 1) * dist * inv_max_dist[b]
                 + gate_weight(b, h, q_idx, 2) * dz / dist + gate_weight(b, h, q_idx, 3) * dist_xy / dist
                 + gate_weight(b, h, q_idx, 4) * dy / dist_xy + gate_weight(b, h, q_idx, 5) * dx / dist_xy)
            if gate == "cond":
                log_gate = torch.nn.functional.logsigmoid(z)
            else:
                log_gate = torch.log(torch.clamp(z, min=GATE_FLOOR))
            return score + torch.clamp(log_gate, min=log_floor)

        if compiled:
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)
        with warnings.catch_warnings():  # eager flex_attention warns that it materialises the scores
            warnings.simplefilter("ignore", UserWarning)
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return call, setup_seconds


# ------------------------------------------------------------------------------------------- run

def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower() or \
        "can't allocate memory" in str(error).lower()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _problem_step(fn: Callable, problem: dict, gate: str, mode: str, grad_weights: bool):
    """The call to time for `mode` and the tensors whose gradients reset between calls."""
    names = ("q", "k", "v", "weights")
    if mode == "forward":
        def forward():
            with torch.no_grad():
                fn(problem["q"], problem["k"], problem["v"], problem["centers"], problem["weights"],
                   problem["key_lengths"], mode=gate)
        return forward, []
    inputs = {n: problem[n].detach().clone().requires_grad_(n != "weights" or grad_weights) for n in names}

    def forward_with_grad():
        return fn(inputs["q"], inputs["k"], inputs["v"], problem["centers"], inputs["weights"],
                  problem["key_lengths"], mode=gate)
    leaves = [t for t in inputs.values() if t.requires_grad]
    if mode == "backward":
        out = forward_with_grad()

        def backward():
            out.backward(problem["grad_out"], retain_graph=True)
        return backward, leaves

    def train():
        forward_with_grad().backward(problem["grad_out"])
    return train, leaves


def _cuda_graph_step(step: Callable, leaves: list[torch.Tensor]) -> Callable:
    """`step` captured once in a CUDA graph (after warm-up on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _time(step: Callable, leaves: list[torch.Tensor], args) -> dict:
    """Median time of `step`: do_bench (CUDA events, L2 flushed) on CUDA, wall clock on CPU."""
    if args.device == "cuda":
        import triton.testing

        median, low, high = triton.testing.do_bench(step, warmup=25, rep=max(100, 10 * args.repeats),
                                                    grad_to_none=leaves or None, quantiles=[0.5, 0.2, 0.8])
        return {"seconds": median / 1e3, "seconds_p20": low / 1e3, "seconds_p80": high / 1e3,
                "timer": "triton.testing.do_bench"}

    def fresh_step():
        for t in leaves:
            t.grad = None
        step()
    return time_call(fresh_step, repeats=args.repeats, warmup=args.warmup, device=args.device).to_dict()


def measure(fn: Callable, problem: dict, gate: str, mode: str, args, grad_weights: bool = True,
            cuda_graph: bool = False) -> dict:
    """Timing and peak memory of one method at one size in one mode."""
    step, leaves = _problem_step(fn, problem, gate, mode, grad_weights)
    if cuda_graph:
        step = _cuda_graph_step(step, leaves)
    row = _time(step, leaves, args)
    row["peak_memory_mb"] = None if args.no_memory else peak_memory(step, args.device) / 2**20
    return row


def run(args: argparse.Namespace) -> dict:
    resolve_common(args, repeats=10, warmup=3)
    device = args.device
    sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
    heads = args.heads or (2 if args.quick else 12)
    head_dim = args.head_dim or (16 if args.quick else 64)
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    wanted = {METHOD_FLAGS[m] for m in args.methods} | {EAGER}
    machine = machine_info(device)
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="eager GPS formulation (autocast in the input dtype) at the same size and mode")
    result.config.update(sizes=[f"{b}x{n}" for b, n in sizes], heads=heads, head_dim=head_dim, dtype=dtype_name)

    methods: dict[str, Callable | None] = {EAGER: with_autocast(gps_spatial_attention, device, dtype)}
    if FP32 in wanted:
        methods[FP32] = reference_spatial_attention  # fp32 inside; its inputs are cast below
    if COMPILED in wanted:
        if device == "cpu" and args.quick:
            result.notes.append("torch.compile GPS skipped in --quick mode on CPU (compile time)")
        else:
            methods[COMPILED] = with_autocast(torch.compile(gps_spatial_attention, dynamic=False), device, dtype)
    if FLEX in wanted:
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
            methods[FLEX] = None  # built per size: the score_mod captures that size's tensors
        except ImportError:
            result.notes.append(f"FlexAttention not measured: torch {torch.__version__} has no flex_attention")
    if KERNEL in wanted or GRAPH in wanted:
        kernel, why_not = load_kernel(device, args.quick)
        if kernel is not None:
            if KERNEL in wanted:
                methods[KERNEL] = kernel
            if GRAPH in wanted and device == "cuda":
                methods[GRAPH] = kernel
            elif GRAPH in wanted:
                result.notes.append("CUDA-graph variant needs CUDA: not measured")
        else:
            result.notes.append(why_not)
    flex_compiled = not (device == "cpu" and args.quick)
    flex_without_weight_grad = False

    rows = []
    progress = tqdm(total=len(sizes) * len(args.modes) * len(methods), desc=NAME, unit="measurement", leave=False)
    for batch, length in sizes:
        torch._dynamo.reset()  # compiled methods recompile per size anyway; stay clear of the recompile limit
        problem = make_problem(batch, length, heads, head_dim, args.gate, dtype, device, args.seed)
        fp32_problem = {n: (t.float() if t.is_floating_point() else t) for n, t in problem.items()}
        for method, fn in methods.items():
            for mode in args.modes:
                row = {"method": method, "batch": batch, "length": length, "mode": mode, "status": "ok"}
                if method == GRAPH and mode == "backward":
                    progress.update()
                    continue  # a captured graph replays the forward with the backward
                inputs = fp32_problem if method == FP32 else problem
                try:
                    if method == FLEX:  # its score_mod captures this size's tensors
                        fn, row["setup_seconds"] = make_flex_attention(problem, args.gate, compiled=flex_compiled)
                    try:
                        row.update(measure(fn, inputs, args.gate, mode, args,
                                           grad_weights=not (method == FLEX and flex_without_weight_grad),
                                           cuda_graph=method == GRAPH))
                    except Exception as e:  # noqa: BLE001  (FlexAttention's gradient support varies)
                        if method != FLEX or mode == "forward" or flex_without_weight_grad or is_out_of_memory(e):
                            raise
                        try:  # again without the gradient of the captured gate weights
                            row.update(measure(fn, problem, args.gate, mode, args, grad_weights=False))
                        except Exception:  # noqa: BLE001
                            raise e from None
                        flex_without_weight_grad = True
                        result.notes.append("FlexAttention could not differentiate its captured gate weights "
                                            f"({type(e).__name__}): its train rows leave that gradient out")
                except Exception as e:  # noqa: BLE001  (an OOM or unsupported case is a result, not a crash)
                    why = str(e).strip().split("\n")[0].split(". ")[0]
                    row["status"] = "OOM" if is_out_of_memory(e) else f"failed: {type(e).__name__}: {why}"[:120]
                    row.update(seconds=None, peak_memory_mb=None)
                free_memory(device)
                rows.append(row)
                progress.update()
        del problem, fp32_problem
        free_memory(device)
    progress.close()

    for row in rows:
        base = next(r for r in rows if r["method"] == EAGER and r["length"] == row["length"]
                    and r["batch"] == row["batch"] and r["mode"] == row["mode"])
        measured = row["seconds"] is not None
        row["scenes_per_s"] = row["batch"] / row["seconds"] if measured else None
        row["ratio_vs_baseline"] = ratio(base["seconds"], row["seconds"]) if measured and base["seconds"] else None
        row["label"] = f"{row['method']} B={row['batch']} L={row['length']}"
    result.rows = rows
    result.targets = speed_targets(rows, args.quick)
    result.notes += [
        f"{heads} heads x {head_dim} channels, gate '{args.gate}', inputs in {dtype_name} (the fp32 reference gets "
        "them in fp32); scene b has between L/2 and L real objects (scene 0 all L)",
        "train: forward + backward with gradients for q, k, v and the gate weights (not the centers); backward: "
        "the backward alone of one retained forward",
        "timer: " + ("triton.testing.do_bench (CUDA events, L2 flushed before each call), median" if device == "cuda"
                     else "wall clock, median of the repeats"),
        f"peak memory: {memory_method(device)}",
        "status OOM: the method ran out of memory at that size (no time recorded)",
    ]
    if args.quick:
        result.notes.append("--quick: tiny sizes, a smoke test of the benchmark; its times and target checks mean "
                            "nothing")
    if FLEX in methods:
        result.notes.append(f"FlexAttention: {'compiled' if flex_compiled else 'eager (--quick on CPU)'} "
                            "flex_attention; its block mask (setup_seconds) and per-scene max distance are built "
                            "outside the timed call (in its favour)")
    return finish(result, machine, ["method", "batch", "length", "mode", "status", "seconds", "scenes_per_s",
                                    "peak_memory_mb", "ratio_vs_baseline", "setup_seconds"], args.out, plot=_plot)


def speed_targets(rows: list[dict], quick: bool) -> list[dict]:
    """The speed and memory claims, checked where both sides were measured.

    In --quick mode the length targets are checked at the shortest and longest quick lengths
    (their numbers mean nothing there, the check only exercises the report).
    """
    def find(method, length, mode):
        return next((r for r in rows if r["method"] == method and r["length"] == length and r["mode"] == mode
                     and r["seconds"] is not None), None)

    lengths = sorted({r["length"] for r in rows})
    if quick:
        checks = [(lengths[0], SPEEDUP_TARGETS[80]), (lengths[-1], SPEEDUP_TARGETS[1024])]
    else:
        checks = list(SPEEDUP_TARGETS.items())
    targets = []
    for length, wanted in checks:
        kernel = find(KERNEL, length, "train")
        if kernel is not None and kernel["ratio_vs_baseline"] is not None:
            targets.append(target(f"Triton kernel fwd+bwd vs eager GPS, L={length}",
                                  kernel["ratio_vs_baseline"], wanted))
    for length in lengths:
        kernel, flex = find(KERNEL, length, "train"), find(FLEX, length, "train")
        if kernel is not None and flex is not None:
            targets.append(target(f"Triton kernel fwd+bwd vs FlexAttention, L={length}",
                                  ratio(flex["seconds"], kernel["seconds"]), FLEX_TARGET))
    memory_length = lengths[-1] if quick else MEMORY_TARGET_LENGTH
    kernel, eager = find(KERNEL, memory_length, "train"), find(EAGER, memory_length, "train")
    if kernel and eager and kernel["peak_memory_mb"] is not None and eager["peak_memory_mb"]:
        targets.append(target(f"Triton kernel fwd+bwd peak memory / eager GPS's, L={memory_length}",
                              kernel["peak_memory_mb"] / eager["peak_memory_mb"], MEMORY_TARGET,
                              higher_is_better=False))
    return targets


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["seconds"] is not None]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(6 * max(len(modes), 1), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for index, method in enumerate(METHODS):
            pts = sorted((r["length"], 1e3 * r["seconds"] / r["batch"]) for r in rows
                         if r["method"] == method and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=f"C{index}",
                        linestyle="--" if method == EAGER else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("object slots per scene (L)")
        ax.set_ylabel("milliseconds per scene (lower is better)")
        ax.set_title({"forward": "forward (no_grad)", "backward": "backward", "train": "forward + backward"}[mode])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
