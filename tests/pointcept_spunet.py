"""An independent SpUNet-v1m1 for the tests: Pointcept's published layout (module names, kernel
sizes, indice keys, the order of the skip concatenation, the input tensor's spatial shape) written
out here, so that weights mapped by `sparsegps.models.pointcept` are checked against a network
that is not ours. Head-less (`num_classes=0`); CPU convs use spconv's Native algorithm."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import spconv.pytorch as spconv
import torch
import torch.nn as nn
from spconv.pytorch import ConvAlgo


def _native(conv):
    conv.algo = ConvAlgo.Native
    return conv


class BasicBlock(spconv.SparseModule):
    def __init__(self, in_channels, embed_channels, norm_fn, indice_key):
        super().__init__()
        if in_channels == embed_channels:
            self.proj = spconv.SparseSequential(nn.Identity())
        else:
            self.proj = spconv.SparseSequential(
                _native(spconv.SubMConv3d(in_channels, embed_channels, kernel_size=1, bias=False)),
                norm_fn(embed_channels))
        self.conv1 = _native(spconv.SubMConv3d(in_channels, embed_channels, kernel_size=3, padding=1, bias=False,
                                               indice_key=indice_key))
        self.bn1 = norm_fn(embed_channels)
        self.relu = nn.ReLU()
        self.conv2 = _native(spconv.SubMConv3d(embed_channels, embed_channels, kernel_size=3, padding=1, bias=False,
                                               indice_key=indice_key))
        self.bn2 = norm_fn(embed_channels)

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features))
        out = out.replace_feature(out.features + self.proj(x).features)
        return out.replace_feature(self.relu(out.features))


class SpUNetV1M1(nn.Module):
    def __init__(self, in_channels, num_classes=0, base_channels=32, channels=(32, 64, 128, 256, 256, 128, 96, 96),
                 layers=(2, 3, 4, 6, 2, 2, 2, 2)):
        super().__init__()
        assert num_classes == 0 and len(layers) == len(channels) and len(layers) % 2 == 0
        self.num_stages = len(layers) // 2
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        self.conv_input = spconv.SparseSequential(
            _native(spconv.SubMConv3d(in_channels, base_channels, kernel_size=5, padding=1, bias=False,
                                      indice_key="stem")),
            norm_fn(base_channels), nn.ReLU())
        enc_channels, dec_channels = base_channels, channels[-1]
        self.down, self.up, self.enc, self.dec = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(self.num_stages):
            self.down.append(spconv.SparseSequential(
                _native(spconv.SparseConv3d(enc_channels, channels[s], kernel_size=2, stride=2, bias=False,
                                            indice_key=f"spconv{s + 1}")),
                norm_fn(channels[s]), nn.ReLU()))
            self.enc.append(spconv.SparseSequential(OrderedDict(
                (f"block{i}", BasicBlock(channels[s], channels[s], norm_fn, f"subm{s + 1}")) for i in range(layers[s]))))
            self.up.append(spconv.SparseSequential(
                _native(spconv.SparseInverseConv3d(channels[len(channels) - s - 2], dec_channels, kernel_size=2,
                                                   bias=False, indice_key=f"spconv{s + 1}")),
                norm_fn(dec_channels), nn.ReLU()))
            self.dec.append(spconv.SparseSequential(OrderedDict(
                (f"block{i}", BasicBlock(dec_channels + enc_channels if i == 0 else dec_channels, dec_channels, norm_fn,
                                         f"subm{s}"))
                for i in range(layers[len(channels) - s - 1]))))
            enc_channels = channels[s]
            dec_channels = channels[len(channels) - s - 2]

    def forward(self, coords: torch.Tensor, feats: torch.Tensor, batch_size: int) -> torch.Tensor:
        """coords int32 [V, 4] (batch, x, y, z) -> [V, channels[-1]] (Pointcept's spatial shape: max + 96)."""
        shape = torch.add(torch.max(coords[:, 1:], dim=0).values, 96).tolist()
        x = spconv.SparseConvTensor(feats, coords.contiguous(), shape, batch_size)
        x = self.conv_input(x)
        skips = [x]
        for s in range(self.num_stages):
            x = self.enc[s](self.down[s](x))
            skips.append(x)
        x = skips.pop(-1)
        for s in reversed(range(self.num_stages)):
            x = self.up[s](x)
            skip = skips.pop(-1)
            x = x.replace_feature(torch.cat((x.features, skip.features), dim=1))
            x = self.dec[s](x)
        return x.features
