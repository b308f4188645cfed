"""Reader for the IDX format used by MNIST and Fashion-MNIST (plain or gzip-compressed).

Layout: 2 zero bytes, a dtype code, the number of dims, then one big-endian uint32 per dim, then
the values in C order (big-endian for multi-byte types).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from contextlib import closing, contextmanager
from itertools import zip_longest
from pathlib import Path
from typing import BinaryIO, Iterator

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
    """Return ``folder/stem`` or ``folder/stem.gz``, whichever exists; None if neither does.

    Both there: the plain one if it holds what the .gz inflates to (``gunzip -k``), else a one-line
    ``DataError`` naming both. The plain one was read without a word, even an all-zero or
    half-copied one beside a good archive (bad-input audit); Debian's package ships only the .gz.
    Checking costs one read of each (0.4 s for all four of Fashion-MNIST, measured once), only when both
    are there. A folder in the way or one that cannot be read is a one-line ``DataError`` ending in
    ``fix``."""
    plain, gz = folder / stem, folder / f"{stem}.gz"
    found = [p for p in (plain, gz) if probe_file(p, fix)]
    if len(found) == 2 and not _same_content(plain, gz):
        raise DataError(f"{plain} and {gz} are both there, and the plain one is not what the .gz inflates to, so which "
                        f"to read is a guess; remove the stale one (Debian's package ships only the .gz files), or remake "
                        f"the plain one with gunzip -kf {gz}")
    return found[0] if found else None


def _same_content(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` hold the same bytes, each inflated if it is gzip (read by content, as
    ``read_idx`` reads them). Compared a slice at a time: stops at the first difference or when the
    shorter one ends, and holds two slices in memory whatever the sizes."""
    try:
        if os.path.samefile(a, b):  # a link from one name to the other
            return True
    except OSError:
        pass  # each is opened below, which names what cannot be read
    # Generators, not two nested ``_opened``: an error reading the outer file would be named as the inner one.
    with closing(_slices(a)) as sa, closing(_slices(b)) as sb:
        return all(x == y for x, y in zip_longest(sa, sb))


def _slices(path: Path) -> Iterator[bytearray]:
    """``path``'s bytes (inflated if gzip) in slices of ``_CHUNK``; read errors name ``path``."""
    with _opened(path) as (f, _, _):
        while chunk := _read_upto(f, _CHUNK):
            yield chunk


# Deflate expands at most 1032:1 (zlib's documented limit), so a gzip file of n bytes holds at most
# this many times n once inflated, whatever its header claims.
_DEFLATE_MAX_RATIO = 1032
# Payloads are read in slices of this many bytes (16 MiB), so memory grows with the data actually
# there, not with the size a header announces (BufferedReader.read(n) allocates all n bytes first).
_CHUNK = 1 << 24


@contextmanager
def _opened(path: Path) -> Iterator[tuple[BinaryIO, int, bool]]:
    """``path`` opened for reading (inflated if it is gzip), its size on disk in bytes, and whether it
    is gzip. Read errors become one-line ``DataError``s naming ``path``."""
    try:
        with open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            # gzip magic 1f 8b; decide by content, not by the file name.
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if not gz:
                yield raw, size, False
                return
            with gzip.GzipFile(fileobj=raw) as f:
                yield f, size, True
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        # A truncated or bit-flipped download: zlib's own message names no file and no fix.
        raise DataError(f"corrupt gzip file {path} ({type(e).__name__}: {e}); delete it and re-download or "
                        f"re-install the dataset files") from None
    except OSError as e:  # permission denied, a folder in its place...
        raise path_error(path, e, _FIX) from None


def _read_upto(f: BinaryIO, n: int) -> bytearray:
    """At most ``n`` bytes of ``f`` (fewer at its end), read a slice at a time."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(n - len(buf), _CHUNK))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path: str | Path, *, ndim: int | None = None, dtype_code: int | None = 0x08) -> torch.Tensor:
    """Read an IDX file into a tensor, checking magic number, dtype, dims and payload size.

    ``ndim``/``dtype_code`` are the expected values (``None`` accepts any). Any mismatch raises a
    ``DataError`` naming the file. The header is checked first and at most the payload it announces
    plus one byte is read, so a file that inflates or extends past its header costs no more than that.
    """
    path = Path(path)
    fix = _FIX
    with _opened(path) as (f, size, gz):
        magic = f.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
            raise DataError(f"malformed idx file {path}: bad magic number {magic.hex() or '(empty)'}; {fix}")
        code, nd = magic[2], magic[3]
        if code not in _DTYPES:
            raise DataError(f"malformed idx file {path}: unknown dtype code 0x{code:02x}; {fix}")
        if dtype_code is not None and code != dtype_code:
            raise DataError(f"malformed idx file {path}: dtype code 0x{code:02x}, expected 0x{dtype_code:02x}; {fix}")
        if ndim is not None and nd != ndim:
            raise DataError(f"malformed idx file {path}: {nd} dims, expected {ndim}; {fix}")
        header = 4 + 4 * nd
        raw_dims = f.read(4 * nd)
        if len(raw_dims) < 4 * nd:
            raise DataError(f"malformed idx file {path}: truncated header; {fix}")
        dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
        dt = _DTYPES[code]
        # Python ints, not np.prod: int64 wraps (dims 2**22, 2**21, 2**21 multiply to 0), and an empty
        # payload then passed this check only for reshape to fail as an "internal error".
        expected = math.prod(dims) * dt.itemsize
        # Before reading the payload, so an absurd header allocates nothing: a plain file's size is
        # exact; a gzip file's bounds what it can inflate to.
        if not gz and size - header != expected:
            raise DataError(f"malformed idx file {path}: payload is {size - header} bytes, dims {dims} need {expected}; "
                            f"{fix}")
        if gz and size * _DEFLATE_MAX_RATIO < header + expected:
            raise DataError(f"malformed idx file {path}: dims {dims} need {expected} bytes, more than a gzip file of "
                            f"{size} bytes can inflate to; {fix}")
        data = _read_upto(f, expected + 1)
    if len(data) > expected:
        raise DataError(f"malformed idx file {path}: payload runs past the {expected} bytes its dims {dims} need "
                        f"(stopped reading there); {fix}")
    if len(data) < expected:
        raise DataError(f"malformed idx file {path}: payload is {len(data)} bytes, dims {dims} need {expected}; {fix}")
    # A count of 0 beside huge dims matches an empty payload, but numpy refuses any shape whose
    # non-zero dims overflow its index type: no real dataset has such a header.
    if math.prod(d for d in dims if d) * dt.itemsize > np.iinfo(np.intp).max:
        raise DataError(f"malformed idx file {path}: dims {dims} describe an array too large to exist; {fix}")
    arr = np.frombuffer(data, dtype=dt).reshape(dims)
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
