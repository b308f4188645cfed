"""Shared fixtures: small datasets written in the real on-disk formats."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml


def pytest_configure(config):
    # Under pytest-xdist (the CI command runs `-n auto`) every worker is a process of its own: each
    # takes its share of the cores, since N workers on all threads each oversubscribe them and
    # OpenMP threads then stall one another.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# Every device this machine has, as test parameters: the CPU always, CUDA when a GPU is visible
# (skipped, not dropped, elsewhere, so a CPU run reports what it could not check). The ids are
# the device names, so `pytest -k cuda` runs the GPU half alone (scripts/gpu_check.sh).
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def write_idx_file(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    """An idx file as Fashion-MNIST ships them: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def learnable_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images whose class is a stripe texture (orientation x period), plus noise.

    Textures, not positions: a small conv net with global pooling can tell them apart anywhere,
    so a few epochs lift accuracy far above chance (0.1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    idx = np.arange(28)
    x = rng.integers(0, 90, (n, 28, 28)).astype(np.float32)
    for i, c in enumerate(y):
        period = 2 + int(c) % 5
        phase = rng.integers(0, period)
        on = ((idx + phase) % period) == 0
        if c < 5:
            x[i, on, :] += 160
        else:
            x[i, :, on] += 160
    return np.clip(x, 0, 255).astype(np.uint8), y


def write_fashion_like(folder: Path, n_train: int = 600, n_test: int = 200) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = learnable_images(n, seed)
        write_idx_file(folder / f"{split}-images-idx3-ubyte", x)
        write_idx_file(folder / f"{split}-labels-idx1-ubyte", y)
    return folder


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> Path:
    return write_fashion_like(tmp_path / "fmnist")


def tiny_config(data_root: Path, **over) -> dict:
    """A whole pipeline that runs in seconds on a CPU."""
    cfg = {
        "name": "tiny",
        "quiet": True,
        "data": {"name": "fashion_mnist", "root": str(data_root), "val_fraction": 0.2, "crop_padding": 2},
        "teacher": {"model": {"arch": "vgg", "kwargs": {"plan": [16, "M", 32, "M", 32]}},
                    "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "milestones": [2]}},
        "prune": {"target_sparsity": 0.36, "retrain": {"epochs": 1, "batch_size": 64, "lr": 0.02}},
        "distill": {"seeds": [0, 1], "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def finished_two_arm_run(tmp_path: Path, data_root: Path) -> tuple[Path, Path]:
    """(its config file, its run folder): a finished tiny run of two students (scratch and
    pruned_teacher, one seed, one epoch), one thread, in ``tmp_path``."""
    from ptd.cli import main

    cfg = tiny_config(data_root, distill={"seeds": [0], "arms": ["scratch", "pruned_teacher"],
                                          "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["threads"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    return p, out


@pytest.fixture
def tiny_yaml(tmp_path: Path, tiny_fashion: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tiny_fashion)))
    return p


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and immune to OpenMP stalls when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class Kill(Exception):
    """Raised by KillAfter: a training run stopped at an epoch boundary, before its commit."""


class KillAfter:
    """A fit hook that raises Kill in end_epoch of ``epoch`` (1-based): that epoch is never committed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        if epoch + 1 == self.epoch:
            raise Kill()
