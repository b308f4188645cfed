"""Fashion-MNIST and MNIST from the four idx files (plain or .gz).

Default Fashion-MNIST root is where Debian's ``dataset-fashion-mnist`` package installs them.
With ``download=True`` missing files are fetched by torchvision into the cache folder.
"""
from __future__ import annotations

from pathlib import Path


from ptd.data.base import (DATASETS, DataError, RawDataset, Split, check_cache_dir, default_cache_dir, one_layout,
                           probe_root)
from ptd.data.idx import find_idx, read_idx_pair

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_all(root: Path, tv_name: str, pretty: str, role: str) -> dict[str, Path] | None:
    """The four idx files in the folder itself or in a torchvision root (``<root>/FashionMNIST/raw``);
    both complete (or one a part) is a one-line ``DataError`` (``one_layout``): the files in ``root``
    were read without a word."""
    found: dict[Path, Path | None] = {}  # find_idx once per file: with plain and .gz both there it reads both

    def has(path: Path) -> bool:
        found[path] = find_idx(path.parent, path.name)
        return found[path] is not None

    d = one_layout(pretty, root, root / tv_name / "raw", list(_STEMS.values()), _root_fix(root), has=has,
                   role=role)
    if d is None:
        return None
    return {k: found[d / s] for k, s in _STEMS.items()}  # type: ignore[misc]


def _root_fix(root: Path) -> str:
    """How to mend a data.root that is a file: its folder when it is one of the idx files."""
    if root.name in _STEMS.values() or root.name.removesuffix(".gz") in _STEMS.values():
        return f"set data.root to the folder holding it, {root.parent}"
    return "set data.root to a folder holding the four idx files"


def _first_missing(root: Path) -> Path:
    for s in _STEMS.values():
        if find_idx(root, s) is None:
            return root / f"{s}(.gz)"
    return root


def _load_idx_dataset(
    *,
    pretty: str,
    tv_name: str,
    root: str | None,
    default_root: str | None,
    download: bool,
    cache_dir: str | None,
    classes: list[str],
    install_hint: str,
) -> RawDataset:
    folder = Path(root).expanduser() if root else (Path(default_root) if default_root else None)
    if root:
        # A file as data.root read "file not found: <root>/train-images-idx3-ubyte(.gz)" (bad-input audit).
        probe_root(folder, _root_fix(folder))
    role = "data.root" if root else "data.root (unset, so the default)"
    files = _find_all(folder, tv_name, pretty, role) if folder is not None else None
    cache = default_cache_dir(cache_dir)
    if files is None and download:
        check_cache_dir(cache_dir)  # a file or read-only folder there: one line now, not a failed download
        files = _find_all(cache, tv_name, pretty, "data.cache_dir")
        if files is None:
            try:
                # Look the class up at call time so tests can monkeypatch its download.
                import torchvision  # here, not at module level: it costs 3-11 s of start-up (docs/speed.md)

                getattr(torchvision.datasets, tv_name)(root=str(cache), train=True, download=True)
            except Exception as e:  # offline, proxy, checksum ... all mean the same to the user
                msg = " ".join(str(e).split())[:200]
                raise DataError(
                    f"{pretty} download failed into {cache / tv_name / 'raw'} ({type(e).__name__}: {msg}); "
                    f"{install_hint}set data.root to a folder holding the four idx files"
                ) from None
            files = _find_all(cache, tv_name, pretty, "data.cache_dir")
            if files is None:
                raise DataError(
                    f"{pretty} download finished but idx files not found under {cache / tv_name / 'raw'}; "
                    f"{install_hint}set data.root to a folder holding the four idx files"
                )
    if files is None:
        if folder is None:
            raise DataError(
                f"{pretty} has no default folder (data.root is unset); set data.root to a folder holding the four "
                f"idx files, or set data.download=true to fetch them into {cache}"
            )
        raise DataError(
            f"{pretty} file not found: {_first_missing(folder)}; {install_hint}set data.root to a folder holding the "
            f"four idx files, or set data.download=true to fetch them into {cache}"
        )
    xtr, ytr = read_idx_pair(files["train_images"], files["train_labels"], len(classes))
    xte, yte = read_idx_pair(files["test_images"], files["test_labels"], len(classes))
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{pretty}: train images {tuple(xtr.shape[2:])} and test images {tuple(xte.shape[2:])} differ in size "
            f"({files['train_images']}, {files['test_images']}); re-download or re-install the dataset files"
        )
    return RawDataset(
        train=Split(xtr, ytr),
        test=Split(xte, yte),
        classes=list(classes),
        in_channels=1,
        image_size=(int(xtr.shape[2]), int(xtr.shape[3])),
        train_from=f"{files['train_images']}, {files['train_labels']}",
        test_from=f"{files['test_images']}, {files['test_labels']}",
        fix="re-download or re-install the dataset files, or set data.root to the right folder",
    )


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """Fashion-MNIST: 60k train / 10k test 28x28 grayscale, 10 classes."""
    return _load_idx_dataset(
        pretty="Fashion-MNIST",
        tv_name="FashionMNIST",
        root=root,
        default_root=FASHION_MNIST_ROOT,
        download=download,
        cache_dir=cache_dir,
        classes=FASHION_MNIST_CLASSES,
        install_hint="install Debian's package with `apt-get install dataset-fashion-mnist`, or ",
    )


@DATASETS.register("mnist")
def load_mnist(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """MNIST digits in the same idx format; no default folder."""
    return _load_idx_dataset(
        pretty="MNIST",
        tv_name="MNIST",
        root=root,
        default_root=None,
        download=download,
        cache_dir=cache_dir,
        classes=MNIST_CLASSES,
        install_hint="",
    )
