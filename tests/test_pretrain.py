"""Pre-training on DeepSpeed: ZeRO stages, two ranks, gradients through the cross-rank gather,
kill-and-resume, checkpoint fallback, export, NaN and config errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsegps.config import ConfigError, load_config, to_dict
from sparsegps.data import write_scenes
from sparsegps.exports import load_model, read_export
from sparsegps.train.pretrain import PretrainConfig, pretrain

from helpers import ROOT, VOCAB, logged_losses, losses as model_losses, pretrain_config as config, write_pretrain_shards

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_pretrain_shards(tmp_path_factory.mktemp("pretrain-data"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_single_process_zero_stages_lower_the_loss(shards, tmp_path, stage):
    torch.manual_seed(0)
    cfg = config(shards, tmp_path, steps=8, deepspeed=str(ROOT / f"configs/deepspeed/zero{stage}.json"),
                 data={"train": [str(shards / "train")], "val": [], "transforms": {"voxel_size": 0.15,
                                                                                    "augment": False}},
                 global_batch=8, micro_batch=4)
    summary = pretrain(cfg, progress=False)
    assert summary["zero_stage"] == stage and summary["pretrain_steps"] == 8
    curve = logged_losses(tmp_path)
    assert len(curve) == 8 and np.mean(curve[-2:]) < np.mean(curve[:2])
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*")) == ["step6", "step8"]  # keeps 2
    export = read_export(tmp_path / "export.safetensors")
    assert export.state_dict["backbone.stem.conv.weight"].dtype == torch.float32 and export.info.task == "pretraining"


def test_config_with_unknown_key_or_wrong_type_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 10\nmodel:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match="d_modle"):
        load_config(PretrainConfig, path)
    path.write_text("steps: ten\n")
    with pytest.raises(ConfigError, match="steps"):
        load_config(PretrainConfig, path)
    with pytest.raises(ConfigError, match="micro_batch"):
        load_config(PretrainConfig, None, ["micro_batch=1.5"])
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/tiny_cpu.yaml", ["model.d_model=96"])
    assert cfg.model.d_model == 96 and cfg.data.transforms.voxel_size == 0.15


def test_config_base_chain_merges_section_by_section_and_refuses_loops(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets/a.yaml").write_text("steps: 10\nmodel:\n  d_model: 64\n  num_heads: 4\n"
                                             "data:\n  train: [x, y]\n")
    (tmp_path / "b.yaml").write_text("base: presets/a.yaml\nmodel:\n  num_heads: 2\ndata:\n  train: [z]\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nsteps: 7\n")
    cfg = load_config(PretrainConfig, tmp_path / "c.yaml", ["model.d_model=32"])
    # c over b over a: lists replace, sections merge key by key, overrides come last
    assert (cfg.steps, cfg.model.d_model, cfg.model.num_heads, cfg.data.train) == (7, 32, 2, ["z"])
    (tmp_path / "presets/a.yaml").write_text("base: ../c.yaml\n")
    with pytest.raises(ConfigError, match="base chain loops"):
        load_config(PretrainConfig, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(PretrainConfig, tmp_path / "d.yaml")


def test_nan_loss_stops_naming_step_and_scenes(shards, tmp_path, monkeypatch):
    from sparsegps.criterion import GPSCriterion

    original = GPSCriterion.__call__

    def poisoned(self, outputs, batch):
        losses = original(self, outputs, batch)
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(GPSCriterion, "__call__", poisoned)
    from sparsegps.train.loop import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*scenes in the batch: \['t"):
        pretrain(config(shards, tmp_path, steps=2), progress=False)


RUN_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import pretrain_config as config
    from sparsegps.train.pretrain import pretrain
    from pathlib import Path
    torch.manual_seed(0)
    cfg = config(Path({shards!r}), Path(sys.argv[1]), steps=6, deepspeed={ds!r})
    if {slow}:
        import sparsegps.train.loop as loop
        original = loop.save_checkpoint
        def slow_save(*a, **k):
            original(*a, **k)
            import time; time.sleep(3)
        loop.save_checkpoint = slow_save
    if len(sys.argv) > 2:
        cfg.resume = "must"
    pretrain(cfg, progress=False)
""")


def _run(shards, out, *extra, slow=False, ds=None, wait=True):
    code = RUN_SCRIPT.format(tests=str(Path(__file__).parent), shards=str(shards), slow=slow, ds=ds)
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's own group
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        output = proc.communicate()[0].decode()
        assert proc.returncode == 0, output[-3000:]
    return proc


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(shards, tmp_path):
    _run(shards, tmp_path / "straight")
    proc = _run(shards, tmp_path / "killed", slow=True, wait=False)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt / "step2").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt / "step2").exists() and not (ckpt / "step6").exists()
    _run(shards, tmp_path / "killed", "--resume")
    a = read_export(tmp_path / "straight" / "export.safetensors").state_dict
    b = read_export(tmp_path / "killed" / "export.safetensors").state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert logged_losses(tmp_path / "straight")[-1] == logged_losses(tmp_path / "killed")[-1]


def test_corrupt_checkpoint_falls_back_to_previous_with_warning(shards, tmp_path, capsys):
    torch.manual_seed(0)
    pretrain(config(shards, tmp_path, steps=4), progress=False)
    newest = tmp_path / "checkpoints" / "step4" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # corrupted in place: same size as the manifest says
    newest.write_bytes(bytes(data))
    manifest = newest.parent / "manifest.json"  # as checkpoints without content hashes had it: the load fails
    described = json.loads(manifest.read_text())
    del described["blake2b"]
    manifest.write_text(json.dumps(described))
    partial = tmp_path / "checkpoints" / "step6"
    partial.mkdir()  # a checkpoint whose writer died before its manifest
    capsys.readouterr()
    with pytest.warns(UserWarning) as record:
        pretrain(config(shards, tmp_path, steps=6, resume="must"), progress=False)
    messages = [str(w.message) for w in record]
    assert any("step6 is unusable: no manifest" in m for m in messages)
    assert any("step4 is unusable: failed to load" in m for m in messages)
    assert f"resumed from {tmp_path / 'checkpoints'}/step2 " in capsys.readouterr().out
    assert read_export(tmp_path / "export.safetensors").info.step == 6


def measured_gradient_mask(cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """Per parameter, the elements whose gradient on a training batch is measured non-zero.

    Some gradients are exactly zero in exact arithmetic (a bias before a softmax: key projections,
    the key third of attention's in_proj_bias, the grounding head's last bias) and come out as
    rounding noise, ~1e-6 of the largest; Adam turns that noise into full-size updates that depend
    on the reduction order, so those elements are not compared."""
    from sparsegps.data import ScenesDataset, collate_scenes
    from sparsegps.models.gps import GPSModel

    torch.manual_seed(0)
    model = GPSModel(cfg.model)
    ds = ScenesDataset(cfg.data.train, cfg.data.transforms)
    model_losses(model, collate_scenes([ds[i] for i in range(cfg.micro_batch)]))["loss"].backward()
    grads = {n: p.grad.abs() for n, p in model.named_parameters() if p.grad is not None}
    largest = max(g.max() for g in grads.values())
    return {n: g > 1e-6 * largest for n, g in grads.items()}


@pytest.mark.slow
def test_zero3_export_loads_into_a_fresh_model_and_matches_zero0(shards, tmp_path):
    torch.manual_seed(0)
    pretrain(config(shards, tmp_path / "z0", steps=3), progress=False)
    torch.manual_seed(0)
    pretrain(config(shards, tmp_path / "z3", steps=3, deepspeed=str(ROOT / "configs/deepspeed/zero3.json")),
             progress=False)
    m0, _ = load_model(tmp_path / "z0" / "export.safetensors")
    m3, info = load_model(tmp_path / "z3" / "export.safetensors")
    assert info.vocabulary == VOCAB and info.model_config["d_model"] == 32
    measured = measured_gradient_mask(config(shards, tmp_path / "probe"))
    assert not measured["grounding_head.mlp.3.bias"].any()  # the bias before the softmax over objects
    assert measured["grounding_head.mlp.3.weight"].all()
    compared = 0
    for (n0, p0), (n3, p3) in zip(m0.state_dict().items(), m3.state_dict().items()):
        assert n0 == n3 and p0.shape == p3.shape
        if n0 in measured:
            mask = measured[n0]
            # Adam moves a weight by about lr = 2e-3 per step, whatever its gradient's size; the
            # stages' different reduction orders shift that by well under 2.5% of one step
            assert torch.allclose(p0[mask], p3[mask], rtol=0, atol=5e-5), n0
            compared += int(mask.sum())
    # all but a sliver of the scene-side weights (the word-embedding rows of absent tokens get none)
    assert compared > 0.99 * sum(p.numel() for n, p in m0.named_parameters() if not n.startswith("text."))
    from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes
    ds = ScenesDataset(shards / "val", TransformConfig(voxel_size=0.15, augment=False))
    batch = collate_scenes([ds[0], ds[1]])
    with torch.no_grad():
        out0, out3 = m0.eval()(batch), m3.eval()(batch)
    # the logits are compared as the softmax sees them: a shared shift (that bias) means nothing
    p0, p3 = out0["grounding_logits"].log_softmax(-1), out3["grounding_logits"].log_softmax(-1)
    assert p0.shape[0] > 0 and torch.allclose(p0, p3, atol=1e-4)


def test_csv_monitor_logs_every_loss_learning_rate_and_throughput(shards, tmp_path):
    torch.manual_seed(0)
    pretrain(config(shards, tmp_path, steps=2, monitor="csv",
                    data={"train": [str(shards / "train")], "val": [], "transforms": {"voxel_size": 0.15,
                                                                                       "augment": False}}),
             progress=False)
    files = {p.stem: p for p in (tmp_path / "monitor").rglob("*.csv")}
    for name in ("train_loss", "train_loss_grounding", "train_loss_mlm", "train_scenes_per_s", "train_lr_heads"):
        assert name in files, sorted(files)
        rows = files[name].read_text().splitlines()
        assert len(rows) == 3, rows  # header + steps 1 and 2
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step2 = files["train_loss"].read_text().splitlines()[2].split(",")
    assert float(step2[0]) == 2 and float(step2[1]) == pytest.approx(jsonl[1]["loss"], rel=1e-5)


def test_monitor_missing_package_is_named(shards, tmp_path, monkeypatch):
    import importlib.util

    from sparsegps.errors import UsageError
    from sparsegps.train.engine import check_monitor_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match="monitor: wandb needs the wandb package"):
        check_monitor_installed("wandb")


@pytest.mark.parametrize("path", sorted((ROOT / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pretraining_config_loads(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.steps > 0 and cfg.global_batch % cfg.micro_batch == 0


@pytest.mark.parametrize("name", ["base_gpu.yaml", "gps.yaml"])
def test_gpu_presets_start_on_1_to_64_gpus_at_their_global_batch(name):
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain" / name)
    assert all(cfg.global_batch % (cfg.micro_batch * gpus) == 0 for gpus in (1, 2, 4, 8, 16, 32, 64))


def test_gps_preset_keeps_gps_s_loss_set_and_schedule():
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/gps.yaml")
    weights = {k: v for k, v in vars(cfg.model.loss).items() if v}
    assert weights == {"scene_text": 1.0, "referral_object": 1.0, "mlm": 1.0}
    assert cfg.model.referral_contrast == "gps" and cfg.model.sentence_pooling == "cls"
    assert cfg.model.text.scene_caption_max_length >= 256
    assert (cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.no_decay) == (500, 0.1, "gps")
    assert (cfg.data.transforms.rotation, cfg.data.transforms.captions) == ("right_angles", "random")
    m = cfg.model
    assert (m.grounding_head, m.grounding_head_dropout, m.temperatures, m.scene_text_gather, m.spatial_max_dist) == \
        ("gps", 0.3, "fixed", "gps", "gps")


def test_object_stage_then_init_from_its_export(shards, tmp_path):
    """GPS's two stages: object classification alone, then a run that starts from its weights."""
    train_only = {"train": [str(shards / "train")], "val": [], "transforms": {"voxel_size": 0.15, "augment": False}}
    torch.manual_seed(0)
    pretrain(config(shards, tmp_path / "objects", steps=2, stage="objects", data=train_only), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "objects" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_object_class"] > 0 and r["loss"] == pytest.approx(r["loss_object_class"]) for r in rows)
    assert all(r["loss_scene_text"] == 0 and r["loss_object_text"] == 0 for r in rows)  # weight 0: not computed
    stage1 = read_export(tmp_path / "objects" / "export.safetensors").state_dict
    frozen = {"lr_text_encoder": 0.0, "lr_backbone": 0.0, "lr_heads": 0.0, "warmup_steps": 0}
    torch.manual_seed(1)  # another initialisation: the weights must come from the export
    pretrain(config(shards, tmp_path / "all", steps=1, data=train_only, optim=frozen,
                    init_from=str(tmp_path / "objects" / "export.safetensors")), progress=False)
    after = read_export(tmp_path / "all" / "export.safetensors").state_dict
    changed = [k for k in stage1 if not torch.equal(stage1[k], after[k])]
    assert all("running" in k or "num_batches" in k for k in changed), changed


def test_data_loader_workers_are_shut_down_when_training_ends(shards, tmp_path):
    """Workers ignore stop signals, so multiprocessing's terminate() at exit cannot end them: a run
    that left them to garbage collection hung at exit. After training they are gone."""
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    pretrain(config(shards, tmp_path / "run", steps=2, num_workers=1, data={
        **to_dict(config(shards, tmp_path).data), "val": []}), progress=False)
    assert {p.pid for p in multiprocessing.active_children()} - before == set()
