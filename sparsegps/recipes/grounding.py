"""Grounding that converges on 2 CPU cores in 45 minutes: `python -m sparsegps.recipes.grounding`
(or `make grounding`).

1. `sparsegps synth`            the disjoint stores of `sparsegps.synth.splits` (pre-training,
                                fine-tuning and test rooms)
2. `sparsegps pretrain`         configs/pretrain/grounding_cpu.yaml: tiny_cpu's model and losses,
                                longer, on many distinct rooms
3. `sparsegps eval-pretrain`    the pre-trained export on the test rooms
4. `sparsegps finetune-ground`  configs/ground/synthetic_cpu.yaml from that export, on the
                                fine-tuning rooms; its end-of-run evaluation (`data.val`) reads the
                                test rooms with the final weights (no checkpoint is chosen on them)

Both evaluations report accuracy, class and within-class accuracy against the class prior, by
relation and same-class count (grounding.png). The recipe's settings were chosen on validation
rooms of other seeds (RESULTS `## grounding`); this script makes no choice on the test rooms.
Writes OUT/summary.json and prints the results.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsegps.files import atomic_write_text
from sparsegps.synth.splits import check_disjoint, synth_command

from .steps import Job, Jobs, command, run_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsegps.recipes.grounding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/grounding", help="output folder")
    parser.add_argument("--configs", default="configs", help="folder of the YAML configs")
    parser.add_argument("--pretrain-scenes", type=int, default=4000)
    parser.add_argument("--finetune-scenes", type=int, default=2000)
    parser.add_argument("--test-scenes", type=int, default=100)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes that synthesize the rooms")
    args = parser.parse_args(argv)

    out, configs = Path(args.out), Path(args.configs)
    jobs = Jobs(out / "logs")  # one at a time: each uses every core
    counts = {"pretrain": args.pretrain_scenes, "finetune": args.finetune_scenes, "test": args.test_scenes}
    stores = {name: out / "data" / name for name in counts}
    for name, count in counts.items():
        jobs.add(Job(f"synth_{name}", synth_command(name, count, stores[name], args.seed, args.workers)))
    jobs.wait()
    check_disjoint(stores)
    steps = (lambda n: {"steps": n} if n else {})  # None: the config's
    export = out / "pretrain/export.safetensors"
    jobs.add(Job("pretrain", command(
        "pretrain", {"data.train": [stores["pretrain"]], "data.val": [], "seed": args.seed, **steps(args.pretrain_steps)},
        config=configs / "pretrain/grounding_cpu.yaml", output_dir=out / "pretrain", overwrite=True)))
    jobs.add(Job("pretrain_test", command("eval-pretrain", checkpoint=export, data=stores["test"], out=out / "pretrain"),
                 after=["pretrain"]))
    jobs.add(Job("finetune", command(
        "finetune-ground", {"data.train": [stores["finetune"]], "data.val": [stores["test"]], "seed": args.seed,
                            **steps(args.finetune_steps)},
        pretrained=export, config=configs / "ground/synthetic_cpu.yaml", output_dir=out / "ground", overwrite=True),
        after=["pretrain"]))
    jobs.wait()
    pre = json.loads((out / "pretrain/grounding.json").read_text())
    tuned = json.loads((out / "ground/grounding.json").read_text())
    summary = {"stores": {k: str(v) for k, v in stores.items()}, "measured_on": "test",
               "pretrained": {k: pre[k] for k in ("accuracy", "class_accuracy", "within_class_accuracy",
                                                  "class_prior", "chance", "referrals")},
               "finetuned": {k: tuned[k] for k in ("accuracy", "class_accuracy", "within_class_accuracy",
                                                   "class_prior", "chance", "referrals")},
               "seconds": jobs.seconds, "total_seconds": jobs.total()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print("\n" + "=" * 78 + "\ngrounding recipe (test rooms)\n" + "-" * 78)
    for name in ("pretrained", "finetuned"):
        s = summary[name]
        print(f"{name:<11} accuracy {s['accuracy']:.3f}  within-class {s['within_class_accuracy']:.3f}  class "
              f"{s['class_accuracy']:.3f}  class prior {s['class_prior']:.3f}  ({s['referrals']} referrals)")
    print("-" * 78 + f"\nbar charts: {out / 'pretrain/grounding.png'}, {out / 'ground/grounding.png'}; "
          f"total {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    run_recipe(main)
