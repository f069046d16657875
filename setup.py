"""sparsegps: grounded 3D vision-language pre-training on sparse voxels, at scale."""
import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"


def _install_choices():
    """sparsegps/install.py, loaded by path: the one place that knows the spconv builds and the
    requirements (setup.py runs before the package is importable)."""
    spec = importlib.util.spec_from_file_location("_sparsegps_install", ROOT / "sparsegps" / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


install = _install_choices()
# One extra per spconv build; install exactly one (they share a folder). `make install` picks it
# from the Python version and torch's CUDA (`python sparsegps/install.py choose`).
SPCONV_EXTRAS = {name: list(build.requirements) for name, build in install.SPCONV_BUILDS.items()}

setup(
    name="sparsegps",
    version=VERSION,
    description="GPS (SceneVerse) grounded 3D vision-language pre-training at scale: spconv U-Net, "
    "fused Triton spatial attention, HDF5 scene shards, DeepSpeed ZeRO",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and benchmarks/ sit at the top level of the repository but install inside the
    # package: a top-level module named `kernels` would shadow a PyPI package transformers probes for.
    packages=find_packages(include=["sparsegps", "sparsegps.*"]) + ["sparsegps.kernels", "sparsegps.benchmarks"],
    package_dir={"sparsegps.kernels": "kernels", "sparsegps.benchmarks": "benchmarks"},
    package_data={"sparsegps": ["resources/*", "resources/**/*"]},
    include_package_data=True,
    install_requires=install.RUNTIME_REQUIREMENTS,
    extras_require={
        **SPCONV_EXTRAS,
        "scatter": [install.TORCH_SCATTER_REQUIREMENT],  # without it pooling runs on native torch
        "dev": install.DEV_REQUIREMENTS,
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["sparsegps=sparsegps.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
