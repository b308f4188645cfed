"""Independent random streams: one seed per (root seed, stream name, seed, epoch, rank).

Every random stream of a run (weight initialization, data order, augmentation, one per rank) gets
its seed from ``stream_seed``, which feeds the whole key to ``numpy.random.SeedSequence``: a hash
designed so that distinct keys give statistically independent streams. Adding seeds instead
(``seed + epoch``) makes seed s at epoch e replay seed s+1 at epoch e-1, so "different seeds"
would share most of their data orders.

The key is laid out in fixed-width 32-bit words (root 2 words, stream name 4 words of its
SHA-256, seed 2 words, epoch 1, rank 1), so two different keys can never encode to the same
entropy; the same key gives the same seed on every machine and every run.

Streams nest: a training run's seed may itself come from ``stream_seed(run_seed, "student",
seed)`` and be the root of that training's ``data_order`` and ``augment`` streams.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where a stream is made, so `ptd --help` stays fast
    import numpy as np

_WORD = 2**32
MAX_ROOT = 2**64 - 1  # roots and seeds take two 32-bit words (a derived 63-bit seed may be a root)
MAX_SMALL = 2**32 - 1  # epoch and rank take one
from ptd.config import MAX_SEED  # noqa: E402,F401 -- defined with the config keys it bounds; consumers import it from here too


def _check(name: str, value: int, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= top:
        raise ValueError(f"{name} must be an integer in 0..{top}, got {value!r}; use a non-negative seed")
    return int(value)


def _words(value: int, n: int) -> list[int]:
    return [(value >> (32 * i)) % _WORD for i in range(n)]


def _name_words(stream: str) -> list[int]:
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream name must be a non-empty string, got {stream!r}")
    digest = hashlib.sha256(stream.encode("utf-8")).digest()[:16]
    return [int.from_bytes(digest[4 * i: 4 * i + 4], "little") for i in range(4)]


def seed_sequence(root: int, stream: str, seed: int = 0, epoch: int = 0, rank: int = 0) -> np.random.SeedSequence:
    """The SeedSequence of one stream (spawn from it for sub-streams, or see ``stream_seed``)."""
    import numpy as np

    entropy = (_words(_check("root seed", root, MAX_ROOT), 2) + _name_words(stream)
               + _words(_check("seed", seed, MAX_ROOT), 2) + [_check("epoch", epoch, MAX_SMALL), _check("rank", rank, MAX_SMALL)])
    return np.random.SeedSequence(entropy)


def stream_seed(root: int, stream: str, seed: int = 0, epoch: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` / ``torch.manual_seed`` / numpy, unique to
    the key (root seed, stream name, seed, epoch, rank)."""
    import numpy as np

    state = seed_sequence(root, stream, seed, epoch, rank).generate_state(2, np.uint32)
    return ((int(state[1]) << 32) | int(state[0])) & (2**63 - 1)


def torch_generator(root: int, stream: str, seed: int = 0, epoch: int = 0, rank: int = 0, device: str = "cpu"):
    """A ``torch.Generator`` on ``device`` seeded for this stream."""
    import torch

    return torch.Generator(device=device).manual_seed(stream_seed(root, stream, seed, epoch, rank))


def numpy_generator(root: int, stream: str, seed: int = 0, epoch: int = 0, rank: int = 0) -> np.random.Generator:
    """A numpy ``Generator`` (PCG64) drawn straight from this stream's SeedSequence."""
    import numpy as np

    return np.random.default_rng(seed_sequence(root, stream, seed, epoch, rank))
