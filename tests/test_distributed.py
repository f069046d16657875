"""Two gloo ranks on one machine, on uneven data: the cross-rank gather keeps gradients (GPS's
scene-text loss does not); a rank whose micro-batch lacks referrals, captions, texts or objects stays
in step under ZeRO 0/2/3; losses are shares of global means; evaluation on two ranks equals one."""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from multirank import LACKS, join_as, odd_val_set, spawn, uneven_train_set, without
from helpers import losses, pretrain_config as config

from helpers import VOCAB, make_scene
from sparsegps.data import write_scenes

ROOT = Path(__file__).resolve().parents[1]


def _gather_worker(rank, world, port, out_dir):
    join_as(rank, world, port)
    import torch.distributed as dist

    from sparsegps import losses as L

    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    a_all = torch.randn(5, 4, generator=g)  # rank 0 holds rows 0-2, rank 1 rows 3-4
    b_all = torch.randn(5, 4, generator=g)
    rows = slice(0, 3) if rank == 0 else slice(3, 5)
    a = a_all[rows].clone().requires_grad_()
    b = b_all[rows].clone().requires_grad_()
    per_row, count = L.symmetric_info_nce(a, b, torch.tensor(3.0))
    loss = L.global_mean_share(per_row.sum(), count)
    loss.backward()
    # GPS's gather (scene_text_gather: gps): the same value, and nothing to differentiate
    gps_rows, _ = L.symmetric_info_nce(a, b, torch.tensor(3.0), gather_grad=False)
    gps_loss = L.global_mean_share(gps_rows.sum(), count)
    torch.save({"grad_a": a.grad, "grad_b": b.grad, "loss": loss.detach(), "gps_loss": gps_loss.detach(),
                "gps_requires_grad": gps_loss.requires_grad}, Path(out_dir) / f"rank{rank}.pt")


def test_scene_loss_sends_gradients_through_the_cross_rank_gather(tmp_path):
    spawn(_gather_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Oracle, one process: rank r's loss scores its rows against all rows, as its share of the mean
    # over all 5 rows (world x its rows' sum / 5); the total over ranks is what the two ranks'
    # backward passes jointly differentiate, and DeepSpeed's average of it is the global mean's.
    g = torch.Generator().manual_seed(0)
    a_all = torch.randn(5, 4, generator=g).requires_grad_()
    b_all = torch.randn(5, 4, generator=g).requires_grad_()
    an, bn = torch.nn.functional.normalize(a_all, dim=-1), torch.nn.functional.normalize(b_all, dim=-1)
    parts = []
    for rows in (slice(0, 3), slice(3, 5)):
        target = torch.arange(5)[rows]
        parts.append(2 / 5 * (torch.nn.functional.cross_entropy(3.0 * an[rows] @ bn.T, target, reduction="sum")
                              + torch.nn.functional.cross_entropy(3.0 * bn[rows] @ an.T, target, reduction="sum")) / 2)
    (parts[0] + parts[1]).backward()
    assert got[0]["loss"].item() == pytest.approx(parts[0].item(), rel=1e-6)
    assert got[1]["loss"].item() == pytest.approx(parts[1].item(), rel=1e-6)
    for r in range(2):
        assert got[r]["gps_loss"].item() == pytest.approx(got[r]["loss"].item(), rel=1e-6)
        assert not got[r]["gps_requires_grad"]
    assert torch.allclose(got[0]["grad_a"], a_all.grad[:3], atol=1e-6)
    assert torch.allclose(got[1]["grad_a"], a_all.grad[3:], atol=1e-6)
    assert torch.allclose(got[1]["grad_b"], b_all.grad[3:], atol=1e-6)
    # the other rank's loss really reaches these rows: without it (GPS's plain all_gather) the
    # gradient is only the local loss's
    a_local = a_all.detach()[:3].clone().requires_grad_()
    an_local = torch.nn.functional.normalize(a_local, dim=-1)
    local = 2 / 5 * (torch.nn.functional.cross_entropy(3.0 * an_local @ bn.detach().T, torch.arange(3), reduction="sum")
                     + torch.nn.functional.cross_entropy(3.0 * bn.detach()[:3] @ torch.cat(
                         [an_local, an.detach()[3:]]).T, torch.arange(3), reduction="sum")) / 2
    local.backward()
    assert (got[0]["grad_a"] - a_local.grad).abs().max() > 1e-3


def _leave_worker(rank, world, port, out_dir):
    join_as(rank, world, port)
    import torch.distributed as dist

    from sparsegps.distributed import leave

    dist.init_process_group("gloo", rank=rank, world_size=world)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    if rank == 1:
        time.sleep(1.0)  # rank 0 reaches leave() first
    arrived = time.time()
    leave()
    (Path(out_dir) / f"left{rank}.json").write_text(json.dumps(
        {"total": total.item(), "initialized": dist.is_initialized(), "arrived": arrived, "left": time.time()}))


def test_leaving_waits_for_every_rank_then_ends_the_group(tmp_path):
    """What every command run on several ranks does once it succeeded on all of them."""
    spawn(_leave_worker, str(tmp_path))
    left = [json.loads((tmp_path / f"left{r}.json").read_text()) for r in range(2)]
    assert [r["total"] for r in left] == [3.0, 3.0]
    assert not left[0]["initialized"] and not left[1]["initialized"]
    assert left[0]["left"] >= left[1]["arrived"]  # rank 0 waited for rank 1, a second late


def _pretrain_worker(rank, world, port, data, out, stage, micro_batch):
    join_as(rank, world, port)
    import deepspeed

    from sparsegps.train.pretrain import pretrain

    torch.manual_seed(0)
    deepspeed_json = str(ROOT / f"configs/deepspeed/zero{stage}.json") if stage else None
    cfg = config(Path(data), Path(out), steps=len(LACKS), global_batch=2 * micro_batch, micro_batch=micro_batch,
                 deepspeed=deepspeed_json, checkpoint_every=100, eval_every=2, dist_timeout_s=120,
                 data=data_config(Path(data)))
    captured = {}
    import sparsegps.train.task as module  # where the training skeleton builds its engine

    original = module.build_engine

    def keep_engine(*args, **kwargs):
        captured["engine"], ds_config = original(*args, **kwargs)
        return captured["engine"], ds_config

    module.build_engine = keep_engine
    summary = pretrain(cfg, progress=False)
    params = list(captured["engine"].module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        state = {n: p.detach().clone() for n, p in captured["engine"].module.named_parameters()}
    torch.save({"params": state, "summary": summary}, Path(out) / f"rank{rank}.pt")


def data_config(data: Path) -> dict:
    return {"train": [str(data / "train")], "val": [str(data / "val")], "eval_max_scenes": None,
            "transforms": {"voxel_size": 0.15, "augment": False}}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Two data sets (micro-batch 1 and 2) whose rank-1 micro-batches lack, step by step, referrals,
    scene captions, object captions, every text, every object; 3 held-out scenes."""
    root = tmp_path_factory.mktemp("uneven")
    for mb in (1, 2):
        uneven_train_set(root / f"mb{mb}" / "train", mb)
        odd_val_set(root / f"mb{mb}" / "val")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage,micro_batch", [(0, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_two_ranks_on_uneven_data_agree_and_evaluate_like_one(uneven, tmp_path, stage, micro_batch):
    """Rank 1 meets a micro-batch without referrals, scene captions, object captions, any text and
    any object; both ranks finish, end with bit-identical parameters, evaluated mid-run and at the
    end on an odd held-out set, and the 2-rank held-out metrics equal one process's."""
    data = uneven / f"mb{micro_batch}"
    spawn(_pretrain_worker, str(data), str(tmp_path), stage, micro_batch)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["params"].keys() == r1["params"].keys() and len(r0["params"]) > 50
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, len(LACKS) + 1))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")

    from sparsegps.eval.pretrain import evaluate_pretraining
    from sparsegps.exports import load_model

    model, _ = load_model(tmp_path / "export.safetensors")
    cfg = config(data, tmp_path / "one", data=data_config(data))
    one = evaluate_pretraining(model, cfg.data.val, cfg.data.transforms, torch.device("cpu"),
                               batch_size=micro_batch, progress=False)
    two = r0["summary"]
    assert one["eval_scenes"] == 3 and one["grounding_referrals"] > 0
    for key in ("grounding_acc", "grounding_chance", "grounding_referrals", "object_text_r1", "scene_text_r1",
                "scene_text_chance", "eval_scenes"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    assert r1["summary"]["grounding_acc"] == two["grounding_acc"]


def _split_batch_worker(rank, world, port, data, out):
    join_as(rank, world, port)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss, grads = _loss_and_gradients(data, [2 * rank, 2 * rank + 1])
    dist.all_reduce(loss)
    for g in grads.values():  # what DeepSpeed does to gradients: the mean over ranks
        dist.all_reduce(g)
        g /= world
    torch.save({"loss": loss / world, "grads": grads}, Path(out) / f"split{rank}.pt")


def _loss_and_gradients(data, indices) -> tuple[torch.Tensor, dict]:
    """Losses and gradients of the tiny model (eval mode: no dropout, BatchNorm's running
    statistics, so a scene's features do not depend on its batch) on the given training scenes."""
    from sparsegps.data import ScenesDataset, collate_scenes
    from sparsegps.models.gps import GPSModel

    cfg = config(Path(data), Path(data) / "unused", data=data_config(Path(data)))
    # the losses over voxels and objects too, with class weights from the global batch's counts
    model_cfg = dataclasses.replace(cfg.model, class_names=list(VOCAB), dense_class_balance=0.5,
                                    loss=dataclasses.replace(cfg.model.loss, dense_text=1.0, object_class=1.0,
                                                             region_text=1.0))
    torch.manual_seed(0)
    model = GPSModel(model_cfg).eval()
    ds = ScenesDataset(cfg.data.train, cfg.data.transforms)
    out = losses(model, collate_scenes([ds[i] for i in indices]))
    out["loss"].backward()
    parts = torch.stack([out[k].detach() for k in ("loss", "loss_grounding", "loss_referral_object",
                                                   "loss_object_text", "loss_scene_text", "loss_dense_text",
                                                   "loss_object_class", "loss_region_text")])
    return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_a_batch_split_over_two_ranks_has_the_loss_and_gradients_of_one(tmp_path):
    """Rank 0 holds two complete scenes, rank 1 one without any text and one without objects:
    the mean of the ranks' losses and of their gradients equals one process on all four scenes."""
    rng = np.random.default_rng(3)
    scenes = [make_scene(rng, f"s{i}", 300, int(rng.integers(2, 5))) for i in range(4)]
    scenes[2] = without(scenes[2], "every text", rng)
    scenes[3] = without(scenes[3], "every object", rng)
    write_scenes(scenes, tmp_path / "train", vocabulary=VOCAB, progress=False)
    odd_val_set(tmp_path / "val")
    spawn(_split_batch_worker, str(tmp_path), str(tmp_path))
    split = torch.load(tmp_path / "split0.pt", weights_only=True)
    loss, grads = _loss_and_gradients(str(tmp_path), [0, 1, 2, 3])
    assert (loss[1:] > 0).all()  # every loss term has terms
    assert torch.allclose(split["loss"], loss, rtol=1e-5, atol=1e-6), (split["loss"], loss)
    assert grads.keys() == split["grads"].keys()
    largest = max(g.abs().max() for g in grads.values())
    for name, g in grads.items():
        assert torch.allclose(split["grads"][name], g, rtol=1e-4, atol=1e-6 * largest), name
    # the local-mean normalisation this replaces would give another loss: rank 1 has no referral
    assert not torch.allclose(split["loss"][1], loss[1] / 2)


def _finetune_worker(rank, world, port, data, out):
    join_as(rank, world, port)
    from sparsegps.config import from_dict
    from sparsegps.train.finetune_ground import GroundConfig, finetune_grounding
    from sparsegps.train.finetune_seg import SegConfig, finetune_segmentation

    from helpers import TINY_MODEL

    data, out = Path(data), Path(out)
    transforms = {"voxel_size": 0.15, "augment": False}
    common = {"micro_batch": 1, "global_batch": 2, "steps": len(LACKS), "device": "cpu", "checkpoint_every": 100,
              "log_every": 1, "num_workers": 0, "dist_timeout_s": 120, "eval_every": 3,
              "deepspeed": str(ROOT / "configs/deepspeed/zero2.json"), "optim": {"warmup_steps": 0}}
    torch.manual_seed(0)
    seg = finetune_segmentation(from_dict(SegConfig, {
        **common, "output_dir": str(out / "seg"), "model": {"backbone": TINY_MODEL["backbone"]},
        "data": {"train": [str(data / "train")], "val": [str(data / "val")], "transforms": transforms}}),
        progress=False)
    ground = finetune_grounding(from_dict(GroundConfig, {
        **common, "output_dir": str(out / "ground"), "model": TINY_MODEL, "loss": {"referral_object": 0.5},
        "data": {"train": [str(data / "train")], "val": [str(data / "val")], "benchmark": "nr3d",
                 "transforms": {**transforms, "max_referrals": 2}}}), progress=False)
    torch.save({"seg": seg, "ground": ground}, out / f"finetune{rank}.pt")


@pytest.mark.slow
def test_two_ranks_fine_tune_segmentation_and_grounding_on_uneven_data(uneven, tmp_path):
    """The same uneven shards (rank 1: no referrals, no labelled voxels at some steps) through
    finetune-seg and finetune-ground on 2 ranks; their evaluations (each rank half the scenes) give
    both ranks one process's numbers for the export."""
    data = uneven / "mb1"
    spawn(_finetune_worker, str(data), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"finetune{r}.pt", weights_only=False) for r in range(2))
    assert r0["seg"]["seg_miou"] == r1["seg"]["seg_miou"]
    assert r0["ground"]["ground_steps"] == len(LACKS) and "ground_accuracy" in r0["ground"]
    evals = [json.loads(line) for line in (tmp_path / "ground" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [3]

    from sparsegps.eval.segmentation import evaluate_segmentation
    from sparsegps.exports import load_model

    model, info = load_model(tmp_path / "seg" / "export.safetensors")
    names = info.vocabulary
    report, _ = evaluate_segmentation(model, [str(data / "val")], 0.15, torch.device("cpu"), len(names), names,
                                      progress=False)
    assert report["miou"] == pytest.approx(r0["seg"]["seg_miou"], rel=1e-12)

    from sparsegps.eval.grounding_model import evaluate_grounding
    from sparsegps.train.finetune_ground import benchmark_headline

    model, _ = load_model(tmp_path / "ground" / "export.safetensors")
    one, _ = evaluate_grounding(model, [str(data / "val")], "nr3d", 0.15, torch.device("cpu"), progress=False)
    assert r0["ground"]["ground_referrals"] == r1["ground"]["ground_referrals"] == one["referrals"] > 0
    assert r0["ground"]["ground_accuracy"] == r1["ground"]["ground_accuracy"] == benchmark_headline(one)["ground_accuracy"]


def _stuck_rank_worker(rank, world, port, data, out):
    join_as(rank, world, port)
    from sparsegps.models.gps import GPSModel
    from sparsegps.train.pretrain import pretrain

    original, calls = GPSModel.forward, []

    def forward_that_sticks(self, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 2:  # rank 1 stops answering at step 2 (a deadlock, a dead node)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and dies when the test ends it, not 30 s later
            time.sleep(300)
        return original(self, batch)

    GPSModel.forward = forward_that_sticks
    cfg = config(Path(data), Path(out), steps=4, global_batch=2, micro_batch=1, checkpoint_every=100,
                 dist_timeout_s=10, data=data_config(Path(data)))
    pretrain(cfg, progress=False)


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_others_with_an_error_naming_rank_and_step(uneven, tmp_path):
    started = time.time()
    with pytest.raises(Exception) as failure:
        spawn(_stuck_rank_worker, str(uneven / "mb1"), str(tmp_path))
    message = str(failure.value)
    assert "CollectiveError: rank 0 of 2, step 2" in message and "TORCH_DISTRIBUTED_DEBUG" in message, message
    assert time.time() - started < 200  # dist_timeout_s, not the 300 s the stuck rank sleeps
