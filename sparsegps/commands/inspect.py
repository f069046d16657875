"""Summarise shards (scenes, points, objects, texts per kind and per source, referrals per shape,
class histogram) and verify checksums.

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


def summarize(paths, verify: bool = True, progress: bool = False) -> dict:
    """The summary of the shards at `paths` as a dict (what `--json` prints)."""
    from sparsegps.data import inspect_store

    return inspect_store(paths, verify=verify, progress=progress).to_dict()


def format_summary(summary: dict, top: int = 25) -> str:
    lines = [f"shards   {summary['shards']}", f"scenes   {summary['scenes']}", f"points   {summary['points']}",
             f"objects  {summary['objects']}"]
    for kind in ("object_caption", "scene_caption", "referral"):
        lines.append(f"texts    {kind:<15} {summary['texts'].get(kind, 0)}")
    for title, counts in (("texts per source", summary["texts_per_source"]),
                          ("referrals per shape", summary["referrals_per_shape"])):
        if counts:
            lines.append(f"{title}:")
            width = max(len(name or "(none)") for name in counts)
            lines += [f"  {name or '(none)':<{width}} {n:>7}" for name, n in counts.items()]
    classes = list(summary["classes"].items())[:top]
    if classes:
        lines.append("classes:")
        width = max(len(c) for c, _ in classes)
        most = classes[0][1]
        lines += [f"  {cls:<{width}} {n:>7}  {'#' * max(1, round(30 * n / most))}" for cls, n in classes]
    return "\n".join(lines)


def run(args) -> int:
    from sparsegps.errors import UsageError

    try:
        summary = summarize(args.paths, verify=not args.no_verify, progress=sys.stderr.isatty())
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary, args.top))
    if args.plot:
        from sparsegps.viz.summary import per_scene_counts, plot_store_summary

        plot_store_summary(summary["classes"], per_scene_counts(args.paths), args.plot_out,
                           f"{', '.join(map(str, args.paths))}: {summary['scenes']:,} scenes", args.top)
        print(f"wrote {args.plot_out}", file=sys.stderr if args.json else sys.stdout)
    for problem in summary["errors"]:
        print(f"problem: {problem}", file=sys.stderr)
    if summary["errors"]:
        raise UsageError(f"{len(summary['errors'])} problem(s) found in {', '.join(map(str, args.paths))} "
                         f"(listed above)")
    return 0
