"""sparsegps: grounded 3D vision-language pre-training (GPS, SceneVerse) on sparse voxels, at scale."""
__version__ = "0.1.0"
