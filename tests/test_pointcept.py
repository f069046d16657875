"""Our SpUNet's weights in Pointcept's SpUNet-v1m1 layout and back, checked against an independent
SpUNet-v1m1 (`pointcept_spunet.py`, Pointcept's published layout): strict loads (every key used
once, shapes equal), equal per-voxel features, round trips, one-line errors naming the key."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pointcept_spunet import SpUNetV1M1

from sparsegps.models.backbone import SpUNet, SpUNetConfig
from sparsegps.models.pointcept import PointceptMismatch, from_pointcept, pointcept_config, to_pointcept


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight and BatchNorm statistic random (so a wrong mapping changes the output), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "bn1.weight", "bn2.weight")):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif t.ndim > 1:  # conv and linear weights, scaled to keep activations near 1
                    fan_in = t[0].numel()
                    t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module.eval()


def voxels(in_channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two scenes of a few hundred voxels on surfaces of a 40^3 grid."""
    rng = np.random.default_rng(seed)
    coords = []
    for b in range(2):
        pts = rng.integers(0, 40, size=(600, 3))
        pts[:300, 2] = rng.integers(0, 2, size=300)  # a floor
        pts = np.unique(pts, axis=0)
        coords.append(np.concatenate([np.full((len(pts), 1), b), pts], 1))
    coords = torch.from_numpy(np.concatenate(coords)).int()
    return coords, torch.from_numpy(rng.normal(size=(len(coords), in_channels)).astype(np.float32))


def ours_forward(model: SpUNet, coords, feats) -> torch.Tensor:
    with torch.no_grad():
        return model(coords, feats, 2, (coords[:, 1:].max(0).values + 1).tolist())


TINY = SpUNetConfig.preset("tiny")
LAYOUTS = {"tiny": TINY, "tiny, kernel-5 stem": SpUNetConfig.preset("tiny", stem_kernel=5),
           "base": SpUNetConfig.preset("base")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_our_weights_load_strictly_into_spunet_v1m1_and_give_the_same_features(layout):
    cfg = LAYOUTS[layout]
    ours = randomised(SpUNet(cfg), seed=1)
    theirs = SpUNetV1M1(**{k: v for k, v in pointcept_config(cfg).items() if k != "num_classes"})
    mapped = to_pointcept(ours.state_dict(), cfg)
    assert set(mapped) == set(theirs.state_dict())  # every key once, nothing left over
    theirs.load_state_dict(mapped, strict=True)
    theirs.eval()
    coords, feats = voxels(cfg.in_channels)
    with torch.no_grad():
        expected = theirs(coords, feats, 2)
    got = ours_forward(ours, coords, feats)
    assert got.shape == expected.shape == (len(coords), cfg.dec_channels[-1])
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("layout", ["tiny", "tiny, kernel-5 stem"])
def test_a_pointcept_checkpoint_read_back_gives_identical_outputs(layout):
    """Ours -> Pointcept (with DDP's and a segmentor's prefixes, and a head) -> ours: the same config
    (a kernel-3 stem is found again in the zero shell of the kernel-5 one) and the same outputs."""
    cfg = LAYOUTS[layout]
    ours = randomised(SpUNet(cfg), seed=2)
    checkpoint = {f"module.backbone.{k}": v for k, v in to_pointcept(ours.state_dict(), cfg).items()}
    checkpoint["module.final.weight"] = torch.zeros(20, 1, 1, 1, 16)  # the segmentor's head: not the backbone's
    got_cfg, state = from_pointcept(checkpoint, "ckpt.pth")
    assert got_cfg == cfg
    back = SpUNet(got_cfg)
    missing, unexpected = back.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("grad_scaler.") for k in missing)
    back.eval()
    coords, feats = voxels(cfg.in_channels, seed=3)
    assert torch.equal(ours_forward(back, coords, feats), ours_forward(ours, coords, feats))


def test_weights_trained_in_pointcept_load_into_ours():
    """SpUNet-v1m1's own random weights (a full kernel-5 stem): ours reads them with stem_kernel 5
    and computes the same features."""
    theirs = randomised(SpUNetV1M1(6, base_channels=16, channels=(16, 32, 64, 64, 64, 48, 32, 16),
                                   layers=(1, 2, 1, 1, 1, 1, 2, 1)), seed=4)
    cfg, state = from_pointcept(theirs.state_dict())
    assert cfg.stem_kernel == 5 and cfg.enc_blocks == [1, 2, 1, 1] and cfg.dec_blocks == [1, 1, 2, 1]
    assert cfg.dec_channels == [64, 48, 32, 16]
    ours = SpUNet(cfg)
    ours.load_state_dict(state, strict=False)
    ours.eval()
    coords, feats = voxels(6, seed=5)
    with torch.no_grad():
        expected = theirs(coords, feats, 2)
    assert (ours_forward(ours, coords, feats) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_a_checkpoint_that_does_not_fit_names_the_first_key():
    state = to_pointcept(SpUNet(TINY).state_dict(), TINY)
    missing = {k: v for k, v in state.items() if k != "enc.1.block0.conv2.weight"}
    with pytest.raises(PointceptMismatch, match=r"no 'enc.1.block0.conv2.weight'"):
        from_pointcept(missing, "model_best.pth")
    extra = {**state, "enc.1.block7.conv1.weight": state["enc.1.block0.conv1.weight"]}
    with pytest.raises(PointceptMismatch, match="indices"):
        from_pointcept(extra, "model_best.pth")
    wrong = {**state, "dec.0.block0.bn1.weight": torch.ones(3)}
    with pytest.raises(PointceptMismatch, match=r"model_best.pth: key 'dec.0.block0.bn1.weight' has shape \[3\]"):
        from_pointcept(wrong, "model_best.pth")
    with pytest.raises(PointceptMismatch, match="not a Pointcept SpUNet-v1m1 checkpoint"):
        from_pointcept({"encoder.weight": torch.ones(1)}, "other.pth")


def test_export_to_pointcept_through_the_cli_and_fine_tune_from_it(tmp_path):
    """`sparsegps export EXPORT --format pointcept` writes a torch.load-able {config, state_dict} that
    SpUNet-v1m1 loads strictly; `finetune-seg --pretrained` takes that file back, with the same weights."""
    import dataclasses

    from helpers import VOCAB, make_scene

    from sparsegps import cli
    from sparsegps.config import from_dict
    from sparsegps.data import write_scenes
    from sparsegps.exports import ExportInfo, read_export, save_export
    from sparsegps.train.finetune_seg import SegConfig, finetune_segmentation

    backbone = randomised(SpUNet(TINY), seed=6)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    export = save_export(tmp_path / "export.safetensors", state, ExportInfo(
        task="pretraining", model_config={"backbone": dataclasses.asdict(TINY)}, voxel_size=0.15, preset="dense"))
    out = tmp_path / "spunet.pth"
    assert cli.main(["export", str(export), "--format", "pointcept", "--out", str(out)]) == 0
    blob = torch.load(out, map_location="cpu", weights_only=True)
    assert blob["config"] == pointcept_config(TINY) and blob["sparsegps"]["voxel_size"] == 0.15
    theirs = SpUNetV1M1(**{k: v for k, v in blob["config"].items() if k != "num_classes"})
    theirs.load_state_dict(blob["state_dict"], strict=True)

    read = read_export(out)
    assert read.info.task == "backbone" and read.info.voxel_size == 0.15
    assert all(torch.equal(read.state_dict[k], v) for k, v in state.items() if "grad_scaler" not in k)

    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"s{i}", 300, 3) for i in range(4)], tmp_path / "train", vocabulary=VOCAB,
                 progress=False)
    cfg = from_dict(SegConfig, {"micro_batch": 2, "global_batch": 2, "steps": 1, "device": "cpu", "num_workers": 0,
                                "output_dir": str(tmp_path / "seg"), "checkpoint_every": 1, "pretrained": str(out),
                                "freeze": "backbone",
                                "data": {"train": [str(tmp_path / "train")], "val": [],
                                         "transforms": {"voxel_size": 0.15, "augment": False}}})
    finetune_segmentation(cfg, progress=False)
    tuned = read_export(tmp_path / "seg" / "export.safetensors").state_dict
    assert torch.equal(tuned["backbone.encoder.1.0.conv1.weight"], state["backbone.encoder.1.0.conv1.weight"])


def test_pre_training_starts_from_a_pointcept_checkpoint(tmp_path):
    """`init_from: spunet.pth`: the U-Net (its shape and weights) comes from the checkpoint, the rest fresh."""
    from helpers import TINY_MODEL, pretrain_config, write_pretrain_shards

    from sparsegps.train.pretrain import PretrainTask

    theirs = randomised(SpUNetV1M1(6, base_channels=8, channels=(8, 16, 16, 8), layers=(1, 1, 1, 1)), seed=7)
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in theirs.state_dict().items()}},
               tmp_path / "spunet.pth")
    shards = write_pretrain_shards(tmp_path / "data")
    cfg = pretrain_config(shards, tmp_path / "run", model=TINY_MODEL)
    cfg.init_from = str(tmp_path / "spunet.pth")
    task = PretrainTask(cfg)
    task.configure()
    assert task.cfg.model.backbone.stem_kernel == 5 and task.cfg.model.backbone.dec_channels == [16, 8]
    model = task.model(initialise=True).eval()
    coords, feats = voxels(6, seed=8)
    with torch.no_grad():
        expected = theirs(coords, feats, 2)
    got = ours_forward(model.backbone, coords, feats)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
