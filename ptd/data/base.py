"""Shared data types, the dataset registry and the train/val/test carving used by every loader.

Each dataset module only has to turn files on disk into a ``RawDataset`` (train + test);
``load_dataset`` then carves the validation split, applies subsets and computes statistics the
same way for all of them, so those rules live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from ptd.errors import PtdError
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


# A loader takes (root, download=..., cache_dir=...) and returns a RawDataset.
DatasetLoader = Callable[..., RawDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def default_cache_dir(cache_dir: str | None) -> Path:
    """Where downloads go when the user names no cache folder."""
    return Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/ptd").expanduser()


def take(split: AnySplit, idx: torch.Tensor) -> AnySplit:
    """Sub-select ``split`` by integer indices (keeps the split's type)."""
    if isinstance(split, Split):
        return Split(x=split.x[idx].contiguous(), y=split.y[idx].contiguous())
    return FolderSplit(samples=[split.samples[i] for i in idx.tolist()], image_size=split.image_size)


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images [N, C, H, W] on the 0..1 scale.

    Sums are accumulated in float64 over chunks so 100k 64x64 images never need a full float copy.
    """
    if x.shape[0] == 0:
        raise DataError("cannot compute mean/std of an empty training split; lower val_fraction or check the data")
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(torch.float64) / 255.0
        s += xb.sum(dim=(0, 2, 3))
        s2 += (xb * xb).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _check_subset(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{name} must be a positive integer or None, got {value!r}; fix data.{name} in the config")


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
) -> Splits:
    """Load dataset ``name`` and carve a seeded validation split out of its training set.

    The validation set is ``round(val_fraction * N_train)`` examples chosen by a permutation drawn
    from ``torch.Generator().manual_seed(seed)``; the test set is never touched. ``train_subset``
    keeps the first N of the remaining (shuffled) train examples, ``test_subset`` the first N test
    examples. Raises ``DataError`` for bad arguments or bad files.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}; fix data.val_fraction in the config")
    _check_subset("train_subset", train_subset)
    _check_subset("test_subset", test_subset)
    key = name.replace("-", "_").lower()
    try:
        loader = DATASETS.get(key)
    except UnknownNameError as e:
        raise DataError(f"{e}; fix data.name in the config") from None

    raw = loader(root, download=download, cache_dir=cache_dir)

    n_train = len(raw.train)
    n_val = int(round(val_fraction * n_train))
    if n_val >= n_train:
        raise DataError(
            f"{name}: val_fraction={val_fraction} leaves no training examples out of {n_train}; lower data.val_fraction"
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
