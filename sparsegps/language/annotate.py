"""Add generated language to scenes already packed into shards, one shard at a time, atomically.

A shard is read whole, every scene gets its texts, and the shard is written again through the
store's writer (temp file, fsync, rename) with the same vocabulary, source, compression and extra
attributes. Points and objects are written back unchanged; scene ids and point counts stay the
same, so a directory's `index.json` stays valid.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import h5py

from sparsegps.data.store import SceneStore, _write_shard, resolve_shards

from .generate import LanguageConfig, generate_language, language_rng

# Shard attributes the writer sets itself; any others are carried over.
_WRITER_ATTRS = {"format", "schema_version", "source", "tool", "created", "label_vocabulary", "num_scenes"}


@dataclass
class AnnotateReport:
    shards: int = 0
    scenes: int = 0
    texts: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)
    rejected: int = 0


def annotate_shards(paths, seed: int = 0, cfg: LanguageConfig | None = None, replace: bool = False,
                    progress: bool = True) -> AnnotateReport:
    """Generate texts for every scene of the shards at `paths` (files or directories) and rewrite
    each shard in place. Existing texts are kept unless `replace`."""
    from tqdm.auto import tqdm

    cfg = cfg or LanguageConfig()
    report = AnnotateReport()
    shards = resolve_shards(paths)
    bar = tqdm(total=None, desc="annotating", unit="scene", disable=not progress)
    for path in shards:
        store = SceneStore([path])
        info = store.shards[0]
        scenes = [store[i] for i in range(len(store))]
        store.close()
        with h5py.File(path, "r") as f:
            compression = f.attrs.get("compression", f["points/xyz"].compression)
            compression = None if compression == "none" else compression
            extra = {k: v for k, v in f.attrs.items() if k not in _WRITER_ATTRS}
        annotated = []
        for scene in scenes:
            generated = generate_language(scene, language_rng(seed, scene.scene_id), cfg)
            kept = [] if replace else list(scene.texts)
            scene.texts = kept + generated.texts
            annotated.append(scene)
            report.texts.update(t.kind for t in generated.texts)
            report.shapes.update(generated.shape_counts())
            report.rejected += generated.rejected
            bar.update(1)
        _write_shard(path, annotated, info.vocabulary, info.source, compression, extra)
        report.shards += 1
        report.scenes += len(annotated)
    bar.close()
    return report
