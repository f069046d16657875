"""Pack real scenes and their language into HDF5 shards.

  sparsegps pack --format sceneverse --src SceneVerse/ --out shards/sceneverse --workers 8
  sparsegps pack --format scannet --src ScanNet/ --out shards/scanrefer_val --split val \\
      --scanrefer ScanRefer_filtered_val.json
  sparsegps pack --format pointcept --src scannet_pointcept/ --out shards/scannet_train --split train

Every annotation is checked against its scene: a target id that is not an object of the scene, or a
scene the source does not have, is reported with scan id and item id (and the text left out). A
summary ends the run; `<out>/pack_report.json` lists every problem, `<out>/pack_config.yaml` the
options used. A re-run with unchanged inputs does nothing; an interrupted run, re-run, rewrites only
the shards it had not finished. See docs/IMPORTING.md for the directory layouts.

Shards written by an earlier sparsegps (schema version 1) still read; `sparsegps pack --upgrade
DIR` rewrites them as the current version in place, one shard at a time and atomically, keeping
every scene's checksum (the new per-text fields stay empty: re-pack to fill them).

Exit status: 0 when scenes were packed (problems are reported, not fatal), 1 on bad arguments or
when no scene could be packed, and with --strict also when any problem was found.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from sparsegps.data.labels import LABEL_MAPS
from sparsegps.importers import FORMATS


@dataclasses.dataclass
class PackConfig:
    """The options of one `sparsegps pack` run (one field per flag), saved beside its shards."""

    format: str
    src: str
    out: str
    labels: str = "scannet200"
    workers: int = 1
    split: str | None = None
    scenes: str | None = None
    limit: int | None = None
    datasets: list[str] | None = None
    language: list[str] | None = None
    scanrefer: list[str] = dataclasses.field(default_factory=list)
    nr3d: list[str] = dataclasses.field(default_factory=list)
    sr3d: list[str] = dataclasses.field(default_factory=list)
    max_scenes_per_shard: int = 256
    compression: str = "none"
    force: bool = False
    strict: bool = False


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, help="layout of --src (required unless --upgrade)")
    parser.add_argument("--src", help="the downloaded dataset (see docs/IMPORTING.md; required unless --upgrade)")
    parser.add_argument("--out", help="directory for the shards, index.json and pack_report.json "
                                      "(required unless --upgrade)")
    parser.add_argument("--upgrade", nargs="+", metavar="SHARDS",
                        help="rewrite these shards or store directories as the current schema version, in place")
    parser.add_argument("--labels", default="scannet200", choices=LABEL_MAPS,
                        help="label map for per-point classes; the store's vocabulary (default: scannet200)")
    parser.add_argument("--workers", type=int, default=1, help="processes loading and converting scenes")
    parser.add_argument("--split", help="keep one split: SceneVerse annotations/splits files, ScanNet's official "
                                        "train/val/test lists, or a Pointcept split folder")
    parser.add_argument("--scenes", help="file with the scene ids to pack, one per line")
    parser.add_argument("--limit", type=int, help="pack only the first N scenes (to try a setup)")
    parser.add_argument("--datasets", type=_csv, help="SceneVerse: dataset folders to pack, e.g. ScanNet,3RScan")
    parser.add_argument("--language", type=_csv,
                        help="SceneVerse: language files to pack, as comma-separated patterns on the file name "
                             "without extension, e.g. 'ssg_ref_*,scene_cap' (default: all but sr3d+)")
    parser.add_argument("--scanrefer", action="append", default=[], metavar="JSON",
                        help="ScanNet/Pointcept: a ScanRefer file (repeatable)")
    parser.add_argument("--nr3d", action="append", default=[], metavar="CSV", help="ScanNet/Pointcept: an Nr3D CSV")
    parser.add_argument("--sr3d", action="append", default=[], metavar="CSV",
                        help="ScanNet/Pointcept: an Sr3D or Sr3D+ CSV")
    parser.add_argument("--max-scenes-per-shard", type=int, default=256)
    parser.add_argument("--compression", default="none",
                        help="none (default: contiguous tables, the fastest reads), lzf, gzip, or lz4 / blosc "
                             "(smaller; need the hdf5plugin package)")
    parser.add_argument("--force", action="store_true", help="convert everything even if the output is up to date")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any problem is found")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def open_source(cfg: PackConfig):
    """The importer source `cfg` describes; ValueError for options that do not fit its format."""
    from sparsegps.importers import PointceptSource, ReferralFiles, ScanNetSource, SceneVerseSource

    referral_files = ReferralFiles(list(cfg.scanrefer), list(cfg.nr3d), list(cfg.sr3d))
    if cfg.format == "sceneverse":
        if referral_files.paths():
            raise ValueError("--scanrefer/--nr3d/--sr3d are for --format scannet or pointcept; SceneVerse ships "
                             "its own copies under ScanNet/annotations/refer (pick them with --language)")
        return SceneVerseSource(Path(cfg.src), datasets=cfg.datasets, split=cfg.split, language=cfg.language)
    if cfg.datasets or cfg.language:
        raise ValueError("--datasets and --language are for --format sceneverse")
    if cfg.format == "scannet":
        return ScanNetSource(Path(cfg.src), split=cfg.split, language=referral_files)
    return PointceptSource(Path(cfg.src), split=cfg.split, language=referral_files)


def run(args) -> int:
    from sparsegps.config import save_config
    from sparsegps.data.scene import SceneFormatError
    from sparsegps.errors import UsageError
    from sparsegps.importers import format_summary, pack

    if args.upgrade:
        return upgrade(args)
    missing = [f"--{name}" for name in ("format", "src", "out") if not getattr(args, name)]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or --upgrade SHARDS)")
    cfg = PackConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PackConfig)})
    if cfg.workers < 1:
        raise UsageError("--workers must be at least 1")
    try:
        source = open_source(cfg)
        scene_ids = None
        if cfg.scenes:
            scene_ids = [line.strip() for line in Path(cfg.scenes).read_text().splitlines() if line.strip()]
        report = pack(source, cfg.out, label_map=cfg.labels, workers=cfg.workers, scene_ids=scene_ids,
                      limit=cfg.limit, force=cfg.force, max_scenes_per_shard=cfg.max_scenes_per_shard,
                      compression=None if cfg.compression == "none" else cfg.compression,
                      progress=sys.stderr.isatty())
    except ValueError as e:  # a bad flag or label map; a damaged scene is a SceneFormatError
        if isinstance(e, SceneFormatError):
            raise
        raise UsageError(str(e)) from None
    if report.scenes:
        save_config(cfg, Path(cfg.out) / "pack_config.yaml")
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_summary(report))
    if not report.scenes:
        raise UsageError(f"no scene could be packed from {cfg.src} (the problems are listed above)")
    if cfg.strict and report.problems:
        raise UsageError(f"{sum(report.problems.values())} problem(s) found (--strict; listed above)")
    return 0


def upgrade(args) -> int:
    """`--upgrade`: rewrite older-schema shards in place (atomically, checksums checked)."""
    from sparsegps.data.store import SCHEMA_VERSION, upgrade_shards

    rewritten = upgrade_shards(args.upgrade, compression=None if args.compression == "none" else args.compression,
                               progress=sys.stderr.isatty())
    print(f"upgraded {len(rewritten)} shard(s) to schema version {SCHEMA_VERSION}"
          + "".join(f"\n  {p}" for p in rewritten))
    return 0
