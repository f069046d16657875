"""Generate procedural indoor rooms (ScanNet20 classes, labelled surface points) with scene-graph
language (object captions, scene captions, checked referrals) and write them as HDF5 shards.

Scene i depends only on --seed and i: the same seed gives identical shards whatever --scenes or
--workers. Settings come from --preset (scannet: ScanNet-like density; demo: small CPU rooms), then
--config, then the flags, then --set overrides; the resolved config is saved to OUT/synth_config.yaml."""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

_CONFIG = None


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--scenes", type=int, help="number of scenes (config key: scenes)")
    parser.add_argument("--seed", type=int, help="random seed (config key: seed)")
    from sparsegps.synth.config import PRESETS

    parser.add_argument("--preset", default="scannet", choices=PRESETS,
                        help="starting settings: sparsegps/resources/synth/PRESET.yaml over the defaults "
                             "(default scannet)")
    parser.add_argument("--config", help="YAML file with settings over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. objects=[8,20] or language.referrals_per_scene=4")
    parser.add_argument("--workers", type=int, default=1, help="generator processes (output does not change)")
    parser.add_argument("--shard-scenes", type=int, help="scenes per shard (config key: shard_scenes)")


def resolve_config(args):
    """The SynthConfig of a command line: preset < --config < flags < --set."""
    from sparsegps.config import ConfigError, apply_overrides, from_dict, read_yaml_mapping
    from sparsegps.synth import SynthConfig
    from sparsegps.synth.config import merge_settings, preset_dict

    data = preset_dict(args.preset)
    if args.config:
        data = merge_settings(data, read_yaml_mapping(args.config))
    for key, value in (("scenes", args.scenes), ("seed", args.seed), ("shard_scenes", args.shard_scenes)):
        if value is not None:
            data[key] = value
    apply_overrides(data, args.overrides)
    try:
        return from_dict(SynthConfig, data)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _init_worker(cfg):
    global _CONFIG
    _CONFIG = cfg


def _make_scene(index: int):
    """Scene `index` with its texts, plus the referral shapes and rejections for the summary."""
    from sparsegps.language import generate_language, language_rng
    from sparsegps.synth import generate_scene

    scene = generate_scene(_CONFIG, index, with_language=False)
    generated = generate_language(scene, language_rng(_CONFIG.seed, scene.scene_id), _CONFIG.language)
    scene.texts = generated.texts
    return scene, generated.shape_counts(), generated.rejected


def run(args) -> int:
    from sparsegps.config import save_config
    from sparsegps.data import write_scenes
    from sparsegps.errors import UsageError
    from sparsegps.synth import SYNTH_VOCABULARY

    cfg = resolve_config(args)
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "synth_config.yaml")

    stats = {"points": 0, "objects": 0, "rejected": 0, "texts": Counter(), "shapes": Counter(), "classes": set()}

    def collect(results):
        for scene, shapes, rejected in results:
            stats["points"] += scene.num_points
            stats["objects"] += len(scene.objects)
            stats["rejected"] += rejected
            stats["texts"].update(t.kind for t in scene.texts)
            stats["shapes"].update(shapes)
            stats["classes"].update(o.label for o in scene.objects)
            yield scene

    start = time.perf_counter()
    if args.workers == 1:
        _init_worker(cfg)
        paths = write_scenes(collect(map(_make_scene, range(cfg.scenes))), out, vocabulary=SYNTH_VOCABULARY,
                             source="sparsegps-synth", max_scenes_per_shard=cfg.shard_scenes,
                             total=cfg.scenes, progress=sys.stderr.isatty())
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (cfg,)) as pool:
            results = pool.imap(_make_scene, range(cfg.scenes), chunksize=2)
            paths = write_scenes(collect(results), out, vocabulary=SYNTH_VOCABULARY, source="sparsegps-synth",
                                 max_scenes_per_shard=cfg.shard_scenes, total=cfg.scenes,
                                 progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    n = cfg.scenes
    print(f"wrote {n} scenes to {len(paths)} shard(s) in {out} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} scenes/s)")
    print(f"  points per scene   {stats['points'] / n:,.0f}")
    print(f"  objects per scene  {stats['objects'] / n:.1f} ({len(stats['classes'])} classes)")
    for kind in ("object_caption", "scene_caption", "referral"):
        print(f"  {kind:<18} {stats['texts'].get(kind, 0)}")
    print("  referral shapes    " + ", ".join(f"{s} {stats['shapes'].get(s, 0)}" for s in cfg.language.shapes))
    if stats["rejected"]:
        print(f"  proposals rejected as ambiguous: {stats['rejected']}")
    return 0
