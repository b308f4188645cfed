"""Students side by side (jobs > 1): worker processes, each training students from the stages
its parent finished."""
from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ptd.config import ARM_TABLE, RunConfig, to_dict
from ptd.train.distributed import init_distributed, resolve_device
from ptd.train.loop import Runtime
from ptd.errors import WorkerDiedError, counted
from ptd.registry import LOADED
from ptd.pipeline.context import Context
from ptd.pipeline.stages import stage_control, stage_distill, stage_prune, stage_student, stage_teacher


# ---------------------------------------------------------------- students side by side (jobs > 1)
# Why processes and not threads: the students (and their teachers' forwards) are small
# convolutions that oneDNN runs overhead-bound, so a second thread inside one step gains little;
# two steps side by side, one thread each, keep both cores busy. Measured on this project's 2-core
# AMD EPYC VM (benchmarks/parallel_fits.py, benchmarks/results/parallel_fits.md): KD steps of the
# demo's student 1.26-1.55x the throughput of one process on 2 threads (median 1.53x); the
# teacher's own training steps 1.15-1.19x, which is why only the students run side by side.
#
# What it does not change: every distillation is its own stage, seeded from its own streams,
# reading its teacher through the same stage functions (which, done, only read and check
# lineage), written atomically into its own folder. So a worker's student on 1 thread is
# bit-identical to the one a 1-job run on 1 thread trains, a kill anywhere resumes as before, and
# results and report come from the ordinary sequential pass, which finds every student done. The
# parent holds the run directory's lock; workers never take it, and die with the parent (ptd.jobs).

_WORKER: dict[str, Any] = {}  # per worker process: its context and the teachers it loaded


def worker_threads(cfg: RunConfig) -> int:
    """Torch threads per worker: the run's threads (torch's default when unset) shared out."""
    return max(1, (cfg.threads or torch.get_num_threads()) // cfg.jobs)


def _student_worker_init(cfg_dict: dict, run_dir: str, threads: int, plugins: Sequence[dict] = ()) -> None:
    from ptd.config import from_dict
    from ptd.registry import PluginError, load_plugins

    # Workers are spawned: the parent's --plugin registrations are not inherited, and a plugin's
    # model, strategy or loss was an unknown name in every worker (review of --plugin). The same
    # bytes only: a file edited since the parent imported it is refused, not trained with.
    now = {p["sha256"] for p in load_plugins([p["path"] for p in plugins])}
    for p in plugins:
        if p["sha256"] not in now:
            raise PluginError(f"--plugin {p['path']}: changed on disk while this run was starting its workers (sha256 "
                              f"{p['sha256'][:12]} when the run began); restore it, or re-run with this version into a new --out")
    torch.set_num_threads(threads)
    cfg = replace(from_dict(RunConfig, cfg_dict).validate(), quiet=True)
    d = init_distributed("cpu")
    rt = Runtime(device=resolve_device("cpu", d), amp=cfg.amp, channels_last=cfg.channels_last, fast_wgrad=cfg.fast_wgrad,
                 compile=cfg.compile, quiet=True, dist=d)
    from ptd.data import load_configured

    _WORKER.clear()
    # headers only: the parent checked every image as the config says before any worker started
    _WORKER["ctx"] = Context(cfg, Path(run_dir), rt, load_configured(cfg.data, cfg.seed, check_images="headers"), lambda s: None,
                             in_worker=True)


def _worker_replicate(replicate: int) -> dict[str, Any]:
    key = ("rep", replicate)
    if key not in _WORKER:
        ctx = _WORKER["ctx"]
        teacher, t_res = stage_teacher(ctx, replicate=replicate)
        pruned, masks, p_res = stage_prune(ctx, teacher, t_res, replicate=replicate)
        _WORKER[key] = {"unpruned": teacher, "pruned": pruned, "masks": masks, "p_res": p_res}
    return _WORKER[key]


def _student_worker(task: tuple[str, int, str | None, int]) -> dict:
    """One student of ``pending_students``, in a worker: its teacher and the student's stats are
    loaded from the finished stages (once per worker), then its stage runs as in the run."""
    arm, seed, loss, replicate = task
    ctx, kind = _WORKER["ctx"], ARM_TABLE[arm].teacher
    rep = _worker_replicate(replicate)
    if "stats" not in _WORKER:  # one student architecture, derived from replicate 0's pruned teacher
        base = _worker_replicate(0)
        _WORKER["stats"] = stage_student(ctx, base["unpruned"], base["pruned"], base["masks"])
    if kind == "retrained" and "retrained" not in rep:
        rep["retrained"], _ = stage_control(ctx, rep["unpruned"], rep["p_res"], replicate=replicate)
    return stage_distill(ctx, arm, seed, _WORKER["stats"], rep[kind] if kind else None, loss=loss, replicate=replicate)


def distill_in_parallel(ctx: Context, tasks: list[tuple], worker: Callable[[tuple], dict] | None = None) -> None:
    """Train the students ``tasks`` (:func:`pending_students`) ``cfg.jobs`` at a time in worker
    processes, with progress and an ETA; the first failure stops the others (their stages resume
    on the next run) and is raised here as the worker raised it. ``worker`` (default: the run's,
    ``_student_worker``) trains one task in a worker whose context ``_student_worker_init`` made;
    ``ptd sweep`` passes its own. It must be a module-level function: workers are spawned."""
    cfg = ctx.cfg
    if not tasks:
        return
    from ptd.jobs import WorkerDied, run_in_workers

    threads = worker_threads(cfg)
    n = min(cfg.jobs, len(tasks))
    ctx.log(f"[distill] {counted(len(tasks), 'student')}, {n} at a time ({counted(threads, 'thread')} each)")
    t0 = time.perf_counter()
    with tqdm(total=len(tasks), desc=f"distill ({n} jobs)", unit="student", disable=cfg.quiet, leave=False) as bar:
        def done(row: dict) -> None:
            bar.update(1)
            ctx.log(f"[distill] {cfg.distill.student_name(row['arm'], row.get('loss'))} seed {row['seed']}: test acc {row['test_acc']:.4f}")

        try:
            run_in_workers(worker or _student_worker, tasks, n, initializer=_student_worker_init,
                           initargs=(to_dict(cfg), str(ctx.run_dir), threads, [dict(p) for p in LOADED]), on_result=done)
        except WorkerDied as e:  # killed from outside: the CLI called it a bug in ptd
            if e.exitcode != -signal.SIGKILL:
                raise  # an exit code, a crash, a scheduler's SIGTERM: not the memory case; the traceback stays
            raise WorkerDiedError(f"jobs: a student's worker process (pid {e.pid}) died with {e.how} before it finished "
                                  f"(SIGKILL is typically the kernel's out-of-memory killer: each of the {n} workers holds "
                                  f"its own data, teacher and student); lower jobs or the batch sizes and run the same "
                                  f"command again, which resumes the students where they stopped") from None
    ctx.log(f"[distill] {counted(len(tasks), 'student')} in {time.perf_counter() - t0:.0f} s")
