"""Bad data folders and files, for every dataset format: refused at load, before training and
before anything is written, in one ``ptd: error:`` line that names the file or folder and the fix.

Covers an OSError anywhere on the way to a data file (permission denied, a folder where a file is
expected, a symlink loop), datasets nothing can be learned from (fewer than 2 classes, an empty
split, labels out of range), CIFAR pixels that are not uint8 values, malformed Tiny-ImageNet lists
(duplicate class ids, annotations that leave val/images), a cache folder that cannot be written,
and image files that cannot be read (``verify_images``, run by ``load_dataset``).
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ptd.cli import main
from ptd.data import DataError, FolderSplit, RawDataset, Split, load_dataset, verify_images
from ptd.data.base import check_raw
from ptd.data.safe_pickle import UnsafePickleError, safe_load

from conftest import tiny_config, write_fashion_like, write_idx_file

FOLDER_FLAGS = ["--set", "data.workers=0", "--set", "data.image_size=16", "--set", "data.crop_padding=0",
                "--set", "teacher.optim.batch_size=2", "--set", "prune.retrain.batch_size=2",
                "--set", "distill.optim.batch_size=2"]


# ----------------------------------------------------------------------------- writers
def png(path: Path, seed: int = 0, size: int = 64) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_cifar10(root: Path, labels: list[int] | None = None, data=None, batch: str = "data_batch_1") -> Path:
    """A cifar-10-batches-py folder of 12-image batches; ``labels``/``data`` replace those of ``batch``."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
        y = [i % 10 for i in range(12)]
        if name == batch:
            x = data if data is not None else x
            y = labels if labels is not None else y
        (d / name).write_bytes(pickle.dumps({b"data": x, b"labels": y}, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2))
    return d


def write_tiny(root: Path, wnids=("n01", "n02"), val_lines: list[str] | None = None) -> Path:
    """tiny-imagenet-200 with 3 train and 1 val PNG per class; ``wnids`` is written as given."""
    t = root / "tiny-imagenet-200"
    (t / "val" / "images").mkdir(parents=True)
    (t / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for k, w in enumerate(dict.fromkeys(wnids)):
        (t / "train" / w / "images").mkdir(parents=True)
        for i in range(3):
            png(t / "train" / w / "images" / f"{w}_{i}.png", seed=10 * k + i)
        png(t / "val" / "images" / f"val_{k}.png", seed=100 + k)
        lines.append(f"val_{k}.png\t{w}\t0\t0\t10\t10")
    (t / "val" / "val_annotations.txt").write_text("\n".join(val_lines if val_lines is not None else lines) + "\n")
    return t


def write_imagefolder(root: Path, classes=("a", "b"), per: int = 4) -> Path:
    for split, n in (("train", per), ("val", 2)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                png(root / split / c / f"{i}.png", seed=100 * k + i, size=24)
    return root


# ----------------------------------------------------------------------------- the CLI contract
def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes (os.walk, not pathlib: ``deny`` patches Path.stat)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            f = os.path.join(d, n)
            if os.path.islink(f):
                out[os.path.relpath(f, root)] = os.readlink(f).encode()
                continue
            if not stat.S_ISREG(os.stat(f).st_mode):  # a FIFO: opening it would block
                out[os.path.relpath(f, root)] = b"<not a regular file>"
                continue
            with open(f, "rb") as fh:
                out[os.path.relpath(f, root)] = fh.read()
    return out


def refused(tmp_path: Path, capsys, argv: list[str]) -> str:
    """``ptd <argv>``: exit 2, one ``ptd: error:`` line, no training, nothing under tmp_path changed."""
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ptd: error: "), (rc, err)
    assert "Traceback" not in err and "training" not in out, out
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "run").exists()
    return lines[0]


def config(tmp_path: Path, name: str, root: Path, **data) -> str:
    cfg = tiny_config(root)
    cfg["data"].update(name=name, root=str(root), **data)
    cfg["teacher"]["optim"]["epochs"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def train(tmp_path: Path, capsys, name: str, root: Path, *extra: str, **data) -> str:
    flags = FOLDER_FLAGS if name in ("imagefolder", "tiny_imagenet") else []
    return refused(tmp_path, capsys, ["train", config(tmp_path, name, root, **data), *flags, *extra,
                                      "--out", str(tmp_path / "run")])


# ----------------------------------------------------------------------------- OSErrors on the way
def deny(monkeypatch, folder: Path) -> None:
    """Permission denied for everything inside ``folder``, as a mode-000 folder gives a non-root
    user (root is exempt from permission bits, so this test cannot simply chmod)."""
    real = Path.stat

    def stat(self, *a, **k):
        if str(self).startswith(str(folder) + os.sep):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)


@pytest.mark.parametrize("fmt", ["fashion_mnist", "cifar10", "tiny_imagenet", "imagefolder"])
def test_an_unreadable_data_folder_is_one_line_naming_it(tmp_path: Path, capsys, monkeypatch, fmt: str):
    root = tmp_path / "data"
    {"fashion_mnist": lambda: write_fashion_like(root, 60, 20), "cifar10": lambda: write_cifar10(root),
     "tiny_imagenet": lambda: write_tiny(root), "imagefolder": lambda: write_imagefolder(root)}[fmt]()
    cfg = config(tmp_path, fmt, root, cache_dir=str(tmp_path / "cache"))
    deny(monkeypatch, root)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as ei:
        load_dataset(fmt, str(root), cache_dir=str(tmp_path / "cache"))
    msg = str(ei.value)
    assert f"cannot read {root}" in msg and "Permission denied" in msg and "make it readable" in msg, msg
    line = refused(tmp_path, capsys, ["train", cfg, *FOLDER_FLAGS, "--out", str(tmp_path / "run")])
    assert str(root) in line and "Permission denied" in line
    assert snapshot(tmp_path) == before


def test_a_symlink_loop_where_an_idx_file_should_be(tmp_path: Path, capsys):
    """A real OSError (ELOOP) that Path.is_file() would have hidden as 'file not found'."""
    root = write_fashion_like(tmp_path / "fm", 60, 20)
    loop = root / "train-images-idx3-ubyte"
    loop.symlink_to(loop.name)  # itself
    line = train(tmp_path, capsys, "fashion_mnist", root)
    assert f"cannot read {loop}" in line and "symbolic links" in line


@pytest.mark.parametrize("dims, words", [((2**22, 2**21, 2**21), "payload is 0 bytes, dims (4194304, 2097152, 2097152) "
                                                                  "need 18446744073709551616"),
                                          ((0, 2**32 - 1, 2**32 - 1), "describe an array too large to exist")],
                         ids=["product-wraps-int64-to-0", "zero-count-beside-huge-dims"])
def test_an_idx_header_whose_dims_overflow_is_refused(tmp_path: Path, capsys, dims, words: str):
    """Both matched an empty payload (np.prod wrapped to 0; 0 images) and reshape failed: "internal error"."""
    root = write_fashion_like(tmp_path / "fm", 60, 20)
    (root / "train-images-idx3-ubyte.gz").unlink()
    bad = root / "train-images-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in dims))
    with pytest.raises(DataError, match=f"malformed idx file {bad}: "):
        load_dataset("fashion_mnist", str(root))
    line = train(tmp_path, capsys, "fashion_mnist", root)
    assert f"malformed idx file {bad}: " in line and words in line and "re-install the dataset files" in line


@pytest.mark.parametrize("fmt", ["imagefolder", "tiny_imagenet"])
@pytest.mark.parametrize("kind", ["loop", "dangling", "fifo"])
def test_an_image_that_is_a_broken_link_is_refused_not_dropped(tmp_path: Path, capsys, fmt: str, kind: str):
    """is_file() said False for these, and the image left its class without a word (the run trained)."""
    if fmt == "imagefolder":
        root = write_imagefolder(tmp_path / "data")
        bad = root / "train" / "a" / "bad.png"
    else:
        root = write_tiny(tmp_path / "data").parent
        bad = root / "tiny-imagenet-200" / "train" / "n01" / "images" / "n01_bad.png"
    {"loop": lambda: bad.symlink_to(bad.name), "dangling": lambda: bad.symlink_to("nowhere.png"),
     "fifo": lambda: os.mkfifo(bad)}[kind]()
    with pytest.raises(DataError) as ei:
        load_dataset(fmt, str(root), cache_dir=str(tmp_path / "cache"))
    line = train(tmp_path, capsys, fmt, root, cache_dir=str(tmp_path / "cache"))
    assert line == f"ptd: error: {ei.value}"
    if kind == "fifo":
        assert f"{bad} is not a regular file" in line and "remove it" in line
    else:
        assert f"cannot read image {bad} (" in line and "symbolic link" in line
        assert "remove the link or point it at an image file" in line


@pytest.mark.parametrize("fmt, where", [("fashion_mnist", "train-labels-idx1-ubyte"),
                                        ("cifar10", "cifar-10-batches-py/batches.meta"),
                                        ("tiny_imagenet", "tiny-imagenet-200/val/val_annotations.txt")])
def test_a_folder_where_a_data_file_should_be(tmp_path: Path, capsys, fmt: str, where: str):
    root = tmp_path / "data"
    {"fashion_mnist": lambda: write_fashion_like(root, 60, 20), "cifar10": lambda: write_cifar10(root),
     "tiny_imagenet": lambda: write_tiny(root)}[fmt]()
    for stale in root.glob(where + "*"):
        stale.unlink()
    (root / where).mkdir()
    line = train(tmp_path, capsys, fmt, root, cache_dir=str(tmp_path / "cache"))
    assert f"{root / where} is a folder, expected a data file" in line


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root needs setpriv to lose DAC override")
def test_real_permissions_through_the_real_entry_point(tmp_path: Path):
    """mode 000 data folder and a read-only cache folder, as a process that permission bits bind."""
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    fm = write_fashion_like(tmp_path / "fm", 60, 20)
    tiny = write_tiny(tmp_path / "ti").parent
    ro = tmp_path / "ro_cache"
    ro.mkdir()
    cases = [(["--set", f"data.root={fm}"], str(fm)),
             (["--set", "data.name=tiny_imagenet", "--set", f"data.root={tiny}", "--set", f"data.cache_dir={ro}",
               *FOLDER_FLAGS], f"data.cache_dir {ro} cannot be written (Permission denied)")]
    fm.chmod(0)
    ro.chmod(0o555)
    try:
        for flags, words in cases:
            cfg = config(tmp_path, "fashion_mnist", fm)
            r = subprocess.run([*prefix, sys.executable, "-m", "ptd", "train", cfg, *flags, "--out", str(tmp_path / "run")],
                               capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
            assert not (tmp_path / "run").exists() and list(ro.iterdir()) == []
    finally:
        fm.chmod(0o755)
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- nothing to learn from
def test_fewer_than_two_classes_is_refused_for_every_format(tmp_path: Path, capsys):
    fm = write_fashion_like(tmp_path / "fm", 60, 20)
    write_idx_file(fm / "train-labels-idx1-ubyte", np.zeros(60, np.uint8))
    line = train(tmp_path, capsys, "fashion_mnist", fm)
    assert "1 class ('T-shirt/top' of 10)" in line and str(fm / "train-labels-idx1-ubyte.gz") in line

    cif = write_cifar10(tmp_path / "cifar", labels=[3] * 12)
    for i in range(2, 6):  # every training batch: one class
        (cif / f"data_batch_{i}").write_bytes((cif / "data_batch_1").read_bytes())
    line = train(tmp_path, capsys, "cifar10", tmp_path / "cifar")
    assert "1 class ('c3' of 10)" in line and str(cif) in line

    ifo = write_imagefolder(tmp_path / "if1", classes=("only",))
    line = train(tmp_path, capsys, "imagefolder", ifo)
    assert "1 class ('only' of 1)" in line and str(ifo / "train") in line and "one sub-folder of images per class" in line

    ti = write_tiny(tmp_path / "ti1", wnids=("n01",))
    line = train(tmp_path, capsys, "tiny_imagenet", ti.parent, cache_dir=str(tmp_path / "cache"))
    assert "1 class ('n01' of 1)" in line and str(ti / "train") in line


@pytest.mark.slow  # load_model's first import of the model zoo: ~5 s
def test_ptd_eval_refuses_a_one_class_dataset_too(tmp_path: Path, capsys):
    from ptd.models import build_model
    from ptd.train.checkpoint import save_model

    ifo = write_imagefolder(tmp_path / "if1", classes=("only",))
    save_model(tmp_path / "m.safetensors", build_model("vgg", 1, 3, plan=[8]))
    line = refused(tmp_path, capsys, ["eval", str(tmp_path / "m.safetensors"), config(tmp_path, "imagefolder", ifo),
                                      *FOLDER_FLAGS])
    assert "1 class" in line and str(ifo / "train") in line


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_an_empty_split_is_refused(tmp_path: Path, capsys, split: str):
    fm = write_fashion_like(tmp_path / "fm", 60, 20)
    write_idx_file(fm / f"{split}-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx_file(fm / f"{split}-labels-idx1-ubyte", np.zeros(0, np.uint8))
    line = train(tmp_path, capsys, "fashion_mnist", fm)
    name = "training" if split == "train" else "test"
    assert f"the {name} split ({fm / f'{split}-images-idx3-ubyte.gz'}" in line and "holds 0 images" in line


def test_an_empty_cifar_batch_is_refused_as_empty_not_as_hostile(tmp_path: Path, capsys):
    d = write_cifar10(tmp_path / "cifar", labels=[], data=np.zeros((0, 3072), np.uint8), batch="data_batch_2")
    line = train(tmp_path, capsys, "cifar10", tmp_path / "cifar")
    assert line == f"ptd: error: CIFAR batch {d / 'data_batch_2'} holds 0 images; re-extract the dataset archive"


def test_labels_outside_the_classes_are_refused_whatever_the_format():
    """The shared check behind every loader (idx and CIFAR also check their own files)."""
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    for y, where, bad in (([0, 1, 2, 3], "train", 3), ([0, 1, -1, 1], "train", -1), ([0, 1, 0, 1], "test", 7)):
        test_y = torch.tensor([0, 7, 1, 1] if where == "test" else [0, 1, 0, 1])
        raw = RawDataset(train=Split(x, torch.tensor(y)), test=Split(x, test_y), classes=["a", "b", "c"], in_channels=1,
                         image_size=(2, 2), train_from="/data/train.bin", test_from="/data/test.bin", fix="replace them")
        with pytest.raises(DataError) as ei:
            check_raw("mine", raw)
        assert str(ei.value) == (f"mine: the {'training' if where == 'train' else 'test'} split (/data/{where}.bin) has "
                                 f"label {bad}, outside 0..2 for its 3 classes; replace them")


# ----------------------------------------------------------------------------- CIFAR pixels
@pytest.mark.parametrize("data, words", [
    (np.full((12, 3072), 1e6), "'data' is not integers (dtype float64), expected pixel values 0..255"),
    (np.full((12, 3072), 0.5, np.float32), "'data' is not integers (dtype float32)"),
    (np.full((12, 3072), 300, np.int64), "bad pixel values in {p}: 'data' holds values 300..300, outside 0..255"),
    (np.full((12, 3072), -1, np.int16), "bad pixel values in {p}: 'data' holds values -1..-1, outside 0..255"),
])
def test_cifar_pixels_that_are_not_uint8_values_are_refused(tmp_path: Path, capsys, data, words: str):
    d = write_cifar10(tmp_path / "cifar", data=data)
    line = train(tmp_path, capsys, "cifar10", tmp_path / "cifar")
    assert words.format(p=d / "data_batch_1") in line and str(d / "data_batch_1") in line


def test_cifar_pixels_as_other_integer_types_in_range_still_load(tmp_path: Path):
    x = np.random.default_rng(1).integers(0, 256, (12, 3072))  # int64, every value a valid pixel
    write_cifar10(tmp_path, data=x, labels=np.arange(12) % 10)
    s = load_dataset("cifar10", str(tmp_path), val_fraction=0.0)
    assert s.train.x.dtype == torch.uint8 and torch.equal(s.train.x[:12].reshape(12, -1), torch.from_numpy(x).to(torch.uint8))


def test_float_cifar_labels_are_refused_not_truncated(tmp_path: Path, capsys):
    write_cifar10(tmp_path / "cifar", labels=np.full(12, 2.7))
    assert "'labels' is not integers (dtype float64)" in train(tmp_path, capsys, "cifar10", tmp_path / "cifar")


def test_safe_pickle_reads_an_empty_bytes_literal_but_calls_nothing_else():
    arr = np.zeros((0, 3072), np.uint8)
    for protocol in (0, 1, 2):  # they spell b"" as a call of bytes()
        got = safe_load(pickle.dumps({b"data": arr}, protocol=protocol))
        assert got[b"data"].shape == (0, 3072)
    with pytest.raises(UnsafePickleError, match="bytes"):  # bytes(10**12): 20 bytes of pickle asking for a terabyte
        safe_load(b"c__builtin__\nbytes\n(I1000000000000\ntR.")


# ----------------------------------------------------------------------------- Tiny-ImageNet lists
def test_tiny_imagenet_duplicate_wnids_name_the_file_and_line(tmp_path: Path, capsys):
    t = write_tiny(tmp_path / "ti", wnids=("n01", "n02", "n01"))
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cache"))
    assert f"duplicate class 'n01' on line 3 of {t / 'wnids.txt'} (first on line 1)" in line


@pytest.mark.parametrize("name", ["../../train/n01/images/n01_0.png", "..", "/etc/hostname", "sub/val_0.png",
                                  "..\\val_0.png"])
def test_tiny_imagenet_val_annotation_leaving_val_images_is_refused(tmp_path: Path, name: str):
    t = write_tiny(tmp_path / "ti", val_lines=["val_0.png\tn01\t0\t0\t1\t1", f"{name}\tn01\t0\t0\t1\t1"])
    with pytest.raises(DataError) as ei:
        load_dataset("tiny_imagenet", str(t.parent), cache_dir=str(tmp_path / "cache"))
    assert str(ei.value).startswith(f"malformed line 2 in {t / 'val' / 'val_annotations.txt'}: {name!r} is not a file name")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npy"))


def test_tiny_imagenet_wnid_that_is_a_path_is_refused(tmp_path: Path):
    t = write_tiny(tmp_path / "ti")
    (t / "wnids.txt").write_text("n01\n\n../n02\n")
    with pytest.raises(DataError, match=r"malformed line 3 in .*wnids.txt: '\.\./n02' is not a folder name"):
        load_dataset("tiny_imagenet", str(t.parent), cache_dir=str(tmp_path / "cache"))


def test_tiny_imagenet_corrupt_image_in_the_decode_cache_build(tmp_path: Path, tmp_path_factory, capsys):
    t = write_tiny(tmp_path / "ti")
    bad = t / "train" / "n02" / "images" / "n02_1.png"
    bad.write_bytes(bad.read_bytes()[:70])  # truncated
    # (The test split, whole, is decoded and cached first: the cache lives outside the folder `train` checks.)
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path_factory.mktemp("cache")))
    assert line.startswith(f"ptd: error: cannot decode image {bad}: ") and "replace the file" in line


# ----------------------------------------------------------------------------- the cache folder
def test_cache_dir_that_is_a_file_is_one_line_before_decoding(tmp_path: Path, capsys, recwarn):
    t = write_tiny(tmp_path / "ti")
    (tmp_path / "cachefile").write_text("an output, not a folder\n")
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cachefile"))
    assert line == f"ptd: error: data.cache_dir {tmp_path / 'cachefile'} is a file, not a folder; set data.cache_dir to a writable folder"
    assert len(recwarn) == 0
    # Under a file: the folder cannot be made.
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cachefile" / "sub"))
    assert f"data.cache_dir {tmp_path / 'cachefile' / 'sub'} cannot be written (Not a directory)" in line


def test_cache_dir_is_checked_before_a_download(tmp_path: Path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", lambda self: pytest.fail("downloaded"))
    (tmp_path / "cachefile").write_text("x")
    for name in ("fashion_mnist", "cifar10"):
        with pytest.raises(DataError, match="data.cache_dir .*cachefile is a file, not a folder"):
            load_dataset(name, str(tmp_path / "none"), download=True, cache_dir=str(tmp_path / "cachefile"))


# ----------------------------------------------------------------------------- image files
@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "folder"])
def test_a_bad_image_is_found_before_training(tmp_path: Path, capsys, damage: str):
    root = write_imagefolder(tmp_path / "if")
    bad = root / "val" / "b" / "1.png"
    if damage == "folder":  # an OSError from open(): IsADirectoryError
        bad.unlink()
        bad.mkdir()
        bad = root / "train" / "b" / "2.png"
        bad.unlink()
        bad.mkdir()
        split = FolderSplit([(str(root / "train" / "a" / "0.png"), 0), (str(bad), 1)])
        with pytest.raises(DataError, match=f"cannot read image {bad} \\(IsADirectoryError"):
            verify_images(split)
        return
    data = bad.read_bytes()
    bad.write_bytes({"garbage": b"not an image at all", "empty": b"", "truncated": data[:60]}[damage])
    line = train(tmp_path, capsys, "imagefolder", root)
    assert line.startswith(f"ptd: error: cannot read image {bad} (") and "replace the file, or remove it before a run starts" in line


def test_verify_images_names_the_first_bad_file_in_split_order(tmp_path: Path):
    """Files are checked in threads, in chunks: the error is still the earliest bad file."""
    png(tmp_path / "good.png", size=4)
    (tmp_path / "bad.png").write_bytes(b"junk")
    paths = [str(tmp_path / "good.png")] * 700
    paths[300] = paths[650] = str(tmp_path / "bad.png")
    (tmp_path / "other_bad.png").write_bytes(b"junk")
    paths[650] = str(tmp_path / "other_bad.png")
    split = FolderSplit([(p, 0) for p in paths])
    for workers in (1, 4):
        with pytest.raises(DataError, match=f"cannot read image {tmp_path / 'bad.png'} "):
            verify_images(split, progress=False, workers=workers)
    verify_images(FolderSplit([(str(tmp_path / "good.png"), 0)] * 700), progress=False)  # all good: no error
    verify_images(Split(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)))  # in memory: nothing


def test_torchrun_ranks_share_the_image_check_and_each_names_its_own_bad_file(tmp_path: Path, monkeypatch):
    """Every rank checked every image (world times the work on one machine's cores); each now
    checks every world-th chunk, and a bad file is its own error, which rank 0 cannot print."""
    import ptd.data.base as base
    from ptd.errors import on_every_rank

    monkeypatch.setattr(base, "_VERIFY_CHUNK", 2)
    png(tmp_path / "good.png", size=4)
    (tmp_path / "bad.png").write_bytes(b"junk")
    opened: list[str] = []
    real = base._verify_files
    monkeypatch.setattr(base, "_verify_files", lambda paths, full: (opened.extend(paths), real(paths, full))[1])
    paths = [str(tmp_path / f"{i}.png") for i in range(7)]  # chunks 0,1 | 2,3 | 4,5 | 6
    for p in paths:
        (tmp_path / Path(p).name).write_bytes((tmp_path / "good.png").read_bytes())
    split = FolderSplit([(p, 0) for p in paths])
    verify_images(split, progress=False, workers=1, shard=(1, 2))
    assert opened == paths[2:4] + paths[6:]
    opened.clear()
    verify_images(split, progress=False, workers=1, shard=(0, 2))
    assert opened == paths[0:2] + paths[4:6]
    bad = FolderSplit([(p, 0) for p in paths[:5]] + [(str(tmp_path / "bad.png"), 0)])  # in chunk 2: rank 0's of 2
    verify_images(bad, progress=False, shard=(1, 2))
    with pytest.raises(DataError, match="bad.png") as e, on_every_rank():
        verify_images(bad, progress=False, shard=(0, 2))
    assert e.value.rank_own and not e.value.every_rank
    assert e.value.image_position == 2  # its chunk's number in the split: the ranks agree on the first (ptd.preflight)
    with pytest.raises(DataError) as e, on_every_rank():  # one process: a refusal like any other
        verify_images(bad, progress=False)
    assert e.value.every_rank and not e.value.rank_own


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_the_header_check_finds_a_cut_jpeg(tmp_path: Path, keep):
    """A JPEG cut after its header passed PIL's verify() (headers only) and failed mid-epoch in the
    loader; the default check now also looks for its end marker. A JPEG with bytes after the end
    marker (some writers pad) still passes."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    raw = (tmp_path / "a.jpg").read_bytes()
    split = FolderSplit([(str(tmp_path / "a.jpg"), 0)])
    (tmp_path / "a.jpg").write_bytes(raw + b"\x00" * 100)
    verify_images(split)
    (tmp_path / "a.jpg").write_bytes(raw[: int(len(raw) * keep) if keep > 0 else keep])
    with pytest.raises(DataError, match="stops short of its end marker"):
        verify_images(split)
    with pytest.raises(DataError, match="truncated"):
        verify_images(split, full=True)


def test_verify_images_shows_a_progress_bar_when_asked(tmp_path: Path, capsys, monkeypatch):
    import ptd.data.base as base
    from tqdm import tqdm as real_tqdm

    seen = []
    monkeypatch.setattr("tqdm.auto.tqdm", lambda *a, **k: seen.append(k) or real_tqdm(*a, **{**k, "disable": True}))
    png(tmp_path / "x.png", size=4)
    split = FolderSplit([(str(tmp_path / "x.png"), 0)] * 3)
    verify_images(split)
    verify_images(split, progress=True)
    monkeypatch.setattr(base, "VERIFY_PROGRESS_MIN", 2)
    verify_images(split)
    assert [k["disable"] for k in seen] == [True, False, False] and all(k["total"] == 3 for k in seen)


def test_tiny_imagenet_val_image_listed_twice_is_refused(tmp_path: Path):
    """Listed under two classes (or twice under one), the image was scored twice: accepted before."""
    t = write_tiny(tmp_path / "ti", val_lines=["val_0.png\tn01\t0\t0\t1\t1", "val_1.png\tn02\t0\t0\t1\t1",
                                               "val_0.png\tn02\t0\t0\t1\t1"])
    with pytest.raises(DataError) as ei:
        load_dataset("tiny_imagenet", str(t.parent), cache_dir=str(tmp_path / "cache"))
    assert str(ei.value).startswith(f"malformed line 3 in {t / 'val' / 'val_annotations.txt'}: 'val_0.png' is listed again "
                                    f"(first on line 1)")


@pytest.mark.parametrize("names", ["abcdefghij", [b"c0"] * 10, [b"c%d" % i for i in range(9)] + [3],
                                   [b"c%d" % i for i in range(9)] + ["c0"]],  # str 'c0' is class b'c0' again
                         ids=["a-string", "one-name", "an-int", "str-and-bytes-alike"])
def test_cifar_label_names_that_are_not_ten_distinct_names_are_refused(tmp_path: Path, names):
    """A 10-letter string passed as ten classes a..j: its length was all that was checked."""
    d = write_cifar10(tmp_path)
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(DataError, match="not a list of 10 distinct names"):
        load_dataset("cifar10", str(tmp_path))


def damage_png_data(path: Path) -> None:
    """Flip a byte inside a PNG's compressed data and recompute its chunk's CRC, as a faulty writer
    would: every checksum verify() reads still holds, and the pixels no longer decode."""
    data = bytearray(path.read_bytes())
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4 : i])[0]
    data[i + 4 + n // 2] ^= 0xFF
    data[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[i : i + 4 + n])))
    path.write_bytes(bytes(data))


def test_data_check_images_full_finds_what_headers_cannot(tmp_path: Path, capsys):
    """A PNG damaged inside its compressed data, checksums intact: the default header check cannot
    see it (it would stop an epoch), data.check_images: full decodes it and refuses the run before
    any work, in one line naming the file."""
    root = write_imagefolder(tmp_path / "if")
    bad = root / "train" / "b" / "1.png"
    damage_png_data(bad)
    with Image.open(bad) as im:
        im.verify()  # the damage is invisible to the checksums
    split = FolderSplit([(str(root / "train" / "a" / "0.png"), 0), (str(bad), 1)])
    verify_images(split, progress=False)
    with pytest.raises(DataError, match=f"cannot read image {re.escape(str(bad))} "):
        verify_images(split, progress=False, full=True)
    line = train(tmp_path, capsys, "imagefolder", root, "--set", "data.check_images=full")
    assert line.startswith(f"ptd: error: cannot read image {bad} (") and "replace the file, or remove it before a run starts" in line
    line = train(tmp_path, capsys, "imagefolder", root, "--set", "data.check_images=all")
    assert line.startswith("ptd: error: data.check_images: 'all' must be headers or full (from "), line
    with pytest.raises(DataError, match="check_images must be one of headers, full, got 'all'"):
        load_dataset("imagefolder", str(root), check_images="all")


@pytest.mark.parametrize("fmt", ["bmp", "ppm", "tiff", "gif", "webp", "png", "jpg"])
def test_an_image_cut_short_after_its_header_is_found_before_training(tmp_path: Path, fmt: str):
    """A copy interrupted two thirds of the way: found by verify_images in every format. BMP, PPM,
    TIFF and GIF passed PIL's verify() (it reads their headers only) and failed mid-epoch, after a
    teacher epoch was committed; they are decoded now."""
    from PIL import Image

    p = tmp_path / f"a.{fmt}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    verify_images(FolderSplit([(str(p), 0)]), progress=False)  # whole: read
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=f"cannot read image {re.escape(str(p))} \\(.*replace the file, or remove it before a run starts"):
        verify_images(FolderSplit([(str(p), 0)]), progress=False)


# ----------------------------------------------------------------------------- a layout that is nearly right
# Messages that said only "not found" for data that is there, in another layout or under another name:
# each now names what it found and the setting or rename that loads it, and the fix is checked to work.
def test_tiny_imagenet_val_sorted_into_class_folders_points_to_imagefolder(tmp_path: Path, capsys):
    """val/<wnid>/images/*.png and no val_annotations.txt (what common preprocessing scripts leave): the
    message said to re-extract the archive; the imagefolder loader reads this layout as it is."""
    t = write_tiny(tmp_path / "ti")
    val = t / "val"
    for line in (val / "val_annotations.txt").read_text().splitlines():
        f, w = line.split("\t")[:2]
        (val / w / "images").mkdir(parents=True)
        (val / "images" / f).rename(val / w / "images" / f)
    (val / "images").rmdir()
    (val / "val_annotations.txt").unlink()
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cache"))
    assert line.startswith(f"ptd: error: Tiny-ImageNet file not found: {val / 'val_annotations.txt'}; "), line
    assert "val/n01/, 2 of the 2 wnids" in line
    assert f"data.name=imagefolder, data.root={t} and data.image_size=64" in line, line
    raw = load_dataset("imagefolder", str(t), val_fraction=0)  # the advice holds: that layout loads
    assert raw.classes == ["n01", "n02"] and len(raw.train) == 6 and len(raw.test) == 2


def test_tiny_imagenet_unzipped_inside_its_own_folder_is_refused_at_the_cli(tmp_path: Path, capsys):
    """tiny-imagenet-200.zip unzipped again inside tiny-imagenet-200/ leaves two complete copies, and
    ptd trained on the inner one without a word; ptd train now stops in one line naming both (exit 2,
    nothing written), before any image is decoded into the cache."""
    outer = write_tiny(tmp_path / "d")
    inner = write_tiny(outer)
    line = train(tmp_path, capsys, "tiny_imagenet", outer, cache_dir=str(tmp_path / "cache"))
    assert line.startswith(f"ptd: error: Tiny-ImageNet: data.root {outer} holds two complete copies, {inner} and the "
                           f"files in {outer} itself, which may differ"), line
    assert not (tmp_path / "cache").exists()


def test_tiny_imagenet_without_wnids_names_the_place_that_exists(tmp_path: Path, capsys):
    """A dataset folder renamed (tiny/, not tiny-imagenet-200/) and missing wnids.txt: the message named
    tiny/tiny-imagenet-200/wnids.txt, a path the user never had."""
    renamed = tmp_path / "tiny"
    write_tiny(tmp_path / "d").rename(renamed)
    (renamed / "wnids.txt").unlink()
    line = train(tmp_path, capsys, "tiny_imagenet", renamed, cache_dir=str(tmp_path / "cache"))
    assert line.startswith(f"ptd: error: Tiny-ImageNet file not found: {renamed / 'wnids.txt'} "), line
    assert "tiny-imagenet-200/wnids.txt" not in line
    assert line.endswith(f"re-extract tiny-imagenet-200.zip, or write it from the class folders: "
                         f"ls {renamed / 'train'} > {renamed / 'wnids.txt'} (the labels are then numbered in sorted order, "
                         f"not the official file's: a model trained with that file reads them wrongly)"), line
    # neither candidate there: both are named
    (tmp_path / "empty").mkdir()
    line = train(tmp_path, capsys, "tiny_imagenet", tmp_path / "empty", cache_dir=str(tmp_path / "cache"))
    assert (f"no wnids.txt in {tmp_path / 'empty'} (data.root) nor in {tmp_path / 'empty' / 'tiny-imagenet-200'}; "
            in line), line
    # the suggested fix works: ls prints the class folders sorted, one a line
    (renamed / "wnids.txt").write_text("".join(f"{n}\n" for n in sorted(os.listdir(renamed / "train"))))
    raw = load_dataset("tiny_imagenet", str(renamed), val_fraction=0, cache_dir=str(tmp_path / "cache"))
    assert raw.classes == ["n01", "n02"]


@pytest.mark.parametrize("asked, inside", [("cifar100", False), ("cifar100", True), ("cifar10", False)],
                         ids=["cifar100-at-cifar10-parent", "cifar100-at-cifar10-folder", "cifar10-at-cifar100"])
def test_cifar_pointed_at_the_other_cifar_says_which_it_found(tmp_path: Path, capsys, asked: str, inside: bool):
    """A CIFAR-100 config pointed at CIFAR-10 files (or the reverse) said only "folder not found" and
    offered data.download=true, which needs internet access that most clusters do not have."""
    if asked == "cifar100":
        found = write_cifar10(tmp_path / "c")
    else:
        found = tmp_path / "c" / "cifar-100-python"
        found.mkdir(parents=True)
        (found / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}, protocol=2))
    root = found if inside else found.parent
    other, folder = ("cifar10", "cifar-100-python") if asked == "cifar100" else ("cifar100", "cifar-10-batches-py")
    cache = tmp_path / "cache"
    line = train(tmp_path, capsys, asked, root, cache_dir=str(cache))
    assert line.startswith(f"ptd: error: {'CIFAR-100' if asked == 'cifar100' else 'CIFAR-10'} folder not found: "
                           f"{root / folder}; found {'CIFAR-10' if other == 'cifar10' else 'CIFAR-100'} there ({found}): "
                           f"set data.name={other} to train on it, or set data.root to the folder holding {folder}/"), line
    assert line.endswith(f"or set data.download=true on a machine with internet access (it downloads into {cache})")
    # nothing else there: no data.name hint, the same honest download wording
    (tmp_path / "empty").mkdir()
    line = train(tmp_path, capsys, asked, tmp_path / "empty", cache_dir=str(cache))
    assert "found" not in line.split("not found", 1)[1] and "internet access" in line, line


@pytest.mark.parametrize("name", ["validation", "valid", "test", "Val"])
def test_imagefolder_val_under_another_name_is_named(tmp_path: Path, capsys, monkeypatch, name: str):
    """validation/ (valid/, test/, Val/) instead of val/: "image folder not found: .../val" named nothing
    found, and was said only after train/ was scanned (minutes, for a full ImageNet)."""
    import ptd.data.imagefolder as imagefolder

    root = write_imagefolder(tmp_path / "if")
    (root / "val").rename(root / name)
    real = imagefolder.scan_split
    monkeypatch.setattr(imagefolder, "scan_split", lambda *a: pytest.fail("a split was scanned before the check"))
    line = train(tmp_path, capsys, "imagefolder", root)
    assert line == (f"ptd: error: image folder not found: {root / 'val'}; found {root / name}/ beside it, but the "
                    f"imagefolder loader reads only train/ and val/: rename it to val/ (mv {root / name} {root / 'val'}) "
                    f"or link it (ln -s {name} {root / 'val'})"), line
    (root / "test2").mkdir()  # not a known name: ignored
    if name != "test":  # two candidates: both named, no guess which
        (root / "test").mkdir()
        line = train(tmp_path, capsys, "imagefolder", root)
        assert f"found {', '.join(sorted([name + '/', 'test/']))} in {root}, but " in line, line
        (root / "test").rmdir()
    monkeypatch.setattr(imagefolder, "scan_split", real)
    (root / "val").symlink_to(name)  # the suggested fix works
    assert load_dataset("imagefolder", str(root), val_fraction=0).classes == ["a", "b"]


# ----------------------------------------------------------------------------- files that expand past their size
@contextmanager
def address_space_headroom(extra: int):
    """The process may map only ``extra`` more bytes (RLIMIT_AS) while inside: a reader that allocates
    what a hostile file asks for fails with MemoryError here instead of swapping the machine."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc/self/status are Linux's")
    import resource

    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < vm + extra:
        pytest.skip("the hard address-space limit leaves no headroom")
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


HEADROOM = 256 << 20  # 256 MiB: the refusals need a few KB; the bombs below ask for 1 GiB and more


def bomb_root(tmp_path_factory) -> Path:
    """Fashion-MNIST-like data outside tmp_path, since ``refused`` snapshots tmp_path (reads every file)."""
    return write_fashion_like(tmp_path_factory.mktemp("bomb") / "fm", 60, 20)


def test_a_gzip_idx_that_inflates_past_its_header_stops_at_the_header_size(tmp_path: Path, tmp_path_factory, capsys):
    """A gzip idx whose valid 60x28x28 header is followed by 1 GiB of zeros (1 MB on disk, 64 gzip
    members) was inflated whole before the size check: 31 s for 3.2 GB, or "out of memory; lower the
    batch sizes" naming no file. At most the header's 47,040 bytes plus one are read now."""
    root = bomb_root(tmp_path_factory)
    bad = root / "train-images-idx3-ubyte.gz"
    member = gzip.compress(bytes(1 << 24))  # 16 MiB of zeros in ~16 KB
    bad.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 60, 28, 28)) + member * 64)
    with address_space_headroom(HEADROOM), pytest.raises(DataError) as ei:
        load_dataset("fashion_mnist", str(root))
    want = f"malformed idx file {bad}: payload runs past the 47040 bytes its dims (60, 28, 28) need"
    assert str(ei.value).startswith(want), ei.value
    assert want in train(tmp_path, capsys, "fashion_mnist", root)


def test_a_gzip_idx_header_bigger_than_the_file_can_inflate_to_is_refused_unread(tmp_path: Path, tmp_path_factory,
                                                                                  capsys):
    """Deflate expands at most 1032:1, so a header of 2**32-1 images in a small .gz cannot be honest."""
    root = bomb_root(tmp_path_factory)
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2**32 - 1, 28, 28) + bytes(1 << 20)))
    line = train(tmp_path, capsys, "fashion_mnist", root)
    assert (f"malformed idx file {bad}: dims (4294967295, 28, 28) need 3367254359280 bytes, more than a gzip file of "
            f"{bad.stat().st_size} bytes can inflate to; re-download") in line, line


def test_a_raw_idx_longer_than_its_header_is_refused_before_reading_it(tmp_path: Path, tmp_path_factory, capsys):
    """A plain idx with a valid header and 4 GiB after it (sparse: nothing on disk) was read whole."""
    root = bomb_root(tmp_path_factory)
    (root / "train-images-idx3-ubyte.gz").unlink()
    bad = root / "train-images-idx3-ubyte"
    with open(bad, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 60, 28, 28))
        f.truncate(4 << 30)
    with address_space_headroom(HEADROOM), pytest.raises(DataError) as ei:
        load_dataset("fashion_mnist", str(root))
    want = f"malformed idx file {bad}: payload is {(4 << 30) - 16} bytes, dims (60, 28, 28) need 47040; re-download"
    assert str(ei.value).startswith(want), ei.value
    assert want in train(tmp_path, capsys, "fashion_mnist", root)


ROW = list(range(256)) * 12  # one image's 3072 pixel values


@pytest.mark.parametrize("key, value, words", [
    ("data", [[ROW] * 1000] * 1000, "'data' holds more than 36864 values, expected 12 rows of 3072 pixel values"),
    ("data", [ROW] * 100_000, "'data' holds more than 36864 values, expected 12 rows of 3072 pixel values"),
    ("labels", [[ROW] * 1000] * 12, "'labels' holds more than 12 values, expected 12 labels"),
], ids=["data-rows-of-rows", "data-many-rows", "labels-of-rows"])
def test_a_cifar_batch_of_aliased_lists_is_measured_before_it_is_built(tmp_path: Path, capsys, key: str, value, words):
    """Pickle stores a list once and refers back to it, so 21 KB of file can hold [[row] * 1000] * 1000:
    np.asarray built its 3e9 values (23 GiB as int64) for 27 s and ended in "out of memory; lower the
    batch sizes", naming no file. The lengths are counted now, each alias as often as it appears."""
    d = write_cifar10(tmp_path / "cifar", **{key: value})
    bad = d / "data_batch_1"
    assert bad.stat().st_size < 2 << 20
    with address_space_headroom(HEADROOM), pytest.raises(DataError) as ei:
        load_dataset("cifar10", str(tmp_path / "cifar"))
    assert str(ei.value).startswith(f"malformed CIFAR batch {bad}: {words}"), ei.value
    assert f"malformed CIFAR batch {bad}: {words}" in train(tmp_path, capsys, "cifar10", tmp_path / "cifar")


def test_cifar_labels_past_the_largest_cifar_file_are_refused_by_their_count(tmp_path: Path, capsys):
    """The labels' count bounds what 'data' may hold, so it is bounded too: 50,000 (CIFAR-100's train)."""
    d = write_cifar10(tmp_path / "cifar", labels=[0] * 50_001)
    assert (f"malformed CIFAR batch {d / 'data_batch_1'}: 'labels' holds 50001 labels, more than the 50000 images of "
            f"the largest CIFAR file") in train(tmp_path, capsys, "cifar10", tmp_path / "cifar")


def test_cifar_lists_with_repeated_rows_within_the_size_still_load(tmp_path: Path):
    """Aliases are counted, not refused: 12 copies of one row as lists of ints load as 12 images."""
    write_cifar10(tmp_path, data=[ROW] * 12, labels=tuple(range(10)) + (0, 1))
    s = load_dataset("cifar10", str(tmp_path), val_fraction=0.0)
    assert torch.equal(s.train.x[:12].reshape(12, -1), torch.tensor([ROW] * 12, dtype=torch.uint8))
    assert s.train.y[:12].tolist() == list(range(10)) + [0, 1]


class _Calls:
    """Pickles as a call of ``fn(*args)``: how a hostile file asks numpy to allocate for it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("call, words", [
    ((np.ndarray, (10**8,), np.dtype(object)), "numpy.ndarray"),  # 800 MB of None pointers, filled
    ((np.ndarray, (10**10,), np.dtype(np.uint8)), "numpy.ndarray"),
    (("_reconstruct", np.ndarray, (10**10,), b"b"), "_reconstruct of shape (10000000000,)"),
    # numpy scalars too: without its bytes, scalar(dtype) zero-fills the dtype's itemsize (2 GB here)
    (("scalar", np.dtype("V2000000000")), "numpy scalar without exactly its itemsize"),
], ids=["ndarray-object", "ndarray-uint8", "reconstruct-uint8", "scalar-void"])
def test_safe_pickle_refuses_arrays_larger_than_the_file(tmp_path: Path, capsys, protocol: int, call, words: str):
    """numpy's pickles rebuild an array as _reconstruct(ndarray, (0,), ...) then fill it from the file's
    own bytes; called with another shape (or ndarray called itself), 60 bytes allocated 10 GB."""
    _reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core or numpy._core's, as this numpy spells it
    fn, *args = call
    scalar = np.float32(1).__reduce__()[0]  # multiarray.scalar, likewise
    payload = _Calls(_reconstruct if fn == "_reconstruct" else scalar if fn == "scalar" else fn, *args)
    blob = pickle.dumps({b"data": payload, b"labels": [0] * 12}, protocol=protocol)
    assert len(blob) < 300
    with address_space_headroom(HEADROOM), pytest.raises(UnsafePickleError, match=re.escape(words)):
        safe_load(blob)
    d = write_cifar10(tmp_path / "cifar")
    (d / "test_batch").write_bytes(blob)
    line = train(tmp_path, capsys, "cifar10", tmp_path / "cifar")
    assert f"refused CIFAR file {d / 'test_batch'}: " in line and words in line, line


def test_a_16_bit_image_is_scaled_not_clipped_and_a_32_bit_one_is_refused_up_front(tmp_path: Path):
    """convert("RGB") clips a 16-bit grayscale PNG (PIL mode I;16) to 255: 96.6% of one image's
    pixels came out white and the run went on (real-data audit). It is scaled to its top 8 bits, in
    the loader and in the full check alike; 32-bit integer or float pixels have no range to scale
    from and are refused by the header check, before training, naming the file."""
    from PIL import Image

    from ptd.data.base import to_rgb

    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == (a >> 8)).all() and (rgb == 255).mean() < 0.01
    verify_images(FolderSplit([(str(tmp_path / "g16.png"), 0)]), full=True)
    from ptd.data import make_loader  # what training reads: the same scaled pixels

    x, _ = next(iter(make_loader(FolderSplit([(str(tmp_path / "g16.png"), 0)], image_size=64), batch_size=1, train=False,
                                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), augment=False, image_size=64, workers=0)))
    # resized and centre-cropped as evaluation reads folders: the mean stays that of the scaled
    # image (127.5 of 255), where the clipped one read 254.5
    assert abs(float(x.mean()) * 255 - float((a >> 8).mean())) < 5, float(x.mean()) * 255
    Image.fromarray(a.astype(np.int32) * 1000, "I").save(tmp_path / "i32.tif")
    with pytest.raises(DataError, match=r"cannot read image .*i32\.tif.*32-bit integer pixels \(PIL mode I\) have no fixed "
                                        r"range"):
        verify_images(FolderSplit([(str(tmp_path / "i32.tif"), 0)]))


def png16(path: Path, a: np.ndarray) -> None:
    """A 16-bit PNG of ``a`` (uint16, [H, W] grey or [H, W, 3] RGB), written by hand: PIL writes no
    48-bit RGB."""
    h, w = a.shape[:2]
    rows = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))  # filter byte 0 (none) per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_12_bit_data_in_a_16_bit_png_reads_dark_on_the_16_bit_scale_and_the_run_log_says_so(tmp_path: Path):
    """Pins what ptd does with 12-bit data stored unscaled in 16-bit PNGs (values 0..4095): it reads
    them on the format's 16-bit range, the top 8 bits, as torchvision's to_dtype(scale=True) does and
    as PIL itself reads a 48-bit RGB PNG, so grey and RGB agree: brightest 15 of 255, mean 7.5 for a
    0..4095 ramp (docs/data.md). Stretching per image would make brightness differ image to image.
    What changed is that the run's log notes it (depth_note), where it read dark without a word."""
    from types import SimpleNamespace

    from ptd.data import make_loader
    from ptd.data.base import depth_note, to_rgb

    ramp = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    png16(tmp_path / "g.png", ramp)
    png16(tmp_path / "rgb.png", np.stack([ramp] * 3, -1))
    for name, mode in (("g.png", "I;16"), ("rgb.png", "RGB")):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode
            rgb = np.asarray(to_rgb(im))
        assert (rgb == (ramp >> 8)[..., None]).all() and rgb.max() == 15 and rgb.mean() == 7.5, name
        x, _ = next(iter(make_loader(FolderSplit([(str(tmp_path / name), 0)], image_size=64), batch_size=1, train=False,
                                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), augment=False, image_size=64, workers=0)))
        assert abs(float(x.max()) * 255 - 15) < 0.5 and abs(float(x.mean()) * 255 - 7.5) < 0.5, name
    note = depth_note(SimpleNamespace(train=FolderSplit([(str(tmp_path / "g.png"), 0), (str(tmp_path / "rgb.png"), 0)])))
    assert note is not None and note.startswith("note: the first 2 16-bit training images keep every value below 4,096")
    assert "brightest pixel reads 15 of 255: dark, with 16 levels" in note and "(x16, or x64)" in note, note
    # no note for 16-bit data that reaches 4,096, nor for 8-bit images
    png16(tmp_path / "full.png", ramp * 16)
    assert depth_note(SimpleNamespace(train=FolderSplit([(str(tmp_path / "g.png"), 0), (str(tmp_path / "full.png"), 0)]))) is None
    png(tmp_path / "8.png")
    assert depth_note(SimpleNamespace(train=FolderSplit([(str(tmp_path / "8.png"), 0)]))) is None


def test_data_root_at_a_split_folder_says_to_use_its_parent(tmp_path: Path, capsys):
    """data.root pointing at train/ itself read ".../train/train not found" (real-data audit)."""
    root = write_imagefolder(tmp_path / "if")
    line = train(tmp_path, capsys, "imagefolder", root / "train")
    assert line.endswith(f"data.root is {root / 'train'}, a split folder itself: set data.root to its parent, {root}, which "
                         f"holds train/ and val/"), line


def test_small_folder_images_scaled_up_to_the_default_224_are_noted(tmp_path: Path):
    """48-pixel images were read at the folder default of 224 without a word: 22x the compute of
    their own size for no detail (real-data audit). The run's log says so, with the key to set."""
    from ptd.config import load_config
    from ptd.data import load_configured
    from ptd.data.base import upscale_note

    root = write_imagefolder(tmp_path / "if")  # 24-pixel PNGs
    cfg = load_config(config(tmp_path, "imagefolder", root))
    sp = load_configured(cfg.data, 0)
    assert upscale_note(sp, None) == ("note: the training images are about 24 pixels on their shorter side and are scaled up "
                                      "to 224 (data.image_size, 224 by default for folders): about 87x the compute of their own "
                                      "size; set data.image_size=24 to train at it")
    assert upscale_note(sp, 32) is None and upscale_note(sp, 48) is not None  # under half the frame only


def test_a_tiny_imagenet_test_image_no_annotation_lists_is_refused(tmp_path: Path, capsys):
    """An image in val/images that val_annotations.txt does not list was left out of the test set
    without a word (real-data audit)."""
    t = write_tiny(tmp_path / "ti", val_lines=["val_0.png\tn01\t0\t0\t10\t10"])  # val_1.png unlisted
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cache"))
    assert (f"Tiny-ImageNet test image {t / 'val' / 'images' / 'val_1.png'} has no line in "
            f"{t / 'val' / 'val_annotations.txt'}: it would be left out of the test set; add its line, or ") in line, line


# ----------------------------------------------------------------------------- what is at data.root (bad-input audit F9)
@pytest.mark.parametrize("fmt, fix", [
    ("fashion_mnist", "set data.root to a folder holding the four idx files"),
    ("mnist", "set data.root to a folder holding the four idx files"),
    ("cifar10", "set data.root to the folder holding cifar-10-batches-py/"),
    ("cifar100", "set data.root to the folder holding cifar-100-python/"),
    ("tiny_imagenet", "set data.root to the folder holding tiny-imagenet-200/"),
    ("imagefolder", "set data.root to a folder holding train/<class>/*.jpg and val/<class>/*.jpg")])
def test_data_root_that_is_a_file_is_named_as_such(tmp_path: Path, capsys, fmt: str, fix: str):
    """Fashion-MNIST read "file not found: <root>/train-images-idx3-ubyte(.gz)", CIFAR "folder not found:
    <root>/cifar-10-batches-py", for a data.root that is there but is a file."""
    f = tmp_path / "afile"
    f.write_text("not a folder\n")
    line = train(tmp_path, capsys, fmt, f, cache_dir=str(tmp_path / "cache"))
    assert line == f"ptd: error: data.root {f} is a file, not a folder; {fix}"


def test_data_root_at_a_data_file_says_to_use_its_folder(tmp_path: Path, capsys):
    fm = write_fashion_like(tmp_path / "fm", 60, 20)
    gz = fm / "train-images-idx3-ubyte.gz"
    assert train(tmp_path, capsys, "fashion_mnist", gz) == (
        f"ptd: error: data.root {gz} is a file, not a folder; set data.root to the folder holding it, {fm}")
    batch = write_cifar10(tmp_path / "c") / "data_batch_1"
    assert train(tmp_path, capsys, "cifar10", batch) == (
        f"ptd: error: data.root {batch} is a file, not a folder; set data.root to the folder holding it, {batch.parent}")


@pytest.mark.parametrize("fmt, where, fix", [
    ("fashion_mnist", "train-labels-idx1-ubyte.gz",
     "set data.root to a folder holding the idx files, or re-download or re-install the dataset files"),
    ("cifar10", "cifar-10-batches-py/data_batch_2", "re-extract the dataset archive into data.root"),
    ("tiny_imagenet", "tiny-imagenet-200/val/val_annotations.txt",
     "re-extract tiny-imagenet-200.zip, or set data.root to the folder holding tiny-imagenet-200/"),
    ("imagefolder", "", "set data.root to a folder holding train/<class>/*.jpg and val/<class>/*.jpg")])
def test_a_dangling_link_to_a_data_file_or_folder_names_the_link(tmp_path: Path, capsys, fmt: str, where: str, fix: str):
    """Read as "file not found" (or "folder not found") for a link the user can see is there."""
    root = tmp_path / "data"
    {"fashion_mnist": lambda: write_fashion_like(root, 60, 20), "cifar10": lambda: write_cifar10(root),
     "tiny_imagenet": lambda: write_tiny(root), "imagefolder": lambda: None}[fmt]()
    link = root / where if where else root
    if where:
        link.unlink()
    link.symlink_to("/nonexistent/x")
    line = train(tmp_path, capsys, fmt, root, cache_dir=str(tmp_path / "cache"))
    assert line == (f"ptd: error: {link} is a symbolic link to '/nonexistent/x', which leads to no file or folder; "
                    f"fix the link, or {fix}")


# ----------------------------------------------------------------------------- fractions that round to nothing (F3)
def test_a_val_fraction_that_carves_no_image_is_refused(tmp_path: Path, capsys):
    """0.001 of 60 images rounds to 0: validation was off without a word, and every model kept its
    last epoch instead of its best-validation one."""
    root = write_fashion_like(tmp_path / "fm", 60, 20)
    line = train(tmp_path, capsys, "fashion_mnist", root, val_fraction=0.001)
    assert line == ("ptd: error: fashion_mnist: val_fraction=0.001 carves 0 of the 60 training images for validation, so "
                    "every model would keep its last epoch, not its best-validation one; set data.val_fraction to at "
                    "least 0.0084 (1 image), a usual 0.1, or 0 for no validation")
    assert len(load_dataset("fashion_mnist", str(root), val_fraction=0.0084).val) == 1  # the advice holds
    assert len(load_dataset("fashion_mnist", str(root), val_fraction=0).val) == 0  # asking for none is fine


@pytest.mark.parametrize("n", [2, 3, 7, 600, 54_000, 1_281_167])
def test_the_smallest_val_fraction_named_carves_one_image(n: int):
    from ptd.data.base import _one_image_fraction

    f = float(_one_image_fraction(n))
    assert round(f * n) == 1 and f < 1.1 * 0.5 / n + 0.01  # 1 image, and not far above the least that gives one


# ----------------------------------------------------------------------------- an idx file twice (F4)
def test_an_idx_file_both_plain_and_gz_must_hold_the_same_data(tmp_path: Path, capsys):
    """A stale all-zero plain file beside the real .gz was read without a word, and trained to chance."""
    root = write_fashion_like(tmp_path / "fm", 60, 20)
    gz = root / "train-images-idx3-ubyte.gz"
    plain = root / "train-images-idx3-ubyte"
    inflated = gzip.decompress(gz.read_bytes())
    good = load_dataset("fashion_mnist", str(root), val_fraction=0).train.x
    for same in (inflated, gz.read_bytes()):  # gunzip -k, or a copy of the archive (read by content)
        plain.write_bytes(same)
        assert torch.equal(load_dataset("fashion_mnist", str(root), val_fraction=0).train.x, good)
    plain.write_bytes(bytes(len(inflated)))
    line = train(tmp_path, capsys, "fashion_mnist", root)
    assert line == (f"ptd: error: {plain} and {gz} are both there, and the plain one is not what the .gz inflates to, so "
                    f"which to read is a guess; remove the stale one (Debian's package ships only the .gz files), or "
                    f"remake the plain one with gunzip -kf {gz}")
    plain.write_bytes(inflated[:-1])  # a copy cut short by a byte
    assert train(tmp_path, capsys, "fashion_mnist", root) == line


# ----------------------------------------------------------------------------- blank images (F5)
def test_blank_training_images_are_refused(tmp_path: Path, capsys):
    """All-zero training images were normalized by a std clamped to 1e-6 and trained to chance without a word."""
    root = write_fashion_like(tmp_path / "fm", 60, 20)
    write_idx_file(root / "train-images-idx3-ubyte", np.full((60, 28, 28), 0, np.uint8))
    line = train(tmp_path, capsys, "fashion_mnist", root)
    assert line == (f"ptd: error: fashion_mnist: every pixel of the 48 training images ({root / 'train-images-idx3-ubyte.gz'}, "
                    f"{root / 'train-labels-idx1-ubyte.gz'}) is 0: the images are blank, with nothing to learn from and no "
                    f"spread to normalize by; check the files: re-download or re-install the dataset files, or set "
                    f"data.root to the right folder")


def test_a_blank_colour_channel_is_refused_and_a_nearly_blank_one_is_not(tmp_path: Path):
    d = write_cifar10(tmp_path / "c")
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = pickle.loads((d / name).read_bytes())
        batch[b"data"][:, 2048:] = 7  # the blue plane
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", str(tmp_path / "c"), val_fraction=0)
    assert str(ei.value) == (f"cifar10: channel 2 (blue) of the 60 training images ({d}/data_batch_1+data_batch_2+"
                             f"data_batch_3+data_batch_4+data_batch_5) is 7 in every pixel: that channel is blank, with "
                             f"nothing to learn from and no spread to normalize by; check the files: re-extract the "
                             f"dataset archive into data.root")
    batch[b"data"][0, 3000] = 8  # one pixel of the last batch off: a spread, however small, is the data's own
    (d / "data_batch_5").write_bytes(pickle.dumps(batch, protocol=2))
    assert load_dataset("cifar10", str(tmp_path / "c"), val_fraction=0).std[2] > 0


# ----------------------------------------------------------------------------- new-user trial (real formats)
def test_a_class_folder_whose_name_is_not_utf8_trains_and_is_reused(tmp_path: Path, capsys):
    """A class folder named in Latin-1 (b'caf\\xe9', as an old Windows zip extracts) reached Python as a
    surrogate escape, and the data fingerprint's str.encode() raised: `ptd: internal error`, exit 1,
    after the images were checked (new-user trial). Its bytes are hashed now; a second session reuses."""
    root = write_imagefolder(tmp_path / "data")
    for split in ("train", "val"):
        os.rename(os.fsencode(root / split / "a"), os.fsencode(root / split) + b"/caf\xe9")
    argv = ["train", config(tmp_path, "imagefolder", root), *FOLDER_FLAGS, "--out", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(argv) == 0
    assert "[reused] teacher" in capsys.readouterr().out


def test_tiny_imagenet_under_a_folder_whose_name_is_not_utf8_loads_through_the_decode_cache(tmp_path: Path):
    """The decode cache's key hashed each path with str.encode(), which raised on a Latin-1 folder
    name (b'd\\xe9'): `ptd: internal error`, exit 1 (new-user trial)."""
    t = write_tiny(tmp_path / "ti")
    latin = Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xe9"))
    t.parent.rename(latin)
    s = load_dataset("tiny_imagenet", str(latin), cache_dir=str(tmp_path / "cache"))
    assert len(s.test) == 2 and len(list((tmp_path / "cache").glob("tiny_imagenet_*.npy"))) == 2


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)


@pytest.mark.parametrize("fmt, where", [("imagefolder", "train/a/._0.png"),
                                        ("tiny_imagenet", "tiny-imagenet-200/train/n01/images/._n01_0.png"),
                                        ("tiny_imagenet", "tiny-imagenet-200/val/images/._val_0.png")])
def test_macos_metadata_beside_the_images_is_named_as_such_with_the_command_that_removes_it(tmp_path: Path, capsys,
                                                                                           fmt: str, where: str):
    """A Mac copying images to a FAT disk or zip writes ._NAME beside each; it was refused as a damaged
    image to replace ("cannot identify image file"), or for val/ as a test image with no annotation line
    (new-user trial). A ._ name that is a real image still loads."""
    root = write_imagefolder(tmp_path / "data") if fmt == "imagefolder" else write_tiny(tmp_path / "data").parent
    bad = root / where
    png(bad, seed=7)  # an image that happens to have such a name: no metadata, so it loads
    if fmt == "imagefolder":
        assert str(bad) in {p for p, _ in load_dataset(fmt, str(root), cache_dir=str(tmp_path / "cache")).train.samples}
    bad.write_bytes(APPLE_DOUBLE)
    line = train(tmp_path, capsys, fmt, root, cache_dir=str(tmp_path / "cache"))
    top = root if fmt == "imagefolder" else root / "tiny-imagenet-200"
    assert line == (f"ptd: error: {bad} is macOS metadata (an AppleDouble file: a Mac writes ._NAME beside each file it "
                    f"copies to a disk or archive that cannot hold its attributes), not an image; delete every such "
                    f"file: find {top} -name '._*' -type f -delete")


def test_imagefolder_class_folders_spelled_in_two_unicode_forms_are_shown_apart(tmp_path: Path, capsys):
    """train/ written on a Mac (NFD) and val/ elsewhere (NFC): the line read "missing ['café'], extra
    ['café']", the same name twice to the eye (new-user trial)."""
    root = write_imagefolder(tmp_path / "data", classes=("cafe\u0301", "b"))
    (root / "val" / "cafe\u0301").rename(root / "val" / "caf\u00e9")
    line = train(tmp_path, capsys, "imagefolder", root)
    assert line == (f"ptd: error: class folder 'caf\u00e9' is spelled in two Unicode forms: train/ has 'cafe\\u0301' "
                    f"(decomposed, NFD, as macOS writes), {root / 'val'} has 'caf\\xe9' (composed, NFC); rename one "
                    f"split's folders to the other's form (convmv -r -f utf8 -t utf8 --nfc --notest {root})")


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagefolder_class_folder_that_is_a_dangling_link_is_refused_not_dropped(tmp_path: Path, capsys, split: str):
    """Path.is_dir() says False for a link to nothing, and the class left the split without a word:
    `ptd train` trained on the other classes (new-user trial)."""
    root = write_imagefolder(tmp_path / "data", classes=("a", "b", "c"))
    shutil.rmtree(root / split / "c")
    (root / split / "c").symlink_to(tmp_path / "unmounted" / "c")
    line = train(tmp_path, capsys, "imagefolder", root)
    assert line == (f"ptd: error: {root / split / 'c'} is a symbolic link to {str(tmp_path / 'unmounted' / 'c')!r}, "
                    f"which leads to no folder: its class would be left out; fix the link, or remove it")


def test_tiny_imagenet_train_class_folder_missing_from_wnids_is_refused_not_dropped(tmp_path: Path, capsys):
    t = write_tiny(tmp_path / "ti", wnids=("n01", "n02", "n03"))
    (t / "wnids.txt").write_text("n01\nn02\n")
    (t / "val" / "val_annotations.txt").write_text("val_0.png\tn01\nval_1.png\tn02\n")
    (t / "val" / "images" / "val_2.png").unlink()
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cache"))
    assert line == (f"ptd: error: Tiny-ImageNet class folder {t / 'train' / 'n03'} is not listed in {t / 'wnids.txt'}: "
                    f"its images would be left out of training; add its wnid to wnids.txt (and its val images to "
                    f"val_annotations.txt), or move the folder out of train/")


def test_tiny_imagenet_val_annotation_naming_an_unlisted_class_says_so(tmp_path: Path, capsys):
    """It read "malformed line 2 ... (need file<TAB>wnid from wnids.txt)", for a line whose tabs were right."""
    t = write_tiny(tmp_path / "ti", val_lines=["val_0.png\tn01\t0\t0\t1\t1", "val_1.png\tn09\t0\t0\t1\t1"])
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path / "cache"))
    assert line == (f"ptd: error: line 2 of {t / 'val' / 'val_annotations.txt'} gives 'val_1.png' the class 'n09', which "
                    f"{t / 'wnids.txt'} does not list (2 classes); add the class to wnids.txt (with its "
                    f"train/n09/images/), or remove the line and its image, or re-extract tiny-imagenet-200.zip")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_cifar_archive_left_unextracted_in_data_root_is_named_with_its_tar_command(tmp_path: Path, capsys, name: str):
    """The downloaded archive beside no extracted folder read only "CIFAR-10 folder not found: ...; set data.root to
    the folder holding cifar-10-batches-py/" (new-user trial)."""
    import tarfile

    src = write_cifar10(tmp_path / "src")
    root = tmp_path / "data"
    root.mkdir()
    tgz = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
    with tarfile.open(tgz, "w:gz") as t:
        t.add(src, arcname=src.name)
    line = train(tmp_path, capsys, name, root)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    assert line.endswith(f"folder not found: {folder}; found the archive {tgz} there, not extracted: tar xzf {tgz} -C {root}")


def test_a_damaged_tiny_imagenet_test_image_says_its_annotation_line_goes_with_it(tmp_path: Path, tmp_path_factory,
                                                                                   capsys):
    """The line said "or remove a training image" for a val/ image too (new-user trial)."""
    t = write_tiny(tmp_path / "ti")
    bad = t / "val" / "images" / "val_1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    line = train(tmp_path, capsys, "tiny_imagenet", t.parent, cache_dir=str(tmp_path_factory.mktemp("cache")))
    assert line.startswith(f"ptd: error: cannot decode image {bad}: ")
    assert line.endswith("or remove it before a run starts on this data (and its line in val/val_annotations.txt)")


def test_imagefolder_thumbnails_in_hidden_or_nas_index_folders_are_not_images_of_the_class(tmp_path: Path):
    """A file manager's .thumbnails/ and a Synology's @eaDir/ inside a class folder hold JPEG/PNG
    thumbnails of its images; they trained as more images of the class (new-user trial). A plain
    sub-folder's images still count (any depth, as torchvision's ImageFolder)."""
    root = write_imagefolder(tmp_path / "data", classes=("a", "b"), per=4)
    for sub in (".thumbnails/normal", "@eaDir/0.png"):
        (root / "train" / "a" / sub).mkdir(parents=True)
        png(root / "train" / "a" / sub / "SYNOFILE_THUMB_M.png", seed=7, size=24)
    (root / "train" / "b" / "more").mkdir()
    png(root / "train" / "b" / "more" / "9.png", seed=9, size=24)
    from ptd.data.imagefolder import load_imagefolder

    raw = load_imagefolder(str(root))  # (load_dataset would carve a validation split out of train)
    files = [os.path.relpath(p, root) for p, _ in raw.train.samples]
    assert files == [f"train/a/{i}.png" for i in range(4)] + [f"train/b/{i}.png" for i in range(4)] + ["train/b/more/9.png"]


def test_a_damaged_tiny_imagenet_test_image_is_refused_before_the_training_split_decodes(tmp_path: Path, monkeypatch):
    """The 100,000 training images decoded first (about a minute on the real set) before a damaged
    test image was refused (new-user trial); the 10,000 test images go first now."""
    import ptd.data.tiny_imagenet as ti

    t = write_tiny(tmp_path / "ti")
    bad = t / "val" / "images" / "val_1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    decoded: list[str] = []
    real = ti._decode
    monkeypatch.setattr(ti, "_decode", lambda p: (decoded.append(p), real(p))[1])
    with pytest.raises(DataError, match="cannot decode image"):
        ti.load_tiny_imagenet(str(t.parent), cache_dir=str(tmp_path / "cache"))
    assert decoded and not any(f"{os.sep}train{os.sep}" in p for p in decoded), decoded
