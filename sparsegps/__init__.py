"""sparsegps: grounded 3D vision-language pre-training (GPS, SceneVerse) on sparse voxels, at scale.

    sparsegps.configure_process()  # once, in a script's main: denormals, malloc, offline Hugging Face
    model, info = sparsegps.load_model("runs/demo/pretrain/export.safetensors", device="cpu")
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_model":  # imported on first use: `import sparsegps` stays free of torch
        from sparsegps.exports import load_model

        return load_model
    if name == "configure_process":
        from sparsegps.runtime import configure_process

        return configure_process
    raise AttributeError(f"module 'sparsegps' has no attribute {name!r}")
