"""Tests for ptd.data: real on-disk formats written to tmp_path, loaders, augmentation, errors."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ptd.data import (
    DATASETS,
    DataError,
    FolderSplit,
    Split,
    crop_batch,
    flip_batch,
    load_dataset,
    make_loader,
)

N_TRAIN, N_TEST = 200, 50


# ----------------------------------------------------------------------------- writers
def write_idx(path: Path, arr: np.ndarray, *, gz: bool, magic: bytes | None = None) -> None:
    """Write ``arr`` (uint8) in IDX format: 0 0 0x08 ndim, big-endian dims, payload."""
    head = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    data = head + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def mnist_like(n: int, offset: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels [0,0],[0,1] encode a unique sample id and whose row 5 encodes the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 50, (n, 28, 28)).astype(np.uint8)
    ids = np.arange(offset, offset + n)
    x[:, 0, 0] = ids % 256
    x[:, 0, 1] = ids // 256
    x[:, 5, :] = (y * 20)[:, None]  # class-dependent stripe
    return x, y


def write_fashion(folder: Path, *, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr = mnist_like(N_TRAIN, 0, 1)
    xte, yte = mnist_like(N_TEST, 1000, 2)
    write_idx(folder / "train-images-idx3-ubyte", xtr, gz=gz)
    write_idx(folder / "train-labels-idx1-ubyte", ytr, gz=gz)
    write_idx(folder / "t10k-images-idx3-ubyte", xte, gz=gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", yte, gz=gz)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


def ids_of(split: Split) -> list[int]:
    x = split.x[:, 0, 0, :2].to(torch.int64)
    return (x[:, 0] + 256 * x[:, 1]).tolist()


@pytest.fixture
def fashion_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path / "fmnist"
    return d, write_fashion(d, gz=True)


def write_cifar(root: Path, *, hundred: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    k = 100 if hundred else 10
    n_tr, n_te = 60, 20
    xtr = rng.integers(0, 256, (n_tr, 3072), dtype=np.uint8)
    ytr = rng.integers(0, k, n_tr)
    xte = rng.integers(0, 256, (n_te, 3072), dtype=np.uint8)
    yte = rng.integers(0, k, n_te)
    lk = b"fine_labels" if hundred else b"labels"
    names = [f"class{i}".encode() for i in range(k)]
    if hundred:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        files = {"train": (xtr, ytr), "test": (xte, yte)}
        meta = ("meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        files = {f"data_batch_{i + 1}": (xtr[i * 12 : (i + 1) * 12], ytr[i * 12 : (i + 1) * 12]) for i in range(5)}
        files["test_batch"] = (xte, yte)
        meta = ("batches.meta", {b"label_names": names, b"num_vis": 3072})
    for name, (x, y) in files.items():
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": x, lk: [int(v) for v in y]}, f)
    with open(d / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def write_tiny(root: Path) -> None:
    """3 classes x 4 train images, 2 val images each; one grayscale JPEG."""
    d = root / "tiny-imagenet-200"
    wnids = ["n001", "n002", "n003"]
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for c, w in enumerate(wnids):
        img_dir = d / "train" / w / "images"
        img_dir.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), COLORS[c]).save(img_dir / f"{w}_{i}.JPEG")
        for i in range(2):
            name = f"val_{c * 2 + i}.JPEG"
            Image.new("RGB", (64, 64), COLORS[c]).save(d / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 128).save(d / "train" / "n001" / "images" / "n001_gray.JPEG")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def write_imagefolder(root: Path) -> None:
    for split, n in (("train", 5), ("val", 2)):
        for c, name in enumerate(["cat", "dog"]):
            cd = root / split / name
            cd.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), COLORS[c]).save(cd / f"{i}.png")


# ----------------------------------------------------------------------------- Fashion-MNIST
def test_registry_has_all_datasets():
    assert {"fashion_mnist", "mnist", "cifar10", "cifar100", "tiny_imagenet", "imagefolder"} <= set(DATASETS.names())


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_roundtrip_exact(tmp_path: Path, gz: bool):
    ref = write_fashion(tmp_path / "f", gz=gz)
    s = load_dataset("fashion_mnist", str(tmp_path / "f"), val_fraction=0.0)
    assert s.train.x.dtype == torch.uint8 and s.train.y.dtype == torch.int64
    assert s.train.x.shape == (N_TRAIN, 1, 28, 28) and s.test.x.shape == (N_TEST, 1, 28, 28)
    # val_fraction=0 keeps the training set in file order.
    assert torch.equal(s.train.x[:, 0], torch.from_numpy(ref["xtr"]))
    assert torch.equal(s.train.y, torch.from_numpy(ref["ytr"]).long())
    assert torch.equal(s.test.x[:, 0], torch.from_numpy(ref["xte"]))
    assert torch.equal(s.test.y, torch.from_numpy(ref["yte"]).long())
    assert len(s.val) == 0 and s.val.x.shape[1:] == (1, 28, 28)
    assert s.num_classes == 10 and s.in_channels == 1 and s.image_size == (28, 28)
    assert s.classes[0] == "T-shirt/top" and s.classes[9] == "Ankle boot"


def test_val_split_disjoint_reproducible(fashion_dir):
    root, ref = fashion_dir
    a = load_dataset("fashion_mnist", str(root), val_fraction=0.1, seed=0)
    b = load_dataset("fashion_mnist", str(root), val_fraction=0.1, seed=0)
    c = load_dataset("fashion_mnist", str(root), val_fraction=0.1, seed=1)
    assert len(a.val) == 20 and len(a.train) == 180 and len(a.test) == N_TEST
    tr, va = set(ids_of(a.train)), set(ids_of(a.val))
    assert not tr & va and tr | va == set(range(N_TRAIN))
    assert ids_of(a.val) == ids_of(b.val) and ids_of(a.train) == ids_of(b.train)
    assert set(ids_of(c.val)) != va
    # labels travel with their images
    ytr = torch.from_numpy(ref["ytr"]).long()
    assert torch.equal(a.val.y, ytr[ids_of(a.val)])
    assert torch.equal(a.test.y, torch.from_numpy(ref["yte"]).long())  # test untouched


def test_subsets(fashion_dir):
    root, _ = fashion_dir
    full = load_dataset("fashion_mnist", str(root), seed=3)
    s = load_dataset("fashion_mnist", str(root), seed=3, train_subset=50, test_subset=10)
    assert len(s.train) == 50 and len(s.test) == 10
    assert set(ids_of(s.train)) <= set(ids_of(full.train))
    assert ids_of(s.val) == ids_of(full.val)
    assert ids_of(s.test) == ids_of(full.test)[:10]
    assert s.mean == full.mean  # stats come from the carved train split, not the subset


def test_mean_std_from_train(fashion_dir):
    root, _ = fashion_dir
    s = load_dataset("fashion_mnist", str(root))
    x = s.train.x.double() / 255
    assert s.mean[0] == pytest.approx(x.mean().item(), rel=1e-6)
    assert s.std[0] == pytest.approx(x.std(unbiased=False).item(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"train_subset": 0},
        {"train_subset": -5},
        {"train_subset": 10_000},
        {"test_subset": 0},
        {"test_subset": 51},
    ],
)
def test_bad_arguments(fashion_dir, kwargs):
    root, _ = fashion_dir
    with pytest.raises(DataError):
        load_dataset("fashion_mnist", str(root), **kwargs)


def test_unknown_dataset_lists_names():
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("imagenette")


def test_missing_folder_message(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as ei:
        load_dataset("fashion_mnist", str(missing))
    msg = str(ei.value)
    assert str(missing) in msg and "train-images-idx3-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg
    assert "\n" not in msg


def test_mnist_needs_root():
    with pytest.raises(DataError, match="data.root"):
        load_dataset("mnist")


def test_malformed_magic_names_file(tmp_path: Path):
    root = tmp_path / "bad"
    write_fashion(root, gz=False)
    xtr, _ = mnist_like(N_TRAIN, 0, 1)
    write_idx(root / "train-images-idx3-ubyte", xtr, gz=False, magic=b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="magic") as ei:
        load_dataset("fashion_mnist", str(root))
    assert str(root / "train-images-idx3-ubyte") in str(ei.value)


def test_idx_count_mismatch_and_truncation(tmp_path: Path):
    root = tmp_path / "bad"
    write_fashion(root, gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(N_TRAIN - 1, np.uint8), gz=False)
    with pytest.raises(DataError, match="disagree"):
        load_dataset("fashion_mnist", str(root))
    write_fashion(root, gz=False)  # restore, then truncate a test file
    p = root / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DataError, match="t10k-images"):
        load_dataset("fashion_mnist", str(root))


def test_download_offline_is_clear(tmp_path: Path, monkeypatch):
    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    with pytest.raises(DataError) as ei:
        load_dataset("fashion_mnist", str(tmp_path / "none"), download=True, cache_dir=str(tmp_path / "cache"))
    msg = str(ei.value)
    assert "download failed" in msg and str(tmp_path / "cache") in msg and "apt-get" in msg


def test_download_fills_cache(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"

    def fake_download(self):  # what torchvision leaves behind: raw, uncompressed idx files
        write_fashion(cache / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    s = load_dataset("fashion_mnist", str(tmp_path / "none"), download=True, cache_dir=str(cache), val_fraction=0)
    assert len(s.train) == N_TRAIN and len(s.test) == N_TEST


# ----------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_roundtrip(tmp_path: Path, hundred: bool):
    ref = write_cifar(tmp_path, hundred=hundred)
    name = "cifar100" if hundred else "cifar10"
    folder = tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    for root in (tmp_path, folder):  # parent or the folder itself
        s = load_dataset(name, str(root), val_fraction=0.0)
        assert s.train.x.shape == (60, 3, 32, 32) and s.train.x.dtype == torch.uint8
        assert torch.equal(s.train.x, torch.from_numpy(ref["xtr"]).view(-1, 3, 32, 32))
        assert torch.equal(s.train.y, torch.from_numpy(ref["ytr"]).long())
        assert torch.equal(s.test.x, torch.from_numpy(ref["xte"]).view(-1, 3, 32, 32))
        assert torch.equal(s.test.y, torch.from_numpy(ref["yte"]).long())
        assert s.num_classes == (100 if hundred else 10) and s.classes[1] == "class1"
        x = s.train.x.double() / 255
        assert s.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))
        assert s.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist()))
    s = load_dataset(name, str(tmp_path), val_fraction=0.25)
    assert len(s.train) == 45 and len(s.val) == 15


def test_cifar_missing_and_malformed(tmp_path: Path):
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", str(tmp_path / "x"))
    assert str(tmp_path / "x" / "cifar-10-batches-py") in str(ei.value) and "data.root" in str(ei.value)
    write_cifar(tmp_path, hundred=False)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))


class _RunsShell:
    """Unpickling this calls os.system: what a hostile "dataset" file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("where", ["batch", "meta"])
def test_cifar_pickle_cannot_run_code(tmp_path: Path, protocol: int, where: str):
    write_cifar(tmp_path, hundred=False)
    marker = tmp_path / "PWNED"
    d = tmp_path / "cifar-10-batches-py"
    target = d / ("data_batch_2" if where == "batch" else "batches.meta")
    payload = {b"data": np.zeros((12, 3072), np.uint8), b"labels": [0] * 12, b"x": _RunsShell(marker)}
    target.write_bytes(pickle.dumps(payload, protocol=protocol))
    # The same bytes through plain pickle really would run the command: the test can fail.
    pickle.loads(target.read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", str(tmp_path))
    msg = str(ei.value)
    assert not marker.exists()
    assert str(target) in msg and "posix.system" in msg and "re-download" in msg and "\n" not in msg


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_pickle_reads_every_numpy_protocol(protocol: int):
    from ptd.data.safe_pickle import safe_load

    x = np.arange(24, dtype=np.uint8).reshape(2, 12)
    obj = {b"data": x, "labels": [3, 1], "n": np.int64(7), "t": (1.5, "a", None)}
    got = safe_load(pickle.dumps(obj, protocol=protocol))
    assert got[b"data"].dtype == np.uint8 and (got[b"data"] == x).all()
    assert got["labels"] == [3, 1] and got["n"] == 7 and got["t"] == (1.5, "a", None)


def test_cifar_batch_of_strings_is_one_line_error(tmp_path: Path):
    write_cifar(tmp_path, hundred=False)
    p = tmp_path / "cifar-10-batches-py" / "test_batch"
    p.write_bytes(pickle.dumps({b"data": [["a", "b"]], b"labels": [0]}))
    with pytest.raises(DataError, match="test_batch.*not numeric"):
        load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_gz_idx_names_file_and_fix(tmp_path: Path, damage: str):
    root = tmp_path / "fm"
    write_fashion(root, gz=True)
    p = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(p.read_bytes())
    if damage == "flip":  # the deflate stream, after the 10-byte gzip header
        for i in range(10, len(raw) - 8):
            raw[i] ^= 0x5A
    else:
        raw = raw[: len(raw) // 2]
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError) as ei:
        load_dataset("fashion_mnist", str(root))
    msg = str(ei.value)
    assert msg.startswith(f"corrupt gzip file {p} (") and "re-download" in msg


# ----------------------------------------------------------------------------- Tiny-ImageNet
def test_tiny_imagenet(tmp_path: Path):
    write_tiny(tmp_path)
    s = load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0)
    assert s.classes == ["n001", "n002", "n003"] and s.num_classes == 3
    assert s.train.x.shape == (13, 3, 64, 64) and s.train.x.dtype == torch.uint8
    assert s.test.x.shape == (6, 3, 64, 64)
    assert s.test.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert sorted(s.train.y.tolist()) == [0] * 5 + [1] * 4 + [2] * 4
    # JPEG of a flat colour decodes to (almost) that colour; grayscale became 3 equal channels.
    for img, lab in zip(s.test.x, s.test.y):
        color = torch.tensor(COLORS[int(lab)], dtype=torch.float32)
        assert (img.float().mean(dim=(1, 2)) - color).abs().max() < 6
    gray = [img for img in s.train.x if (img[0] == img[1]).all() and (img[1] == img[2]).all()]
    assert len(gray) == 1 and abs(gray[0].float().mean().item() - 128) < 3
    s2 = load_dataset("tiny_imagenet", str(tmp_path / "tiny-imagenet-200"), val_fraction=0.25, seed=1)
    assert len(s2.train) + len(s2.val) == 13 and len(s2.test) == 6


def test_tiny_imagenet_missing(tmp_path: Path):
    with pytest.raises(DataError) as ei:
        load_dataset("tiny_imagenet", str(tmp_path))
    assert "wnids.txt" in str(ei.value) and str(tmp_path) in str(ei.value) and "data.root" in str(ei.value)


# ----------------------------------------------------------------------------- a data.root read two ways
NESTED = {"fashion_mnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py", "tiny_imagenet": "tiny-imagenet-200"}


def write_flat(kind: str, folder: Path) -> None:
    """A complete copy of ``kind`` whose files lie in ``folder`` itself."""
    if kind == "fashion_mnist":
        write_fashion(folder, gz=False)
        return
    tmp = folder / "_tmp"
    write_cifar(tmp, hundred=False) if kind == "cifar10" else write_tiny(tmp)
    (tmp / NESTED[kind]).rename(folder / "_ds")
    for f in (folder / "_ds").iterdir():
        f.rename(folder / f.name)
    (folder / "_ds").rmdir()
    tmp.rmdir()


def which_copy(kind: str, s) -> str:
    """Which of ``two_copies``'s copies ``s`` was read from."""
    if kind == "tiny_imagenet":
        return "nested" if s.classes[0] == "n003" else "root"
    return "nested" if len(s.test) == 7 else "root"


def two_copies(kind: str, root: Path) -> Path:
    """``root`` holding a complete ``kind`` in itself and in the dataset's own folder under it, told
    apart by the test split's size (7 images in the nested copy) or the class order (reversed there)."""
    write_flat(kind, root)
    nested = root / NESTED[kind]
    write_flat(kind, nested)
    if kind == "fashion_mnist":
        x, y = mnist_like(7, 1000, 2)
        write_idx(nested / "t10k-images-idx3-ubyte", x, gz=False)
        write_idx(nested / "t10k-labels-idx1-ubyte", y, gz=False)
    elif kind == "cifar10":
        x = np.random.default_rng(5).integers(0, 256, (7, 3072), dtype=np.uint8)
        (nested / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": list(range(7))}))
    else:
        (nested / "wnids.txt").write_text("n003\nn002\nn001\n")
    return nested


@pytest.mark.parametrize("kind", list(NESTED))
def test_a_data_root_holding_two_complete_copies_is_refused_naming_both(tmp_path: Path, kind: str):
    """Fashion-MNIST read the idx files in data.root, CIFAR and Tiny-ImageNet the dataset folder under
    it, without a word, when both were complete (a tiny-imagenet-200.zip unzipped inside its own
    folder, say), and the two may differ. Each fix the line gives reads the copy it names."""
    root = tmp_path / "data"
    nested = two_copies(kind, root)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as ei:
        load_dataset(kind, str(root), val_fraction=0, cache_dir=cache)
    msg = str(ei.value)
    assert "\n" not in msg and f"data.root {root} holds two complete copies, {nested} and the files in {root} itself" in msg
    assert msg.endswith(f"set data.root to {nested} to read that one, or move {nested} out of {root} to read the one "
                        f"in {root} itself"), msg
    assert which_copy(kind, load_dataset(kind, str(nested), val_fraction=0, cache_dir=cache)) == "nested"
    nested.rename(tmp_path / "away")
    assert which_copy(kind, load_dataset(kind, str(root), val_fraction=0, cache_dir=cache)) == "root"


# One file of the dataset's own, enough to start a copy; and a file the two copies share no name with.
PART = {"fashion_mnist": "train-images-idx3-ubyte", "cifar10": "batches.meta", "tiny_imagenet": "wnids.txt"}


@pytest.mark.parametrize("kind", list(NESTED))
def test_a_partial_second_copy_is_refused_and_an_empty_folder_is_not(tmp_path: Path, kind: str):
    """A nested folder holding part of the dataset (an interrupted download or extraction, likely the
    copy meant) beside a complete copy in data.root is refused, naming what it lacks; an empty one (no
    file of the dataset's) is no copy: data.root's own files are read (CIFAR read the empty folder
    and said its data_batch_1 was not found)."""
    root = tmp_path / "data"
    write_flat(kind, root)
    nested = root / NESTED[kind]
    nested.mkdir(parents=True)
    cache = str(tmp_path / "cache")
    assert which_copy(kind, load_dataset(kind, str(root), val_fraction=0, cache_dir=cache)) == "root"
    (nested / PART[kind]).write_bytes((root / PART[kind]).read_bytes())
    with pytest.raises(DataError) as ei:
        load_dataset(kind, str(root), val_fraction=0, cache_dir=cache)
    n = {"fashion_mnist": 4, "cifar10": 7, "tiny_imagenet": 2}[kind]
    assert f"{nested} holds 1 of its {n} files (no " in str(ei.value), str(ei.value)
    assert str(ei.value).endswith(f"move {nested} out of {root} to read {root}'s own files, or complete it and set "
                                  f"data.root to {nested}"), str(ei.value)


def test_a_complete_dataset_folder_beside_a_stray_file_of_it_or_another_datasets_folders(tmp_path: Path):
    """The other way round: a stray wnids.txt in data.root beside a complete tiny-imagenet-200/ is
    refused (set data.root to the complete one); an ImageNet-style train/ and val/ there hold none
    of Tiny-ImageNet's files by name and change nothing; nor does tiny-imagenet-200 as a link to
    data.root itself (one folder, reached twice)."""
    write_tiny(tmp_path)
    cache = str(tmp_path / "cache")
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    assert load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0, cache_dir=cache).num_classes == 3
    (tmp_path / "wnids.txt").write_text("n001\n")
    with pytest.raises(DataError, match=f"set data.root to {tmp_path / 'tiny-imagenet-200'} to read the complete one"):
        load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0, cache_dir=cache)
    flat = tmp_path / "tiny-imagenet-200"
    (flat / "tiny-imagenet-200").symlink_to(".")
    assert load_dataset("tiny_imagenet", str(flat), val_fraction=0, cache_dir=cache).num_classes == 3


# ----------------------------------------------------------------------------- imagefolder
def test_imagefolder_splits_and_loader(tmp_path: Path):
    write_imagefolder(tmp_path)
    s = load_dataset("imagefolder", str(tmp_path), val_fraction=0.2, seed=0)
    assert isinstance(s.train, FolderSplit) and isinstance(s.test, FolderSplit)
    assert s.classes == ["cat", "dog"] and s.image_size == (224, 224)
    assert len(s.train) == 8 and len(s.val) == 2 and len(s.test) == 4
    assert not {p for p, _ in s.train.samples} & {p for p, _ in s.val.samples}
    assert s.mean == (0.485, 0.456, 0.406)
    ev = make_loader(s.test, batch_size=3, train=False, mean=s.mean, std=s.std, workers=0, image_size=16)
    batches = list(ev)
    assert len(ev) == 2 and [b[0].shape for b in batches] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 1, 1]
    # a flat red image normalizes to the expected per-channel values
    want = (torch.tensor(COLORS[0]) / 255 - torch.tensor(s.mean)) / torch.tensor(s.std)
    assert torch.allclose(batches[0][0][0].mean(dim=(1, 2)), want.float(), atol=0.05)
    tr = make_loader(s.train, batch_size=3, train=True, mean=s.mean, std=s.std, workers=0, image_size=16)
    assert len(tr) == 2 and tr.num_samples == 6
    tr.set_epoch(1)
    assert all(x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 for x, _ in tr)


def test_imagefolder_empty_class(tmp_path: Path):
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError) as ei:
        load_dataset("imagefolder", str(tmp_path))
    assert str(tmp_path / "train" / "empty") in str(ei.value)
    with pytest.raises(DataError, match="data.root"):
        load_dataset("imagefolder", str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- TensorLoader
def id_split(n: int, c: int = 1, hw: int = 8) -> Split:
    """Images whose first pixel holds the sample id (n <= 256)."""
    x = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return Split(x, torch.arange(n, dtype=torch.int64))


def ident(c: int = 1):
    return dict(mean=(0.0,) * c, std=(1.0,) * c)


def test_loader_counts_and_drop_last():
    sp = id_split(100)
    tr = make_loader(sp, batch_size=32, train=True, augment=False, **ident())
    assert len(tr) == 3 and tr.num_samples == 96
    ys = [y for _, y in tr]
    assert [len(y) for y in ys] == [32, 32, 32] and len(set(torch.cat(ys).tolist())) == 96
    ev = make_loader(sp, batch_size=32, train=False, **ident())
    batches = list(ev)
    assert len(ev) == 4 and [len(y) for _, y in batches] == [32, 32, 32, 4] and ev.num_samples == 100
    assert torch.cat([y for _, y in batches]).tolist() == list(range(100))  # each once, in order
    x, _ = batches[0]
    assert x.dtype == torch.float32 and torch.allclose(x * 255, sp.x[:32].float(), atol=1e-4)


def test_loader_deterministic_per_epoch():
    sp = id_split(64)

    def order(epoch: int, seed: int = 0) -> list[int]:
        ld = make_loader(sp, batch_size=8, train=True, seed=seed, **ident())
        ld.set_epoch(epoch)
        return torch.cat([y for _, y in ld]).tolist()

    def images(epoch: int) -> torch.Tensor:
        ld = make_loader(sp, batch_size=8, train=True, **ident())
        ld.set_epoch(epoch)
        return torch.cat([x for x, _ in ld])

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=5)
    assert sorted(order(2)) == list(range(64))
    assert torch.equal(images(3), images(3))  # augmentation is reproducible too


@pytest.mark.parametrize("n", [100, 101])
def test_loader_ddp_shards(n: int):
    sp = id_split(n)
    shards = []
    for rank in range(2):
        ld = make_loader(sp, batch_size=10, train=True, rank=rank, world_size=2, seed=4, **ident())
        ld.set_epoch(2)
        assert len(ld) == 5 and ld.num_samples == 50
        shards.append(torch.cat([y for _, y in ld]).tolist())
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 100
    # eval: every sample seen, equal batch counts
    evs = [make_loader(sp, batch_size=16, train=False, rank=r, world_size=2, **ident()) for r in range(2)]
    assert len(evs[0]) == len(evs[1])
    seen = [torch.cat([y for _, y in ev]).tolist() for ev in evs]
    assert set(seen[0]) | set(seen[1]) == set(range(n)) and len(seen[0]) == len(seen[1]) == (n + 1) // 2


class EvenIdsRight(torch.nn.Module):
    """On id_split: right on even sample ids, wrong on odd ones; a constant class on folders."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        ids = (x[:, 0, 0, 0] * 255).round().long()  # the loader scales pixels to [0, 1]
        guess = torch.where(ids % 2 == 0, ids, (ids + 1) % self.n)
        return torch.nn.functional.one_hot(guess, self.n).float()


@pytest.mark.parametrize("n,world", [(101, 2), (100, 3), (7, 4), (2, 4)])
def test_a_sharded_eval_loader_is_evaluated_over_each_sample_once(n: int, world: int):
    # Its padding (repeats of the first samples, id 0 being right) was counted: n 102 of 101, acc 52/102.
    from ptd.train.loop import Runtime, evaluate

    sp, model, rt = id_split(n), EvenIdsRight(n), Runtime(quiet=True, channels_last=False)
    got = [evaluate(model, make_loader(sp, batch_size=16, train=False, rank=r, world_size=world, **ident()), rt) for r in range(world)]
    assert sum(g["n"] for g in got) == n  # each rank's share, summed as all_sum would
    assert sum(g["acc"] * g["n"] for g in got if g["n"]) == pytest.approx((n + 1) // 2)  # the even ids
    one = evaluate(model, make_loader(sp, batch_size=16, train=False, **ident()), rt)
    assert one["n"] == n and one["acc"] == pytest.approx(((n + 1) // 2) / n)


def test_a_sharded_folder_eval_loader_is_evaluated_over_each_image_once(tmp_path: Path):
    from ptd.train.loop import Runtime, evaluate

    write_imagefolder(tmp_path)
    s = load_dataset("imagefolder", str(tmp_path), val_fraction=0.0)  # train: 5 cat then 5 dog
    cat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))  # says "cat" whatever the image
    with torch.no_grad():
        cat[1].weight.zero_()
        cat[1].bias.copy_(torch.tensor([1.0, 0.0]))
    rt = Runtime(quiet=True, channels_last=False)
    loaders = [make_loader(s.train, batch_size=3, train=False, rank=r, world_size=3, mean=s.mean, std=s.std, image_size=8)
               for r in range(3)]
    assert all(ld.world_size == 3 for ld in loaders)  # what evaluate sums over the ranks by (it had none: never summed)
    got = [evaluate(cat, ld, rt) for ld in loaders]
    assert sum(g["n"] for g in got) == 10  # not 12: the two padded cats
    assert sum(g["acc"] * g["n"] for g in got) == pytest.approx(5)


def test_loader_too_small_for_batch():
    with pytest.raises(DataError, match="batch_size"):
        make_loader(id_split(5), batch_size=8, train=True, **ident())


def reference_crop(x: torch.Tensor, oy: int, ox: int, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = torch.zeros(x.shape[0], h + 2 * p, w + 2 * p, dtype=x.dtype)
    padded[:, p : p + h, p : p + w] = x
    return padded[:, oy : oy + h, ox : ox + w]


def test_crop_batch_matches_hand_computed():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    out = crop_batch(x, torch.tensor([0, 2]), torch.tensor([4, 1]), padding=2)
    # sample 0: offset (0, 4) = content moved 2 px down and 2 px left, zeros fill in.
    assert torch.equal(out[0, :, 2:, :4], x[0, :, :4, 2:])
    assert (out[0, :, :2] == 0).all() and (out[0, :, :, 4:] == 0).all()
    assert torch.equal(out[1], reference_crop(x[1], 2, 1, 2))
    ident_out = crop_batch(x, torch.tensor([2, 2]), torch.tensor([2, 2]), padding=2)
    assert torch.equal(ident_out, x)


def test_flip_batch():
    x = torch.arange(2 * 4, dtype=torch.float32).view(2, 1, 1, 4)
    out = flip_batch(x, torch.tensor([True, False]))
    assert out[0, 0, 0].tolist() == [3, 2, 1, 0] and out[1, 0, 0].tolist() == [4, 5, 6, 7]


def test_loader_augmentation_is_crop_and_flip():
    sp = id_split(32, c=3, hw=8)
    sp.x[:, :, 0, 0] = 0  # ids unused here; keep images random
    p = 2
    ld = make_loader(sp, batch_size=32, train=True, crop_padding=p, seed=1, **ident(3))
    ld.set_epoch(0)
    (x, y), = list(ld)
    aug = (x * 255).round().to(torch.uint8)
    n_changed, n_flipped = 0, 0
    for img, lab in zip(aug, y):
        orig = sp.x[lab]
        cands = {}
        for oy in range(2 * p + 1):
            for ox in range(2 * p + 1):
                c = reference_crop(orig, oy, ox, p)
                cands[(oy, ox, False)] = c
                cands[(oy, ox, True)] = c.flip(-1)
        hits = [k for k, c in cands.items() if torch.equal(c, img)]
        assert hits, "augmented image is not a crop/flip of its source"
        n_changed += not torch.equal(img, orig)
        n_flipped += any(k[2] for k in hits)
    assert n_changed >= 24 and 4 <= n_flipped <= 28  # 32 samples: mostly shifted, ~half flipped


def test_loader_normalization_and_channels_last():
    sp = id_split(10, c=3)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    ld = make_loader(sp, batch_size=10, train=False, mean=mean, std=std, channels_last=True)
    (x, _), = list(ld)
    want = (sp.x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, want, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(DataError, match="channels"):
        make_loader(sp, batch_size=4, train=False, mean=(0.5,), std=(0.2,))


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_fashion_mnist():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    s = load_dataset("fashion_mnist")
    assert len(s.train) == 54000 and len(s.val) == 6000 and len(s.test) == 10000
    assert len(s.train) + len(s.val) == 60000
    full = load_dataset("fashion_mnist", val_fraction=0.0)
    assert full.train.x.shape == (60000, 1, 28, 28) and full.test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(full.train.y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(full.test.y, minlength=10).tolist() == [1000] * 10
    assert 0.27 < full.mean[0] < 0.30 and 0.34 < full.std[0] < 0.37


def test_folder_loader_with_workers_is_deterministic(tmp_path: Path):
    write_imagefolder(tmp_path)
    s = load_dataset("imagefolder", str(tmp_path), val_fraction=0.0)

    def run(epoch: int) -> tuple[list[int], torch.Tensor]:
        ld = make_loader(s.train, batch_size=5, train=True, mean=s.mean, std=s.std, workers=2, image_size=16)
        ld.set_epoch(epoch)
        ys, xs = zip(*[(y, x) for x, y in ld])
        return torch.cat(ys).tolist(), torch.cat(xs)

    (ya, xa), (yb, xb) = run(1), run(1)
    assert ya == yb and torch.equal(xa, xb) and len(ya) == 10


def test_folder_augmentation_does_not_depend_on_the_number_of_workers(tmp_path: Path):
    """Each image's crop and flip come from (seed, epoch, image): the same run trained other weights
    at data.workers 0 and 2 (an audit: the teacher files differed), since the augmentation drew from
    each worker's RNG, or from the training loop's own without workers (moving its dropout stream)."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "val" / c / "0.png")
    s = load_dataset("imagefolder", str(tmp_path), val_fraction=0.0)

    def epoch(workers: int, e: int) -> dict[int, torch.Tensor]:
        ld = make_loader(s.train, batch_size=4, train=True, mean=s.mean, std=s.std, workers=workers, image_size=16,
                         seed=3, with_index=True)
        ld.set_epoch(e)
        return {int(i): x for xb, _, ib in ld for x, i in zip(xb, ib)}

    before = torch.get_rng_state()
    cuda_seeded = []
    real = torch.cuda.manual_seed_all
    torch.cuda.manual_seed_all = lambda seed: cuda_seeded.append(seed)  # torch.manual_seed would reseed every GPU
    try:
        runs = {w: epoch(w, 1) for w in (0, 1, 2)}
    finally:
        torch.cuda.manual_seed_all = real
    assert torch.equal(torch.get_rng_state(), before)  # workers 0: the loop's RNG did not move
    assert cuda_seeded == []  # nor the GPU's (its dropout stream followed the batch's last image)
    assert len(runs[0]) == 12 and all(runs[w].keys() == runs[0].keys() for w in runs)
    assert all(torch.equal(runs[w][i], runs[0][i]) for w in runs for i in runs[0])
    again = epoch(0, 2)  # another epoch: other crops of the same images
    assert sum(not torch.equal(again[i], runs[0][i]) for i in again) >= 10


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path: Path, workers: int):
    """A file found unreadable mid-epoch (folder datasets decode as they train): the error names the
    file and the fix in one line, also when a DataLoader worker raised it (torch re-raises it there
    with the worker's traceback folded into the message)."""
    write_imagefolder(tmp_path)
    # Loaded before the file goes bad: load_dataset's own check (verify_images) would refuse it
    # up front; this is the file that changes between the check and the epoch.
    s = load_dataset("imagefolder", str(tmp_path), val_fraction=0.0)
    bad = tmp_path / "train" / "dog" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing decodable
    ld = make_loader(s.train, batch_size=5, train=True, mean=s.mean, std=s.std, workers=workers, image_size=16)
    with pytest.raises(DataError) as ei:
        list(ld)
    msg = str(ei.value)
    assert msg.startswith(f"cannot read image {bad}: ") and "run the same command again to resume" in msg
    assert "Traceback" not in msg and "worker" not in msg and "\n" not in ei.value.args[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_loader_on_cuda():
    sp = id_split(64, c=3)
    ld = make_loader(sp, batch_size=16, train=True, device="cuda", channels_last=True, **ident(3))
    ld.set_epoch(1)
    batches = list(ld)
    assert len(batches) == 4
    x, y = batches[0]
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    cpu = make_loader(sp, batch_size=16, train=True, device="cpu", augment=False, **ident(3))
    cpu.set_epoch(1)
    assert torch.cat([y for _, y in ld]).cpu().tolist() == torch.cat([y for _, y in cpu]).tolist()


def test_load_configured_passes_every_data_key_load_dataset_takes(monkeypatch):
    """One place maps DataConfig onto load_dataset: ptd eval and ptd export once called
    load_dataset by hand and dropped cache_dir (Tiny-ImageNet then decoded into ~/.cache/ptd)."""
    import dataclasses
    import inspect
    import pathlib

    import ptd.data.base as base
    from ptd.config import DataConfig

    seen = {}
    monkeypatch.setattr(base, "load_dataset", lambda name, root, **kw: seen.update(name=name, root=root, **kw))
    dc = DataConfig(name="cifar10", root="/r", cache_dir="/c", download=True, train_subset=7, test_subset=5, val_fraction=0.3,
                    check_images="full")
    base.load_configured(dc, 11, test_subset=3)
    takes = set(inspect.signature(base.load_dataset).parameters)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    for k in takes & fields:
        assert k in seen, k
    assert seen == {"name": "cifar10", "root": "/r", "val_fraction": 0.3, "seed": 11, "download": True, "cache_dir": "/c",
                    "train_subset": 7, "test_subset": 3, "check_images": "full", "check_shard": (0, 1)}
    # Under torchrun a process checks only its share of the images where every process's refusal is
    # then gathered (preflight.load_checked): ptd eval and ptd export gather nothing, and each rank
    # checked its own share, so rank 0 went on past a bad file in rank 1's (last session's note).
    monkeypatch.setenv("RANK", "6")  # a second machine of 4 processes each: its share is of its own copy
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert base.torchrun_shard() == (2, 4)
    base.load_configured(dc, 11)
    assert seen["check_shard"] == (0, 1)  # every image, as eval and export load
    sharded = [f.relative_to(pathlib.Path(base.__file__).parents[1]).as_posix() for f in pathlib.Path(base.__file__).parents[1].rglob("*.py")
               if "=torchrun_shard()" in f.read_text().replace(" ", "")]
    assert sharded == ["preflight.py"], sharded  # the one caller that gathers the refusals
    with pytest.raises(TypeError, match="unknown keyword"):
        base.load_configured(dc, 0, cache=1)
    # Nothing outside ptd.data maps a config onto load_dataset by hand.
    root = pathlib.Path(base.__file__).parents[1]
    for f in root.rglob("*.py"):
        if "data" not in f.relative_to(root).parts:
            assert "load_dataset(dc" not in f.read_text() and "load_dataset(cfg" not in f.read_text(), f


def test_a_mistyped_dataset_name_is_echoed_as_written_with_the_name_it_likely_meant():
    """data.name=cifar-10 was refused as 'cifar_10' (the lookup's normalised key) with no hint
    (real-data audit). Every registry's refusal now names its nearest registered name."""
    from ptd.data import DataError, load_dataset
    from ptd.registry import Registry, UnknownNameError

    with pytest.raises(DataError) as e:
        load_dataset("cifar-10", "/nowhere")
    assert str(e.value).startswith("unknown dataset 'cifar-10' (did you mean 'cifar10'?); valid names: cifar10, ")
    r: Registry[int] = Registry("loss")
    r.register("kd")(1)
    r.register("dkd")(2)
    r.register("fitnet")(3)
    assert r.nearest("KD") == "kd" and r.nearest("fit-net") == "fitnet" and r.nearest("fitnte") == "fitnet"
    assert r.nearest("resnet") is None
    with pytest.raises(UnknownNameError, match=r"unknown loss 'dk' \(did you mean 'dkd'\?\); valid names: dkd, fitnet, kd"):
        r.get("dk")


def test_channel_stats_do_not_depend_on_the_thread_count():
    """float64 sums split over threads add in another order: a Fashion-MNIST split's mean read
    0.3652458379185007 at 1 thread and 0.36524583791850074 at 2, and preflight loaded the data
    before setting the run's threads, so one config normalized (and trained) differently by the
    machine's default thread count. Integer sums are exact: the same figures at any count, equal
    to numpy's exact arithmetic on the same pixels."""
    from fractions import Fraction

    from ptd.data.base import channel_stats

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=g)  # the old sums: 1 ulp apart here
    before = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got.append(channel_stats(x))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1] == got[2]
    a = x.numpy().astype(np.int64)
    n = a.shape[0] * a.shape[2] * a.shape[3]
    for ch in range(x.shape[1]):
        exact = Fraction(int(a[:, ch].sum()), 255 * n)  # the mean, as a fraction: float() rounds it once
        assert abs(got[0][0][ch] - float(exact)) <= 2e-16
