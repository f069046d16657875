"""From a source (SceneVerse, ScanNet v2, Pointcept folders) to HDF5 shards: plan the scenes and
their language, convert scenes (in worker processes if asked), check every annotation against its
scene, write shards in scene order, and report what was packed and every problem found.

Re-runs: `write_scenes` keeps each shard that already holds exactly the scenes it would receive,
so an interrupted run redoes the loading but rewrites only unfinished shards. When a previous run
completed with the same inputs and options (same file sizes and modification times, recorded as a
fingerprint in `pack_report.json`) and its shards are all present, nothing is loaded at all.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from sparsegps import __version__
from sparsegps.data.labels import load_label_map
from sparsegps.data.scene import Scene, SceneFormatError
from sparsegps.data.store import INDEX_NAME, write_scenes
from sparsegps.files import atomic_write_text
from sparsegps.runtime import configure_process

from . import pointcept, scannet, sceneverse
from .common import PROBLEM_KINDS, Annotation, Problem, attach_texts
from .safe_load import UnsafeFileError

REPORT_NAME = "pack_report.json"
SHARD_PREFIX = "shard"
# How many problems of one kind the report lists in full (all are counted).
MAX_EXAMPLES_PER_KIND = 10_000
LOADERS = {sceneverse.FORMAT: sceneverse.load_scene, scannet.FORMAT: scannet.load_scene,
           pointcept.FORMAT: pointcept.load_scene}


@dataclass
class SceneJob:
    """Everything a worker needs to produce one scene: its files and its language."""

    format: str
    scene_id: str
    files: dict[str, str]
    label_map: str
    annotations: list[Annotation]


@dataclass
class SceneResult:
    scene_id: str
    scene: Scene | None
    problems: list[Problem]


@dataclass
class PackPlan:
    """The scenes to pack, in order, with their files; the language is added by `add_language`."""

    jobs: list[SceneJob]
    known_scenes: set[str]
    problems: list[Problem]
    notes: list[str]
    language_files: list[Path]


@dataclass
class PackReport:
    """What a pack run did: counts of what was written and of every kind of problem."""

    format: str
    source: str
    out: str
    label_map: str
    scenes: int = 0
    points: int = 0
    objects: int = 0
    texts: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)
    problem_examples: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    shards: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    fingerprint: str = ""

    def add_problem(self, problem: Problem) -> None:
        self.problems[problem.kind] += 1
        examples = self.problem_examples.setdefault(problem.kind, [])
        if len(examples) < MAX_EXAMPLES_PER_KIND:
            examples.append(problem.to_dict())

    def to_dict(self) -> dict:
        return {"format": self.format, "source": self.source, "out": self.out, "label_map": self.label_map,
                "scenes": self.scenes, "points": self.points, "objects": self.objects, "texts": dict(self.texts),
                "problems": dict(self.problems), "problem_examples": self.problem_examples, "notes": self.notes,
                "shards": self.shards, "seconds": round(self.seconds, 3), "up_to_date": self.up_to_date,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> "PackReport":
        return cls(**{**d, "texts": Counter(d["texts"]), "problems": Counter(d["problems"])})


# ------------------------------------------------------------------------------------------ planning

def plan_pack(source, label_map: str, *, scene_ids: Iterable[str] | None = None,
              limit: int | None = None) -> PackPlan:
    """The scenes to pack, in order: those of the source, kept to its split and to `scene_ids` when
    given, the first `limit` of them when given. A repeated scene id is a problem."""
    problems: list[Problem] = []
    notes: list[str] = []
    entries: list[tuple[str, dict[str, str]]] = []
    seen: set[str] = set()
    for scene_id, files in source.scenes():
        first_file = next(iter(files.values()))
        if scene_id in seen:
            problems.append(Problem("bad_scene", "scene id repeats an earlier scene's; this copy is left out",
                                    scan_id=scene_id, file=first_file))
            continue
        seen.add(scene_id)
        entries.append((scene_id, files))
    keep = source.split_ids()
    if keep is not None:
        entries = [e for e in entries if e[0] in keep]
    if scene_ids is not None:
        wanted = list(dict.fromkeys(scene_ids))
        absent = [s for s in wanted if s not in seen]
        if absent:
            notes.append(f"{len(absent)} listed scenes are not in the source, e.g. {absent[:5]}")
        wanted_set = set(wanted)
        entries = [e for e in entries if e[0] in wanted_set]
    if limit is not None:
        entries = entries[:limit]
    jobs = [SceneJob(source.format, scene_id, files, label_map, []) for scene_id, files in entries]
    return PackPlan(jobs, seen, problems, notes, list(source.language_paths()))


def add_language(plan: PackPlan, source) -> None:
    """Read the source's language and hand each annotation to its scene's job.

    An annotation whose scene the source does not have at all is a "scene_missing" problem; one
    whose scene exists but is not selected for this run is only counted in a note.
    """
    by_scene = {job.scene_id: job.annotations for job in plan.jobs}
    not_selected = 0
    skipped: Counter = Counter()
    for item in source.annotations(skipped):
        if isinstance(item, Problem):
            plan.problems.append(item)
        elif item.scan_id in by_scene:
            by_scene[item.scan_id].append(item)
        elif item.scan_id in plan.known_scenes:
            not_selected += 1
        else:
            plan.problems.append(Problem("scene_missing", "the source has no such scene", scan_id=item.scan_id,
                                         item_id=item.item_id, file=item.file))
    if not_selected:
        plan.notes.append(f"{not_selected} annotations belong to scenes not selected for this run")
    plan.notes += [f"{n} rows skipped: {why}" for why, n in sorted(skipped.items())]
    plan.notes += source.notes


def fingerprint(plan: PackPlan, options: dict) -> str:
    """A hash of the options and of every input file's path, size and modification time."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(options, sort_keys=True).encode())

    def add(path) -> None:
        try:
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}|absent\n".encode())

    for job in plan.jobs:
        h.update(job.scene_id.encode())
        for path in job.files.values():
            if os.path.isdir(path):
                for child in sorted(os.listdir(path)):
                    add(os.path.join(path, child))
            else:
                add(path)
    for path in plan.language_files:
        add(path)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- converting

def convert(job: SceneJob) -> SceneResult:
    """Load one scene and attach its texts; a scene that cannot be loaded becomes a problem."""
    problems: list[Problem] = []
    try:
        scene = LOADERS[job.format](job.scene_id, job.files, job.label_map)
    except UnsafeFileError as e:
        return SceneResult(job.scene_id, None, [Problem("unsafe_file", e.reason, scan_id=job.scene_id, file=e.file)])
    except SceneFormatError as e:
        reason = f"{e.field}: {e.reason}" if e.field else e.reason
        return SceneResult(job.scene_id, None, [Problem("bad_scene", reason, scan_id=job.scene_id, file=e.file)])
    except FileNotFoundError as e:
        return SceneResult(job.scene_id, None, [Problem("bad_scene", f"missing file ({e.strerror})",
                                                        scan_id=job.scene_id, file=e.filename)])
    attach_texts(scene, job.annotations, problems)
    return SceneResult(job.scene_id, scene, problems)


def _init_worker() -> None:
    configure_process(threads=1)


def convert_all(jobs: list[SceneJob], workers: int = 1) -> Iterator[SceneResult]:
    """`convert` every job, in job order; with `workers` > 1 in that many processes, at most
    2 x workers scenes in flight."""
    if workers <= 1:
        yield from map(convert, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        todo = iter(jobs)
        in_flight = deque(pool.submit(convert, job) for job in itertools.islice(todo, 2 * workers))
        while in_flight:
            result = in_flight.popleft().result()
            job = next(todo, None)
            if job is not None:
                in_flight.append(pool.submit(convert, job))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------- packing

def read_report(out_dir: str | os.PathLike) -> PackReport | None:
    """The report of the last completed pack run in `out_dir`, if any."""
    path = Path(out_dir) / REPORT_NAME
    try:
        return PackReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _complete(out: Path) -> bool:
    try:
        index = json.loads((out / INDEX_NAME).read_text())
        return all((out / shard["file"]).is_file() for shard in index["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def pack(source, out_dir: str | os.PathLike, *, label_map: str = "scannet200", workers: int = 1,
         scene_ids: Iterable[str] | None = None, limit: int | None = None, force: bool = False,
         max_scenes_per_shard: int = 256, compression: str | None = None, progress: bool = True) -> PackReport:
    """Pack `source` into shards under `out_dir` and write `pack_report.json` beside them.

    The store's vocabulary is the label map's class names. Returns the report; when no scene could
    be packed, nothing is written and the report says why (`report.scenes == 0`).
    """
    start = time.perf_counter()
    vocabulary = load_label_map(label_map).names
    out = Path(out_dir)
    plan = plan_pack(source, label_map, scene_ids=scene_ids, limit=limit)
    options = {"format": source.format, "source": str(Path(source.root).resolve()), "label_map": label_map,
               "max_scenes_per_shard": max_scenes_per_shard, "compression": compression,
               "tool": __version__}
    digest = fingerprint(plan, options)
    previous = read_report(out)
    if not force and previous is not None and previous.fingerprint == digest and _complete(out):
        previous.up_to_date = True
        return previous
    add_language(plan, source)
    report = PackReport(source.format, str(source.root), str(out), label_map, notes=list(plan.notes),
                        fingerprint=digest)
    for problem in plan.problems:
        report.add_problem(problem)

    def scenes() -> Iterator[Scene]:
        for result in convert_all(plan.jobs, workers):
            for problem in result.problems:
                report.add_problem(problem)
            if result.scene is not None:
                report.scenes += 1
                report.points += result.scene.num_points
                report.objects += len(result.scene.objects)
                report.texts.update(t.kind for t in result.scene.texts)
                yield result.scene

    stream = scenes()
    first = next(stream, None)
    if first is not None:
        paths = write_scenes(itertools.chain([first], stream), out, vocabulary=vocabulary,
                             source=f"{source.format}:{source.root}", max_scenes_per_shard=max_scenes_per_shard,
                             compression=compression, prefix=SHARD_PREFIX, progress=progress, total=len(plan.jobs))
        report.shards = len(paths)
        _remove_stale_shards(out, {p.name for p in paths})
    report.seconds = time.perf_counter() - start
    if first is not None:
        atomic_write_text(out / REPORT_NAME, json.dumps(report.to_dict(), indent=1))
    return report


def _remove_stale_shards(out: Path, current: set[str]) -> None:
    """Delete shards of an earlier run that the new index no longer lists."""
    for path in itertools.chain(out.glob(f"{SHARD_PREFIX}-*.h5"), out.glob(f"{SHARD_PREFIX}-*.h5.tmp")):
        if path.name not in current:
            path.unlink()


def format_summary(report: PackReport, max_problems: int = 20) -> str:
    """The human-readable end-of-run summary: counts, then problems by kind with examples."""
    rate = report.scenes / report.seconds if report.seconds > 0 else 0.0
    lines = [f"{'up to date, nothing to do: ' if report.up_to_date else ''}{report.format} -> {report.out}",
             f"scenes   {report.scenes}" + (f"   ({rate:.1f} scenes/s)" if not report.up_to_date else ""),
             f"points   {report.points}", f"objects  {report.objects}", f"shards   {report.shards}"]
    for kind in ("object_caption", "scene_caption", "referral"):
        lines.append(f"texts    {kind:<15} {report.texts.get(kind, 0)}")
    if report.problems:
        lines.append("problems:")
        for kind, n in sorted(report.problems.items()):
            lines.append(f"  {kind:<15} {n:>8}  {PROBLEM_KINDS.get(kind, '')}")
        for kind in sorted(report.problems):
            examples = report.problem_examples.get(kind, [])
            for example in examples[:max_problems]:
                lines.append("  " + str(Problem(**example)))
            if report.problems[kind] > min(len(examples), max_problems):
                lines.append(f"  ... {report.problems[kind] - min(len(examples), max_problems)} more {kind} "
                             f"(see {REPORT_NAME})")
    else:
        lines.append("problems: none")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
