"""Read `torch.save`d files of NumPy arrays without letting them run code.

SceneVerse ships its point clouds and instance labels as `.pth` files: pickles of tuples and
dicts of NumPy arrays. A pickle can name any Python callable, so an untrusted one can run
commands when loaded. `load_pth` reads them with `torch.load(..., weights_only=True)`, whose
unpickler only accepts an allow-list, extended here by exactly the NumPy pieces such files need:
`ndarray`, its `_reconstruct` helper, `dtype` and the numeric, boolean and string dtype classes,
and `scalar` (NumPy scalars, e.g. instance ids used as dict keys). Anything else (a call to
`os.system`, `subprocess`, `eval`, a custom class) stops the load before it happens and raises
`UnsafeFileError` naming the file.
"""
from __future__ import annotations

import functools
import os
import pickle
import re

from sparsegps.data.scene import SceneFormatError

# dtype characters of the dtype classes on the allow-list: bool, integers, floats, complex,
# unicode and byte strings. Object arrays ("O") are left out.
_ALLOWED_DTYPE_CODES = "?bBhHiIlLqQefdgFDGUS"
# Modules under which NumPy 1.x ("numpy.core") and 2.x ("numpy._core") pickle ndarray and scalars.
_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_REASON = re.compile(r"(Unsupported global: GLOBAL \S+|Trying to load unsupported GLOBAL \S+"
                     r"|Trying to call reduce for unrecognized function [^\n]+|Can only [^\n]+)")


class UnsafeFileError(SceneFormatError):
    """A pickle that asks for something outside the allow-list: refused without being run."""


@functools.lru_cache(maxsize=1)
def numpy_safe_globals() -> tuple:
    """The NumPy callables and classes `load_pth` allows, in the form
    `torch.serialization.safe_globals` takes (an object, or an (object, pickled name) pair)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype]
    for module in _MULTIARRAY_MODULES:
        allowed.append((multiarray._reconstruct, f"{module}._reconstruct"))
        allowed.append((multiarray.scalar, f"{module}.scalar"))
    for code in _ALLOWED_DTYPE_CODES:
        dtype_class = type(np.dtype(code))
        if dtype_class is not np.dtype and dtype_class not in allowed:
            allowed.append(dtype_class)
    return tuple(allowed)


def load_pth(path: str | os.PathLike):
    """Load a `torch.save`d file holding NumPy arrays, tensors and plain containers.

    Raises `UnsafeFileError` when the pickle needs anything outside the allow-list and
    `SceneFormatError` when the file is not a readable torch file; both name the file.
    """
    import torch

    path = os.fspath(path)
    with torch.serialization.safe_globals(list(numpy_safe_globals())):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _REASON.search(str(e))
            if reason is None:
                raise SceneFormatError(f"not a readable torch file ({_first_line(e)})", file=path) from None
            raise UnsafeFileError(
                f"refused to unpickle: {reason.group(1).rstrip('.')}. The file asks for code outside the "
                "allow-list of NumPy array types, so loading it could run arbitrary commands",
                file=path) from None
        except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
            raise SceneFormatError(f"not a readable torch file ({_first_line(e)})", file=path) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
