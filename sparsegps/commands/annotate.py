"""Add scene-graph language to packed scenes: an object caption for every object, scene captions,
and referrals (single relation, two relations, chain, between) checked to pick out their target
alone. Each shard is rewritten atomically; points and objects are left exactly as they were.

Texts depend only on --seed, the settings and each scene's id: `--seed S --config
OUT/synth_config.yaml --replace` on shards from `sparsegps synth --seed S` writes them again
identically. Existing texts are kept unless --replace."""
from __future__ import annotations

import sys
import time


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="SHARD", help="shard files or directories of shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the text generator (default 0)")
    parser.add_argument("--replace", action="store_true", help="drop the scenes' existing texts first")
    parser.add_argument("--config", help="YAML with language settings (LanguageConfig), or a synth_config.yaml "
                                         "whose `language` section is used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a language setting, e.g. referrals_per_scene=20 (repeatable)")


def language_config(path: str | None, overrides: list[str]):
    """LanguageConfig from a YAML file (a language section of a synth config counts) and overrides."""
    from sparsegps.config import apply_overrides, from_dict, read_yaml_mapping
    from sparsegps.language import LanguageConfig

    data: dict = {}
    if path is not None:
        data = read_yaml_mapping(path)
        if isinstance(data.get("language"), dict):
            data = data["language"]
    apply_overrides(data, overrides)
    return from_dict(LanguageConfig, data)


def run(args) -> int:
    from sparsegps.errors import UsageError
    from sparsegps.language.annotate import annotate_shards

    try:
        cfg = language_config(args.config, args.overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    start = time.perf_counter()
    report = annotate_shards(args.paths, args.seed, cfg, args.replace, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(f"annotated {report.scenes} scenes in {report.shards} shard(s) in {seconds:.1f} s "
          f"({report.scenes / max(seconds, 1e-9):.1f} scenes/s)")
    for kind in ("object_caption", "scene_caption", "referral"):
        print(f"  added {kind:<15} {report.texts.get(kind, 0)}")
    print("  referral shapes  " + ", ".join(f"{s} {n}" for s, n in sorted(report.shapes.items())))
    return 0
