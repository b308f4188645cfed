"""PyTorch DDP under torchrun: the one place ranks, devices and reductions are handled.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything is a single process.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        # Torn down before the interpreter exits: left to process teardown, gloo's threads were
        # once destroyed while joinable, and rank 0 of a finished torchrun aborted ("terminate
        # called without an active exception", exit -6) after all its work was written.
        atexit.register(shutdown_distributed)
    return Dist(rank, local, world)


def shutdown_distributed() -> None:
    """Destroy the process group if one is up (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- at exit, after the work: a failed teardown changes nothing written
            pass


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.enabled:
        name = f"cuda:{d.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available; set device: cpu or auto")
    return torch.device(name)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over ranks (evaluation counts); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
