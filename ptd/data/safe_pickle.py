"""Unpickling data files without running code from them.

``pickle.load`` calls whatever callable a file names (``os.system`` included), so a downloaded
"dataset" could run a shell command on load. ``safe_load`` resolves only the globals a numpy-array
data file needs: numpy's array/dtype/scalar reconstruction, ``_codecs.encode`` (how protocol 2
spells a bytes literal) and ``bytes()`` with no argument (how protocols 0-2 spell an empty one, as
in the pickle of an empty array). Dicts, lists, tuples, str, bytes, ints and floats need no global
at all. Any other global is refused before it is called, with ``UnsafePickleError``. Nor may a
file allocate more than it holds: numpy's reconstruction is allowed only in the shape numpy's own
pickles use, an empty array that the file's bytes then fill.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

try:  # numpy >= 2 moved the private modules to numpy._core; files name either spelling
    from numpy._core import multiarray, numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric  # type: ignore[no-redef]


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a callable outside the allow-list; nothing from it was called."""


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocols 0-2 call it for ``b""``; any argument is refused, since ``bytes(n)``
    from a file would allocate n bytes (a 10**12 in 20 bytes of pickle)."""
    if args:
        raise UnsafePickleError("refused to call bytes() with arguments (only the empty bytes literal is allowed)")
    return b""


class _NdarrayType:
    """Stands in for ``numpy.ndarray``: files name it only as the first argument of ``_reconstruct``.
    Called itself, ``ndarray(shape, dtype)`` would allocate any shape a file asks for (an object array
    of 10**8 Nones is 800 MB from 60 bytes of pickle)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError("refused to call numpy.ndarray (arrays are read only through numpy's own pickle format)")


_NDARRAY = _NdarrayType()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``_reconstruct`` as numpy's pickles call it: an empty ndarray that the file's own bytes then
    fill (``__setstate__`` checks they match the shape). Any other shape is refused, since numpy
    allocates it uninitialised, and a shape of 10**10 bytes comes from 20 bytes of pickle."""
    if subtype is not _NDARRAY or shape != (0,):
        raise UnsafePickleError(f"refused numpy _reconstruct of shape {shape!r} (numpy's own pickles ask for (0,))")
    return multiarray._reconstruct(np.ndarray, (0,), dtype)


def _scalar(dtype: Any, *args: Any) -> Any:
    """``multiarray.scalar`` as numpy's pickles call it: a dtype and exactly its itemsize of bytes
    from the file. Called without the bytes, numpy allocates and zero-fills the itemsize, and a file
    may name a dtype of 2 GB in 125 bytes of pickle (review of the size-bomb fix)."""
    if not isinstance(dtype, np.dtype) or len(args) != 1 or not isinstance(args[0], (bytes, str)) \
            or len(args[0]) != dtype.itemsize:
        raise UnsafePickleError("refused numpy scalar without exactly its itemsize of bytes from the file")
    return multiarray.scalar(dtype, *args)


def _allowed() -> dict[tuple[str, str], Any]:
    import _codecs

    objs: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
        ("__builtin__", "bytes"): _empty_bytes,  # the Python 2 module name, as protocol 2 writes it
        ("builtins", "bytes"): _empty_bytes,
    }
    for mod in ("numpy.core", "numpy._core"):
        objs[(f"{mod}.multiarray", "_reconstruct")] = _reconstruct
        objs[(f"{mod}.multiarray", "scalar")] = _scalar
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
