"""SpUNet: the sparse-convolution U-Net (spconv 2.x) that turns a voxelized scene into per-voxel features.

The layout follows SpUNet-v1m1 of Pointcept: a submanifold stem, encoder stages of a strided
sparse conv (kernel 2, stride 2) followed by residual submanifold blocks, and a decoder that
undoes each stride with the matching inverse conv, concatenates the encoder skip and runs more
residual blocks. The stem uses kernel 3 by default (`stem_kernel`; Pointcept's is 5): kernel
volumes above 32 push spconv off its fast implicit-GEMM path on CUDA. `sparsegps.models.pointcept`
maps the weights to and from Pointcept's module names.

Neighbour indices are built once per level and shared through `indice_key`: every submanifold
conv at level s uses key `subm{s}` (the stem and the last decoder stage share `subm0`), and the
strided conv into level s+1 and its inverse share `down{s+1}`. The inverse convs restore the
input's indices, so the output rows line up with the input voxels one to one.

Devices and precision:
- On CPU every conv runs spconv's `ConvAlgo.Native` (its default asserts CUDA) and denormal
  floats are flushed to zero (denormal gradients slow spconv's CPU kernels about tenfold); on CUDA
  the convs use spconv's default implicit-GEMM algorithm. The choice is made at forward time from
  the input's device, so a model built on CPU and moved to a GPU just works.
- spconv has no bf16 kernels. Under an active CUDA autocast (bf16 or fp16) the backbone runs under
  an fp16 autocast, so convs, norms and skips agree on one half type; under a CPU autocast it runs
  in fp32 with autocast off. The output features are always fp32.
- The gradient entering the fp16 U-Net is scaled by a power of two and unscaled on the way out
  (`grad_scale`, see `sparsegps.models.grad_scale`): the losses' gradients per voxel lie mostly
  below fp16's normal range. Only under a CUDA autocast; on CPU and in fp32 nothing changes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import spconv.pytorch as spconv
import torch
import torch.nn as nn
from spconv.pytorch import ConvAlgo
from spconv.pytorch.conv import SparseConvolution
from torch.utils.checkpoint import checkpoint

from .grad_scale import BackboneGradScaler, GradScaleMode, is_power_of_two

# spconv's own default for kernel volumes <= 32 on a CUDA build (larger ones, a kernel-5 stem: Native).
_CUDA_CONV_ALGO = ConvAlgo.MaskImplicitGemm
_CPU_CONV_ALGO = ConvAlgo.Native


@dataclass
class SpUNetConfig:
    """Widths and depths of the U-Net. Encoder lists run shallow to deep, decoder lists deep to shallow."""

    in_channels: int = 6
    stem_channels: int = 32
    stem_kernel: Literal[3, 5] = 3
    """The stem's submanifold kernel: 3 keeps every conv on spconv's implicit-GEMM path on CUDA
    (kernel volumes up to 32); Pointcept's SpUNet-v1m1 uses 5 (`sparsegps.models.pointcept` writes
    a kernel-3 stem as an exact kernel-5 one)."""
    enc_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    dec_channels: list[int] = field(default_factory=lambda: [256, 128, 96, 96])
    enc_blocks: list[int] = field(default_factory=lambda: [2, 3, 4, 6])
    dec_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    checkpoint_decoder: bool = False
    grad_scale: GradScaleMode = "dynamic"
    """Scaling of the gradient through the U-Net when it runs in fp16 (under bf16 training on a GPU):
    none; constant, by `grad_scale_init`; dynamic, from `grad_scale_init`, halved on an overflow and
    doubled after `grad_scale_growth_interval` steps without one. On CPU and in fp32: no effect."""
    grad_scale_init: float = 2.0 ** 16
    """The first (constant: the only) gradient scale; a power of two, so scaling is exact."""
    grad_scale_growth_interval: int = 1000
    """Dynamic scaling: optimizer steps without an overflow after which the scale doubles."""

    def __post_init__(self):
        stages = len(self.enc_channels)
        if stages == 0:
            raise ValueError("SpUNetConfig.enc_channels: at least one encoder stage is needed")
        for name in ("dec_channels", "enc_blocks", "dec_blocks"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"SpUNetConfig.{name}: expected {stages} entries (one per encoder stage), "
                                 f"got {getattr(self, name)}")
        for name in ("enc_blocks", "dec_blocks"):
            if any(n < 1 for n in getattr(self, name)):
                raise ValueError(f"SpUNetConfig.{name}: every stage needs at least one block, "
                                 f"got {getattr(self, name)}")
        if self.stem_kernel not in (3, 5):
            raise ValueError(f"SpUNetConfig.stem_kernel: 3 or 5, got {self.stem_kernel}")
        if not is_power_of_two(self.grad_scale_init) or self.grad_scale_init < 1:
            raise ValueError(f"SpUNetConfig.grad_scale_init: {self.grad_scale_init} is not a power of two >= 1")
        if self.grad_scale_growth_interval < 1:
            raise ValueError(f"SpUNetConfig.grad_scale_growth_interval: must be at least 1, "
                             f"got {self.grad_scale_growth_interval}")

    @property
    def num_stages(self) -> int:
        return len(self.enc_channels)

    @classmethod
    def preset(cls, name: str, **overrides) -> "SpUNetConfig":
        """A named preset (see `PRESETS`), with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown SpUNet preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(copy.deepcopy(PRESETS[name]), **overrides)


PRESETS: dict[str, SpUNetConfig] = {
    # SpUNet-v1m1's widths and depths (about 39M parameters).
    "base": SpUNetConfig(),
    # Small enough to train on a laptop CPU in tests and demos.
    "tiny": SpUNetConfig(
        stem_channels=16,
        enc_channels=[16, 32, 64, 64],
        dec_channels=[64, 48, 32, 32],
        enc_blocks=[1, 1, 1, 1],
        dec_blocks=[1, 1, 1, 1],
    ),
}


def _batch_norm(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


class SparseConvNormReLU(nn.Module):
    """A sparse conv (submanifold, strided or inverse) followed by BatchNorm and ReLU on its features."""

    def __init__(self, conv: SparseConvolution):
        super().__init__()
        self.conv = conv
        self.norm = _batch_norm(conv.out_channels)

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        x = self.conv(x)
        return x.replace_feature(torch.relu(self.norm(x.features)))


class ResidualBlock(nn.Module):
    """Two 3x3x3 submanifold convs with BatchNorm, a residual connection (projected when widths differ), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, indice_key: str):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(in_channels, out_channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.norm1 = _batch_norm(out_channels)
        self.conv2 = spconv.SubMConv3d(out_channels, out_channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.norm2 = _batch_norm(out_channels)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            # A 1x1x1 submanifold conv is a per-voxel linear map.
            self.shortcut = nn.Sequential(nn.Linear(in_channels, out_channels, bias=False), _batch_norm(out_channels))

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        residual = self.shortcut(x.features)
        out = self.conv1(x)
        out = out.replace_feature(torch.relu(self.norm1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(torch.relu(self.norm2(out.features) + residual))


class DecoderStage(nn.Module):
    """Inverse strided conv back to the finer level, concatenation with the encoder skip, residual blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, num_blocks: int, level: int):
        super().__init__()
        self.up = SparseConvNormReLU(
            spconv.SparseInverseConv3d(in_channels, out_channels, 2, bias=False, indice_key=f"down{level + 1}"))
        self.blocks = nn.Sequential(*[
            ResidualBlock(out_channels + skip_channels if i == 0 else out_channels, out_channels, f"subm{level}")
            for i in range(num_blocks)
        ])

    def forward(self, x: spconv.SparseConvTensor, skip: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        x = self.up(x)
        x = x.replace_feature(torch.cat([x.features, skip.features], dim=1))
        return self.blocks(x)


@contextlib.contextmanager
def _batch_norm_stats_frozen(module: nn.Module):
    """Restore every BatchNorm's running statistics on exit: a checkpoint's recomputation must not count twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class SpUNet(nn.Module):
    """Sparse U-Net: voxels (batch, x, y, z) with features -> per-voxel features, in input order."""

    def __init__(self, config: SpUNetConfig | None = None):
        super().__init__()
        self.config = config = config or SpUNetConfig()
        self.out_channels = config.dec_channels[-1]
        # a kernel-3 stem shares its neighbour indices with the last decoder stage's convs
        self.stem = SparseConvNormReLU(spconv.SubMConv3d(
            config.in_channels, config.stem_channels, config.stem_kernel, padding=config.stem_kernel // 2,
            bias=False, indice_key="subm0" if config.stem_kernel == 3 else "stem"))

        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        level_channels = [config.stem_channels]
        for s, (channels, num_blocks) in enumerate(zip(config.enc_channels, config.enc_blocks)):
            self.down.append(SparseConvNormReLU(spconv.SparseConv3d(
                level_channels[-1], channels, 2, stride=2, bias=False, indice_key=f"down{s + 1}")))
            self.encoder.append(nn.Sequential(*[ResidualBlock(channels, channels, f"subm{s + 1}")
                                                for _ in range(num_blocks)]))
            level_channels.append(channels)

        # decoder[i] lands on level num_stages - 1 - i, i.e. runs deep to shallow.
        self.decoder = nn.ModuleList()
        in_channels = level_channels[-1]
        for i, (channels, num_blocks) in enumerate(zip(config.dec_channels, config.dec_blocks)):
            level = config.num_stages - 1 - i
            self.decoder.append(DecoderStage(in_channels, level_channels[level], channels, num_blocks, level))
            in_channels = channels

        self.grad_scaler = BackboneGradScaler(config.grad_scale, config.grad_scale_init,
                                              config.grad_scale_growth_interval)
        self._algo_device_type: str | None = None

    def _select_conv_algo(self, device_type: str) -> None:
        """Point every spconv layer at the algorithm for `device_type` (only when the device type changes)."""
        if device_type == self._algo_device_type:
            return
        for module in self.modules():
            if isinstance(module, SparseConvolution):
                cuda_algo = _CUDA_CONV_ALGO if math.prod(module.kernel_size) <= 32 else ConvAlgo.Native
                module.algo = _CPU_CONV_ALGO if device_type == "cpu" else cuda_algo
        self._algo_device_type = device_type

    def _precision_context(self, features: torch.Tensor):
        """fp16 autocast under any CUDA autocast (spconv has no bf16 kernels); autocast off on CPU."""
        device_type = features.device.type
        if not torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        if device_type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast(device_type, enabled=False)

    def _run_decoder_stage(self, stage: DecoderStage, x: spconv.SparseConvTensor,
                           skip: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        """One decoder stage, under activation checkpointing when configured and gradients are on.

        All neighbour indices the decoder needs already exist when it runs (built by the stem and
        the encoder), so the recomputation in backward only redoes the feature math.
        """
        if not (self.config.checkpoint_decoder and torch.is_grad_enabled()):
            return stage(x, skip)

        def contexts():
            return contextlib.nullcontext(), _batch_norm_stats_frozen(stage)

        return checkpoint(stage, x, skip, use_reentrant=False, context_fn=contexts)

    def padded_spatial_shape(self, spatial_shape) -> list[int]:
        """`spatial_shape` rounded up to a multiple of 2**num_stages, so no stride drops edge voxels."""
        factor = 2 ** self.config.num_stages
        return [-(-int(extent) // factor) * factor for extent in spatial_shape]

    def forward_sparse(self, coords: torch.Tensor, feats: torch.Tensor, batch_size: int,
                       spatial_shape) -> spconv.SparseConvTensor:
        """Like `forward`, but returns the output SparseConvTensor (its indices equal `coords`)."""
        if coords.dtype != torch.int32 or coords.ndim != 2 or coords.shape[1] != 4:
            raise ValueError(f"SpUNet: coords must be int32 [V, 4] (batch, x, y, z), "
                             f"got {coords.dtype} {list(coords.shape)}")
        if feats.shape != (coords.shape[0], self.config.in_channels):
            raise ValueError(f"SpUNet: feats must be [V={coords.shape[0]}, {self.config.in_channels}], "
                             f"got {list(feats.shape)}")
        self._select_conv_algo(feats.device.type)
        scaled = self.grad_scaler.start_forward(self.parameters(), feats.device.type)
        if scaled:
            feats = self.grad_scaler.at_input(feats)
        with self._precision_context(feats):
            if not torch.is_autocast_enabled(feats.device.type):
                feats = feats.float()
            x = spconv.SparseConvTensor(feats, coords.contiguous(), self.padded_spatial_shape(spatial_shape),
                                        batch_size)
            x = self.stem(x)
            skips = [x]
            for down, blocks in zip(self.down, self.encoder):
                x = blocks(down(x))
                skips.append(x)
            skips.pop()
            for stage in self.decoder:
                x = self._run_decoder_stage(stage, x, skips.pop())
        features = x.features.float()
        return x.replace_feature(self.grad_scaler.at_output(features) if scaled else features)

    def forward(self, coords: torch.Tensor, feats: torch.Tensor, batch_size: int, spatial_shape) -> torch.Tensor:
        """coords int32 [V, 4] (batch, x, y, z), feats [V, in_channels] -> fp32 features [V, out_channels].

        Row v of the output belongs to voxel `coords[v]`. `spatial_shape` is the grid extent (x, y, z)
        covering every voxel; it is padded internally to a multiple of the total stride.
        """
        return self.forward_sparse(coords, feats, batch_size, spatial_shape).features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["PRESETS", "SpUNet", "SpUNetConfig", "count_parameters"]
