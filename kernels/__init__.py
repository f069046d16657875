"""Triton kernels and their autograd wrappers; installed as `sparsegps.kernels`.

Importing this package imports Triton. On CPU the kernels run only under the Triton interpreter:
set TRITON_INTERPRET=1 before the first import.

From the repository's root (the current directory on `sys.path`, as under `python -m` or pytest)
this folder is also importable as a top-level `kernels`, the name of a PyPI package that
transformers imports. Imported under that name, it loads that package in its place, or fails as
if this folder were not there.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repository]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from sparsegps.kernels.spatial_attention import inverse_max_pair_distance, spatial_attention

    __all__ = ["spatial_attention", "inverse_max_pair_distance"]
