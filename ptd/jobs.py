"""Work spread over worker processes that die with their parent.

``run_in_workers`` is a ``multiprocessing`` pool (spawn: a fork of a process whose OpenMP pool has
run is not safe to use) whose workers ask Linux to SIGKILL them when the parent dies
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of ptd leaves no orphan still writing into a run, and
which is terminated on the first failure. ptd.pipeline uses it for ``jobs: N`` (students trained
side by side); it imports nothing from ptd, so any layer may use it.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:  # pragma: no cover - no glibc: the pool's terminate() in the parent still applies
            pass


def _init(parent: int, initializer: Callable[..., None] | None, initargs: Sequence[Any]) -> None:
    die_with_parent()
    # PR_SET_PDEATHSIG covers a parent that dies from now on. One that died while this worker was
    # starting (spawn imports torch and ptd before this runs: 2-4 s) left it orphaned, and it went
    # on to train a student into a run directory whose lock nobody held (an audit: 17 of 31 kills
    # of the parent alone, every one within 1.5 s of the workers appearing).
    if os.getppid() != parent:
        os._exit(1)
    # tqdm's default lock is a multiprocessing semaphore, made at a worker's first bar (a disabled
    # one too); a worker the pool stops (after a failure or a Ctrl-C) cannot unregister it, and
    # Python's resource tracker then warns of "leaked semaphore objects" on stderr after ptd's one
    # line. Workers print no bars of their own: a thread lock serves.
    try:
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:  # pragma: no cover - tqdm is a dependency of ptd, not of this module
        pass
    # Ctrl-C reaches the whole process group: the parent stops the workers (terminate), so they
    # need not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def run_in_workers(fn: Callable[[Any], Any], tasks: Iterable[Any], processes: int, *,
                   initializer: Callable[..., None] | None = None, initargs: Sequence[Any] = (),
                   on_result: Callable[[Any], None] | None = None) -> None:
    """``fn(task)`` for every task in ``processes`` spawned workers (``fn`` and ``initializer``:
    module-level functions, which pickle by name), ``on_result`` called in the parent as each
    finishes (in completion order). The first exception a task raises is raised here, after every
    worker was stopped."""
    pool = mp.get_context("spawn").Pool(processes, initializer=_init, initargs=(os.getpid(), initializer, tuple(initargs)))
    done = False
    try:
        for out in pool.imap_unordered(fn, list(tasks)):
            if on_result is not None:
                on_result(out)
        pool.close()
        pool.join()  # every worker exits on its own, its finalizers run (a terminate could cut them short)
        done = True
    finally:
        if not done:
            pool.terminate()  # after a failure or an interrupt: no worker goes on running
            pool.join()
