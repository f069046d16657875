"""Summarise shards (scenes, points, objects, texts per kind, class histogram) and verify checksums.

Exits non-zero when any shard or scene is unreadable or fails its checksum."""
from __future__ import annotations

import json
import sys


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", help="shard files or directories of shards")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    parser.add_argument("--top", type=int, default=25, help="classes to list in the histogram")
    parser.add_argument("--plot", action="store_true",
                        help="also draw the class histogram and per-scene distributions as a PNG")
    parser.add_argument("--plot-out", default="inspect.png", metavar="PNG", help="where --plot writes (inspect.png)")


def run(args) -> int:
    from sparsegps.data import inspect_store

    try:
        report = inspect_store(args.paths, verify=not args.no_verify, progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(f"shards   {report.shards}\nscenes   {report.scenes}\npoints   {report.points}\n"
              f"objects  {report.objects}")
        for kind in ("object_caption", "scene_caption", "referral"):
            print(f"texts    {kind:<15} {report.texts.get(kind, 0)}")
        if report.classes:
            print("classes:")
            width = max(len(c) for c, _ in report.classes.most_common(args.top))
            top = report.classes.most_common(1)[0][1]
            for cls, n in report.classes.most_common(args.top):
                print(f"  {cls:<{width}} {n:>7}  {'#' * max(1, round(30 * n / top))}")
    if args.plot:
        from sparsegps.viz.summary import per_scene_counts, plot_store_summary

        plot_store_summary(report.classes, per_scene_counts(args.paths), args.plot_out,
                           f"{', '.join(map(str, args.paths))}: {report.scenes:,} scenes", args.top)
        print(f"wrote {args.plot_out}", file=sys.stderr if args.json else sys.stdout)
    for err in report.errors:
        print(f"error: {err}", file=sys.stderr)
    if report.errors:
        print(f"{len(report.errors)} problem(s) found", file=sys.stderr)
        return 1
    return 0
