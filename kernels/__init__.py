"""Triton kernels and their autograd wrappers; installed as `sparsegps.kernels`.

Importing this package imports Triton. On CPU the kernels run only under the Triton interpreter:
set TRITON_INTERPRET=1 before the first import.
"""
from sparsegps.kernels.spatial_attention import inverse_max_pair_distance, spatial_attention

__all__ = ["spatial_attention", "inverse_max_pair_distance"]
