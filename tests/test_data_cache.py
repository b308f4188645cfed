"""Tiny-ImageNet's decode cache: decoded once, read back equal, invalidated when a file changes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ptd.data import load_dataset
from ptd.data import tiny_imagenet as ti
from test_data import write_tiny


def test_tiny_imagenet_decodes_once_then_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_tiny(tmp_path)
    cache = tmp_path / "cache"
    first = load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0, cache_dir=str(cache))
    assert len(list(cache.glob("tiny_imagenet_*.npy"))) == 2  # train and test arrays

    calls = []
    real = ti.decode_all
    monkeypatch.setattr(ti, "decode_all", lambda paths, workers=None: calls.append(len(paths)) or real(paths, workers))
    again = load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0, cache_dir=str(cache))
    assert calls == []  # nothing decoded
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.test.x, again.test.x)
    assert torch.equal(first.train.y, again.train.y)

    # A changed file (new mtime) invalidates that split's cache only: the 13 train images are decoded again.
    img = next((tmp_path / "tiny-imagenet-200" / "train" / "n002" / "images").iterdir())
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0, cache_dir=str(cache))
    assert calls == [13]


def test_tiny_imagenet_torn_cache_file_is_decoded_again(tmp_path: Path):
    write_tiny(tmp_path)
    cache = tmp_path / "cache"
    first = load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0, cache_dir=str(cache))
    for f in cache.glob("tiny_imagenet_*.npy"):
        f.write_bytes(f.read_bytes()[:100])  # a crash mid-write elsewhere, or a truncated copy
    again = load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0, cache_dir=str(cache))
    assert torch.equal(first.train.x, again.train.x)


def test_a_killed_cache_writers_temporary_is_removed_by_the_next_write(tmp_path: Path):
    """A kill mid-write of the decode cache left ``tiny_imagenet_<key>.<pid>.tmp`` (up to 1.2 GB for
    the train split) that no later load removed (crash audit). The next cache write removes the
    temporaries of dead writers of this machine; a live writer's and another machine's stay."""
    import subprocess
    import sys

    from ptd.io import dead_writer, writer_tag

    write_tiny(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    here = writer_tag().rpartition("-")[0]  # <host>-<pid namespace>
    host, space = here.split("-")
    killed = cache / f"tiny_imagenet_0123abcd.{here}-{dead}.tmp"
    old = cache / f"tiny_imagenet_4567abcd.{dead}.tmp"  # named by ptd before the host was in the name
    live = cache / f"tiny_imagenet_89abcdef.{writer_tag()}.tmp"
    elsewhere = cache / f"tiny_imagenet_fedcba98.other_host-{space}-{dead}.tmp"
    # A container with this host name but its own PIDs: its pid may be free here while it writes (review).
    container = cache / f"tiny_imagenet_76543210.{host}-1{space}-{dead}.tmp"
    for f in (killed, old, live, elsewhere, container):
        f.write_bytes(b"\x93NUMPY torn")
    assert dead_writer(f"{here}-{dead}") and not dead_writer(writer_tag())
    assert not dead_writer(f"other_host-{space}-{dead}") and not dead_writer(f"{host}-1{space}-{dead}")
    load_dataset("tiny_imagenet", str(tmp_path), val_fraction=0.0, cache_dir=str(cache))
    left = sorted(p.name for p in cache.iterdir())
    assert len([n for n in left if n.endswith(".npy")]) == 2
    assert [n for n in left if n.endswith(".tmp")] == sorted([live.name, elsewhere.name, container.name]), left
