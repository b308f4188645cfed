"""What this machine has: CPUs and memory, for checks that refuse work it cannot hold.

Imports nothing from ptd, so every layer (preflight, losses, loaders) may ask.
"""
from __future__ import annotations

import os


def cpu_count() -> int:
    """Logical CPUs of this machine (at least 1)."""
    return os.cpu_count() or 1


def memory_bytes() -> int:
    """Physical memory in bytes; 0 where the OS does not say (then no memory check refuses)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def gib(n: float) -> str:
    """``n`` bytes as GiB, for messages."""
    return f"{n / 2**30:,.1f} GiB"


def gpu_memory_bytes(device) -> int:
    """Total memory of a CUDA device in bytes (0 for any other device)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.get_device_properties(device).total_memory)
