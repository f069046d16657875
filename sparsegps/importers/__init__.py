"""Importers: real datasets into `Scene`s and shards.

- `sceneverse`: the SceneVerse release (ScanNet, 3RScan, MultiScan, ARKitScenes, HM3D,
  Structured3D, ProcThor) with its referrals, object captions and scene captions.
- `scannet`: ScanNet v2 scans (mesh, segments, aggregation, axis alignment) with ScanRefer and
  ReferIt3D (Nr3D, Sr3D) referrals.
- `pointcept`: per-scene `.npy` folders (coord, color, segment, instance) as Pointcept writes them.

A source lists scenes and language; `packing.pack` converts and writes them; `.pth` pickles are
only read through `safe_load.load_pth`. docs/IMPORTING.md shows the expected directory layouts.
"""
from __future__ import annotations

from .common import PROBLEM_KINDS, Annotation, Problem
from .packing import PackReport, format_summary, pack, read_report
from .pointcept import PointceptSource
from .safe_load import UnsafeFileError, load_pth
from .scannet import ReferralFiles, ScanNetSource
from .sceneverse import SceneVerseSource

FORMATS = ("sceneverse", "scannet", "pointcept")

__all__ = ["FORMATS", "PROBLEM_KINDS", "Annotation", "PackReport", "PointceptSource", "Problem", "ReferralFiles",
           "ScanNetSource", "SceneVerseSource", "UnsafeFileError", "format_summary", "load_pth", "pack",
           "read_report"]
