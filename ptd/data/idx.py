"""Reader for the IDX format used by MNIST and Fashion-MNIST (plain or gzip-compressed).

Layout: 2 zero bytes, a dtype code, the number of dims, then one big-endian uint32 per dim, then
the values in C order (big-endian for multi-byte types).
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from ptd.data.base import DataError, path_error, probe_file

# IDX dtype code -> numpy dtype (big-endian where it matters).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


_FIX = "re-download or re-install the dataset files"


def find_idx(folder: Path, stem: str, fix: str = f"set data.root to a folder holding the idx files, or {_FIX}") -> Path | None:
    """Return ``folder/stem`` or ``folder/stem.gz``, whichever exists (plain first).

    A folder in the way or one that cannot be read is a one-line ``DataError`` ending in ``fix``."""
    for p in (folder / stem, folder / f"{stem}.gz"):
        if probe_file(p, fix):
            return p
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        # gzip magic 1f 8b; decide by content, not by the file name.
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        # A truncated or bit-flipped download: zlib's own message names no file and no fix.
        raise DataError(f"corrupt gzip file {path} ({type(e).__name__}: {e}); delete it and re-download or "
                        f"re-install the dataset files") from None
    except OSError as e:  # permission denied, a folder in its place...
        raise path_error(path, e, _FIX) from None


def read_idx(path: str | Path, *, ndim: int | None = None, dtype_code: int | None = 0x08) -> torch.Tensor:
    """Read an IDX file into a tensor, checking magic number, dtype, dims and payload size.

    ``ndim``/``dtype_code`` are the expected values (``None`` accepts any). Any mismatch raises a
    ``DataError`` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    fix = "re-download or re-install the dataset files"
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"malformed idx file {path}: bad magic number {data[:4].hex() or '(empty)'}; {fix}")
    code, nd = data[2], data[3]
    if code not in _DTYPES:
        raise DataError(f"malformed idx file {path}: unknown dtype code 0x{code:02x}; {fix}")
    if dtype_code is not None and code != dtype_code:
        raise DataError(f"malformed idx file {path}: dtype code 0x{code:02x}, expected 0x{dtype_code:02x}; {fix}")
    if ndim is not None and nd != ndim:
        raise DataError(f"malformed idx file {path}: {nd} dims, expected {ndim}; {fix}")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataError(f"malformed idx file {path}: truncated header; {fix}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=nd, offset=4))
    dt = _DTYPES[code]
    # Python ints, not np.prod: int64 wraps (dims 2**22, 2**21, 2**21 multiply to 0), and an empty
    # payload then passed this check only for reshape to fail as an "internal error".
    expected = math.prod(dims) * dt.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"malformed idx file {path}: payload is {len(data) - header} bytes, dims {dims} need {expected}; {fix}"
        )
    # A count of 0 beside huge dims matches an empty payload, but numpy refuses any shape whose
    # non-zero dims overflow its index type: no real dataset has such a header.
    if math.prod(d for d in dims if d) * dt.itemsize > np.iinfo(np.intp).max:
        raise DataError(f"malformed idx file {path}: dims {dims} describe an array too large to exist; {fix}")
    arr = np.frombuffer(data, dtype=dt, offset=header).reshape(dims)
    # Native byte order and a writable copy, since torch cannot wrap big-endian or read-only buffers.
    return torch.from_numpy(arr.astype(dt.newbyteorder("="), copy=True))


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an images/labels pair: uint8 images [N, 1, H, W] and int64 labels [N], counts checked."""
    x = read_idx(images_path, ndim=3)
    y = read_idx(labels_path, ndim=1)
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"idx files disagree: {images_path} has {x.shape[0]} images but {labels_path} has {y.shape[0]} labels; "
            f"re-download or re-install the dataset files"
        )
    y = y.to(torch.int64)
    if y.numel() and int(y.max()) >= num_classes:
        raise DataError(
            f"bad labels in {labels_path}: max label {int(y.max())} but only {num_classes} classes; "
            f"re-download or re-install the dataset files"
        )
    return x.unsqueeze(1).contiguous(), y
