"""Shared data types, the dataset registry and the train/val/test carving used by every loader.

Each dataset module only has to turn files on disk into a ``RawDataset`` (train + test);
``load_dataset`` then carves the validation split, applies subsets and computes statistics the
same way for all of them, so those rules live in one place.
"""
from __future__ import annotations

import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch

from ptd.errors import PtdError, counted, least_shown
from ptd.registry import Registry, UnknownNameError


class DataError(PtdError):
    """Bad data input. The message is one line: what is wrong, which path, and how to fix it."""

    def __init__(self, message: str):
        # The CLI prints this without a traceback, so keep it to a single line.
        super().__init__(" ".join(str(message).splitlines()))


@dataclass
class Split:
    """In-memory split: ``x`` uint8 [N, C, H, W] on the CPU, ``y`` int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class FolderSplit:
    """On-disk split for datasets too large for memory: (image path, label) pairs."""

    samples: list[tuple[str, int]] = field(default_factory=list)
    image_size: int = 224

    def __len__(self) -> int:
        return len(self.samples)


AnySplit = Union[Split, FolderSplit]


def labels_of(split: AnySplit) -> torch.Tensor:
    """int64 [N] labels of a split, in memory or on disk (no image is read)."""
    if isinstance(split, FolderSplit):
        return torch.tensor([label for _, label in split.samples], dtype=torch.int64)
    return split.y


def fingerprint(splits: Any, root: str | None = None) -> dict[str, Any]:
    """What a run was trained and scored on, to tell later sessions whether the data is the same:
    each split's image count, and one sha256 over every split's labels and, for in-memory data,
    its pixels (Fashion-MNIST: 0.1 s), for folders the image paths (relative to ``root``) rather
    than their bytes (an ImageNet's 1.28M paths in a few seconds, its bytes in minutes). Deleting 6
    training images between two sessions of one run went unnoticed: the teacher and the first
    students were reused, the new students trained on other data and another validation split
    (real-data audit).

    Folders also get ``file_sizes``, a sha256 over every image's size in bytes: a dataset resized
    or re-encoded in place keeps its paths, and nearly every such rewrite changes sizes (one stat
    per image: 0.8 s for 120,000 files in the page cache on this 2-core machine, as much again as
    the rest of the fingerprint). An edit that keeps an image's byte count is not seen."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    sizes = hashlib.sha256()
    counts = {}
    folders = False
    for name in ("train", "val", "test"):
        sp = getattr(splits, name)
        counts[name] = len(sp)
        h.update(f"{name}:{len(sp)}\n".encode())
        h.update(labels_of(sp).contiguous().numpy())  # the buffer itself: tobytes() copied Tiny-ImageNet's 1.1 GB (review)
        if isinstance(sp, FolderSplit):
            folders = True
            # os.fsencode: the bytes the file system gave, so a name that is not UTF-8 (a Latin-1 folder
            # name from an old archive, held as surrogate escapes) hashes instead of raising; UTF-8 names
            # encode as before, so existing runs keep their fingerprint.
            h.update(os.fsencode("\n".join(os.path.relpath(p, root) if root else p for p, _ in sp.samples)))
            sizes.update(np.array([_file_size(p) for p, _ in sp.samples], dtype=np.int64))
        else:
            h.update(sp.x.contiguous().numpy())
    out: dict[str, Any] = {"images": counts, "sha256": h.hexdigest()}
    if folders:
        out["file_sizes"] = sizes.hexdigest()
    return out


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:  # removed or made unreadable since the folder was listed
        raise path_error(path, e, "restore it, or run again once the data folder is complete") from None


def test_set_facts(split: AnySplit, num_classes: int) -> dict[str, float | int]:
    """What a test accuracy is measured against: how many images, and chance, the accuracy of
    always answering the most frequent class (1/num_classes on a balanced set)."""
    y = labels_of(split)
    n = int(y.numel())
    chance = float(torch.bincount(y, minlength=num_classes).max()) / n if n else 0.0
    return {"n": n, "num_classes": num_classes, "chance": chance}


@dataclass
class Splits:
    name: str
    train: AnySplit
    val: AnySplit
    test: AnySplit
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]  # per channel, 0..1 scale
    std: tuple[float, ...]
    classes: list[str]


@dataclass
class RawDataset:
    """What a registered dataset loader returns: the official train and test sets, uncarved.

    ``mean``/``std`` are left ``None`` for in-memory data (computed from the carved train split)
    and set to known constants for folder datasets, whose pixels are never all in memory.
    """

    train: AnySplit
    test: AnySplit
    classes: list[str]
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # Where each split was read from (a file, files or a folder) and how to repair the dataset:
    # ``check_raw`` names them when the labels are wrong for every format in one place.
    train_from: str = ""
    test_from: str = ""
    fix: str = "re-download or re-extract the dataset files"


# A loader takes (root, download=..., cache_dir=...) and returns a RawDataset.
DatasetLoader = Callable[..., RawDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def default_cache_dir(cache_dir: str | None) -> Path:
    """Where downloads go when the user names no cache folder."""
    return Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/ptd").expanduser()


# ----------------------------------------------------------------------------- touching paths
def path_error(path: Path | str, e: OSError, fix: str) -> DataError:
    """The one-line error for an OSError met while touching ``path`` (permission denied, a file where
    a folder is expected, a name too long...): the path the OS refused, its reason, and ``fix``."""
    where = e.filename if isinstance(e.filename, str) and e.filename else str(path)
    reason = e.strerror or type(e).__name__
    hint = "make it readable (check the permissions of it and of the folders above it), or " if isinstance(
        e, PermissionError) else ""
    return DataError(f"cannot read {where} ({reason}); {hint}{fix}")


def _link_target(path: Path | str) -> str:
    """Where the symbolic link ``path`` points, quoted, for a message."""
    try:
        return repr(os.readlink(path))
    except OSError:
        return "a path"


def _stat(path: Path, fix: str) -> os.stat_result | None:
    """``path.stat()``; None when nothing is there. Python 3.11's ``is_file``/``is_dir`` raise on
    every other OSError (a folder without read permission above ``path``): one line instead.

    A symbolic link at ``path`` whose target is gone is not "nothing there": it said "file not found"
    for the link's own name, which the user can see is there (bad-input audit); the line names
    the link and where it points."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise DataError(f"{path} is a symbolic link to {_link_target(path)}, which leads to no file or folder; "
                            f"fix the link, or {fix}") from None
        return None
    except OSError as e:
        raise path_error(path, e, fix) from None


def probe_file(path: Path, fix: str) -> bool:
    """True if ``path`` is a regular file, False if nothing is there; anything else there (a folder,
    a device) or an unreadable folder on the way is a one-line ``DataError`` naming the path."""
    st = _stat(path, fix)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DataError(f"{path} is {kind}, expected a data file; {fix}")
    return True


def probe_dir(path: Path, fix: str, role: str | None = None) -> bool:
    """True if ``path`` is a folder, False if nothing is there; a file there, or an unreadable folder
    on the way, is a one-line ``DataError`` naming the path (and ``role``, e.g. "data.root")."""
    st = _stat(path, fix)
    if st is None:
        return False
    if not stat.S_ISDIR(st.st_mode):
        if role is None:
            raise DataError(f"{path} is a file, expected a folder; {fix}")
        kind = "a file" if stat.S_ISREG(st.st_mode) else "not a folder (a FIFO, socket or device)"
        raise DataError(f"{role} {path} is {kind}, not a folder; {fix}")
    return True


def probe_root(path: Path, fix: str) -> bool:
    """``probe_dir`` for ``data.root`` itself. A file given as data.root said only that the first
    data file under it was not found (bad-input audit): here it is named as data.root, with ``fix``."""
    return probe_dir(path, fix, "data.root")


def _regular_file(path: Path, fix: str) -> bool:
    """Whether ``path`` is a regular file; a folder or nothing there is False (a folder named like a
    data file, CIFAR-100's ``train`` beside an ImageNet-style ``train/``, is not that layout's file).
    An unreadable folder on the way or a dangling link is a one-line ``DataError`` ending in ``fix``."""
    st = _stat(path, fix)
    return st is not None and stat.S_ISREG(st.st_mode)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def one_layout(pretty: str, root: Path, nested: Path, needs: list[str], fix: str,
               has: Callable[[Path], bool] | None = None, role: str = "data.root") -> Path | None:
    """The one of ``root`` itself and ``nested`` (the dataset's own folder name under it) that holds
    every file in ``needs`` (paths relative to it); None when neither does, for the loader's own
    message naming what is missing. ``has(path)``: whether that file is there (default: a regular
    file; a dangling link or an unreadable folder is a ``DataError`` ending in ``fix``). Every
    loader that accepts both a dataset folder and the folder above it decides here, by a stat of
    each name in each place (14 for CIFAR-10), reading no file.

    When both could be read, the loaders read the first they tried without a word: Fashion-MNIST
    the files in ``root``, CIFAR and Tiny-ImageNet ``nested`` (a tiny-imagenet-200.zip unzipped
    inside its own folder is the usual way to get there). The two copies may differ, so both
    complete is a one-line ``DataError`` naming them and how to read either.

    One complete and the other holding some but not all of ``needs``: that one is refused too. Its
    files are the dataset's own, by name, where the loader looks, so it is plausibly the copy meant
    (an interrupted download, extraction or copy replacing the other, the usual reason to have a
    part of a dataset), and reading the complete one would silently train on the copy being
    replaced. The fix is one ``mv`` or ``rm``. A layout holding none of ``needs`` (an empty
    ``cifar-10-batches-py/``, a ``train/`` folder of another dataset beside ``tiny-imagenet-200/``)
    is no copy and is not looked at further. The same folder reached twice (``nested`` a link to
    ``root``) is one layout."""
    if has is None:
        def has(path: Path) -> bool:
            return _regular_file(path, fix)
    if _same_folder(root, nested):
        return root if all(has(root / n) for n in needs) else None
    held = {d: [n for n in needs if has(d / n)] for d in (nested, root)}
    complete = [d for d, h in held.items() if len(h) == len(needs)]
    if not complete:
        return None
    if len(complete) == 2:
        raise DataError(f"{pretty}: {role} {root} holds two complete copies, {nested} and the files in {root} itself, "
                        f"which may differ, so which to read is a guess; set data.root to {nested} to read that one, or "
                        f"move {nested} out of {root} to read the one in {root} itself")
    good = complete[0]
    part = root if good == nested else nested
    if not held[part]:
        return good
    missing = next(n for n in needs if n not in held[part])
    what = (f"{part} holds {len(held[part])} of its {len(needs)} files (no {missing}), an interrupted download, "
            f"extraction or copy perhaps, beside the complete copy in {good}, so which is meant is a guess")
    if good == nested:
        how = (f"set data.root to {nested} to read the complete one, or complete the files in {root} and move {nested} "
               f"out of it")
    else:
        how = f"move {nested} out of {root} to read {root}'s own files, or complete it and set data.root to {nested}"
    raise DataError(f"{pretty}: {role} {root}: {what}; {how}")


def check_cache_dir(cache_dir: str | None) -> Path:
    """The cache folder (``data.cache_dir``, else ~/.cache/ptd), created and proven writable now.

    Called by the loaders that will write there (a download, the Tiny-ImageNet decode cache) before
    any work, so a file given as the folder or a read-only folder is one line at load rather than
    warnings and a slower run. The proof is a real temporary file, removed again: permission bits
    alone do not tell (root, ACLs, read-only mounts)."""
    path = default_cache_dir(cache_dir)
    key = "data.cache_dir" if cache_dir else "data.cache_dir (unset, so the default)"
    fix = "set data.cache_dir to a writable folder"
    try:
        if path.exists() and not path.is_dir():
            raise DataError(f"{key} {path} is a file, not a folder; {fix}")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".ptd-write-test-"):
            pass
    except OSError as e:  # a file on the way, permission denied, a read-only file system
        raise DataError(f"{key} {path} cannot be written ({e.strerror or type(e).__name__}); {fix}") from None
    return path


# ----------------------------------------------------------------------------- checking the data
def check_raw(name: str, raw: RawDataset) -> None:
    """Refuse what no format-level check catches and nothing can be learned from: an empty split,
    a label outside 0..num_classes-1, or a training set with fewer than two classes (a model would
    score 100% by answering the one class, which reads as success)."""
    k = len(raw.classes)
    for split_name, split, where in (("training", raw.train, raw.train_from), ("test", raw.test, raw.test_from)):
        src = f" ({where})" if where else ""
        if len(split) == 0:
            raise DataError(f"{name}: the {split_name} split{src} holds 0 images; {raw.fix}")
        y = labels_of(split)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            raise DataError(f"{name}: the {split_name} split{src} has label {lo if lo < 0 else hi}, outside "
                            f"0..{k - 1} for its {k} classes; {raw.fix}")
    present = torch.unique(labels_of(raw.train))
    if present.numel() < 2:
        only = raw.classes[int(present[0])] if k else "?"
        src = f" ({raw.train_from})" if raw.train_from else ""
        raise DataError(f"{name}: the training split{src} holds images of {present.numel()} class ({only!r} of {k}); "
                        f"a classifier needs at least 2, so check the labels or the class folders; {raw.fix}")


# Opening every file of a folder split before training, so a corrupt, truncated or unreadable
# image stops the run at load instead of mid-epoch. Measured through this function (2026-11, PIL
# 13, a shared 2-core VM, page cache warm), seconds per 1,000 images and CPU thread:
#                                 headers (open + verify)   full (convert("RGB"), as the loader)
#   2,000 64x64 PNG + JPEG              0.06 - 0.13                  0.2 - 0.5
#   500x375 JPEG (ImageNet-like)        0.08 - 0.18                  1.5 - 4.2
# A full decode of ImageNet's 1.28M JPEGs would cost 30-90 CPU-minutes on every load (each train,
# resume, eval), so the default checks headers: every format's header, and for PNG every chunk's
# CRC (a truncated or bit-flipped PNG is found); ImageNet costs 2-4 CPU-minutes, spread over
# threads (and cold-disk reads overlap there). For JPEG it also reads the last 4 KB for the end
# marker, so a JPEG cut short after its header is found here too: +0.02-0.05 s per 1,000 500x375
# JPEGs (0.07-0.11 against 0.05-0.06, warm cache, one thread). Every other format (BMP, PPM,
# TIFF, GIF, WEBP...), whose header says nothing of its data, is decoded. What headers cannot
# find: data damaged inside a JPEG's entropy-coded segment, or a PNG's compressed data damaged
# before its chunk checksums were computed (a faulty writer; no copy or disk error does that).
# Such a file fails mid-epoch in one line naming it, and the run resumes from its last committed
# epoch once it is replaced. ``data.check_images: full`` decodes every image instead: certainty
# for the cost in the second column (for PNG, inflating the data alone was measured at ~80% of a
# full decode: 2.2 against 2.8 s per 1,000 500x375 PNGs, so no cheaper PNG-only check was kept).
# Tiny-ImageNet is decoded whole at load anyway (its decode cache): a bad file fails there, in one
# line naming it.
CHECK_IMAGES = ("headers", "full")  # data.check_images: what load_dataset's check reads of each image
VERIFY_PROGRESS_MIN = 1000  # files: below this no progress bar is shown
_VERIFY_CHUNK = 256  # files per thread task: few futures for 1.28M files, a bar that still moves


# A JPEG ends with its EOI marker (FF D9); some writers append padding or metadata after it,
# so the marker is looked for in the file's last bytes. In entropy-coded data FF is always
# followed by 00 or a restart marker (D0-D7), so FF D9 there is the end of an image.
_JPEG_TAIL = 4096


def _check_jpeg_end(path: str) -> None:
    """A JPEG whose header PIL read but whose data stops short (a copy interrupted): PIL's
    verify() reads headers only, and the loader would fail on it mid-epoch."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _JPEG_TAIL))
        if b"\xff\xd9" not in f.read():
            raise OSError(f"the JPEG data stops short of its end marker (file cut short at {size:,} bytes)")


# The first 4 bytes of an AppleDouble file (Apple's "._NAME" companion of NAME, holding its
# Finder attributes), and of its AppleSingle sibling.
_APPLE_MAGIC = (b"\x00\x05\x16\x07", b"\x00\x05\x16\x00")


def apple_double(path: str, root: str | Path | None = None) -> None:
    """A one-line ``DataError`` if ``path`` is macOS metadata under an image's name: a Mac copying
    ``x.jpg`` to a disk that cannot hold its attributes (FAT, exFAT, a network share, a zip made
    there) writes ``._x.jpg`` beside it. Read as an image it failed with "cannot identify image
    file; replace the file" (new-user trial): there is no image to replace, the fix is deleting
    every such file. Only ``._`` names are opened (4 bytes), and only those with Apple's magic are
    refused: a real image that happens to be named ``._x.jpg`` loads."""
    name = os.path.basename(path)
    if not name.startswith("._"):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # unreadable: the image check names it with its reason
    if head in _APPLE_MAGIC:
        where = str(root) if root is not None else os.path.dirname(path)
        raise DataError(f"{path} is macOS metadata (an AppleDouble file: a Mac writes ._NAME beside each file it copies "
                        f"to a disk or archive that cannot hold its attributes), not an image; delete every such file: "
                        f"find {where} -name '._*' -type f -delete")


def image_file(path: str, fix: str, root: str | Path | None = None) -> bool:
    """True if ``path``, an image-named entry of a class folder, is a file to load; False for a folder.

    Not ``os.path.isfile``/``Path.is_file``: they say False for a symlink loop or a link to nothing, and
    the image dropped out of its class without a word. Whatever else is there and cannot be read as a
    file (a FIFO would block the image check forever) is a one-line ``DataError`` naming it, and so is
    a macOS ``._`` metadata file (``apple_double``; ``root``: the folder its fix cleans)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if not os.path.islink(path):
            raise path_error(path, e, fix) from None
        target = _link_target(path)
        raise DataError(f"cannot read image {path} ({e.strerror or type(e).__name__}): it is a symbolic link to "
                        f"{target} that leads to no file; remove the link or point it at an image file") from None
    if stat.S_ISDIR(st.st_mode):
        return False
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path} is not a regular file (a FIFO, socket or device), expected an image; remove it, "
                        f"or {fix}")
    apple_double(path, root)
    return True


def to_rgb(im: Any) -> Any:
    """A PIL image as 8-bit RGB, as every loader of ptd reads one. ``convert("RGB")`` clips a 16-bit
    grayscale PNG (mode I;16) to 255 rather than scaling it: 96.6% of one such image's pixels came
    out white, with no word (real-data audit); it is scaled (the top 8 bits). 32-bit integer and
    float images (modes I, F) have no fixed range to scale from: ValueError, which the callers
    turn into a one-line DataError naming the file."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("I", "F"):
        raise ValueError(f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels (PIL mode {im.mode}) have no "
                         f"fixed range to read as 8 bits; save it as an 8- or 16-bit image")
    return im.convert("RGB")


def _verify_files(paths: list[str], full: bool) -> int:
    """Open each of ``paths``; the first bad one is a ``DataError``. Returns how many were checked."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode in ("I", "F"):  # known from the header: refused before training, not mid-epoch
                    to_rgb(im)
                if full:
                    to_rgb(im)
                elif im.format in ("JPEG", "PNG"):
                    fmt = im.format
                    im.verify()  # PNG: every chunk's CRC up to IEND, so a PNG cut short fails here
                    if fmt == "JPEG":
                        _check_jpeg_end(path)
                else:
                    # verify() reads no further than the header of BMP, PPM, TIFF, GIF...: a file cut
                    # short passed it and failed mid-epoch, after a teacher epoch was committed. They
                    # are rare in datasets (ImageNet is JPEG, most others PNG): decoding them is cheap.
                    im.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for a bad file: all the same here
            # "remove" only before a run starts: a started run records its data (data.json) and refuses other
            # data, so there only a replacement at the same path resumes it (review).
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); replace the file, or remove it before a "
                            f"run starts on this data, then run the command again") from None
    return len(paths)


def verify_images(split: AnySplit, progress: bool | None = None, *, full: bool = False,
                  workers: int | None = None, shard: tuple[int, int] = (0, 1)) -> None:
    """Open every image file of a ``FolderSplit`` once; the first one (in split order) that PIL
    cannot read (corrupt, truncated, permission denied, not an image) is a one-line ``DataError``
    naming it and the fix.

    ``full``: decode every pixel (``convert("RGB")``, what the loader does) instead of checking
    headers (``Image.open`` + ``verify``); see the measurements above. ``progress``: a tqdm bar;
    None shows one for ``VERIFY_PROGRESS_MIN`` files or more once it has run a second. ``workers``:
    threads (default: the CPUs, at most 16). In-memory ``Split``s were decoded when they were read:
    nothing to check. ``shard``: (rank, world): this rank checks every world-th chunk of files from
    its rank on, so torchrun's ranks share the check instead of each doing all of it; a bad file is
    then this rank's own error (``rank_own``), the first bad one of its chunks. The error's
    ``image_position`` is the number of the bad file's chunk in the whole split's order.
    """
    if not isinstance(split, FolderSplit) or not split.samples:
        return
    from tqdm.auto import tqdm

    rank, world = shard
    paths = [p for p, _ in split.samples]
    chunks = [paths[i : i + _VERIFY_CHUNK] for i in range(0, len(paths), _VERIFY_CHUNK)][rank::world]
    if not chunks:
        return
    paths = [p for c in chunks for p in c]
    show = progress if progress is not None else len(paths) >= VERIFY_PROGRESS_MIN
    workers = max(1, min(workers or os.cpu_count() or 1, 16, len(chunks)))
    ex = ThreadPoolExecutor(max_workers=workers)
    done = 0  # chunks of this share found good, in order
    try:
        with tqdm(total=len(paths), desc="checking images", unit="img", disable=not show, delay=1.0,
                  leave=False) as bar:
            # map yields in order, so the error raised is the first bad file of the split (of this rank's share).
            for n in ex.map(_verify_files, chunks, [full] * len(chunks)):
                bar.update(n)
                done += 1
    except DataError as e:
        e.rank_own = world > 1  # the other ranks did not see it: not a refusal every rank makes (ptd.errors)
        # Where the bad file is in the split: its chunk's number over every rank's share (chunks
        # are dealt round-robin), so ranks that each found one can agree on the first (ptd.preflight).
        e.image_position = rank + world * done
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)  # after an error, do not check the rest


def frame_size(splits: Any, image_size: int | None) -> tuple[int, int]:
    """(height, width) of the images a run trains on: ``data.image_size`` (a square: folder images are
    cropped to it, in-memory ones resized) where set, else the dataset's own. Every measurement of a model (FLOPs, latency, memory, export)
    takes its input from here, so none is made at the folder loader's default 224 while training
    ran at another size."""
    return (int(image_size), int(image_size)) if image_size else (int(splits.image_size[0]), int(splits.image_size[1]))


def upscale_note(splits: Any, image_size: int | None, sample: int = 16) -> str | None:
    """A folder dataset whose images are much smaller than the size the run feeds (data.image_size,
    224 by default) is upscaled every step, costing (224 / 48)^2 = 22x the compute of its own size
    for no detail (real-data audit: 48-pixel images read at 224 without a word). The median shorter
    side of the first ``sample`` training images against the frame, from their headers only; None
    when in memory (resized to image_size only where it is set) or not under half the frame."""
    from PIL import Image

    train = splits.train
    if not isinstance(train, FolderSplit) or not train.samples:
        return None
    side = frame_size(splits, image_size)[0]
    sides = []
    for path, _ in train.samples[:sample]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 -- only a note: the image check names a bad file
            continue
    if not sides:
        return None
    median = sorted(sides)[len(sides) // 2]
    if median * 2 > side:
        return None
    return (f"note: the training images are about {median} pixels on their shorter side and are scaled up to {side} "
            f"(data.image_size{'' if image_size else ', 224 by default for folders'}): about {(side / median) ** 2:.0f}x the "
            f"compute of their own size; set data.image_size={median} to train at it")


def _sixteen_bit(im: Any) -> bool:
    """Whether PIL opened ``im`` (header read, no pixel yet) from 16 bits a sample: grayscale as mode
    I;16, RGB as mode RGB with a 16-bit raw mode (a 48-bit PNG's is RGB;16B), whose top byte PIL
    keeps, as ``to_rgb`` keeps I;16's."""
    return im.mode.startswith("I;16") or any(";16" in str(t[3]) for t in (im.tile or ())[:1])


# A 16-bit image whose brightest pixel is below this uses at most 12 of its bits: 10- and 12-bit
# sensor data (medical, microscopy, raw camera frames) stored in 16-bit files without scaling.
_LOW_BITS_BELOW = 4096


def depth_note(splits: Any, sample: int = 16) -> str | None:
    """A note when the 16-bit images among the first ``sample`` training images all keep their
    values below 4,096: 10- or 12-bit data stored unscaled in a 16-bit file. ptd reads 16-bit
    pixels on the 16-bit range, as the PNG and TIFF formats define it and torchvision's
    ``to_dtype(..., scale=True)`` does (their top 8 bits, ``to_rgb``), so such images read as 0..15
    of 255: dark, 16 grey levels (measured: a 0..4095 ramp read as mean 7.5 of 255). ptd cannot know
    the bits a sensor filled, and stretching each image to its own maximum would change one image's
    brightness against another's, so the pixels stay as the format says and the run's log says this.
    Headers only for 8-bit images; a 16-bit one is decoded (at most ``sample``). None when in memory,
    not 16-bit, or any sampled 16-bit image reaches 4,096."""
    import numpy as np
    from PIL import Image

    train = splits.train
    if not isinstance(train, FolderSplit) or not train.samples:
        return None
    tops = []  # the brightest pixel of each 16-bit image, as ptd reads it (0..255)
    for path, _ in train.samples[:sample]:
        try:
            with Image.open(path) as im:
                if _sixteen_bit(im):
                    tops.append(int(np.asarray(to_rgb(im)).max()))
        except Exception:  # noqa: BLE001 -- only a note: the image check names a bad file
            continue
    if not tops or max(tops) >= _LOW_BITS_BELOW >> 8:
        return None
    top = max(tops)
    return (f"note: the first {len(tops)} 16-bit training images keep every value below 4,096 (at most 12 of their 16 "
            f"bits), and ptd reads 16-bit pixels on the full 16-bit range (their top 8 bits), so their brightest pixel "
            f"reads {top} of 255: dark, with {top + 1} levels; if they hold 12-bit (or 10-bit) data, rescale the files "
            f"to the 16-bit range (x16, or x64) or save them as 8-bit images (docs/data.md)")


def take(split: AnySplit, idx: torch.Tensor) -> AnySplit:
    """Sub-select ``split`` by integer indices (keeps the split's type)."""
    if isinstance(split, Split):
        return Split(x=split.x[idx].contiguous(), y=split.y[idx].contiguous())
    return FolderSplit(samples=[split.samples[i] for i in idx.tolist()], image_size=split.image_size)


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] on the 0..1 scale.

    The sums are exact integers (int64, over chunks so 100k 64x64 images never need a full copy):
    float64 sums split over threads summed in another order, and the mean of one Fashion-MNIST
    split came out 0.3652458379185007 at 1 thread and 0.36524583791850074 at 2, so the same config
    normalized its images (and trained) otherwise by the thread count data was loaded under, which
    preflight did not yet set (tests/test_reuse.py met it as a --from copy unlike its fresh run).
    Integers add in any order alike: the mean depends on the images alone. int64 holds the squares'
    sum up to 1.4e14 uint8 values a channel (ImageNet: 6.4e10).
    """
    if x.shape[0] == 0:
        raise DataError("cannot compute mean/std of an empty training split; lower val_fraction or check the data")
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.int64)
    s2 = torch.zeros(c, dtype=torch.int64)
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(torch.int64)
        s += xb.sum(dim=(0, 2, 3))
        s2 += (xb * xb).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s.to(torch.float64) / (255.0 * n)
    std = (s2.to(torch.float64) / (255.0 * 255.0 * n) - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


_RGB = ("red", "green", "blue")


def check_channels(name: str, raw: RawDataset, x: torch.Tensor, std: tuple[float, ...]) -> None:
    """Refuse training images [N, C, H, W] (uint8) whose channel holds one value in every pixel.

    ``channel_stats`` clamps a std of 0 to 1e-6, so blank training images (all black, say) trained
    to chance without a word and any test pixel off that value was normalized to ~1e5 (bad-input
    audit). Only a channel whose computed ``std`` is below 1e-3 is looked at, pixel by pixel: exactly
    constant, not merely small (float sums leave a constant channel a std of up to ~1e-6)."""
    for c, s in enumerate(std):
        if s >= 1e-3:
            continue
        plane = x[:, c]
        lo, hi = int(plane.min()), int(plane.max())
        if lo != hi:
            continue
        src = f" ({raw.train_from})" if raw.train_from else ""
        if x.shape[1] == 1:
            what = f"every pixel of the {x.shape[0]} training images{src} is {lo}: the images are blank"
        else:
            color = f" ({_RGB[c]})" if x.shape[1] == 3 else ""
            what = (f"channel {c}{color} of the {x.shape[0]} training images{src} is {lo} in every pixel: that channel "
                    f"is blank")
        raise DataError(f"{name}: {what}, with nothing to learn from and no spread to normalize by; check the files: "
                        f"{raw.fix}")


def _one_image_fraction(n: int) -> str:
    """The smallest val_fraction, to two significant digits, that carves 1 of ``n`` images (round()
    rounds half to even, so 0.5 / n itself carves 0)."""
    return least_shown(0.5 / n, lambda f: round(f * n) >= 1)


def _check_subset(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{name} must be a positive integer or None, got {value!r}; fix data.{name} in the config")


def torchrun_shard() -> tuple[int, int]:
    """(local rank, processes on this machine) from the variables torchrun sets; (0, 1) alone or when
    they are not numbers. Per machine, not per job: a machine's processes share its cores, and each
    machine may hold its own copy of the data (node-local disks), which its processes then cover
    whole between them (by the global rank, each node checked 1/world of its copy)."""
    try:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


def load_configured(dc: Any, seed: int, **override: Any) -> Splits:
    """``load_dataset`` with every field of a ``DataConfig`` (``ptd.config``) passed through, so no
    command forgets one (``ptd eval`` and ``ptd export`` once dropped ``cache_dir``, and Tiny-ImageNet
    then decoded into ~/.cache/ptd). ``override``: keyword arguments of ``load_dataset`` to change
    (export reads only ``test_subset`` images)."""
    kw: dict[str, Any] = dict(val_fraction=dc.val_fraction, seed=seed, download=dc.download, cache_dir=dc.cache_dir,
                              train_subset=dc.train_subset, test_subset=dc.test_subset,
                              check_images=dc.check_images, check_shard=(0, 1))
    # Every image by default. A share (``torchrun_shard``) only for a caller that then gathers every
    # process's refusal (preflight.load_checked): ptd eval and ptd export under torchrun, which
    # gather nothing, each checked their own share, and rank 0 went on past a bad file in rank 1's.
    unknown = set(override) - set(kw)
    if unknown:
        raise TypeError(f"load_configured: {counted(len(unknown), 'unknown keyword')} {sorted(unknown)}; known: {sorted(kw)}")
    kw.update(override)
    return load_dataset(dc.name, dc.root, **kw)


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    cache_dir: str | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    check_images: str = "headers",
    check_shard: tuple[int, int] = (0, 1),
) -> Splits:
    """Load dataset ``name`` and carve a seeded validation split out of its training set.

    The validation set is ``round(val_fraction * N_train)`` examples chosen by a permutation drawn
    from ``torch.Generator().manual_seed(seed)``; the test set is never touched. ``train_subset``
    keeps the first N of the remaining (shuffled) train examples, ``test_subset`` the first N test
    examples. ``check_images`` (folder datasets): ``headers`` or ``full``; ``check_shard``: (rank,
    world), the share of the images this process checks; see ``verify_images``.
    Raises ``DataError`` for bad arguments or bad files.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}; fix data.val_fraction in the config")
    _check_subset("train_subset", train_subset)
    _check_subset("test_subset", test_subset)
    if check_images not in CHECK_IMAGES:
        raise DataError(f"check_images must be one of {', '.join(CHECK_IMAGES)}, got {check_images!r}; "
                        f"fix data.check_images in the config")
    key = name.replace("-", "_").lower()
    try:
        loader = DATASETS.get(key)
    except UnknownNameError:  # named as the user wrote it, not as normalised for the lookup ('cifar_10' for cifar-10)
        raise DataError(f"unknown dataset {name!r}{DATASETS.meant(key)}; valid names: {', '.join(DATASETS.names())}; "
                        f"fix data.name in the config") from None

    raw = loader(root, download=download, cache_dir=cache_dir)
    check_raw(key, raw)

    n_train = len(raw.train)
    n_val = int(round(val_fraction * n_train))
    if n_val >= n_train:
        raise DataError(
            f"{name}: val_fraction={val_fraction} leaves no training examples out of {n_train}; lower data.val_fraction"
        )
    if val_fraction > 0 and n_val == 0:
        # Validation asked for but none carved: every model then kept its last epoch, not its best-validation
        # one, without a word (bad-input audit).
        raise DataError(
            f"{name}: val_fraction={val_fraction} carves 0 of the {n_train} training images for validation, so every "
            f"model would keep its last epoch, not its best-validation one; set data.val_fraction to at least "
            f"{_one_image_fraction(n_train)} (1 image), a usual 0.1, or 0 for no validation"
        )
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(seed)))
    val_idx = perm[:n_val].sort().values
    train_idx = perm[n_val:]
    if train_subset is not None:
        if train_subset > train_idx.numel():
            raise DataError(
                f"{name}: train_subset={train_subset} exceeds the {train_idx.numel()} training examples left after "
                f"carving validation; lower data.train_subset"
            )
    train_full = take(raw.train, train_idx.sort().values)
    train = train_full
    if train_subset is not None:
        train = take(raw.train, train_idx[:train_subset].sort().values)
    val = take(raw.train, val_idx)

    test = raw.test
    if test_subset is not None:
        if test_subset > len(test):
            raise DataError(f"{name}: test_subset={test_subset} exceeds the {len(test)} test examples; lower data.test_subset")
        test = take(test, torch.arange(test_subset))

    if raw.mean is not None and raw.std is not None:
        mean, std = raw.mean, raw.std
    else:
        assert isinstance(train_full, Split)
        # Statistics from the carved training split (before subsetting) so they never see val/test
        # and do not change when a demo uses train_subset.
        mean, std = channel_stats(train_full.x)
        check_channels(key, raw, train_full.x, std)

    # Last, being the slow check: exactly the images this run will read, under one progress bar.
    verify_images(FolderSplit([smp for sp in (train, val, test) if isinstance(sp, FolderSplit) for smp in sp.samples]),
                  full=check_images == "full", shard=check_shard)

    return Splits(
        name=key,
        train=train,
        val=val,
        test=test,
        num_classes=len(raw.classes),
        in_channels=raw.in_channels,
        image_size=raw.image_size,
        mean=tuple(mean),
        std=tuple(std),
        classes=list(raw.classes),
    )
