"""Unpickling data files without running code from them.

``pickle.load`` calls whatever callable a file names (``os.system`` included), so a downloaded
"dataset" could run a shell command on load. ``safe_load`` resolves only the globals a numpy-array
data file needs: numpy's array/dtype/scalar reconstruction, ``_codecs.encode`` (how protocol 2
spells a bytes literal) and ``bytes()`` with no argument (how protocols 0-2 spell an empty one, as
in the pickle of an empty array). Dicts, lists, tuples, str, bytes, ints and floats need no global
at all. Any other global is refused before it is called, with ``UnsafePickleError``.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a callable outside the allow-list; nothing from it was called."""


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocols 0-2 call it for ``b""``; any argument is refused, since ``bytes(n)``
    from a file would allocate n bytes (a 10**12 in 20 bytes of pickle)."""
    if args:
        raise UnsafePickleError("refused to call bytes() with arguments (only the empty bytes literal is allowed)")
    return b""


def _allowed() -> dict[tuple[str, str], Any]:
    import _codecs

    try:  # numpy >= 2 moved the private modules to numpy._core; files name either spelling
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    objs: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
        ("__builtin__", "bytes"): _empty_bytes,  # the Python 2 module name, as protocol 2 writes it
        ("builtins", "bytes"): _empty_bytes,
    }
    for mod in ("numpy.core", "numpy._core"):
        objs[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        objs[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol 5 arrays
            objs[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return objs


_ALLOWED = _allowed()


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refused to load {module}.{name} (only numpy arrays and plain containers are allowed)") from None


def safe_load(f: BinaryIO | bytes, encoding: str = "latin1") -> Any:
    """``pickle.load`` restricted to plain containers and numpy arrays.

    ``encoding='latin1'`` reads Python 2 pickles (CIFAR's) with their numpy arrays intact.
    Raises ``UnsafePickleError`` for any other global, other ``pickle``/``EOFError``... errors for
    a malformed file; the caller turns both into its one-line user error.
    """
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    return _Restricted(f, encoding=encoding).load()
