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

from ptd.data.base import (DATASETS, DataError, RawDataset, Split, check_cache_dir, default_cache_dir, path_error,
                           one_layout, probe_dir, probe_file, probe_root)
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


_FIX = "re-extract the dataset archive"


def _str(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one pickled batch; keys normalised to str (py2 pickles give bytes or latin1 str).

    Through ``safe_load``: a file that names any callable besides numpy's array reconstruction is
    refused before anything from it runs (plain ``pickle.load`` would run it).
    """
    if not probe_file(path, f"{_FIX} into data.root"):
        raise DataError(f"CIFAR file not found: {path}; re-extract the dataset archive into data.root")
    try:
        with open(path, "rb") as f:
            obj = safe_load(f, encoding="latin1")
    except OSError as e:  # permission denied, an I/O error: the file is there but cannot be read
        raise path_error(path, e, _FIX) from None
    except UnsafePickleError as e:
        raise DataError(f"refused CIFAR file {path}: {e}; a CIFAR batch holds only arrays and lists, so this file is not one "
                        f"(do not use it): re-download the archive from the official site and re-extract it") from None
    except Exception as e:  # truncated or garbage files fail in many pickle/EOF/value types; all mean the same here
        raise DataError(f"malformed CIFAR batch {path}: {type(e).__name__}: {e}; re-extract the dataset archive") from None
    if not isinstance(obj, dict):
        raise DataError(f"malformed CIFAR batch {path}: expected a dict, got {type(obj).__name__}; re-extract the dataset archive")
    return {_str(k): v for k, v in obj.items()}


# The most images one CIFAR file holds: CIFAR-100's train file (CIFAR-10's batches hold 10,000).
_MAX_IMAGES = 50_000
_PIXELS = 3072  # 3 channels x 32 x 32, stored channel-major (R plane, G plane, B plane)
# Python scalars a list may hold without a per-item check (numpy scalars take the slow path).
_SCALARS = {int, float, bool, complex}
_NUMBERS = (int, float, complex, np.number, np.bool_)


def _read_batches(folder: Path, names: list[str], label_key: str, num_classes: int) -> Split:
    xs, ys = [], []
    for n in names:
        path = folder / n
        d = _unpickle(path)
        if "data" not in d or label_key not in d:
            raise DataError(
                f"malformed CIFAR batch {path}: missing key 'data' or {label_key!r}; re-extract the dataset archive"
            )
        rows = _count_labels(d[label_key], label_key, path)
        data = _integers(d["data"], "data", path, 0, 255, "pixel values",
                         rows * _PIXELS, f"{rows} rows of {_PIXELS} pixel values, one per label")
        labels = _integers(d[label_key], label_key, path, 0, num_classes - 1, "labels", rows, f"{rows} labels")
        if data.ndim != 2 or data.shape[1] != _PIXELS or labels.shape != (data.shape[0],):
            raise DataError(
                f"malformed CIFAR batch {path}: data {data.shape}, labels {labels.shape}, expected (N, 3072) and (N,); "
                f"re-extract the dataset archive"
            )
        if data.shape[0] == 0:  # every real batch holds 10,000 images
            raise DataError(f"CIFAR batch {path} holds 0 images; {_FIX}")
        xs.append(torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32)))
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    return Split(torch.cat(xs), torch.cat(ys))


def _count_labels(labels: Any, key: str, path: Path) -> int:
    """How many labels (so images) the batch announces, from its length alone: it bounds the values
    'data' may hold before anything is converted."""
    n = len(labels) if isinstance(labels, (list, tuple)) or (isinstance(labels, np.ndarray) and labels.ndim) else None
    if n is None:
        raise DataError(f"malformed CIFAR batch {path}: {key!r} is a {type(labels).__name__}, expected a list of labels; "
                        f"{_FIX}")
    if n > _MAX_IMAGES:
        raise DataError(f"malformed CIFAR batch {path}: {key!r} holds {n} labels, more than the {_MAX_IMAGES} images "
                        f"of the largest CIFAR file; {_FIX}")
    return n


def _count(value: Any, cap: int, seen: dict[int, int], depth: int = 0) -> int:
    """How many values ``np.asarray(value)`` would hold, from list lengths alone; stops counting once
    past ``cap`` (and returns more than it). Raises ``ValueError`` for anything but numbers.

    A list the pickle holds once but names many times counts each time, as asarray copies it each
    time: ``[[row] * 1000] * 1000`` is 21 KB of pickle and 3e9 values (23 GiB as int64). ``seen``
    (by id) counts each distinct list once, so the walk costs no more than the lists in memory."""
    if isinstance(value, np.ndarray):  # its bytes came from the file (safe_load allows no other array)
        if value.dtype.kind not in "biufc":
            raise ValueError(f"holds an array of dtype {value.dtype}")
        return value.size
    if isinstance(value, _NUMBERS):
        return 1
    if not isinstance(value, (list, tuple)):  # a str would make asarray as many bytes per value as it is long
        raise ValueError(f"holds a {type(value).__name__}")
    if depth >= 32:  # numpy 1.x's most dims; deeper would exhaust the recursion first
        raise ValueError("lists nested more than 32 deep")
    if id(value) in seen:
        return seen[id(value)]
    if set(map(type, value)) <= _SCALARS:  # a row of Python numbers: its length, no per-item call
        total = len(value)
    else:
        total = 0
        for v in value:
            total += _count(v, cap, seen, depth + 1)
            if total > cap:
                break
    seen[id(value)] = total
    return total


def _integers(value: Any, key: str, path: Path, lo: int, hi: int, what: str, cap: int, expected: str) -> np.ndarray:
    """``value`` as an integer array whose entries all lie in lo..hi, or a one-line ``DataError``.

    A list is first measured against ``cap`` values (what ``expected`` describes) without building
    anything: pickle's back-references let a few KB of file describe gigabytes of nested lists.
    Checked before any cast: ``np.asarray(..., dtype=np.uint8)`` would wrap 1e6 or -1 into a
    plausible pixel and truncate 2.7 into label 2, and the run would train on that silently."""
    try:
        n = _count(value, cap, {}) if isinstance(value, (list, tuple)) else 0
        arr = np.asarray(value) if n <= cap else None
    except (TypeError, ValueError) as e:  # ragged lists, strings
        raise DataError(f"malformed CIFAR batch {path}: {key!r} is not numeric ({e}); {_FIX}") from None
    if arr is None:
        raise DataError(f"malformed CIFAR batch {path}: {key!r} holds more than {cap} values, expected {expected}; {_FIX}")
    if arr.size == 0:  # an empty list reads as float64; no value to check (an empty batch is refused by the caller)
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        kind = "not numeric" if arr.dtype.kind not in "fcb" else "not integers"
        raise DataError(f"malformed CIFAR batch {path}: {key!r} is {kind} (dtype {arr.dtype}), expected {what} "
                        f"{lo}..{hi}; {_FIX}")
    if int(arr.min()) < lo or int(arr.max()) > hi:
        raise DataError(f"bad {what} in {path}: {key!r} holds values {int(arr.min())}..{int(arr.max())}, outside "
                        f"{lo}..{hi}; {_FIX}")
    return arr


def _resolve(root: Path, key: str, role: str = "data.root") -> Path | None:
    """The folder itself or its parent: the one holding every file (two copies, or a complete and a
    partial one, are a one-line ``DataError``, see ``one_layout``). Neither complete: the one that
    looks meant, so reading it names the first file missing."""
    s = _SPECS[key]
    folder_name = s["folder"]
    found = one_layout(s["pretty"], root, root / folder_name, [*s["train"], *s["test"], s["meta"]],
                       f"{_FIX} into data.root", role=role)
    if found is not None:
        return found
    fix = f"set data.root to the folder holding {folder_name}/"
    for cand in (root / folder_name, root):
        if (cand.name == folder_name and probe_dir(cand, fix)) or probe_file(cand / _marker(folder_name), fix):
            return cand
    return None


def _marker(folder_name: str) -> str:
    return "batches.meta" if folder_name == "cifar-10-batches-py" else "meta"


# The other CIFAR of the two: a config whose data.name and data.root disagree is a common slip.
_OTHER = {"cifar10": "cifar100", "cifar100": "cifar10"}


def _not_found(key: str, root: str | None, download: bool, cache: Path) -> str:
    """The one line for a CIFAR folder found neither under data.root nor (with data.download) in the cache."""
    s = _SPECS[key]
    where = Path(root).expanduser() / s["folder"] if root else "(data.root is unset)"
    fix = f"set data.root to the folder holding {s['folder']}/ (torchvision's python-version archive, extracted)"
    # data.download fetches from the internet into the cache folder, so it is offered as what it is (most
    # clusters have no internet); once it is on and we still got here, repeating it would not help.
    if not download:
        fix += f", or set data.download=true on a machine with internet access (it downloads into {cache})"
    if root:
        o = _SPECS[_OTHER[key]]
        try:  # only a hint: anything odd about the other folder must not replace the real message
            found = _resolve(Path(root).expanduser(), _OTHER[key])
        except DataError:
            found = None
        if found is not None:
            return (f"{s['pretty']} folder not found: {where}; found {o['pretty']} there ({found}): set "
                    f"data.name={_OTHER[key]} to train on it, or {fix}")
        # The archive downloaded but not extracted is the usual first try: the line named only the
        # folder it lacks (new-user trial). The official archive names: cifar-10-python.tar.gz, cifar-100-python.tar.gz.
        tgz = Path(root).expanduser() / f"{s['folder'].removesuffix('-batches-py').removesuffix('-python')}-python.tar.gz"
        try:
            archive = tgz.is_file()
        except OSError:  # only a hint
            archive = False
        if archive:
            return (f"{s['pretty']} folder not found: {where}; found the archive {tgz} there, not extracted: "
                    f"tar xzf {tgz} -C {tgz.parent}")
    return f"{s['pretty']} folder not found: {where}; {fix}"


def _root_fix(key: str, root: Path) -> str:
    """How to mend a data.root that is a file: its folder when it is a CIFAR batch, extraction when
    it is the archive."""
    s = _SPECS[key]
    if root.name in (*s["train"], *s["test"], s["meta"]):
        return f"set data.root to the folder holding it, {root.parent}"
    if root.name.endswith((".tar.gz", ".tgz")):
        return f"extract it (tar xzf {root} -C {root.parent}) and set data.root to the folder holding {s['folder']}/"
    return f"set data.root to the folder holding {s['folder']}/"


def _load(key: str, root: str | None, download: bool, cache_dir: str | None) -> RawDataset:
    s = _SPECS[key]
    folder = None
    if root:
        # A file as data.root read "CIFAR-10 folder not found: <root>/cifar-10-batches-py" (bad-input audit).
        probe_root(Path(root).expanduser(), _root_fix(key, Path(root).expanduser()))
        folder = _resolve(Path(root).expanduser(), key)
    cache = default_cache_dir(cache_dir)
    if folder is None and download:
        check_cache_dir(cache_dir)  # a file or read-only folder there: one line now, not a failed download
        folder = _resolve(cache, key, "data.cache_dir")
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
            folder = _resolve(cache, key, "data.cache_dir")
    if folder is None:
        raise DataError(_not_found(key, root, download, cache))
    train = _read_batches(folder, s["train"], s["label_key"], s["num_classes"])
    test = _read_batches(folder, s["test"], s["label_key"], s["num_classes"])
    meta_path = folder / s["meta"]
    meta = _unpickle(meta_path)
    names = meta.get(s["names_key"])
    # a list of names (bytes or str), each once: a string of 10 letters has a length of 10 too. Compared
    # decoded, as the classes are named: 'a' and b'a' differ as Python values but are the same class.
    if (not isinstance(names, (list, tuple)) or len(names) != s["num_classes"]
            or not all(isinstance(n, (str, bytes)) for n in names) or len({_str(n) for n in names}) != len(names)):
        raise DataError(
            f"malformed CIFAR meta file {meta_path}: {s['names_key']!r} missing or not a list of {s['num_classes']} distinct names; "
            f"re-extract the dataset archive"
        )
    return RawDataset(
        train=train,
        test=test,
        classes=[_str(n) for n in names],
        in_channels=3,
        image_size=(32, 32),
        train_from=f"{folder}/{'+'.join(s['train'])}" if len(s["train"]) > 1 else str(folder / s["train"][0]),
        test_from=str(folder / s["test"][0]),
        fix="re-extract the dataset archive into data.root",
    )


@DATASETS.register("cifar10")
def load_cifar10(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """CIFAR-10: 50k train / 10k test 32x32 RGB, 10 classes."""
    return _load("cifar10", root, download, cache_dir)


@DATASETS.register("cifar100")
def load_cifar100(root: str | None, *, download: bool = False, cache_dir: str | None = None) -> RawDataset:
    """CIFAR-100 (fine labels): 50k train / 10k test 32x32 RGB, 100 classes."""
    return _load("cifar100", root, download, cache_dir)
