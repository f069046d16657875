"""Triton kernels and their autograd wrappers; installed as `sparsegps.kernels`."""
