"""Gradient scaling through the sparse U-Net: exact in fp32, recovers what an fp16 backward flushes,
skips the backbone's step on an overflow and adapts its scale, survives checkpoints; LAMB is
refused under ZeRO."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("spconv.pytorch")

from sparsegps.config import ConfigError, from_dict  # noqa: E402
from sparsegps.errors import UsageError  # noqa: E402
from sparsegps.models.backbone import SpUNet, SpUNetConfig  # noqa: E402
from sparsegps.models.grad_scale import BackboneGradScaler, finish_grad_scaling_step  # noqa: E402

from helpers import ROOT, pretrain_config, tiny_model_config, write_pretrain_shards  # noqa: E402

SCALE = 2.0 ** 16


def two_scenes(seed: int = 0, count: int = 400, shape=(16, 14, 10)):
    """Distinct random voxels of two scenes and their features."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(2):
        flat = torch.randperm(shape[0] * shape[1] * shape[2], generator=g)[:count]
        x, rest = flat // (shape[1] * shape[2]), flat % (shape[1] * shape[2])
        rows.append(torch.stack([torch.full_like(x, b), x, rest // shape[2], rest % shape[2]], dim=1))
    coords = torch.cat(rows).int()
    return coords, torch.randn(len(coords), 6, generator=g), list(shape)


def small_unet(**config) -> SpUNet:
    torch.manual_seed(0)
    cfg = SpUNetConfig(stem_channels=8, enc_channels=[8, 16], dec_channels=[16, 8], enc_blocks=[1, 1],
                       dec_blocks=[1, 1], **config)
    return SpUNet(cfg)


def unet_gradients(model: SpUNet, coords, feats, shape, upstream) -> dict[str, torch.Tensor]:
    """Parameter and input gradients of sum(output * upstream), and the gradient at the input of
    the last decoder stage (inside the U-Net, where scaling shows)."""
    inside = {}

    def on_stage_forward(module, args, output):
        args[0].features.register_hook(lambda g: inside.__setitem__("decoder_input", g.clone()))

    handle = model.decoder[-1].register_forward_hook(on_stage_forward)
    model.zero_grad(set_to_none=True)
    feats = feats.clone().requires_grad_(True)
    (model(coords, feats, 2, shape) * upstream).sum().backward()
    handle.remove()
    return {"input": feats.grad, "decoder_input": inside["decoder_input"],
            **{name: p.grad for name, p in model.named_parameters()}}


# ------------------------------------------------------------------------------------ fp32: exact

def test_scaling_leaves_fp32_gradients_bit_equal_and_does_scale_inside():
    coords, feats, shape = two_scenes()
    plain, scaled = small_unet(grad_scale="none"), small_unet(grad_scale="constant")
    scaled.load_state_dict(plain.state_dict())
    scaled.grad_scaler.always = True
    upstream = torch.randn(len(coords), plain.out_channels) * 1e-6  # a global-batch mean's size
    want = unet_gradients(plain, coords, feats, shape, upstream)
    got = unet_gradients(scaled, coords, feats, shape, upstream)
    assert set(got) == set(want)
    for name in want:
        if name == "decoder_input":
            # inside the U-Net the gradient is S times larger (exactly: S is a power of two)
            assert torch.equal(got[name], want[name] * SCALE), name
        else:
            assert torch.equal(got[name], want[name]), name
    assert all(want[name].abs().sum() > 0 for name in want)


def test_on_cpu_without_autocast_scaling_does_nothing():
    coords, feats, shape = two_scenes(seed=1)
    plain, default = small_unet(grad_scale="none"), small_unet()  # default: dynamic
    default.load_state_dict(plain.state_dict())
    upstream = torch.randn(len(coords), plain.out_channels)
    want = unet_gradients(plain, coords, feats, shape, upstream)
    got = unet_gradients(default, coords, feats, shape, upstream)
    assert all(torch.equal(got[name], want[name]) for name in want)  # the inside too: not scaled
    assert not default.grad_scaler._hooks
    finish_grad_scaling_step(default)
    assert float(default.grad_scaler.scale) == SCALE and int(default.grad_scaler.clean_steps) == 0


# ------------------------------------------------------------- an fp16 backward, simulated on CPU

class HalfGradient(torch.autograd.Function):
    """The identity in forward; in backward the gradient is rounded through fp16, as an fp16
    backward holds it (tiny values flush to zero, large ones overflow to inf)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.half().float()


class ToyBackbone(torch.nn.Module):
    """y = fp16-backward(x * w1) * w2, scaled like SpUNet: at_input, then at_output."""

    def __init__(self, scaler: BackboneGradScaler):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.linspace(0.5, 2.0, 5))
        self.w2 = torch.nn.Parameter(torch.linspace(-1.0, 1.5, 5))
        self.scaler = scaler

    def forward(self, x):
        scaled = self.scaler.start_forward(self.parameters(), x.device.type)
        if scaled:
            x = self.scaler.at_input(x)
        y = HalfGradient.apply(x * self.w1) * self.w2
        return self.scaler.at_output(y) if scaled else y


def toy(mode: str, init_scale: float = SCALE, growth_interval: int = 1000) -> ToyBackbone:
    scaler = BackboneGradScaler(mode, init_scale, growth_interval)
    scaler.always = True  # the simulation runs on CPU
    return ToyBackbone(scaler)


def toy_backward(model: ToyBackbone, upstream: torch.Tensor, head: torch.nn.Parameter | None = None):
    """Backward of sum(y * upstream) (times `head`, a parameter outside the backbone); returns x's gradient."""
    x = torch.linspace(1.0, 3.0, 5, requires_grad=True)
    y = model(x)
    loss = (y * upstream * (head if head is not None else 1.0)).sum()
    loss.backward()
    return x.grad


def test_scaling_recovers_gradients_that_fp16_flushes():
    upstream = torch.full((5,), 1e-8)  # below 2**-25: rounds to zero in fp16
    x = torch.linspace(1.0, 3.0, 5)
    unscaled = toy("none")
    x_grad = toy_backward(unscaled, upstream)
    assert torch.equal(unscaled.w1.grad, torch.zeros(5)) and torch.equal(x_grad, torch.zeros(5))

    scaled = toy("constant")
    x_grad = toy_backward(scaled, upstream)
    w1, w2 = scaled.w1.detach(), scaled.w2.detach()
    # the exact gradients, in fp64; fp16 keeps 11 significant bits at 1e-8 * 2**16 (a normal number)
    expected_w1 = upstream.double() * w2.double() * x.double()
    expected_x = upstream.double() * w2.double() * w1.double()
    torch.testing.assert_close(scaled.w1.grad.double(), expected_w1, rtol=2 ** -11, atol=0)
    torch.testing.assert_close(x_grad.double(), expected_x, rtol=2 ** -11, atol=0)
    # w2's gradient never passes through fp16: exact up to fp32 rounding
    torch.testing.assert_close(scaled.w2.grad.double(), upstream.double() * x.double() * w1.double(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------- overflow

def test_overflow_skips_the_backbone_step_halves_the_scale_and_clean_steps_double_it():
    model = toy("dynamic", init_scale=2.0 ** 4, growth_interval=2)
    head = torch.nn.Parameter(torch.tensor(2.0))
    # 5e3 x 2 x 16 x w2 (up to 1.5) exceeds 65504 where the gradient passes fp16: inf reaches w1, while
    # w2's gradient (taken before fp16) is finite and arrives first
    x = torch.linspace(1.0, 3.0, 5)
    arrived = {}
    y = model(x)
    for name in ("w1", "w2"):  # after the unscaling hooks: what an optimizer's own hooks would see
        getattr(model, name).register_hook(lambda g, name=name: arrived.__setitem__(name, g.clone()))
    (y * 5e3 * head).sum().backward()
    scaler = model.scaler
    assert bool(scaler.found_overflow)
    assert torch.equal(arrived["w1"], torch.zeros(5))  # never inf, even during the backward pass
    assert torch.isfinite(arrived["w2"]).all() and arrived["w2"].abs().sum() > 0
    # w1's gradient was zeroed as it arrived, w2's when the backward pass ended: the backbone skips the step
    assert torch.equal(model.w1.grad, torch.zeros(5)) and torch.equal(model.w2.grad, torch.zeros(5))
    assert head.grad == (y.detach() * 5e3).sum() and head.grad != 0  # the rest of the model steps
    finish_grad_scaling_step(model)
    assert float(scaler.scale) == 8.0 and int(scaler.clean_steps) == 0 and not bool(scaler.found_overflow)

    scales = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        upstream = torch.full((5,), 1e-3)
        toy_backward(model, upstream)
        torch.testing.assert_close(model.w2.grad, upstream * x * model.w1.detach())  # clean steps are unscaled
        finish_grad_scaling_step(model)
        scales.append((float(scaler.scale), int(scaler.clean_steps)))
    assert scales == [(8.0, 1), (16.0, 0), (16.0, 1), (32.0, 0)]


def test_overflow_in_constant_mode_keeps_the_scale_and_no_scale_goes_below_one():
    constant = toy("constant", init_scale=2.0 ** 4)
    toy_backward(constant, torch.full((5,), 1e5))
    finish_grad_scaling_step(constant)
    assert float(constant.scaler.scale) == 16.0 and torch.equal(constant.w1.grad, torch.zeros(5))

    floor = toy("dynamic", init_scale=1.0)
    toy_backward(floor, torch.full((5,), 1e6))  # overflows fp16 even unscaled
    finish_grad_scaling_step(floor)
    assert float(floor.scaler.scale) == 1.0 and torch.equal(floor.w1.grad, torch.zeros(5))


def test_gradient_accumulation_counts_one_step_and_an_overflow_zeroes_earlier_micro_batches():
    model = toy("dynamic", init_scale=2.0 ** 4, growth_interval=1)
    toy_backward(model, torch.full((5,), 1e-3))  # a clean micro-batch, accumulated
    assert model.w1.grad.abs().sum() > 0
    toy_backward(model, torch.full((5,), 1e5))  # an overflowing one
    finish_grad_scaling_step(model)
    assert torch.equal(model.w1.grad, torch.zeros(5)) and torch.equal(model.w2.grad, torch.zeros(5))
    assert float(model.scaler.scale) == 8.0


# ---------------------------------------------------------------------------------------- state

def test_scale_survives_a_state_dict_round_trip_and_old_state_dicts_load():
    model = small_unet()
    model.grad_scaler.scale.fill_(2.0 ** 10)
    model.grad_scaler.clean_steps.fill_(7)
    state = model.state_dict()
    assert {"grad_scaler.scale", "grad_scaler.clean_steps"} <= set(state)
    assert "grad_scaler.found_overflow" not in state  # per step, not state

    restored = small_unet()
    restored.load_state_dict(state)  # strict
    assert float(restored.grad_scaler.scale) == 2.0 ** 10 and int(restored.grad_scaler.clean_steps) == 7

    old = {k: v for k, v in state.items() if not k.startswith("grad_scaler.")}
    fresh = small_unet(grad_scale_init=2.0 ** 12)
    result = fresh.load_state_dict(old)  # strict: missing buffers keep their values
    assert not result.missing_keys and not result.unexpected_keys
    assert float(fresh.grad_scaler.scale) == 2.0 ** 12 and int(fresh.grad_scaler.clean_steps) == 0
    assert torch.equal(fresh.stem.conv.weight, model.stem.conv.weight)


def test_an_export_written_before_grad_scaling_loads(tmp_path):
    import dataclasses

    from sparsegps.config import to_dict
    from sparsegps.exports import ExportInfo, load_model, save_export
    from sparsegps.models.gps import GPSModel

    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = GPSModel(cfg)
    old = {k: v for k, v in model.state_dict().items() if "grad_scaler" not in k}
    save_export(tmp_path / "old.safetensors", old, ExportInfo("pretraining", to_dict(cfg)))
    loaded, _ = load_model(tmp_path / "old.safetensors")
    assert float(loaded.backbone.grad_scaler.scale) == SCALE
    assert torch.equal(loaded.backbone.stem.conv.weight, model.backbone.stem.conv.weight)
    assert dataclasses.asdict(loaded.cfg) == dataclasses.asdict(cfg)


def test_a_copy_scales_its_own_parameters():
    coords, feats, shape = two_scenes(seed=2)
    original = small_unet(grad_scale="constant")
    original.grad_scaler.always = True
    upstream = torch.randn(len(coords), original.out_channels) * 1e-6
    want = unet_gradients(original, coords, feats, shape, upstream)
    copied = copy.deepcopy(original)
    got = unet_gradients(copied, coords, feats, shape, upstream)
    again = unet_gradients(original, coords, feats, shape, upstream)
    assert all(torch.equal(got[name], want[name]) and torch.equal(again[name], want[name]) for name in want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_scaled_gradients_match_fp32_where_unscaled_ones_vanish():
    """Under bf16 autocast the U-Net runs in fp16: a tiny output gradient (1e-8, mostly rounding to
    zero in fp16) comes back from the fp16 backward only when scaled."""
    coords, feats, shape = two_scenes(seed=3)
    coords, feats = coords.cuda(), feats.cuda()
    model = small_unet(grad_scale="constant").cuda()
    upstream = torch.randn(len(coords), model.out_channels, device="cuda") * 1e-8

    def parameter_gradients(mode: str, autocast: bool) -> torch.Tensor:
        model.grad_scaler.mode = mode
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(coords, feats, 2, shape)
        (out * upstream).sum().backward()
        model.grad_scaler.finish_step()
        return torch.cat([p.grad.flatten().float() for p in model.parameters()])

    reference = parameter_gradients("none", autocast=False)
    unscaled = parameter_gradients("none", autocast=True)
    scaled = parameter_gradients("constant", autocast=True)
    error = (lambda g: float((g - reference).norm() / reference.norm()))
    assert error(scaled) < 0.1 < 0.5 < error(unscaled)
    assert float(model.grad_scaler.scale) == SCALE


# --------------------------------------------------------------------------------------- config

def test_config_checks_the_scale():
    with pytest.raises(ValueError, match="power of two"):
        SpUNetConfig(grad_scale_init=3000.0)
    with pytest.raises(ValueError, match="at least 1"):
        SpUNetConfig(grad_scale_growth_interval=0)
    with pytest.raises(ConfigError, match="grad_scale"):
        from_dict(SpUNetConfig, {"grad_scale": "sometimes"})
    cfg = from_dict(SpUNetConfig, {"grad_scale": "constant", "grad_scale_init": 1024})
    assert (cfg.grad_scale, cfg.grad_scale_init) == ("constant", 1024.0)
    assert (SpUNetConfig().grad_scale, SpUNetConfig().grad_scale_init) == ("dynamic", SCALE)


# ------------------------------------------------------------------------------------ LAMB + ZeRO

def test_lamb_is_refused_under_zero():
    from sparsegps.train.engine import check_optimizer_fits_zero

    for stage in (1, 2, 3):
        with pytest.raises(UsageError, match=f"lamb cannot run under ZeRO stage {stage}") as caught:
            check_optimizer_fits_zero("lamb", stage)
        assert "\n" not in str(caught.value) and "partition" in str(caught.value)
    check_optimizer_fits_zero("lamb", 0)
    check_optimizer_fits_zero("adamw", 3)


def test_pretraining_with_lamb_and_zero_stops_before_starting(tmp_path):
    import torch.distributed as dist

    from sparsegps.train.pretrain import pretrain

    shards = write_pretrain_shards(tmp_path / "data")
    cfg = pretrain_config(shards, tmp_path / "run", deepspeed=str(ROOT / "configs/deepspeed/zero2.json"),
                          optim={"optimizer": "lamb"})
    joined = dist.is_initialized()  # an earlier in-process run of the suite may have joined a group of one
    with pytest.raises(UsageError, match="ZeRO stage 2"):
        pretrain(cfg, progress=False)
    assert dist.is_initialized() == joined and not (tmp_path / "run").exists()  # refused before setup
