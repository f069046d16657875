"""The whole product on 2 CPU cores in a few minutes: `python -m sparsegps.demo` (or `make demo`).

1. `sparsegps synth`         small procedural rooms with language, train and held-out splits
2. `sparsegps inspect`       what the shards hold
3. `sparsegps pretrain`      GPS pre-training (tiny_cpu) on DeepSpeed, held-out grounding accuracy
4. `sparsegps finetune-seg`  segmentation from the pre-trained model (backbone, and its zero-shot
                             segmenter as the starting head), and from scratch (linear head) with
                             the same budget, both evaluated on the held-out rooms (mIoU); the same
                             on 16 of the training rooms (few labels: what pre-training buys)
5. `sparsegps eval-seg --zero-shot`  segmentation by the pre-trained model alone, naming classes
6. gallery                   pictures of held-out referrals (right and wrong) and of one room's
                             segmentation, as `sparsegps show` draws them, in OUT/gallery/

Each step is the documented command, run as its own process; the results table is printed and
written to OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sparsegps.files import atomic_write_text


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHOWN = ("%|", "wrote ", "scenes ", "texts ", "resumed", "Error", "error")


def _run(args: list[str], log: Path) -> None:
    """Run `sparsegps ARGS`, showing the command, its progress bars and key lines, keeping the
    whole output in `log`."""
    cmd = [sys.executable, "-m", "sparsegps.cli", *args]
    print(f"\n$ sparsegps {shlex.join(args)}", flush=True)
    # each step is a world of its own: not the rendezvous of a process group this process may be in
    inherited = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env = {**inherited, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        pending = b""
        while chunk := proc.stdout.read1(65536):
            f.write(chunk)
            pending += chunk
            *segments, pending = re.split(rb"(?<=[\r\n])", pending)  # progress bars end in \r
            for segment in segments:
                text = segment.decode(errors="replace")
                if any(key in text for key in SHOWN):
                    sys.stdout.write(text)
                    sys.stdout.flush()
        if proc.wait():
            raise SystemExit(f"step failed (exit {proc.returncode}); see {log}")
    sys.stdout.write("\n")


FEW_ROOMS = 16


def majority_class_miou(confusion: np.ndarray) -> float:
    """mIoU of predicting the most frequent ground-truth class everywhere: that class's IoU is its
    share of the points, every other present class scores 0."""
    truth = confusion.sum(axis=1)
    return float(truth.max() / truth.sum() / (truth > 0).sum()) if truth.sum() else float("nan")


def _gallery(out: Path, val: Path) -> list[Path]:
    """Pictures of held-out referrals and one segmentation (see sparsegps.viz.gallery)."""
    import logging
    import warnings

    from sparsegps.viz.gallery import write_gallery

    # in this process, as `sparsegps` does for its commands: warnings nobody can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv\.")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    print(f"\n# gallery of held-out referrals and one segmentation -> {out / 'gallery'}", flush=True)
    return write_gallery(out / "gallery", val, out / "pretrain/export.pt", out / "seg/export.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsegps.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--configs", default="configs", help="folder of the YAML configs")
    parser.add_argument("--train-scenes", type=int, default=160)
    parser.add_argument("--val-scenes", type=int, default=40)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--seg-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pre-training config (repeatable): measure a variant, "
                             "e.g. --pretrain-set model.referral_contrast=gps")
    args = parser.parse_args(argv)

    out, configs = Path(args.out), Path(args.configs)
    data, logs = out / "data", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings = {}

    def step(name, argv_):
        t = time.perf_counter()
        _run(argv_, logs / f"{name}.log")
        timings[name] = round(time.perf_counter() - t, 1)

    step("synth_train", ["synth", "--preset", "demo", "--scenes", str(args.train_scenes), "--seed", str(args.seed),
                         "--out", str(data / "train")])
    step("synth_val", ["synth", "--preset", "demo", "--scenes", str(args.val_scenes), "--seed",
                       str(args.seed + 1), "--out", str(data / "val")])
    step("inspect", ["inspect", str(data / "train")])
    paths = [f"data.train=[{data / 'train'}]", f"data.val=[{data / 'val'}]"]
    sets = [x for p in paths for x in ("--set", p)]
    step("pretrain", ["pretrain", "--config", str(configs / "pretrain/tiny_cpu.yaml"), "--output-dir",
                      str(out / "pretrain"), "--set", f"steps={args.pretrain_steps}", "--set", f"seed={args.seed}",
                      *sets, *(x for item in args.pretrain_set for x in ("--set", item))])
    seg = ["finetune-seg", "--config", str(configs / "seg/synthetic_cpu.yaml"), "--set", f"steps={args.seg_steps}",
           "--set", f"seed={args.seed}", *sets]
    # from the pre-trained export, fine-tuning starts at its zero-shot segmenter (language head)
    pretrained = ["--pretrained", str(out / "pretrain/export.pt"), "--set", "model.head=language",
                  "--set", "model.head_init=zero_shot"]
    step("finetune_seg", [*seg, *pretrained, "--output-dir", str(out / "seg")])
    step("finetune_seg_scratch", [*seg, "--output-dir", str(out / "seg_scratch")])
    # the first 16 training rooms (a scene depends only on seed and index): few labelled scenes
    step("synth_few", ["synth", "--preset", "demo", "--scenes", str(FEW_ROOMS), "--seed", str(args.seed),
                       "--out", str(data / "train_few")])
    # 16 rooms are 2 steps an epoch: no DataLoader worker to start anew every other step
    few = [*seg, "--set", f"data.train=[{data / 'train_few'}]", "--set", "num_workers=0"]
    step("finetune_seg_few", [*few, *pretrained, "--output-dir", str(out / "seg_few")])
    step("finetune_seg_few_scratch", [*few, "--output-dir", str(out / "seg_few_scratch")])
    step("zero_shot", ["eval-seg", "--checkpoint", str(out / "pretrain/export.pt"), "--data", str(data / "val"),
                       "--zero-shot", "--out", str(out / "zero_shot")])

    pre = json.loads((out / "pretrain/summary.json").read_text())
    seg_pre = json.loads((out / "seg/summary.json").read_text())
    seg_scratch = json.loads((out / "seg_scratch/summary.json").read_text())
    few, few_scratch = (json.loads((out / name / "summary.json").read_text()) for name in ("seg_few", "seg_few_scratch"))
    zero_shot = json.loads((out / "zero_shot/seg_report.json").read_text())
    summary = {
        "grounding_acc": pre["grounding_acc"], "grounding_chance": pre["grounding_chance"],
        "grounding_referrals": pre["grounding_referrals"], "scene_text_r1": pre.get("scene_text_r1"),
        "scene_text_chance": pre.get("scene_text_chance"), "object_text_r1": pre.get("object_text_r1"),
        "pretrain_steps": pre["pretrain_steps"], "pretrain_scenes_per_s": pre["pretrain_scenes_per_s"],
        "pretrain_voxels_per_s": pre["pretrain_voxels_per_s"], "seg_miou": seg_pre["seg_miou"],
        "seg_miou_scratch": seg_scratch["seg_miou"], "seg_accuracy": seg_pre["seg_accuracy"],
        "seg_accuracy_scratch": seg_scratch["seg_accuracy"], "seg_miou_few": few["seg_miou"],
        "seg_miou_few_scratch": few_scratch["seg_miou"], "few_scenes": FEW_ROOMS,
        "zero_shot_miou": zero_shot["miou"], "zero_shot_accuracy": zero_shot["accuracy"],
        "zero_shot_baseline": majority_class_miou(np.array(zero_shot["confusion"])), "train_scenes": args.train_scenes,
        "val_scenes": args.val_scenes, "pretrain_overrides": args.pretrain_set, "seconds": timings,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    t = time.perf_counter()
    gallery = _gallery(out, data / "val")
    summary["seconds"]["gallery"] = round(time.perf_counter() - t, 1)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    rows = [
        ("held-out grounding accuracy", f"{summary['grounding_acc']:.3f}",
         f"chance {summary['grounding_chance']:.3f} ({summary['grounding_referrals']} referrals)"),
        ("scene-text retrieval R@1", f"{summary['scene_text_r1']:.3f}", f"chance {summary['scene_text_chance']:.3f}"),
        ("object-caption retrieval R@1", f"{summary['object_text_r1']:.3f}", "among the objects of each scene"),
        ("pre-training throughput", f"{summary['pretrain_scenes_per_s']:.2f} scenes/s",
         f"{summary['pretrain_voxels_per_s']:.0f} voxels/s, {summary['pretrain_steps']} steps"),
        ("segmentation mIoU, pre-trained", f"{summary['seg_miou']:.3f}", f"accuracy {summary['seg_accuracy']:.3f}"),
        ("segmentation mIoU, from scratch", f"{summary['seg_miou_scratch']:.3f}",
         f"accuracy {summary['seg_accuracy_scratch']:.3f}, same budget"),
        (f"segmentation mIoU, {FEW_ROOMS} rooms, pre-trained", f"{summary['seg_miou_few']:.3f}",
         f"from scratch {summary['seg_miou_few_scratch']:.3f}, same steps"),
        ("zero-shot segmentation mIoU", f"{summary['zero_shot_miou']:.3f}",
         f"no segmentation labels; majority class {summary['zero_shot_baseline']:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * 78 + "\nsparsegps demo results (held-out rooms)\n" + "-" * 78)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    print("-" * 78 + f"\nwritten: {out / 'summary.json'}; loss curve: {out / 'pretrain/loss_curve.png'}; "
          f"confusion matrix: {out / 'seg/confusion.png'}\ngallery: {len(gallery)} pictures in {out / 'gallery'}"
          f"\ntotal {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
