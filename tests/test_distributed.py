"""Two gloo ranks on one machine: the cross-rank gather keeps gradients (GPS's scene-text loss
does not), and data-parallel ZeRO-2 / ZeRO-3 training ends with identical parameters on both ranks."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _spawn(fn, *args, world: int = 2):
    from sparsegps.train.engine import free_port

    port = free_port()
    mp.spawn(fn, args=(world, port, *args), nprocs=world, join=True)


def _join(rank: int, world: int, port: int) -> None:
    launcher = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    os.environ.update(launcher)
    torch.set_num_threads(1)


def _gather_worker(rank, world, port, out_dir):
    _join(rank, world, port)
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
    torch.save({"grad_a": a.grad, "grad_b": b.grad, "loss": loss.detach()}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_scene_loss_sends_gradients_through_the_cross_rank_gather(tmp_path):
    _spawn(_gather_worker, str(tmp_path))
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


def _train_worker(rank, world, port, shards, out_dir, stage):
    _join(rank, world, port)
    sys.path.insert(0, str(Path(__file__).parent))
    import deepspeed

    from test_pretrain import config

    from sparsegps.data import ScenesDataset
    from sparsegps.models.gps import GPSModel
    from sparsegps.train.loop import build_engine, setup_run, train_loop

    torch.manual_seed(0)
    cfg = config(Path(shards), Path(out_dir) / "run", steps=3, global_batch=4, micro_batch=2,
                 deepspeed=str(ROOT / f"configs/deepspeed/zero{stage}.json"), checkpoint_every=100)
    run = setup_run(cfg)
    assert run.world == 2 and run.grad_accum == 1
    dataset = ScenesDataset(cfg.data.train, cfg.data.transforms, seed=cfg.seed)
    model = GPSModel(cfg.model)
    engine, _ = build_engine(run, model, model.parameter_groups(), cfg.optim)
    train_loop(run, engine, dataset, client_state={}, resume=False, progress=False)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save(state, Path(out_dir) / f"params{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_end_with_identical_parameters(tmp_path, stage):
    from sparsegps.data import write_scenes

    from conftest import VOCAB, make_scene

    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"t{i}", 300, 3) for i in range(8)], tmp_path / "train", vocabulary=VOCAB,
                 progress=False)
    write_scenes([make_scene(rng, f"v{i}", 300, 3) for i in range(2)], tmp_path / "val", vocabulary=VOCAB,
                 progress=False)
    _spawn(_train_worker, str(tmp_path), str(tmp_path), stage)
    p0 = torch.load(tmp_path / "params0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params1.pt", weights_only=True)
    assert p0.keys() == p1.keys() and len(p0) > 50
    for name in p0:
        assert p0[name].numel() > 0 and torch.equal(p0[name], p1[name]), name
    from test_pretrain import config

    from sparsegps.models.gps import GPSModel

    torch.manual_seed(0)
    initial = dict(GPSModel(config(tmp_path, tmp_path / "x").model).named_parameters())
    assert not torch.equal(initial["backbone.stem.conv.weight"], p0["backbone.stem.conv.weight"])  # it trained
