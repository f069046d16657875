"""The fused Triton spatial attention against the PyTorch reference, forward and backward.

Without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET=1 must be in the
environment when the kernels are decorated (at import), so this module sets it before importing
them. Should anything in the same run have imported them earlier without it, the module is
re-imported here with the interpreter on, so the tests run whatever ran before them. The interpreter cannot multiply
bf16 tiles, so CPU runs cover fp32 and fp16; tests marked `gpu` add bf16 and larger scenes where
CUDA is present.
"""
import importlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
kernel_module = importlib.import_module("sparsegps.kernels.spatial_attention")
if not ON_GPU and not kernel_module.INTERPRETED:  # imported earlier without the interpreter
    kernel_module = importlib.reload(kernel_module)

from sparsegps.models.spatial_attention import SpatialSelfAttention, reference_spatial_attention  # noqa: E402

spatial_attention = kernel_module.spatial_attention
DEVICE = "cuda" if ON_GPU else "cpu"

requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# 'mul' weight gradients carry the slope 1/z of log(relu(z)), which turns fp32 rounding of gates
# just above the kink into ~1e-4 relative error (the fp32 reference is that far from fp64 too).
MUL_WEIGHT_GRAD_TOLERANCE = 1e-3


def tolerance(name, mode, dtype):
    if name == "grad_weights" and mode == "mul":
        return max(TOLERANCE[dtype], MUL_WEIGHT_GRAD_TOLERANCE)
    return TOLERANCE[dtype]


def make_inputs(batch, heads, length, head_dim, lengths, mode, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    centers = torch.rand(batch, length, 3, generator=gen) * 4.0
    if mode == "cond":
        weights = torch.randn(batch, length, heads, 6, generator=gen)
    else:
        weights = torch.randn(heads, 6, generator=gen) * 0.5
        weights[:, 0] += 0.5  # keep a fair share of relu gates open
    grad_out = torch.randn(batch, heads, length, head_dim, generator=gen)
    inputs = {name: t.to(device=device, dtype=dtype)
              for name, t in dict(q=q, k=k, v=v, weights=weights, grad_out=grad_out).items()}
    return dict(inputs, centers=centers.to(device), key_lengths=torch.tensor(lengths, device=device))


def run_with_grads(fn, inputs, mode, as_dtype=None):
    """Forward and backward of fn; returns out and the gradients of q, k, v and weights."""
    leaves = {}
    for name in ("q", "k", "v", "weights"):
        t = inputs[name] if as_dtype is None else inputs[name].to(as_dtype)
        leaves[name] = t.detach().clone().requires_grad_(True)
    out = fn(leaves["q"], leaves["k"], leaves["v"], inputs["centers"], leaves["weights"], inputs["key_lengths"],
             mode=mode)
    grad_out = inputs["grad_out"] if as_dtype is None else inputs["grad_out"].to(as_dtype)
    out.backward(grad_out)
    return {"out": out.detach(), **{f"grad_{n}": t.grad for n, t in leaves.items()}}


def assert_close(actual, expected, tol, what):
    """max |actual - expected| within tol of the expected tensor's scale (at least 1)."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = max(1.0, expected.float().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} exceeds {tol:g} x {scale:.3g}"


def check_against_reference(batch, heads, length, head_dim, lengths, mode, dtype, seed=0):
    inputs = make_inputs(batch, heads, length, head_dim, lengths, mode, dtype, seed=seed)
    got = run_with_grads(spatial_attention, inputs, mode)
    want = run_with_grads(reference_spatial_attention, inputs, mode, as_dtype=torch.float32)
    assert got["out"].dtype == dtype and got["grad_weights"].dtype == dtype
    for name in want:
        assert_close(got[name], want[name], tolerance(name, mode, dtype), f"{name} ({mode}, {dtype}, L={length})")
    for b, n in enumerate(lengths):
        if n == 0:  # a scene without objects: zero output, no gradient
            assert torch.equal(got["out"][b], torch.zeros_like(got["out"][b]))
            assert not got["grad_q"][b].any() and not got["grad_k"][b].any()
        if n < length:  # padded keys get no gradient
            assert not got["grad_k"][b, :, n:].any() and not got["grad_v"][b, :, n:].any()


@pytest.mark.parametrize(
    "batch, heads, length, head_dim, lengths, mode, dtype",
    [
        pytest.param(2, 2, 37, 16, [37, 20], "cond", torch.float32, id="cond-L37-mixed-lengths"),
        pytest.param(2, 1, 40, 16, [40, 9], "mul", torch.float32, id="mul-L40-padded-tail-block"),
        pytest.param(1, 2, 1, 16, [1], "cond", torch.float32, id="cond-L1"),
        pytest.param(2, 1, 1, 16, [1, 0], "mul", torch.float32, id="mul-L1-empty-scene"),
        pytest.param(1, 2, 20, 64, [13], "cond", torch.float32, id="cond-Dh64"),
        pytest.param(2, 1, 33, 64, [33, 30], "mul", torch.float32, id="mul-Dh64"),
        pytest.param(1, 1, 20, 24, [20], "cond", torch.float32, id="cond-Dh24-padded-head-dim"),
        pytest.param(2, 1, 37, 16, [37, 25], "cond", torch.float16, id="cond-fp16"),
        pytest.param(2, 1, 35, 16, [35, 0], "mul", torch.float16, id="mul-fp16-empty-scene"),
    ],
)
def test_forward_and_gradients_match_reference(batch, heads, length, head_dim, lengths, mode, dtype):
    check_against_reference(batch, heads, length, head_dim, lengths, mode, dtype)


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_padded_slots_have_no_influence(mode):
    """Junk in padded q/k/v/centers/weights changes nothing about the real objects, bit for bit."""
    length, n = 40, 9
    inputs = make_inputs(2, 1, length, 16, [length, n], mode, torch.float32, seed=1)
    inputs["grad_out"][1, :, n:] = 0  # padded query rows carry no loss
    first = run_with_grads(spatial_attention, inputs, mode)

    gen = torch.Generator().manual_seed(7)
    junk = lambda t: (torch.randn(t.shape, generator=gen) * 50).to(t)  # noqa: E731
    for name in ("q", "k", "v"):
        inputs[name][1, :, n:] = junk(inputs[name][1, :, n:])
    inputs["centers"][1, n:] = junk(inputs["centers"][1, n:])
    if mode == "cond":
        inputs["weights"][1, n:] = junk(inputs["weights"][1, n:])
    second = run_with_grads(spatial_attention, inputs, mode)

    assert torch.equal(first["out"][0], second["out"][0])
    assert torch.equal(first["out"][1, :, :n], second["out"][1, :, :n])
    for name in ("grad_q", "grad_k", "grad_v"):
        assert torch.equal(first[name][1, :, :n], second[name][1, :, :n]), name
    assert not second["grad_k"][1, :, n:].any() and not second["grad_v"][1, :, n:].any()
    if mode == "cond":
        assert torch.equal(first["grad_weights"][1, :n], second["grad_weights"][1, :n])
    else:
        assert torch.equal(first["grad_weights"], second["grad_weights"])


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_bitwise_deterministic(mode):
    inputs = make_inputs(2, 1, 37, 16, [37, 21], mode, torch.float32, seed=2)
    first = run_with_grads(spatial_attention, inputs, mode)
    second = run_with_grads(spatial_attention, inputs, mode)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_layer_triton_backend_equals_reference_backend(mode):
    torch.manual_seed(3)
    reference_layer = SpatialSelfAttention(32, 2, mode=mode, backend="reference").to(DEVICE)
    triton_layer = SpatialSelfAttention(32, 2, mode=mode, backend="triton").to(DEVICE)
    triton_layer.load_state_dict(reference_layer.state_dict())
    x = torch.randn(2, 20, 32, device=DEVICE)
    centers = torch.rand(2, 20, 3, device=DEVICE) * 5
    lengths = torch.tensor([20, 11], device=DEVICE)
    outs = []
    for layer in (reference_layer, triton_layer):
        out = layer(x, centers, lengths)
        out.square().mean().backward()
        outs.append(out.detach())
    assert_close(outs[1], outs[0], 1e-4, f"layer output ({mode})")
    for (name, ref_param), tri_param in zip(reference_layer.named_parameters(), triton_layer.parameters()):
        tol = MUL_WEIGHT_GRAD_TOLERANCE if name == "gate_weights" else 1e-4
        assert_close(tri_param.grad, ref_param.grad, tol, f"grad of {name} ({mode})")


def test_rejects_bad_inputs():
    inputs = make_inputs(1, 2, 8, 16, [8], "cond", torch.float32)
    with pytest.raises(ValueError, match="centers"):
        spatial_attention(inputs["q"], inputs["k"], inputs["v"], inputs["centers"][:, :4], inputs["weights"],
                          inputs["key_lengths"])
    big = torch.zeros(1, 1, 4, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        spatial_attention(big, big, big, torch.zeros(1, 4, 3, device=DEVICE), torch.zeros(1, 4, 1, 6, device=DEVICE),
                          torch.tensor([4], device=DEVICE))


# ---------------------------------------------------------------------------------------------
# The two paths (small L: one key tile, several heads per program; long L: tiled), the op
# registration, launches and needs_input_grad
# ---------------------------------------------------------------------------------------------

SMALL_L_CASES = [
    pytest.param(2, 4, 1, 16, [1, 0], "cond", id="L1-empty-scene"),
    pytest.param(2, 4, 7, 16, [7, 3], "mul", id="L7-mixed"),
    pytest.param(2, 4, 80, 64, [80, 23], "cond", id="L80-Dh64-cond"),
    pytest.param(2, 6, 80, 16, [61, 80], "mul", id="L80-H6-mul"),
    pytest.param(2, 3, 128, 128, [128, 70], "cond", id="L128-Dh128-H3"),
    pytest.param(1, 4, 128, 16, [100], "mul", id="L128-mul"),
]


@pytest.mark.parametrize("batch, heads, length, head_dim, lengths, mode", SMALL_L_CASES)
def test_small_l_path_matches_reference(batch, heads, length, head_dim, lengths, mode):
    configs = kernel_module.launch_configs(length, head_dim, heads)
    assert configs.small and configs.forward.block_n >= length
    check_against_reference(batch, heads, length, head_dim, lengths, mode, torch.float32, seed=length)


@pytest.mark.parametrize("heads_forward, heads_backward", [(1, 1), (2, 2), (4, 1), (4, 4)])
def test_heads_per_program_do_not_change_results(monkeypatch, heads_forward, heads_backward):
    """Every grouping of heads into programs gives the reference's result, bit-identical to one
    head per program."""
    inputs = make_inputs(2, 4, 20, 16, [20, 9], "cond", torch.float32, seed=11)
    real = kernel_module.launch_configs

    def grouped(forward, backward):
        def configs(seq_len, head_dim, num_heads):
            base = real(seq_len, head_dim, num_heads)
            return kernel_module.LaunchConfigs(
                True, kernel_module.TileConfig(16, base.forward.block_n, 1, 1, forward), base.backward_dkdv,
                kernel_module.TileConfig(16, base.forward.block_n, 1, 1, backward))
        return configs

    monkeypatch.setattr(kernel_module, "launch_configs", grouped(1, 1))
    single = run_with_grads(spatial_attention, inputs, "cond")
    monkeypatch.setattr(kernel_module, "launch_configs", grouped(heads_forward, heads_backward))
    got = run_with_grads(spatial_attention, inputs, "cond")
    want = run_with_grads(reference_spatial_attention, inputs, "cond")
    for name in want:
        assert torch.equal(got[name], single[name]), name
        assert_close(got[name], want[name], 1e-4, name)


@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_long_path_matches_reference(mode):
    """Past 128 objects the tiled FlashAttention-style kernels run (several key and query tiles)."""
    assert not kernel_module.launch_configs(150, 16, 2).small
    check_against_reference(2, 2, 150, 16, [150, 77], mode, torch.float32, seed=12)


def test_lengths_are_clamped_in_the_kernel_for_any_integer_dtype():
    inputs = make_inputs(3, 2, 12, 16, [12, 5, 0], "cond", torch.float32, seed=13)
    want = run_with_grads(spatial_attention, inputs, "cond")
    for raw in (torch.tensor([40, 5, -3], dtype=torch.int64), torch.tensor([12, 5, 0], dtype=torch.int32)):
        got = run_with_grads(spatial_attention, dict(inputs, key_lengths=raw.to(DEVICE)), "cond")
        for name in want:
            assert torch.equal(got[name], want[name]), (name, raw.dtype)


def test_cond_weights_are_read_through_their_strides():
    """A [B, L, H, 6] view that is not contiguous (as a permute leaves it) gives the same result."""
    inputs = make_inputs(2, 3, 10, 16, [10, 6], "cond", torch.float32, seed=14)
    strided = inputs["weights"].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    assert not strided.is_contiguous() and torch.equal(strided, inputs["weights"])
    want = run_with_grads(spatial_attention, inputs, "cond")
    got = run_with_grads(spatial_attention, dict(inputs, weights=strided), "cond")
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_inverse_max_distance_kernel_matches_reference_and_can_be_shared():
    from sparsegps.models.spatial_attention import inverse_max_pair_distance as reference_inverse

    gen = torch.Generator().manual_seed(15)
    centers = (torch.rand(4, 70, 3, generator=gen) * 9).to(DEVICE)
    lengths = torch.tensor([70, 33, 1, 0], device=DEVICE)
    got = kernel_module.inverse_max_pair_distance(centers, lengths)
    want = reference_inverse(centers, lengths)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    assert got[3] == 1.0  # a scene without objects

    inputs = make_inputs(2, 2, 9, 16, [9, 4], "mul", torch.float32, seed=16)
    shared = kernel_module.inverse_max_pair_distance(inputs["centers"], inputs["key_lengths"])
    with_shared = lambda *a, **kw: spatial_attention(*a, **kw, inv_max_dist=shared)  # noqa: E731
    for name, value in run_with_grads(with_shared, inputs, "mul").items():
        assert torch.equal(value, run_with_grads(spatial_attention, inputs, "mul")[name]), name


class _LaunchLog:
    """Counts the launches of the module's kernels by name."""

    NAMES = ("_inverse_max_distance_kernel", "_small_forward_kernel", "_small_backward_kernel", "_forward_kernel",
             "_backward_preprocess_kernel", "_backward_dkdv_kernel", "_backward_dq_kernel")

    def __init__(self, monkeypatch):
        self.launches = []
        for name in self.NAMES:
            monkeypatch.setattr(kernel_module, name, self._counting(name, getattr(kernel_module, name)))

    def _counting(self, name, kernel):
        log = self.launches

        class Counting:
            def __getitem__(self, grid):
                log.append(name)
                return kernel[grid]
        return Counting()


def test_small_l_launches_one_kernel_per_direction(monkeypatch):
    log = _LaunchLog(monkeypatch)
    inputs = make_inputs(2, 4, 80, 16, [80, 31], "cond", torch.float32, seed=17)
    shared = kernel_module.inverse_max_pair_distance(inputs["centers"], inputs["key_lengths"])
    assert log.launches == ["_inverse_max_distance_kernel"]
    log.launches.clear()
    with_shared = lambda *a, **kw: spatial_attention(*a, **kw, inv_max_dist=shared)  # noqa: E731
    run_with_grads(with_shared, inputs, "cond")
    assert log.launches == ["_small_forward_kernel", "_small_backward_kernel"]


def test_only_the_gradients_asked_for_are_computed(monkeypatch):
    """ctx.needs_input_grad reaches the kernels: no dK/dV kernel when only q and weights train."""
    inputs = make_inputs(1, 2, 140, 16, [140], "cond", torch.float32, seed=18)
    want = run_with_grads(reference_spatial_attention, inputs, "cond")
    log = _LaunchLog(monkeypatch)
    q = inputs["q"].clone().requires_grad_(True)
    weights = inputs["weights"].clone().requires_grad_(True)
    k, v = inputs["k"].clone(), inputs["v"].clone().requires_grad_(False)
    out = spatial_attention(q, k, v, inputs["centers"], weights, inputs["key_lengths"])
    out.backward(inputs["grad_out"])
    assert "_backward_dkdv_kernel" not in log.launches and "_backward_dq_kernel" in log.launches
    assert_close(q.grad, want["grad_q"], 1e-4, "grad_q")
    assert_close(weights.grad, want["grad_weights"], 1e-4, "grad_weights")

    log.launches.clear()
    k = inputs["k"].clone().requires_grad_(True)
    out = spatial_attention(inputs["q"], k, inputs["v"], inputs["centers"], inputs["weights"], inputs["key_lengths"])
    out.backward(inputs["grad_out"])
    assert "_backward_dq_kernel" not in log.launches and "_backward_dkdv_kernel" in log.launches
    assert_close(k.grad, want["grad_k"], 1e-4, "grad_k")


@pytest.mark.parametrize("mode, length", [("cond", 6), ("mul", 6), pytest.param("cond", 130, marks=pytest.mark.slow)])
def test_custom_ops_pass_opcheck(mode, length):
    """Schema, fake (meta) implementations, autograd registration and AOT tracing of the ops; at
    130 objects the backward runs the tiled kernels."""
    inputs = make_inputs(2, 2 if length <= 128 else 1, length, 16, [length, 3], mode, torch.float32, seed=19)
    q, k, v = (inputs[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    weights = inputs["weights"].clone().requires_grad_(True)
    centers, lengths = inputs["centers"], inputs["key_lengths"]
    inv_max_dist = kernel_module.inverse_max_pair_distance(centers, lengths)
    torch.library.opcheck(torch.ops.sparsegps.inverse_max_pair_distance.default, (centers, lengths))
    torch.library.opcheck(torch.ops.sparsegps.spatial_attention_forward.default,
                          (q, k, v, centers, weights, lengths, inv_max_dist, mode == "cond"))
    out, lse = torch.ops.sparsegps.spatial_attention_forward(q, k, v, centers, weights, lengths, inv_max_dist,
                                                             mode == "cond")
    torch.library.opcheck(torch.ops.sparsegps.spatial_attention_backward.default,
                          (inputs["grad_out"], q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), centers,
                           weights.detach(), lengths, inv_max_dist, mode == "cond", True, True, True))


def test_layer_compiles_as_one_graph():
    """torch.compile captures the layer, kernels included, without graph breaks."""
    torch.manual_seed(20)
    layer = SpatialSelfAttention(32, 4, mode="cond", backend="triton").to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE)
    centers = torch.rand(2, 12, 3, device=DEVICE) * 5
    lengths = torch.tensor([12, 5], device=DEVICE)
    want = layer(x, centers, lengths)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x, centers, lengths)
    assert torch.equal(got, want)
    got.square().sum().backward()
    assert layer.q_proj.weight.grad is not None and torch.isfinite(layer.q_proj.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# Native GPU runs: half precision, GPS-sized and longer scenes
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["cond", "mul"])
@pytest.mark.parametrize("length, lengths", [(80, [80, 37, 1, 0]), (300, [300, 129, 64, 5])])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_matches_reference(dtype, mode, length, lengths, head_dim):
    check_against_reference(4, 3, length, head_dim, lengths, mode, dtype, seed=4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_gpu_bitwise_deterministic_bf16(mode):
    inputs = make_inputs(4, 4, 300, 64, [300, 200, 17, 0], mode, torch.bfloat16, seed=5)
    first = run_with_grads(spatial_attention, inputs, mode)
    second = run_with_grads(spatial_attention, inputs, mode)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["cond", "mul"])
def test_gpu_layer_bf16_autocast_matches_reference(mode):
    torch.manual_seed(6)
    reference_layer = SpatialSelfAttention(768, 12, mode=mode, backend="reference").cuda()
    triton_layer = SpatialSelfAttention(768, 12, mode=mode, backend="triton").cuda()
    triton_layer.load_state_dict(reference_layer.state_dict())
    x = torch.randn(4, 80, 768, device="cuda")
    centers = torch.rand(4, 80, 3, device="cuda") * 5
    lengths = torch.tensor([80, 50, 3, 0], device="cuda")
    want = reference_layer(x, centers, lengths)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = triton_layer(x, centers, lengths)
    assert_close(got, want, TOLERANCE[torch.bfloat16], f"layer output under bf16 autocast ({mode})")


def test_benchmark_quick_run_reports_kernel_and_baselines(tmp_path):
    """The benchmark's smoke mode measures the kernel against eager GPS and the fp32 reference in
    all three modes and writes its files; ratios are against eager GPS."""
    import json

    from sparsegps.benchmarks import bench_spatial_attention

    bench_spatial_attention.main(["--quick", "--device", DEVICE, "--sizes", "1x20", "--methods", "fp32", "triton",
                                  "--no-memory", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "attention.json").read_text())
    assert (tmp_path / "attention.md").read_text().startswith("### attention")
    assert data["benchmark"] == "attention" and data["machine"]["summary"]
    rows = {(r["method"], r["mode"]): r for r in data["rows"]}
    methods = ("eager GPS", "eager fp32 reference", "Triton kernel")
    assert set(rows) == {(m, mode) for m in methods for mode in ("forward", "backward", "train")}
    for (method, mode), row in rows.items():
        assert row["status"] == "ok" and row["seconds"] > 0
        base = rows[("eager GPS", mode)]
        assert row["ratio_vs_baseline"] == pytest.approx(base["seconds"] / row["seconds"])
    assert [t["name"] for t in data["targets"]] == ["Triton kernel fwd+bwd vs eager GPS, L=20"] * 2


def test_gps_formulation_baseline_matches_reference():
    """The benchmark's baseline computes what the reference computes (fp32 inputs: no autocast)."""
    from sparsegps.benchmarks.bench_spatial_attention import gps_spatial_attention

    for mode in ("cond", "mul"):
        inputs = make_inputs(2, 3, 11, 16, [11, 4], mode, torch.float32, seed=21)
        got = run_with_grads(gps_spatial_attention, inputs, mode)
        want = run_with_grads(reference_spatial_attention, inputs, mode)
        for name in want:
            assert_close(got[name], want[name], 1e-5, f"{name} ({mode})")
