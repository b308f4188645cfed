"""ImageNet-style folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

Too large for memory, so this yields ``FolderSplit`` path lists; images are decoded by the
DataLoader workers. ``root/val`` becomes the test split; validation is carved from train.
"""
from __future__ import annotations

from pathlib import Path

from ptd.data.base import DATASETS, DataError, FolderSplit, RawDataset

IMAGE_SIZE = 224  # pixels, the standard ImageNet training resolution
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
_FIX = "set data.root to a folder holding train/<class>/*.jpg and val/<class>/*.jpg"


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Scan ``folder/<class>/`` image files; ``classes`` fixes the class list (else: sorted subfolders)."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}; {_FIX}")
    try:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:  # e.g. a folder without read permission
        raise DataError(f"cannot list image folder {folder} ({type(e).__name__}: {e}); {_FIX}") from None
    if not found:
        raise DataError(f"no class folders in {folder}; {_FIX}")
    if classes is None:
        classes = found
    elif found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"class folders in {folder} differ from train: missing {missing[:5]}, extra {extra[:5]}; "
            f"make train/ and val/ hold the same class folders"
        )
    samples: list[tuple[str, int]] = []
    for i, c in enumerate(classes):
        cdir = folder / c
        try:
            files = sorted(str(p) for p in cdir.rglob("*") if p.suffix.lower() in _EXTS and p.is_file())
        except OSError as e:
            raise DataError(f"cannot list class folder {cdir} ({type(e).__name__}: {e}); {_FIX}") from None
        if not files:
            raise DataError(f"class folder has no images: {cdir}; add images ({', '.join(sorted(_EXTS))}) or remove it")
        samples += [(f, i) for f in files]
    return classes, samples


@DATASETS.register("imagefolder")
def load_imagefolder(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """Folder dataset at ``root``; mean/std are the ImageNet constants."""
    del download, cache_dir
    if not root:
        raise DataError(f"imagefolder needs data.root (unset); {_FIX}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}; {_FIX}")
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
    )
