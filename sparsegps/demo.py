"""The whole product on 2 CPU cores in a few minutes: `python -m sparsegps.demo` (or `make demo`).

Five stores of procedural rooms, synthesized from different seeds and checked to share no room
(by point content): `pretrain`, `finetune` (and `finetune_few`, its first 16 rooms), `val` (where
every choice of the presets was made) and `test` (every number below is measured on it, and nothing
was chosen on it).

1. `sparsegps synth`         the five stores
2. `sparsegps pretrain`      GPS pre-training (tiny_cpu, the `dense` preset: texts, object classes and
                             per-voxel classes) with the labels of 4 classes withheld, their texts kept
                             (`data.holdout_classes`, `data.holdout: labels`)
3. `sparsegps eval-pretrain` held-out grounding: accuracy against the class prior, class and
                             within-class accuracy, by relation (a bar chart)
4. `sparsegps eval-seg --zero-shot`  segmentation by the pre-trained model alone, naming classes;
                             base classes, novel (held-out) classes and their harmonic mean (hIoU),
                             against guessing each point's class by the classes' point shares
5. `sparsegps finetune-seg`  segmentation on 16 labelled rooms, from the pre-trained model (its
                             zero-shot segmenter as the starting head) and from scratch (the same
                             language head, its own learning rate); since the `dense` preset consumed
                             per-voxel class labels of other rooms, scratch also gets as many
                             supervised steps as pre-training and fine-tuning together (`scratch+`).
                             Fine-tuning on all rooms, at more steps, over seeds and presets:
                             `sparsegps bench transfer`
6. gallery                   pictures of test referrals (right and wrong) and of one room's
                             segmentation, as `sparsegps show` draws them, in OUT/gallery/

Each step is the documented command, run as its own process, two at a time on one core each (the
scratch runs need no pre-training and run beside it); the results table is printed and written to
OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparsegps.files import atomic_write_text
from sparsegps.recipes.steps import Job, Jobs, command, parse_settings, run_recipe
from sparsegps.synth.splits import FEW_ROOMS, HOLDOUT_CLASSES, check_disjoint, synth_command


def _gallery(out: Path, test: Path, segmenter: Path) -> list[Path]:
    """Pictures of test referrals and one segmentation (see sparsegps.viz.gallery)."""
    import logging
    import warnings

    from sparsegps.viz.gallery import write_gallery

    # in this process, as `sparsegps` does for its commands: warnings nobody can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv\.")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    print(f"\n# gallery of test referrals and one segmentation -> {out / 'gallery'}", flush=True)
    return write_gallery(out / "gallery", test, out / "pretrain/export.safetensors", segmenter)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsegps.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--configs", default="configs", help="folder of the YAML configs")
    parser.add_argument("--pretrain-scenes", type=int, default=1600)
    parser.add_argument("--finetune-scenes", type=int, default=160)
    parser.add_argument("--val-scenes", type=int, default=40)
    parser.add_argument("--test-scenes", type=int, default=40)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--seg-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes that synthesize the rooms")
    parser.add_argument("--parallel", type=int, default=2, help="commands run at once (the cores shared)")
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pre-training config (repeatable): measure a variant, "
                             "e.g. --pretrain-set model.referral_contrast=projected")
    args = parser.parse_args(argv)

    out, configs = Path(args.out), Path(args.configs)
    data = out / "data"
    jobs = Jobs(out / "logs", parallel=args.parallel)
    counts = {"pretrain": args.pretrain_scenes, "finetune": args.finetune_scenes, "finetune_few": FEW_ROOMS,
              "val": args.val_scenes, "test": args.test_scenes}
    stores = {name: data / name for name in counts}
    for name, count in counts.items():
        jobs.add(Job(f"synth_{name}", synth_command(name, count, stores[name], args.seed, args.workers)))
    jobs.wait()
    try:
        check_disjoint(stores)
    except ValueError as e:
        raise SystemExit(f"the demo's splits leak: {e}") from None
    test = stores["test"]

    # pre-training on one core, the scratch runs (which need no pre-training) on the other: the demo
    # ends sooner than with pre-training alone on both cores as two ranks, 1.4x faster, and the
    # scratch runs after it (benchmarks/RESULTS.md, "demo")
    jobs.add(Job("pretrain", command("pretrain", {
        "steps": args.pretrain_steps, "seed": args.seed, "data.train": [stores["pretrain"]], "data.val": [],
        "data.holdout_classes": HOLDOUT_CLASSES, **parse_settings(args.pretrain_set)},
        config=configs / "pretrain/tiny_cpu.yaml", output_dir=out / "pretrain", overwrite=True)))
    export = out / "pretrain/export.safetensors"
    jobs.add(Job("grounding", command("eval-pretrain", checkpoint=export, data=test, out=out / "pretrain"),
                 after=["pretrain"]))
    jobs.add(Job("zero_shot", command("eval-seg", checkpoint=export, data=test, zero_shot=True, out=out / "zero_shot"),
                 after=["pretrain"]))

    # 16 rooms are 2 steps an epoch: no DataLoader worker to start anew every other step
    seg = {"seed": args.seed, "data.val": [test], "data.train": [stores["finetune_few"]], "num_workers": 0}
    # the dense preset consumed per-voxel class labels: scratch also gets its supervised steps
    supervised = args.pretrain_steps + args.seg_steps
    # from the pre-trained export, fine-tuning starts at its zero-shot segmenter (language head);
    # scratch has its own config (its own learning rate)
    arms = {"seg_few": ({"model.head": "language", "model.head_init": "zero_shot", "steps": args.seg_steps},
                        "seg/synthetic_cpu.yaml", export),
            "seg_few_scratch": ({"steps": args.seg_steps}, "seg/synthetic_cpu_scratch.yaml", None),
            "seg_few_scratch_long": ({"steps": supervised}, "seg/synthetic_cpu_scratch.yaml", None)}
    for name, (settings, config, pretrained) in arms.items():
        # every run folder is the demo's own: a demo run again starts each run afresh (--overwrite)
        jobs.add(Job(f"finetune_{name}", command("finetune-seg", {**seg, **settings}, config=configs / config,
                                                 pretrained=pretrained, output_dir=out / name, overwrite=True),
                     after=["pretrain"] if pretrained else []))
    jobs.wait()

    pre = _read(out / "pretrain/summary.json")
    grounding = _read(out / "pretrain/grounding.json")
    zero_shot = _read(out / "zero_shot/seg_report.json")
    seg_runs = {name: _read(out / name / "summary.json") for name in arms}
    from sparsegps.exports import read_export

    info = read_export(export).info
    summary = {
        "stores": {name: str(path) for name, path in stores.items()}, "measured_on": "test",
        "rooms": counts, "holdout_classes": list(HOLDOUT_CLASSES), "preset": info.preset,
        "labels_consumed": info.labels_consumed,
        "grounding_acc": grounding["accuracy"], "grounding_class_prior": grounding["class_prior"],
        "grounding_chance": grounding["chance"], "grounding_class_accuracy": grounding["class_accuracy"],
        "grounding_within_class_accuracy": grounding["within_class_accuracy"],
        "grounding_referrals": grounding["referrals"],
        "pretrain_steps": pre["pretrain_steps"],
        "pretrain_scenes_per_s": pre["pretrain_scenes_per_s"],
        "pretrain_voxels_per_s": pre["pretrain_voxels_per_s"],
        "holdout": info.holdout,
        "zero_shot_miou": zero_shot["miou"], "zero_shot_miou_seen": zero_shot["miou_seen"],
        "zero_shot_miou_unseen": zero_shot["miou_unseen"], "zero_shot_hiou": zero_shot["hiou"],
        "zero_shot_baseline": zero_shot["prior_miou"], "zero_shot_baseline_seen": zero_shot["prior_miou_seen"],
        "zero_shot_baseline_unseen": zero_shot["prior_miou_unseen"], "zero_shot_baseline_hiou": zero_shot["prior_hiou"],
        "seg_miou_few": seg_runs["seg_few"]["seg_miou"], "seg_miou_few_scratch": seg_runs["seg_few_scratch"]["seg_miou"],
        "seg_miou_few_scratch_long": seg_runs["seg_few_scratch_long"]["seg_miou"],
        "seg_steps": args.seg_steps, "seg_steps_scratch_long": supervised, "few_scenes": FEW_ROOMS,
        "pretrain_overrides": args.pretrain_set, "seconds": jobs.seconds,
    }
    t = time.perf_counter()
    gallery = _gallery(out, stores["test"], out / "seg_few/export.safetensors")
    summary["seconds"]["gallery"] = round(time.perf_counter() - t, 1)
    summary["total_seconds"] = jobs.total()
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print_results(summary, out, len(gallery))
    return 0


def print_results(s: dict, out: Path, pictures: int) -> None:
    few = s["few_scenes"]
    rows = [
        ("grounding accuracy", f"{s['grounding_acc']:.3f}",
         f"class prior {s['grounding_class_prior']:.3f}, chance {s['grounding_chance']:.3f} "
         f"({s['grounding_referrals']} referrals)"),
        ("  within the named class", f"{s['grounding_within_class_accuracy']:.3f}",
         f"class prior {s['grounding_class_prior']:.3f}; class named right {s['grounding_class_accuracy']:.3f}"),
        ("pre-training throughput", f"{s['pretrain_scenes_per_s']:.2f} scenes/s",
         f"{s['pretrain_voxels_per_s']:.0f} voxels/s, {s['pretrain_steps']} steps, "
         f"preset {s['preset']}"),
        ("zero-shot segmentation mIoU", f"{s['zero_shot_miou']:.3f}",
         f"guessing by point shares {s['zero_shot_baseline']:.3f}"),
        ("  base classes (labelled in pre-training)", f"{s['zero_shot_miou_seen']:.3f}",
         f"guessing {s['zero_shot_baseline_seen']:.3f}"),
        (f"  novel classes ({'labels withheld, texts kept' if s['holdout'] == 'labels' else 'labels and texts withheld'})",
         f"{s['zero_shot_miou_unseen']:.3f}",
         f"guessing {s['zero_shot_baseline_unseen']:.3f} ({', '.join(s['holdout_classes'])})"),
        ("  hIoU (harmonic mean of base and novel)", f"{s['zero_shot_hiou']:.3f}",
         f"guessing {s['zero_shot_baseline_hiou']:.3f}"),
        (f"segmentation mIoU, {few} rooms, pre-trained", f"{s['seg_miou_few']:.3f}",
         f"from scratch {s['seg_miou_few_scratch']:.3f} ({s['seg_steps']} steps), "
         f"{s['seg_miou_few_scratch_long']:.3f} ({s['seg_steps_scratch_long']} steps)"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * 96 + "\nsparsegps demo results (test rooms; nothing was chosen on them)\n" + "-" * 96)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    print("-" * 96 + f"\nwritten: {out / 'summary.json'}; loss curve: {out / 'pretrain/loss_curve.png'}; grounding: "
          f"{out / 'pretrain/grounding.png'}; confusion matrix: {out / 'seg_few/confusion.png'}\ngallery: {pictures} "
          f"pictures in {out / 'gallery'}\ntotal {s['total_seconds']:.0f} s")


if __name__ == "__main__":
    run_recipe(main)
