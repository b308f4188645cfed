"""Tiny-ImageNet (200 classes, 64x64 RGB) from the standard ``tiny-imagenet-200`` folder.

All images are decoded into one uint8 tensor (100k x 3 x 64 x 64 = 1.2 GB) so training reads
from memory. The decoded arrays are cached as .npy under the cache folder (data.cache_dir, default
~/.cache/ptd), keyed by every file's path, size and mtime: decoding 110k JPEGs costs about a
minute of CPU per run, reading the cached 1.3 GB a second or two. The official test labels are not public, so the official ``val`` set is used as our
test split and validation is carved from train by ``load_dataset``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ptd.data.base import (DATASETS, DataError, FolderSplit, RawDataset, Split, apple_double, check_cache_dir, check_raw,
                           image_file, one_layout, path_error, probe_dir, probe_file, probe_root, to_rgb)
from ptd.io import dead_writer, writer_tag

FOLDER = "tiny-imagenet-200"
SIZE = 64  # pixels, both sides
_EXTS = {".jpeg", ".jpg", ".png"}
_FIX = "re-extract tiny-imagenet-200.zip, or set data.root to the folder holding tiny-imagenet-200/"


def _decode(path: str) -> torch.Tensor:
    try:
        # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
        # convert("RGB") also turns the few grayscale JPEGs in Tiny-ImageNet into 3 channels.
        with Image.open(path) as im:
            arr = np.asarray(to_rgb(im))
    except Exception as e:  # corrupt, truncated, unreadable: this decode touches every pixel, so it finds them all
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}; replace the file (re-extract "
                        f"tiny-imagenet-200.zip), or remove it before a run starts on this data"
                        # a val image also has its line: "remove a training image" read as if only those could go
                        + (" (and its line in val/val_annotations.txt)" if _in_val(path) else "")) from None
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # HWC -> CHW
    if tuple(img.shape) != (3, SIZE, SIZE):
        raise DataError(f"image {path} is {tuple(img.shape[1:])} pixels, expected {SIZE}x{SIZE}; {_FIX}")
    return img


def _in_val(path: str) -> bool:
    """Whether ``path`` is a test image (tiny-imagenet-200/val/images/NAME)."""
    p = Path(path)
    return p.parent.name == "images" and p.parent.parent.name == "val"


def decode_all(paths: list[str], workers: int | None = None) -> torch.Tensor:
    """Decode images into uint8 [N, 3, 64, 64]; threads, since PIL's JPEG decoder releases the GIL."""
    out = torch.empty((len(paths), 3, SIZE, SIZE), dtype=torch.uint8)
    if not paths:
        return out
    workers = workers or min(16, os.cpu_count() or 1)

    def work(i: int) -> None:
        out[i] = _decode(paths[i])

    with ThreadPoolExecutor(max_workers=workers) as ex:
        for _ in ex.map(work, range(len(paths))):
            pass
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:  # unreadable (permissions) or not a text file
        raise DataError(f"cannot read Tiny-ImageNet file {path} ({type(e).__name__}: {e}); {_FIX}") from None


def _cache_key(paths: list[str]) -> str:
    """Changes when any file is added, removed, renamed, resized or touched."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise path_error(p, e, _FIX) from None
        h.update(os.fsencode(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n"))  # a non-UTF-8 path hashes its bytes
    return h.hexdigest()[:24]


def decode_cached(paths: list[str], cache: Path | None) -> torch.Tensor:
    """:func:`decode_all`, through a .npy cache in folder ``cache`` (None: no cache)."""
    if cache is None or not paths:
        return decode_all(paths)
    f = cache / f"tiny_imagenet_{_cache_key(paths)}.npy"
    if f.is_file():
        try:
            arr = np.load(f)
            if arr.shape == (len(paths), 3, SIZE, SIZE) and arr.dtype == np.uint8:
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # a torn or foreign file: decode again and overwrite it
    out = decode_all(paths)
    tmp = f.with_suffix(f".{writer_tag()}.tmp")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        remove_dead_writers_temps(cache)
        with open(tmp, "wb") as fh:
            np.save(fh, out.numpy())
            fh.flush()
            os.fsync(fh.fileno())  # the bytes on disk before the name: a power cut leaves no named, torn cache
        os.replace(tmp, f)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError as e:
        # The folder was proven writable at load (check_cache_dir); what is left is the disk filling
        # up mid-write. The images are decoded, so the run goes on; only the next load is slower.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no torn .tmp left behind in the user's cache
        warnings.warn(f"could not write the Tiny-ImageNet decode cache {f}: {e}; free space there or set data.cache_dir "
                      f"to another folder to skip decoding next time", stacklevel=2)
    return out


def remove_dead_writers_temps(cache: Path) -> int:
    """Delete the decode-cache temporaries (``tiny_imagenet_<key>.<writer>.tmp``, up to 1.2 GB for
    the train split) whose writing process is gone: a kill mid-write left them, and no later load
    removed them (crash audit). A live writer's, or another machine's, stay. Returns how many."""
    gone = 0
    for tmp in cache.glob("tiny_imagenet_*.tmp"):
        if dead_writer(tmp.name[:-4].rpartition(".")[2]):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                gone += 1
    return gone


def _resolve(root: Path) -> Path | None:
    """``root/tiny-imagenet-200`` or ``root`` itself (under any name): the one holding both files this
    loader reads first (two copies, or a complete and a partial one, are a one-line ``DataError``, see
    ``one_layout``). Neither complete: the one with wnids.txt, so the read names what is missing."""
    found = one_layout("Tiny-ImageNet", root, root / FOLDER, ["wnids.txt", "val/val_annotations.txt"], _FIX)
    if found is not None:
        return found
    for cand in (root / FOLDER, root):
        if probe_file(cand / "wnids.txt", _FIX):
            return cand
    return None


def _no_wnids(base: Path) -> str:
    """The one line for a data.root where ``_resolve`` found no wnids.txt.

    Both candidates were looked at (``base/tiny-imagenet-200`` and ``base`` itself), so the message names
    the one that exists: a path the user never had (base/tiny-imagenet-200/wnids.txt for a dataset
    folder renamed, say, to tiny/) sends them looking for the wrong thing."""
    nested = base / FOLDER
    if probe_dir(nested, _FIX):
        return f"Tiny-ImageNet file not found: {nested / 'wnids.txt'}; {_FIX}"
    train = probe_dir(base / "train", _FIX)
    if train or probe_dir(base / "val", _FIX):  # data.root is the dataset folder itself, under another name
        # wnids.txt only lists the class ids, one a line; the train/ folder names are those ids (in sorted
        # order, where the official file's order differs: labels are numbered by the file's order).
        remake = (f", or write it from the class folders: ls {base / 'train'} > {base / 'wnids.txt'} (the labels are then "
                  f"numbered in sorted order, not the official file's: a model trained with that file reads them wrongly)"
                  if train else "")
        return (f"Tiny-ImageNet file not found: {base / 'wnids.txt'} (data.root holds the dataset's train/ or val/ "
                f"but not its class list); re-extract tiny-imagenet-200.zip{remake}")
    if not probe_dir(base, f"set data.root to the folder holding {FOLDER}/"):
        return f"Tiny-ImageNet folder not found: {base} (data.root); set data.root to the folder holding {FOLDER}/"
    return (f"Tiny-ImageNet not found: no wnids.txt in {base} (data.root) nor in {nested}; set data.root to the "
            f"folder holding {FOLDER}/, or to that folder itself (under any name), or re-extract tiny-imagenet-200.zip")


def _sorted_val_hint(folder: Path, wnids: list[str]) -> str | None:
    """The fix for a val/ that holds class folders (val/<wnid>/images/*.JPEG) instead of val_annotations.txt.

    Common preprocessing scripts sort val/ that way (for torchvision's ImageFolder); the annotations
    file goes, so this loader cannot label the images, but the imagefolder loader can: its scan is
    recursive, so val/<wnid>/images/ counts as class <wnid>, as train/<wnid>/images/ does. None when
    val/ holds no wnid folder (or cannot be listed: the plain not-found message stands then)."""
    val = folder / "val"
    known = set(wnids)
    try:
        found = sorted(p.name for p in val.iterdir() if p.name in known and p.is_dir())
    except OSError:
        return None
    if not found:
        return None
    return (f"val/ holds class folders instead (val/{found[0]}/, {len(found)} of the {len(wnids)} wnids), as a val/ "
            f"sorted by class does: that layout loads with data.name=imagefolder, data.root={folder} and "
            f"data.image_size={SIZE} (its default is 224); or re-extract tiny-imagenet-200.zip for the original val/")


def _plain_name(name: str) -> bool:
    """A single file or folder name: joined to a folder it stays inside it (no '..', no separator,
    not absolute), so a listed name cannot reach files outside the dataset's own folders."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    return bool(name) and name not in (".", "..") and not any(s in name for s in seps) and "\0" not in name


def _read_wnids(path: Path) -> list[str]:
    """wnids.txt: one class id a line, each a plain folder name, none twice."""
    wnids: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        w = line.strip()
        if not w:
            continue
        if not _plain_name(w):
            raise DataError(f"malformed line {n} in {path}: {w[:80]!r} is not a folder name (a class id such as "
                            f"n01443537); {_FIX}")
        if w in first_line:
            raise DataError(f"duplicate class {w!r} on line {n} of {path} (first on line {first_line[w]}); each class "
                            f"must be listed once: remove the repeated line or {_FIX}")
        first_line[w] = n
        wnids.append(w)
    return wnids


def _images_in(folder: Path, root: Path) -> list[str]:
    try:
        # image_file, not Path.is_file, which drops a symlink loop or a dangling link without a word.
        return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in _EXTS and image_file(str(p), _FIX, root))
    except OSError as e:  # e.g. a folder without read permission
        raise DataError(f"cannot list Tiny-ImageNet folder {folder} ({type(e).__name__}: {e}); {_FIX}") from None


@DATASETS.register("tiny_imagenet")
def load_tiny_imagenet(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """Tiny-ImageNet: 100k train / 10k val (used as test), 64x64 RGB, 200 classes (wnids)."""
    del download  # no automatic download: the archive has no stable checksummed mirror
    if not root:
        raise DataError(f"tiny_imagenet has no default folder (data.root is unset); set data.root to the folder holding {FOLDER}/")
    base = Path(root).expanduser()
    probe_root(base, f"unzip it (unzip {base} -d {base.parent}) and set data.root to the folder holding {FOLDER}/"
               if base.suffix.lower() == ".zip" else f"set data.root to the folder holding {FOLDER}/")
    folder = _resolve(base)
    if folder is None:
        raise DataError(_no_wnids(base))
    wnids = _read_wnids(folder / "wnids.txt")
    if not wnids:
        raise DataError(f"Tiny-ImageNet class list is empty: {folder / 'wnids.txt'}; {_FIX}")
    index = {w: i for i, w in enumerate(wnids)}

    train_paths: list[str] = []
    train_labels: list[int] = []
    for w in wnids:
        cdir = folder / "train" / w / "images"
        if not probe_dir(cdir, _FIX):
            raise DataError(f"Tiny-ImageNet class folder not found: {cdir}; {_FIX}")
        files = _images_in(cdir, folder)
        if not files:
            raise DataError(f"Tiny-ImageNet class folder is empty: {cdir}; {_FIX}")
        train_paths += files
        train_labels += [index[w]] * len(files)

    # A class folder in train/ that wnids.txt does not list was left out of training without a word
    # (new-user trial), as an unlisted val image was before (below).
    try:
        unlisted_classes = sorted(p.name for p in (folder / "train").iterdir()
                                  if p.name not in index and not p.name.startswith(".") and p.is_dir())
    except OSError:
        unlisted_classes = []  # each listed class folder was found above; only this check is lost
    if unlisted_classes:
        raise DataError(f"Tiny-ImageNet class folder {folder / 'train' / unlisted_classes[0]} is not listed in "
                        f"{folder / 'wnids.txt'}"
                        + (f" (nor {len(unlisted_classes) - 1} more)" if len(unlisted_classes) > 1 else "")
                        + f": its images would be left out of training; add its wnid to wnids.txt (and its val "
                          f"images to val_annotations.txt), or move the folder out of train/")

    ann = folder / "val" / "val_annotations.txt"
    if not probe_file(ann, _FIX):
        raise DataError(f"Tiny-ImageNet file not found: {ann}; {_sorted_val_hint(folder, wnids) or _FIX}")
    test_paths: list[str] = []
    test_labels: list[int] = []
    seen: dict[str, int] = {}  # file -> the line that listed it
    for n, line in enumerate(_read_text(ann).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] not in index and _plain_name(parts[1]):
            # A well-formed line naming a class wnids.txt lacks read "malformed line ... (need file<TAB>wnid
            # from wnids.txt)", which sent the user looking at the tabs (new-user trial).
            raise DataError(f"line {n} of {ann} gives {parts[0][:80]!r} the class {parts[1][:80]!r}, which "
                            f"{folder / 'wnids.txt'} does not list ({len(wnids)} classes); add the class to wnids.txt (with "
                            f"its train/{parts[1][:80]}/images/), or remove the line and its image, or re-extract "
                            f"tiny-imagenet-200.zip")
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"malformed line {n} in {ann}: {line[:80]!r} (need file<TAB>wnid from wnids.txt); {_FIX}")
        if not _plain_name(parts[0]):
            raise DataError(f"malformed line {n} in {ann}: {parts[0][:80]!r} is not a file name in val/images (a path "
                            f"that leaves that folder); {_FIX}")
        if parts[0] in seen:  # scored twice, or under two classes: the test accuracy would not be of the test set
            raise DataError(f"malformed line {n} in {ann}: {parts[0][:80]!r} is listed again (first on line "
                            f"{seen[parts[0]]}); each test image is listed once, with its class; {_FIX}")
        seen[parts[0]] = n
        p = folder / "val" / "images" / parts[0]
        if not probe_file(p, _FIX):
            raise DataError(f"Tiny-ImageNet file not found: {p} (listed in {ann}); {_FIX}")
        test_paths.append(str(p))
        test_labels.append(index[parts[1]])
    if not test_paths:
        raise DataError(f"Tiny-ImageNet val annotations are empty: {ann}; {_FIX}")
    # An image in val/images that no line lists was left out of the test set without a word
    # (real-data audit): the test set would not be the folder's.
    try:
        unlisted = sorted(f for f in os.listdir(folder / "val" / "images") if f not in seen and Path(f).suffix.lower() in _EXTS)
    except OSError:
        unlisted = []  # the listed files were each found above; only a hint is lost
    for f in unlisted:  # a Mac's ._NAME metadata is no test image left out: named as what it is
        apple_double(str(folder / "val" / "images" / f), folder)
    if unlisted:
        raise DataError(f"Tiny-ImageNet test image {folder / 'val' / 'images' / unlisted[0]} has no line in {ann}"
                        + (f" (nor {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
                        + f": it would be left out of the test set; add its line, or {_FIX}")

    where = dict(classes=wnids, in_channels=3, image_size=(SIZE, SIZE), train_from=str(folder / "train"),
                 test_from=str(ann), fix=_FIX)
    # load_dataset checks the classes again on the result; here, before the minute of decoding.
    check_raw("tiny_imagenet", RawDataset(train=FolderSplit(list(zip(train_paths, train_labels))),
                                          test=FolderSplit(list(zip(test_paths, test_labels))), **where))
    cache = check_cache_dir(cache_dir)  # before the minute of decoding that would fill it
    # The 10,000 test images first: a damaged one was refused only after the 100,000 training images
    # had decoded (about a minute on the real set; new-user trial), each split being cached on its own.
    test = Split(decode_cached(test_paths, cache), torch.tensor(test_labels, dtype=torch.int64))
    return RawDataset(train=Split(decode_cached(train_paths, cache), torch.tensor(train_labels, dtype=torch.int64)),
                      test=test, **where)
