"""Work spread over worker processes that die with their parent.

``run_in_workers`` starts ``multiprocessing`` worker processes (spawn: a fork of a process whose
OpenMP pool has run is not safe to use) that ask Linux to SIGKILL them when the parent dies
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of ptd leaves no orphan still writing into a run, and
which are terminated on the first failure. Each worker is fed its tasks over a pipe of its own, not
through a ``multiprocessing.Pool``: a Pool's queues are guarded by named POSIX semaphores
(``/dev/shm/sem.mp-*``, 6 per pool) that only Python's resource tracker unlinks, and a kill of ptd's
process group killed the tracker with it, leaving them behind for good at every such kill (an
audit); a pipe is gone with the last process that holds it. ptd.pipeline uses it for ``jobs: N``
(students trained side by side); it imports nothing from ptd, so any layer may use it.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection, wait
from multiprocessing.pool import ExceptionWithTraceback, MaybeEncodingError
from typing import Any, Callable, Iterable, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:  # pragma: no cover - no glibc: the parent's terminate() still applies
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
    # one too); a worker the parent stops (after a failure or a Ctrl-C) cannot unregister it, and
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


def _serve(conn: Connection, parent: int, fn: Callable[[Any], Any], initializer: Callable[..., None] | None,
           initargs: Sequence[Any]) -> None:
    """A worker: ``fn(task)`` for each ``(task,)`` the parent sends, answered ``(True, result)`` or
    ``(False, error)``, until it sends None (or is gone: end of file)."""
    try:
        _init(parent, initializer, initargs)
        failed = None
    except Exception as e:  # sent back as the first task's error: the parent raises it as a task's
        failed = e
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            if failed is not None:
                raise failed
            out = (True, fn(msg[0]))
        except Exception as e:
            out = (False, ExceptionWithTraceback(e, e.__traceback__))  # re-raised with the worker's traceback as its cause
        try:
            conn.send(out)
        except Exception as e:  # a result or an error that does not pickle (pickling fails before anything is sent)
            conn.send((False, MaybeEncodingError(e, out[1])))
        if failed is not None:
            return


class WorkerDied(RuntimeError):
    """A worker process died while it held a task: ``pid``, ``exitcode`` (as multiprocessing gives
    it: -N for signal N, None if unknown) and ``how`` (the same in words)."""

    def __init__(self, pid: int | None, exitcode: int | None):
        try:
            how = f"signal {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
        except ValueError:  # a signal number without a name
            how = f"signal {-exitcode}"
        super().__init__(f"a worker process (pid {pid}) died with {how} before it finished its task")
        self.pid, self.exitcode, self.how = pid, exitcode, how


def _start_ignoring_ctrl_c(w: mp.process.BaseProcess) -> None:
    """Start ``w`` with SIGINT ignored from its first instruction. Ctrl-C reaches the whole process
    group; a worker still importing torch and ptd (2-4 s, before ``_init`` ignores it) printed a
    KeyboardInterrupt traceback of its own under ptd's line. An ignored signal stays ignored across
    exec, and Python then installs no KeyboardInterrupt handler. The parent ignores it only for the
    milliseconds ``start`` takes (on the main thread, the only one that may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        w.start()
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        w.start()
    finally:
        signal.signal(signal.SIGINT, before)


def _died(w: mp.process.BaseProcess) -> WorkerDied:
    """The error for worker process ``w``, whose pipe closed while it owed a result."""
    w.join(5)  # its pipe closed as it died: the exit status follows at once (s)
    return WorkerDied(w.pid, w.exitcode)


def run_in_workers(fn: Callable[[Any], Any], tasks: Iterable[Any], processes: int, *,
                   initializer: Callable[..., None] | None = None, initargs: Sequence[Any] = (),
                   on_result: Callable[[Any], None] | None = None) -> None:
    """``fn(task)`` for every task in ``processes`` spawned workers (``fn`` and ``initializer``:
    module-level functions, which pickle by name), ``on_result`` called in the parent as each
    finishes (in completion order). The first exception a task (or ``initializer``) raises is
    raised here, after every worker was stopped; a worker that dies while it holds a task
    (killed, out of memory) is a ``WorkerDied`` (a RuntimeError)."""
    if processes < 1:
        raise ValueError("Number of processes must be at least 1")
    todo = list(tasks)
    ctx = mp.get_context("spawn")
    workers: dict[Connection, mp.process.BaseProcess] = {}  # the parent's end of each worker's pipe -> its process
    done = False
    try:
        for _ in range(min(processes, len(todo))):
            ours, theirs = ctx.Pipe()
            w = ctx.Process(target=_serve, args=(theirs, os.getpid(), fn, initializer, tuple(initargs)), daemon=True)
            _start_ignoring_ctrl_c(w)
            # Only the worker holds its end now (spawn passes it that descriptor alone), so its
            # death, however it dies, reads as end of file here instead of a wait for ever.
            theirs.close()
            workers[ours] = w
        left = iter(todo)
        busy: set[Connection] = set()

        def hand(conn: Connection) -> None:
            """The next task to this idle worker, or None (it exits) when none is left."""
            for task in left:
                conn.send((task,))
                busy.add(conn)
                return
            try:
                conn.send(None)
            except OSError:  # gone already, owing nothing: its exit code is no failure of a task
                pass

        for conn in workers:
            try:
                hand(conn)
            except OSError:  # it died before it read a thing (broken pipe)
                raise _died(workers[conn]) from None
        while busy:
            for conn in wait(list(busy)):
                try:
                    ok, out = conn.recv()
                except (EOFError, OSError):  # OSError: it died with its task unread (ECONNRESET), e.g. in its initializer
                    raise _died(workers[conn]) from None
                busy.discard(conn)
                if not ok:
                    raise out
                if on_result is not None:
                    on_result(out)
                try:
                    hand(conn)
                except OSError:
                    raise _died(workers[conn]) from None
        for w in workers.values():
            w.join()  # every worker exits on its own, its finalizers run (a terminate could cut them short)
        done = True
    finally:
        if not done:
            for w in workers.values():
                if w.is_alive():
                    w.terminate()  # after a failure or an interrupt: no worker goes on running
            for w in workers.values():
                w.join()
        for conn in workers:
            conn.close()
