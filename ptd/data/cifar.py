"""CIFAR-10 / CIFAR-100 from torchvision's on-disk "python version" pickles.

The batches are read directly (same format torchvision uses) instead of through
``torchvision.datasets.CIFAR10``: its md5 check re-hashes ~170 MB on every load and rejects
small test fixtures, while the shape/label checks here catch the corruption that matters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptd.data.base import DATASETS, DataError, RawDataset, Split, default_cache_dir
from ptd.data.safe_pickle import UnsafePickleError, safe_load

_SPECS = {
    "cifar10": dict(
        pretty="CIFAR-10", folder="cifar-10-batches-py", tv="CIFAR10",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        meta="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
    ),
    "cifar100": dict(
        pretty="CIFAR-100", folder="cifar-100-python", tv="CIFAR100",
        train=["train"], test=["test"],
        meta="meta", label_key="fine_labels", names_key="fine_label_names", num_classes=100,
    ),
}


def _str(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one pickled batch; keys normalised to str (py2 pickles give bytes or latin1 str).

    Through ``safe_load``: a file that names any callable besides numpy's array reconstruction is
    refused before anything from it runs (plain ``pickle.load`` would run it).
    """
    if not path.is_file():
        raise DataError(f"CIFAR file not found: {path}; re-extract the dataset archive into data.root")
    try:
        with open(path, "rb") as f:
            obj = safe_load(f, encoding="latin1")
    except UnsafePickleError as e:
        raise DataError(f"refused CIFAR file {path}: {e}; a CIFAR batch holds only arrays and lists, so this file is not one "
                        f"(do not use it): re-download the archive from the official site and re-extract it") from None
    except Exception as e:  # truncated or garbage files fail in many pickle/EOF/value types; all mean the same here
        raise DataError(f"malformed CIFAR batch {path}: {type(e).__name__}: {e}; re-extract the dataset archive") from None
    if not isinstance(obj, dict):
        raise DataError(f"malformed CIFAR batch {path}: expected a dict, got {type(obj).__name__}; re-extract the dataset archive")
    return {_str(k): v for k, v in obj.items()}


def _read_batches(folder: Path, names: list[str], label_key: str, num_classes: int) -> Split:
    xs, ys = [], []
    for n in names:
        path = folder / n
        d = _unpickle(path)
        if "data" not in d or label_key not in d:
            raise DataError(
                f"malformed CIFAR batch {path}: missing key 'data' or {label_key!r}; re-extract the dataset archive"
            )
        try:
            data = np.asarray(d["data"], dtype=np.uint8)
            labels = np.asarray(d[label_key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:  # ragged lists, strings, out-of-range numbers
            raise DataError(f"malformed CIFAR batch {path}: 'data'/{label_key!r} are not numeric arrays ({e}); "
                            f"re-extract the dataset archive") from None
        # 3072 = 3 channels x 32 x 32, stored channel-major (R plane, G plane, B plane).
        if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
            raise DataError(
                f"malformed CIFAR batch {path}: data {data.shape}, labels {labels.shape}, expected (N, 3072) and (N,); "
                f"re-extract the dataset archive"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"bad labels in {path}: outside 0..{num_classes - 1}; re-extract the dataset archive")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(labels.copy()))
    return Split(torch.cat(xs), torch.cat(ys))


def _resolve(root: Path, folder_name: str) -> Path | None:
    """Accept the folder itself or its parent."""
    for cand in (root / folder_name, root):
        if (cand.is_dir() and cand.name == folder_name) or (cand / _marker(folder_name)).is_file():
            return cand
    return None


def _marker(folder_name: str) -> str:
    return "batches.meta" if folder_name == "cifar-10-batches-py" else "meta"


def _load(key: str, root: str | None, download: bool, cache_dir: str | None) -> RawDataset:
    s = _SPECS[key]
    folder = None
    if root:
        folder = _resolve(Path(root).expanduser(), s["folder"])
    cache = default_cache_dir(cache_dir)
    if folder is None and download:
        folder = _resolve(cache, s["folder"])
        if folder is None:
            try:
                import torchvision  # here, not at module level: it costs 3-11 s of start-up (docs/speed.md)

                getattr(torchvision.datasets, s["tv"])(root=str(cache), train=True, download=True)
            except Exception as e:
                msg = " ".join(str(e).split())[:200]
                raise DataError(
                    f"{s['pretty']} download failed into {cache / s['folder']} ({type(e).__name__}: {msg}); "
                    f"set data.root to the folder holding {s['folder']}/"
                ) from None
            folder = _resolve(cache, s["folder"])
    if folder is None:
        where = Path(root).expanduser() / s["folder"] if root else "(data.root is unset)"
        raise DataError(
            f"{s['pretty']} folder not found: {where}; set data.root to the folder holding {s['folder']}/ "
            f"(torchvision's python-version archive, extracted), or set data.download=true"
        )
    train = _read_batches(folder, s["train"], s["label_key"], s["num_classes"])
    test = _read_batches(folder, s["test"], s["label_key"], s["num_classes"])
    meta_path = folder / s["meta"]
    meta = _unpickle(meta_path)
    names = meta.get(s["names_key"])
    if names is None or len(names) != s["num_classes"]:
        raise DataError(
            f"malformed CIFAR meta file {meta_path}: {s['names_key']!r} missing or not {s['num_classes']} names; "
            f"re-extract the dataset archive"
        )
    return RawDataset(
        train=train,
        test=test,
        classes=[_str(n) for n in names],
        in_channels=3,
        image_size=(32, 32),
    )


@DATASETS.register("cifar10")
def load_cifar10(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """CIFAR-10: 50k train / 10k test 32x32 RGB, 10 classes."""
    return _load("cifar10", root, download, cache_dir)


@DATASETS.register("cifar100")
def load_cifar100(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """CIFAR-100 (fine labels): 50k train / 10k test 32x32 RGB, 100 classes."""
    return _load("cifar100", root, download, cache_dir)
