"""PyTorch DDP under torchrun: the one place ranks, devices and reductions are handled.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything is a single process.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo on CPU), and a watch
    that stops this worker once torchrun is gone (``watch_parent``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # Before the rendezvous: a worker orphaned while it waits there would otherwise retry for
    # minutes (measured: over 10), and one orphaned later trains on, holding the run's lock.
    watch_parent()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        # Imported before the group exists, never after: its functions take `group=group.WORLD`
        # as a default argument, evaluated on import, and imported later (torch._dynamo imports it,
        # and a model built on the meta device, as preflight does, imports torch._dynamo) they hold
        # the group for good. destroy_process_group then frees nothing, gloo's worker threads live
        # into interpreter finalization, and one still retiring the last collective's tensors
        # takes the GIL there, is unwound by Python and aborts the process ("terminate called
        # without an active exception", SIGABRT) after every file was written: 3 of 72 re-runs
        # of a finished 2-process run on 2 busy cores. Imported here (2 ms), nothing holds the group.
        import torch.distributed.nn.functional  # noqa: F401
        dist.init_process_group(backend)
        # Torn down before the interpreter exits, while Python can still run the worker threads'
        # last releases: the group's destructor (GIL released) waits for its queue and joins them.
        atexit.register(shutdown_distributed)
    return Dist(rank, local, world)


_watching: threading.Thread | None = None


def watch_parent(interval_s: float = 1.0) -> None:
    """Exit this process (``os._exit(1)``, after one line on stderr) once its parent is gone.

    torchrun starts its workers in a session of their own (``start_new_session=True``), so killing
    torchrun's process group, or torchrun alone with SIGKILL, leaves them running: they train on
    and hold the run directory's lock, and the user's re-run is refused as "in use". A daemon
    thread polls ``os.getppid()`` every ``interval_s`` seconds (a syscall, microseconds) and
    stops the process when it changed: the parent died and the worker was re-parented.
    Not ``prctl(PR_SET_PDEATHSIG)``: that fires when the parent *thread* that forked the worker
    exits, which torchrun's agent is free to do while it lives on. Idempotent (one thread a process).
    """
    global _watching
    if _watching is not None and _watching.is_alive():
        return
    import ptd

    # The parent when ptd was imported, not now: torchrun killed while this worker imported torch
    # (seconds) had already left it to init, and a parent read now would be init itself (a kill
    # 3 s after the launch left both workers waiting in the rendezvous, measured).
    parent = ptd.LAUNCH_PARENT

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                try:
                    sys.stderr.write(f"ptd: error: the launcher of this worker (pid {parent}, e.g. torchrun) is gone; worker pid "
                                     f"{os.getpid()} stops too, so the run directory is free for a re-run\n")
                    sys.stderr.flush()
                finally:
                    # _exit, not exit: no cleanup that could block on a dead peer (gloo, NCCL); the
                    # kernel releases the directory's flock and every descriptor with the process.
                    os._exit(1)
            time.sleep(interval_s)

    _watching = threading.Thread(target=watch, name="ptd-parent-watch", daemon=True)
    _watching.start()


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


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, from ptd's own processes), in rank order; ``[obj]`` on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    """Processes in the running group: 1 without one (or before ``init_distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo is given CPU tensors (it has no CUDA path for every op).
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _flat_groups(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of ``tensors`` by dtype: one collective per dtype, not one per tensor (a ResNet's
    BatchNorm alone has ~100 buffers)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


@torch.no_grad()
def _collective_(tensors: Sequence[torch.Tensor], op: Callable[[torch.Tensor], Any]) -> None:
    dev = _comm_device()
    for dtype, idx in _flat_groups(tensors).items():
        # bool goes as uint8: not every backend reduces or broadcasts bool tensors.
        wire = torch.uint8 if dtype == torch.bool else dtype
        flat = torch.cat([tensors[i].detach().reshape(-1).to(device=dev, dtype=wire) for i in idx])
        op(flat)
        at = 0
        for i in idx:
            t = tensors[i]
            t.copy_(flat[at:at + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
            at += t.numel()


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s (bit for bit); nothing on one process.
    Every rank must call it, with tensors of the same shapes and dtypes in the same order."""
    if world_size() > 1 and tensors:
        _collective_(tensors, lambda t: dist.broadcast(t, src))


def all_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over ranks (every rank gets the same sum); nothing on one process."""
    if world_size() > 1 and tensors:
        _collective_(tensors, dist.all_reduce)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics, loss modules' state).

    DDP broadcasts them at the start of every forward, so after an epoch each rank holds rank 0's
    plus one update from its own last batch: evaluated as they are, the ranks would score different
    models, and disagree on the best epoch and on divergence."""
    broadcast_(list(module.buffers()), src)


def first_true(flag: bool) -> int | None:
    """The lowest rank where ``flag`` is true (every rank gets the same answer), or None when it
    is false everywhere; ``0`` or None on one process. One small all-reduce."""
    n = world_size()
    if n <= 1:
        return 0 if flag else None
    dev = _comm_device()
    hits = torch.zeros(n, dtype=torch.float64, device=dev)
    hits[dist.get_rank()] = float(bool(flag))
    dist.all_reduce(hits)
    ranks = hits.nonzero().flatten().tolist()
    return int(ranks[0]) if ranks else None


def broadcast_object(obj: Any, src: int) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself on one process."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]
