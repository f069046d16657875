"""SpUNet: spconv layers against dense conv3d, the U-Net's voxel order, gradients, presets, checkpointing."""
import pytest
import torch
import torch.nn.functional as F

spconv = pytest.importorskip("spconv.pytorch")

from sparsegps.models.backbone import PRESETS, SpUNet, SpUNetConfig, count_parameters  # noqa: E402

NATIVE = spconv.ConvAlgo.Native


def _unique_sites(shape, count, seed, batch_size=1):
    """`count` distinct voxels per scene on a grid of `shape`, as int32 (batch, x, y, z)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch_size):
        flat = torch.randperm(shape[0] * shape[1] * shape[2], generator=g)[:count]
        x, rem = flat // (shape[1] * shape[2]), flat % (shape[1] * shape[2])
        rows.append(torch.stack([torch.full_like(x, b), x, rem // shape[2], rem % shape[2]], dim=1))
    return torch.cat(rows).int()


def _dense(coords, feats, shape):
    grid = torch.zeros(1, feats.shape[1], *shape, dtype=feats.dtype)
    x, y, z = coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()
    grid[0, :, x, y, z] = feats.T
    return grid


def _at(grid, coords):
    return grid[0, :, coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()].T


def _sorted_rows(indices):
    return sorted(map(tuple, indices.tolist()))


def test_submanifold_conv_matches_dense_conv3d():
    shape = (5, 6, 7)
    coords = _unique_sites(shape, 60, seed=0)
    feats = torch.randn(len(coords), 2)
    conv = spconv.SubMConv3d(2, 5, 3, padding=1, bias=True, algo=NATIVE)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    # spconv 2.x stores weights as [out, kx, ky, kz, in].
    assert conv.weight.shape == (5, 3, 3, 3, 2)

    out = conv(spconv.SparseConvTensor(feats, coords, list(shape), 1))
    dense = F.conv3d(_dense(coords, feats, shape), conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=1)
    assert torch.equal(out.indices, coords)
    torch.testing.assert_close(out.features, _at(dense, coords), rtol=1e-5, atol=1e-5)


def test_strided_and_inverse_conv_match_dense_conv3d():
    shape = (6, 8, 4)
    coords = _unique_sites(shape, 40, seed=1)
    feats = torch.randn(len(coords), 3)
    down = spconv.SparseConv3d(3, 4, 2, stride=2, bias=False, indice_key="down", algo=NATIVE)
    up = spconv.SparseInverseConv3d(4, 2, 2, bias=False, indice_key="down", algo=NATIVE)
    torch.nn.init.normal_(down.weight)
    torch.nn.init.normal_(up.weight)

    coarse = down(spconv.SparseConvTensor(feats, coords, list(shape), 1))
    occupied = torch.unique(torch.cat([coords[:, :1], coords[:, 1:] // 2], dim=1), dim=0)
    assert _sorted_rows(coarse.indices) == _sorted_rows(occupied)
    dense_coarse = F.conv3d(_dense(coords, feats, shape), down.weight.permute(0, 4, 1, 2, 3), stride=2)
    torch.testing.assert_close(coarse.features, _at(dense_coarse, coarse.indices), rtol=1e-5, atol=1e-5)

    fine = up(coarse)
    assert torch.equal(fine.indices, coords)
    coarse_shape = [s // 2 for s in shape]
    dense_fine = F.conv_transpose3d(_dense(coarse.indices, coarse.features, coarse_shape),
                                    up.weight.permute(4, 0, 1, 2, 3), stride=2)
    torch.testing.assert_close(fine.features, _at(dense_fine, coords), rtol=1e-5, atol=1e-5)


def _two_scenes(seed=0, shape=(21, 17, 13), count=500):
    coords = _unique_sites(shape, count, seed=seed, batch_size=2)
    feats = torch.randn(len(coords), 6, generator=torch.Generator().manual_seed(seed))
    return coords, feats, list(shape)


def test_unet_forward_backward_every_parameter_gets_gradient():
    torch.manual_seed(0)
    model = SpUNet(SpUNetConfig.preset("tiny"))
    coords, feats, shape = _two_scenes()
    feats.requires_grad_(True)
    out = model(coords, feats, 2, shape)
    assert out.shape == (len(coords), model.out_channels) and out.dtype == torch.float32
    assert all(m.algo == NATIVE for m in model.modules() if isinstance(m, spconv.conv.SparseConvolution))
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert feats.grad.abs().sum(dim=1).gt(0).all()


def test_unet_output_rows_follow_input_voxels():
    """Output row v belongs to input voxel v, and permuting the input permutes the output alike."""
    torch.manual_seed(0)
    model = SpUNet(SpUNetConfig.preset("tiny"))
    coords, feats, shape = _two_scenes(seed=1)
    out = model.forward_sparse(coords, feats, 2, shape)
    assert torch.equal(out.indices, coords)
    # Neighbour indices were built once per key: one submanifold key per level, one per stride.
    assert sorted(out.indice_dict) == ["down1", "down2", "down3", "down4", "subm0", "subm1", "subm2", "subm3", "subm4"]
    assert all(m.indice_key for m in model.modules() if isinstance(m, spconv.conv.SparseConvolution))

    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(2))
    permuted = model(coords[perm], feats[perm], 2, shape)
    torch.testing.assert_close(permuted, out.features[perm], rtol=1e-4, atol=1e-4)


def test_unet_strided_convs_keep_every_occupied_cell():
    """An odd grid extent must not make a stride drop the voxels on its far edge."""
    model = SpUNet(SpUNetConfig.preset("tiny"))
    coords, feats, shape = _two_scenes(seed=3, shape=(35, 19, 17), count=400)
    seen = []
    hooks = [down.register_forward_hook(lambda mod, inp, out: seen.append(out.indices)) for down in model.down]
    with torch.no_grad():
        model(coords, feats, 2, shape)
    for h in hooks:
        h.remove()
    for level, indices in enumerate(seen, start=1):
        cells = torch.cat([coords[:, :1], coords[:, 1:] // 2 ** level], dim=1)
        assert _sorted_rows(indices) == _sorted_rows(torch.unique(cells, dim=0)), f"level {level}"


def test_checkpointed_decoder_matches_plain_decoder():
    torch.manual_seed(0)
    plain = SpUNet(SpUNetConfig.preset("tiny"))
    checkpointed = SpUNet(SpUNetConfig.preset("tiny", checkpoint_decoder=True))
    checkpointed.load_state_dict(plain.state_dict())
    coords, feats, shape = _two_scenes(seed=4)
    weights = torch.randn(len(coords), plain.out_channels)
    outs = []
    for model in (plain, checkpointed):
        out = model(coords, feats, 2, shape)
        (out * weights).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    # The recomputation in backward must not update BatchNorm statistics a second time.
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_cpu_autocast_runs_the_backbone_in_fp32():
    torch.manual_seed(0)
    model = SpUNet(SpUNetConfig.preset("tiny")).eval()
    coords, feats, shape = _two_scenes(seed=5, count=200)
    with torch.no_grad():
        reference = model(coords, feats, 2, shape)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(coords, feats, 2, shape)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)


def test_unet_rejects_bad_inputs():
    model = SpUNet(SpUNetConfig.preset("tiny"))
    coords, feats, shape = _two_scenes(count=10)
    with pytest.raises(ValueError, match="int32"):
        model(coords.long(), feats, 2, shape)
    with pytest.raises(ValueError, match="feats"):
        model(coords, feats[:, :3], 2, shape)
    with pytest.raises(ValueError, match="dec_blocks"):
        SpUNetConfig(dec_blocks=[1, 1])


def _expected_parameter_count(cfg: SpUNetConfig) -> int:
    """Parameters of the U-Net by hand: 3x3x3 / 2x2x2 kernels without bias, BatchNorm scale and shift."""
    def conv(k, cin, cout):
        return k ** 3 * cin * cout + 2 * cout

    def block(cin, cout):
        return conv(3, cin, cout) + conv(3, cout, cout) + (0 if cin == cout else cin * cout + 2 * cout)

    total = conv(3, cfg.in_channels, cfg.stem_channels)
    levels = [cfg.stem_channels] + list(cfg.enc_channels)
    for s, (c, n) in enumerate(zip(cfg.enc_channels, cfg.enc_blocks)):
        total += conv(2, levels[s], c) + n * block(c, c)
    cin = levels[-1]
    for i, (c, n) in enumerate(zip(cfg.dec_channels, cfg.dec_blocks)):
        skip = levels[cfg.num_stages - 1 - i]
        total += conv(2, cin, c) + block(c + skip, c) + (n - 1) * block(c, c)
        cin = c
    return total


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_presets_build_with_expected_parameter_count(name):
    cfg = SpUNetConfig.preset(name)
    model = SpUNet(cfg)
    assert model.out_channels == cfg.dec_channels[-1]
    assert count_parameters(model) == _expected_parameter_count(cfg)
    print(f"SpUNet {name}: {count_parameters(model):,} parameters")


def test_presets_are_independent_copies_and_unknown_name_fails():
    cfg = SpUNetConfig.preset("tiny", checkpoint_decoder=True)
    cfg.enc_channels[0] = 99
    assert PRESETS["tiny"].enc_channels[0] == 16 and not PRESETS["tiny"].checkpoint_decoder
    assert _expected_parameter_count(PRESETS["tiny"]) < _expected_parameter_count(PRESETS["base"])
    with pytest.raises(ValueError, match="unknown SpUNet preset"):
        SpUNetConfig.preset("huge")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_runs_fp16_and_matches_fp32():
    """A model used on CPU moves to CUDA: convs switch to implicit GEMM; bf16 autocast runs as fp16."""
    torch.manual_seed(0)
    model = SpUNet(SpUNetConfig.preset("tiny")).eval()
    coords, feats, shape = _two_scenes(seed=6)
    with torch.no_grad():
        model(coords, feats, 2, shape)
        model.cuda()
        coords, feats = coords.cuda(), feats.cuda()
        reference = model(coords, feats, 2, shape)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = model(coords, feats, 2, shape)
    assert all(m.algo == spconv.ConvAlgo.MaskImplicitGemm
               for m in model.modules() if isinstance(m, spconv.conv.SparseConvolution))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=2e-2, atol=2e-2)
