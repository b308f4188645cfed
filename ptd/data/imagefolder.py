"""ImageNet-style folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

Too large for memory, so this yields ``FolderSplit`` path lists; images are decoded by the
DataLoader workers. ``root/val`` becomes the test split; validation is carved from train.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from ptd.data.base import DATASETS, DataError, FolderSplit, RawDataset, image_file, path_error, probe_dir, probe_root
from ptd.errors import counted

IMAGE_SIZE = 224  # pixels, the standard ImageNet training resolution
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
_FIX = "set data.root to a folder holding train/<class>/*.jpg and val/<class>/*.jpg"


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Scan ``folder/<class>/`` image files; ``classes`` fixes the class list (else: sorted subfolders)."""
    if not probe_dir(folder, _FIX):
        raise DataError(f"image folder not found: {folder}; {_FIX}")
    try:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and _class_dir(p))
    except OSError as e:  # e.g. a folder without read permission
        raise path_error(folder, e, _FIX) from None
    if not found:
        raise DataError(f"no class folders in {folder}; {_FIX}")
    if classes is None:
        classes = found
    elif found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        nfc = {unicodedata.normalize("NFC", c) for c in missing} & {unicodedata.normalize("NFC", c) for c in extra}
        if nfc:
            # macOS writes names decomposed (NFD: e + U+0301), most other tools composed (NFC: U+00E9): the
            # same name to the eye, another to the file system. The list above printed "missing ['café'],
            # extra ['café']" (new-user trial); ascii() shows the two spellings apart.
            name = sorted(nfc)[0]
            tr = next(c for c in classes if unicodedata.normalize("NFC", c) == name)
            va = next(c for c in found if unicodedata.normalize("NFC", c) == name)
            raise DataError(
                f"class folder {name!r} is spelled in two Unicode forms: train/ has {ascii(tr)} "
                f"({_form(tr)}), {folder} has {ascii(va)} ({_form(va)})"
                + (f", and {counted(len(nfc) - 1, 'more name')} so" if len(nfc) > 1 else "")
                + f"; rename one split's folders to the other's form (convmv -r -f utf8 -t utf8 --nfc --notest "
                  f"{folder.parent})"
            )
        raise DataError(
            f"class folders in {folder} differ from train: missing {missing[:5]}, extra {extra[:5]}; "
            f"make train/ and val/ hold the same class folders"
        )
    samples: list[tuple[str, int]] = []
    for i, c in enumerate(classes):
        cdir = folder / c
        files = _image_files(cdir)
        if not files:
            raise DataError(f"class folder has no images: {cdir}; add images ({', '.join(sorted(_EXTS))}) or remove it")
        samples += [(f, i) for f in files]
    return classes, samples


def _form(name: str) -> str:
    """Which Unicode normalization form ``name`` is written in, for a message."""
    if unicodedata.is_normalized("NFC", name):
        return "composed, NFC"
    return "decomposed, NFD, as macOS writes" if unicodedata.is_normalized("NFD", name) else "mixed"


def _class_dir(p: Path) -> bool:
    """Whether the entry ``p`` of a split folder is a class folder. ``Path.is_dir`` says False for a
    symbolic link that leads nowhere, and the class left the dataset without a word (new-user
    trial: a train/ link to an unmounted disk trained on the other classes); it is refused."""
    if p.is_dir():
        return True
    if p.is_symlink() and not p.exists():
        try:
            target = repr(os.readlink(p))
        except OSError:
            target = "a path"
        raise DataError(f"{p} is a symbolic link to {target}, which leads to no folder: its class would be left out; "
                        f"fix the link, or remove it")
    return False


# Other names datasets and tools give the two splits. The loader reads only train/ and val/ (no alias is
# accepted: a test/ beside a val/ would make the choice ambiguous), so these are named in the message only.
_OTHER_NAMES = {"train": {"train", "training"}, "val": {"val", "validation", "valid", "test", "testing", "eval"}}


def _split_dir(base: Path, split: str) -> Path:
    """``base/split``, or a one-line ``DataError`` that names any sibling under another common name
    (compared case-insensitively, so Val/ on a case-sensitive disk is found too)."""
    d = base / split
    if probe_dir(d, _FIX):
        return d
    try:
        others = sorted(p.name for p in base.iterdir() if p.name.lower() in _OTHER_NAMES[split] and p.is_dir())
    except OSError:  # only a hint: the plain message below stands
        others = []
    if len(others) == 1:
        o = others[0]
        raise DataError(f"image folder not found: {d}; found {base / o}/ beside it, but the imagefolder loader reads "
                        f"only train/ and val/: rename it to {split}/ (mv {base / o} {d}) or link it (ln -s {o} {d})")
    if others:
        raise DataError(f"image folder not found: {d}; found {', '.join(o + '/' for o in others)} in {base}, but the "
                        f"imagefolder loader reads only train/ and val/: rename (or ln -s) the one to use to {split}/")
    if base.name.lower() in _OTHER_NAMES["train"] | _OTHER_NAMES["val"] and (base.parent / split).is_dir():
        # data.root pointing at a split folder itself read ".../train/train not found" (real-data audit)
        raise DataError(f"image folder not found: {d}; data.root is {base}, a split folder itself: set data.root to its "
                        f"parent, {base.parent}, which holds train/ and val/")
    raise DataError(f"image folder not found: {d}; {_FIX}")


# Folders file servers write inside every folder they index (Synology's @eaDir, with thumbnails).
_INDEX_DIRS = frozenset({"@eaDir"})


def _image_files(cdir: Path) -> list[str]:
    """Image files under ``cdir`` at any depth, sorted; symlinked sub-folders are not followed, nor
    hidden ones and _INDEX_DIRS.

    ``os.walk`` with an ``onerror`` rather than ``Path.rglob``, which skips a folder it may not read
    without a word: the class would lose its images, or look empty for the wrong reason."""
    def refuse(e: OSError) -> None:
        raise path_error(cdir, e, _FIX)

    files = []
    try:
        for dirpath, dirs, names in os.walk(cdir, onerror=refuse):
            # Not into hidden folders or a NAS's index folders: a file manager's .thumbnails/ and a
            # Synology's @eaDir/ hold JPEG thumbnails of the class's images, which trained as more
            # images of the class (new-user trial). Hidden class folders are skipped likewise (scan_split).
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _INDEX_DIRS]
            files += [os.path.join(dirpath, n) for n in names if os.path.splitext(n)[1].lower() in _EXTS]
        return sorted(f for f in files if image_file(f, _FIX, cdir.parent.parent))
    except OSError as e:
        raise path_error(cdir, e, _FIX) from None


@DATASETS.register("imagefolder")
def load_imagefolder(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """Folder dataset at ``root``; mean/std are the ImageNet constants."""
    del download, cache_dir
    if not root:
        raise DataError(f"imagefolder needs data.root (unset); {_FIX}")
    base = Path(root).expanduser()
    if not probe_root(base, _FIX):
        raise DataError(f"image folder not found: {base}; {_FIX}")
    # Both split folders before either is scanned: walking train/ of a full ImageNet takes a while, and
    # a missing val/ is then refused before that work, with the folder it was likely named as.
    for split in ("train", "val"):
        _split_dir(base, split)
    classes, train = scan_split(base / "train")
    _, test = scan_split(base / "val", classes)
    return RawDataset(
        train=FolderSplit(train, IMAGE_SIZE),
        test=FolderSplit(test, IMAGE_SIZE),
        classes=classes,
        in_channels=3,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train_from=str(base / "train"),
        test_from=str(base / "val"),
        fix="give train/ (and val/) one sub-folder of images per class, at least 2 classes",
    )
