"""Our SpUNet's weights in the layout of Pointcept's SpUNet-v1m1 (`SpUNetBase`), and back.

Pointcept (`pointcept/models/sparse_unet/spconv_unet_v1m1_base.py`) builds the same U-Net with
other module names; the tensors differ in two places only:

- the stem: SpUNet-v1m1's is a kernel-5 submanifold conv, ours kernel 3 by default
  (`SpUNetConfig.stem_kernel`). A kernel-3 stem is written as a kernel-5 one with its outer shell
  of weights zero (the same function: a submanifold conv keeps the sites, and the outer neighbours
  then add nothing); read back, a kernel-5 stem whose shell is zero becomes a kernel-3 one again.
- the residual blocks' projection, where widths change: Pointcept's is a kernel-1 submanifold conv
  (weight [out, 1, 1, 1, in], whose memory spconv reads as an [in, out] matrix), ours a linear
  layer (weight [out, in]) on the voxel features.

Names: `conv_input.{0,1}` = `stem.{conv,norm}`; `down.{s}.{0,1}` = `down.{s}.{conv,norm}`;
`enc.{s}.block{i}.{conv1,bn1,conv2,bn2,proj.0,proj.1}` = `encoder.{s}.{i}.{conv1,norm1,conv2,norm2,
shortcut.0,shortcut.1}`; Pointcept's decoder lists run shallow to deep (`up.{s}`, `dec.{s}` land on
level s), ours deep to shallow: `up.{s}` = `decoder.{S-1-s}.up`, `dec.{s}.block{i}` =
`decoder.{S-1-s}.blocks.{i}`. The skip is concatenated after the upsampled features in both.

The input features the weights expect (6 channels, our `data.collate`): the voxel's mean colour
scaled to [-1, 1] (rgb / 127.5 - 1), then its centre in metres minus the centre of the scene's
bounding box (x, y, z); voxel coordinates at the export's voxel size.
"""
from __future__ import annotations

import re

import torch
from spconv.constants import FILTER_HWIO

from .backbone import SpUNetConfig

POINTCEPT_STEM_KERNEL = 5
INPUT_FEATURES = ("6 channels per voxel: its mean colour as rgb / 127.5 - 1, then its centre in metres minus the "
                  "centre of the scene's bounding box (x, y, z); grid coordinates at the export's voxel size")
_OURS_ONLY = ("grad_scaler.",)  # buffers of our fp16 gradient scaling, not weights
_BLOCK = {"conv1": "conv1", "norm1": "bn1", "conv2": "conv2", "norm2": "bn2", "shortcut.0": "proj.0",
          "shortcut.1": "proj.1"}


class PointceptMismatch(ValueError):
    """A checkpoint or backbone that does not map between the two layouts; the message names the key."""


def pointcept_config(cfg: SpUNetConfig) -> dict:
    """SpUNet-v1m1's keyword arguments for a backbone of config `cfg` (num_classes 0: no head)."""
    return {"in_channels": cfg.in_channels, "num_classes": 0, "base_channels": cfg.stem_channels,
            "channels": [*cfg.enc_channels, *cfg.dec_channels], "layers": [*cfg.enc_blocks, *cfg.dec_blocks]}


def _pointcept_name(key: str, stages: int) -> str | None:
    """The SpUNet-v1m1 name of our state-dict key (None: ours only)."""
    if key.startswith(_OURS_ONLY):
        return None
    rules = [
        (r"stem\.conv\.(.+)", lambda m: f"conv_input.0.{m[1]}"),
        (r"stem\.norm\.(.+)", lambda m: f"conv_input.1.{m[1]}"),
        (r"down\.(\d+)\.conv\.(.+)", lambda m: f"down.{m[1]}.0.{m[2]}"),
        (r"down\.(\d+)\.norm\.(.+)", lambda m: f"down.{m[1]}.1.{m[2]}"),
        (r"encoder\.(\d+)\.(\d+)\.(conv1|norm1|conv2|norm2|shortcut\.0|shortcut\.1)\.(.+)",
         lambda m: f"enc.{m[1]}.block{m[2]}.{_BLOCK[m[3]]}.{m[4]}"),
        (r"decoder\.(\d+)\.up\.conv\.(.+)", lambda m: f"up.{stages - 1 - int(m[1])}.0.{m[2]}"),
        (r"decoder\.(\d+)\.up\.norm\.(.+)", lambda m: f"up.{stages - 1 - int(m[1])}.1.{m[2]}"),
        (r"decoder\.(\d+)\.blocks\.(\d+)\.(conv1|norm1|conv2|norm2|shortcut\.0|shortcut\.1)\.(.+)",
         lambda m: f"dec.{stages - 1 - int(m[1])}.block{m[2]}.{_BLOCK[m[3]]}.{m[4]}"),
    ]
    for pattern, name in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return name(m)
    raise PointceptMismatch(f"backbone key {key!r} has no place in SpUNet-v1m1")


def to_pointcept(state_dict: dict[str, torch.Tensor], cfg: SpUNetConfig) -> dict[str, torch.Tensor]:
    """Our backbone's state dict (keys as `SpUNet.state_dict()`) in SpUNet-v1m1's names and shapes."""
    out = {}
    for key, value in state_dict.items():
        name = _pointcept_name(key, cfg.num_stages)
        if name is None:
            continue
        if key == "stem.conv.weight" and value.shape[1] != POINTCEPT_STEM_KERNEL:
            value = _grow_kernel(value, POINTCEPT_STEM_KERNEL)
        elif ".shortcut.0." in key:
            value = _linear_to_conv1x1(value)
        out[name] = value.detach().cpu().clone()
    return out


def from_pointcept(state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
                   ) -> tuple[SpUNetConfig, dict[str, torch.Tensor]]:
    """A SpUNet-v1m1 state dict (any `module.` / `backbone.` prefix; a `final` head left out) as our
    backbone's config and state dict. Every other key must find its place, every place its key."""
    state = _strip_prefixes(state_dict)
    state = {k: v for k, v in state.items() if not k.startswith("final.")}
    cfg = _infer_config(state, source)
    ours = {}
    from .backbone import SpUNet  # the names and shapes to fill

    expected = {k: v for k, v in SpUNet(cfg).state_dict().items() if not k.startswith(_OURS_ONLY)}
    names = {_pointcept_name(k, cfg.num_stages): k for k in expected}
    for name, value in state.items():
        if name not in names:
            raise PointceptMismatch(f"{source}: key {name!r} does not fit a SpUNet-v1m1 of {cfg.num_stages} stages "
                                    f"(channels {pointcept_config(cfg)['channels']})")
        key = names[name]
        if key == "stem.conv.weight" and value.shape[1] != cfg.stem_kernel:
            value = _shrink_kernel(value, cfg.stem_kernel)
        elif ".shortcut.0." in key:
            value = _conv1x1_to_linear(value)
        if value.shape != expected[key].shape:
            raise PointceptMismatch(f"{source}: key {name!r} has shape {list(value.shape)}, expected "
                                    f"{list(expected[key].shape)}")
        ours[key] = value
    missing = [name for name, key in names.items() if key not in ours]
    if missing:
        raise PointceptMismatch(f"{source}: no {missing[0]!r} (and {len(missing) - 1} more keys of a SpUNet-v1m1 "
                                f"backbone missing)")
    return cfg, ours


def _strip_prefixes(state: dict) -> dict:
    """Pointcept's checkpoints: `module.` from DDP, `backbone.` from a segmentor around the U-Net."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _count(state: dict, pattern: str) -> int:
    found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise PointceptMismatch(f"indices {sorted(found)} of {pattern!r} are not 0..{len(found) - 1}")
    return len(found)


def _infer_config(state: dict, source: str) -> SpUNetConfig:
    """The SpUNetConfig of a SpUNet-v1m1 state dict, from its tensors' shapes."""
    try:
        stem = state["conv_input.0.weight"]
    except KeyError:
        raise PointceptMismatch(f"{source}: no 'conv_input.0.weight': not a Pointcept SpUNet-v1m1 checkpoint") from None
    stages, ups = _count(state, r"down\.(\d+)\."), _count(state, r"up\.(\d+)\.")
    if stages == 0 or ups != stages:
        raise PointceptMismatch(f"{source}: {stages} down and {ups} up stages")
    kernel = int(stem.shape[1])
    if kernel == POINTCEPT_STEM_KERNEL and not _shell(stem).any():
        kernel = 3  # written from a kernel-3 stem
    return SpUNetConfig(
        in_channels=int(stem.shape[-1]), stem_channels=int(stem.shape[0]), stem_kernel=kernel,
        enc_channels=[int(state[f"down.{s}.1.weight"].shape[0]) for s in range(stages)],
        dec_channels=[int(state[f"up.{s}.1.weight"].shape[0]) for s in reversed(range(stages))],
        enc_blocks=[_count(state, rf"enc\.{s}\.block(\d+)\.") for s in range(stages)],
        dec_blocks=[_count(state, rf"dec\.{s}\.block(\d+)\.") for s in reversed(range(stages))])


def _linear_to_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's [out, in] weight as spconv's kernel-1 submanifold conv weight [out, 1, 1, 1, in].

    spconv computes a kernel-1 conv as one matrix product, reading its weight's memory as [in, out]
    (as [out, in] only in builds with FILTER_HWIO), not as its shape says."""
    out_channels, in_channels = weight.shape
    matrix = weight if FILTER_HWIO else weight.T
    return matrix.contiguous().view(out_channels, 1, 1, 1, in_channels)


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    out_channels, in_channels = weight.shape[0], weight.shape[-1]
    if FILTER_HWIO:
        return weight.reshape(out_channels, in_channels).clone()
    return weight.contiguous().view(in_channels, out_channels).T.contiguous()


def _shell(weight: torch.Tensor) -> torch.Tensor:
    """The weights of a [out, 5, 5, 5, in] kernel outside its central 3x3x3."""
    inner = torch.zeros(weight.shape[1:4], dtype=torch.bool)
    inner[1:4, 1:4, 1:4] = True
    return weight[:, ~inner]


def _grow_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """A [out, k, k, k, in] kernel centred in a [out, size, size, size, in] one of zeros."""
    k = weight.shape[1]
    lo = (size - k) // 2
    out = weight.new_zeros((weight.shape[0], size, size, size, weight.shape[-1]))
    out[:, lo:lo + k, lo:lo + k, lo:lo + k] = weight
    return out


def _shrink_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    lo = (weight.shape[1] - size) // 2
    return weight[:, lo:lo + size, lo:lo + size, lo:lo + size].contiguous()
