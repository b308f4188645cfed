"""The whole run: preflight, the context, every stage up to ``until`` in order, the report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch.nn as nn
from tqdm.auto import tqdm

from ptd import paths as P
from ptd.config import ARM_TABLE, RunConfig
from ptd.train import checkpoint as ckpt
from ptd.train.distributed import all_sum
from ptd.errors import counted, on_every_rank
from ptd.pipeline.lineage import is_done
from ptd.pipeline.rundir import RunDirError
from ptd.pipeline.reuse import _read_lock_source, check_reuse
from ptd.pipeline.context import Context, finish_growth, make_context
from ptd.pipeline.plugins import check_plugins
from ptd.pipeline.stages import (distill_all, pending_students, stage_control, stage_prune, stage_student,
                                 stage_teacher, student_tasks)
from ptd.pipeline.parallel import distill_in_parallel


STAGES = P.STAGES


def run_pipeline(cfg: RunConfig, run_dir: str | Path, until: str = "report", arms: Sequence[str] | None = None,
                 log: Callable[[str], None] | None = None, reuse_from: str | Path | None = None) -> dict:
    """Run every stage up to and including ``until``; returns what the last stage produced.
    ``reuse_from``: a run directory whose finished teacher, pruning and control are copied in
    instead of trained (``--from``; :func:`check_reuse` says when it may be)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; valid: {', '.join(STAGES)}")
    log = log or (lambda s: tqdm.write(s))
    t0 = time.perf_counter()
    from ptd.preflight import preflight

    src_lock = None
    try:
        with on_every_rank():  # every rank runs these checks on the same inputs: rank 0 alone prints a refusal
            if reuse_from is not None:
                from ptd.preflight import check_out_dir

                check_out_dir(run_dir)  # (a file as --out is named as such, before --from's checks)
                # --from's checks first (a stale or damaged source is refused before preflight's
                # seconds), under SRC's shared lock, which is then let go: held through preflight
                # (seconds, up to a minute for the largest torchvision teachers), it refused a ptd
                # started in SRC meanwhile (a resume of it) as "in use".
                src_lock = _read_lock_source(Path(reuse_from))
                check_reuse(cfg, reuse_from, run_dir)
                ckpt.read_unlock_dir(src_lock)
                src_lock = None
            splits = preflight(cfg, run_dir, until=until, arms=arms)  # every user error up front, before the run directory is written
            check_plugins(cfg)
            copies = None
            if reuse_from is not None:
                # SRC may have changed while unlocked: checked again under the lock that is held to
                # the end of the copy (make_context), so no stage of SRC changes between its check
                # and its copy.
                src_lock = _read_lock_source(Path(reuse_from))
                copies = check_reuse(cfg, reuse_from, run_dir)
            ctx = make_context(cfg, Path(run_dir), log, splits=splits, reuse=(Path(reuse_from), copies) if copies else None,
                               until=until, arms=arms)
    finally:
        ckpt.read_unlock_dir(src_lock)  # copied (or refused): a ptd may run in the earlier run again
    try:
        out = _run_stages(ctx, until, arms, log, t0)
        finish_growth(ctx)
        return out
    finally:
        ckpt.unlock_dir(run_dir)


def main_writes(ctx: Context, write: Callable[[], None], what: str) -> None:
    """``write()`` on rank 0 while every rank waits for it (one collective, which also carries
    rank 0's failure, so every rank stops together); ``write()`` alone on one process. Without it a
    rank returned before rank 0 had written the report, the CLI read report.md before it existed,
    and torchrun killed rank 0 mid-write (measured, 4 of 4 runs)."""
    failed: BaseException | None = None
    if ctx.main:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 -- every rank stops together, rank 0 says why
            failed = e
    if all_sum([0.0 if failed is None else 1.0], ctx.rt.device)[0] > 0:
        raise failed if failed is not None else RunDirError(f"{what} failed on rank 0")


def plan_line(cfg: RunConfig, until: str, arms: Sequence[str], run_dir: Path | None = None) -> str:
    """What a command will train, in epochs (full passes over the training images), before it
    starts: each stage's bar has its own ETA, but nothing said how many stages follow it, so the
    first bar's ETA read as the run's (new-user audit). With ``run_dir``, how many of those epochs
    its finished stages already hold (a resume, a grown run, --from: reused, '[reused]' lines)."""
    from ptd.preflight import planned_epochs

    pc, reps = cfg.prune, cfg.teacher.seeds
    plan = planned_epochs(cfg, until, arms)  # the numbers the refusal past MAX_PLANNED_EPOCHS counts
    total = sum(n * e for n, e in plan.values())
    rep = f" x {reps} teacher replicates" if reps > 1 else ""
    roots = [P.replicate_root(run_dir, r) for r in range(reps)] if run_dir is not None else []

    def finished(stage: str) -> int:  # replicates whose stage folder is done
        return sum(is_done(root / stage) for root in roots)

    t_ep = cfg.teacher.optim.epochs if "teacher" in plan else 0
    parts = [f"teacher {counted(t_ep, 'epoch')}{rep}" if t_ep else "teacher loaded, not trained"]
    done = t_ep * finished(P.TEACHER)  # epochs whose stage is finished
    rounds = plan["pruning"][0] // reps if "pruning" in plan else 0
    if "pruning" in plan:
        parts.append(f"pruning {counted(rounds, 'round')} of {counted(pc.retrain.epochs, 'epoch')}{rep}")
        done += rounds * pc.retrain.epochs * finished(P.PRUNE)
    if "control" in plan:
        parts.append(f"control {counted(rounds, 'round')} of {counted(pc.retrain.epochs, 'epoch')}{rep}")
        done += rounds * pc.retrain.epochs * finished(P.CONTROL)
    if "students" in plan:
        tasks = student_tasks(cfg, arms)
        parts.append(f"{counted(plan['students'][0], 'student')} of {counted(cfg.distill.optim.epochs, 'epoch')} ({counted(len(arms), 'arm')}, "
                     f"{counted(len(cfg.distill.seeds), 'seed')}"
                     + (f", {len(cfg.distill.losses)} losses for each arm with a teacher" if len(cfg.distill.losses) > 1 else "")
                     + (f", {reps} teacher replicates)" if reps > 1 else ")"))
        done += cfg.distill.optim.epochs * sum(is_done(P.distill_dir(root, a, sd, cfg.distill.folder_loss(loss)))
                                               for root in roots for a, sd, loss in tasks)
    line = f"[plan] {'; '.join(parts)}: {counted(total, 'epoch')} of training in all"
    if done:
        line += f", {counted(done, 'epoch')} of them finished earlier (reused)"
    return line + (" (a student's epoch is cheaper: a smaller net)" if until in ("distill", "report") else "")


def _run_stages(ctx: Context, until: str, arms: Sequence[str] | None, log: Callable[[str], None], t0: float) -> dict:
    log = ctx.log  # rank 0's alone under torchrun: the [plan] line and "done in" came once per rank
    cfg = ctx.cfg
    arms = list(arms or cfg.distill.arms)
    log(plan_line(cfg, until, arms, ctx.run_dir))
    from ptd.data.base import depth_note, upscale_note

    for note in (upscale_note(ctx.splits, cfg.data.image_size), depth_note(ctx.splits)):
        if note is not None:
            log(note)
    students: list[dict] = []
    reps: list[dict] = []  # per teacher replicate: its teacher, pruning and control results
    s_stats: dict = {}
    for r in range(cfg.teacher.seeds):
        teacher, t_res = stage_teacher(ctx, replicate=r)
        reps.append({"replicate": r, "teacher": t_res})
        if until == "teacher":
            continue
        pruned, masks, p_res = stage_prune(ctx, teacher, t_res, replicate=r)
        reps[-1]["prune"] = p_res
        if until == "prune":
            continue
        if r == 0:
            # One student architecture for every replicate, derived from replicate 0's pruned
            # teacher: students of different teachers then differ only by what they were taught.
            s_stats = stage_student(ctx, teacher, pruned, masks)
            if until == "student":
                return s_stats
        # Each arm's teacher is the one of the kind ARM_TABLE names; the control teacher is trained
        # only when an arm asks for it, before any student.
        teachers: dict[str | None, nn.Module | None] = {None: None, "unpruned": teacher, "pruned": pruned}
        reps[-1]["control"] = None
        if any(ARM_TABLE[a].teacher == "retrained" for a in arms):
            teachers["retrained"], reps[-1]["control"] = stage_control(ctx, teacher, p_res, replicate=r)
        if cfg.jobs > 1:  # the students side by side in worker processes; the pass below then reads them
            distill_in_parallel(ctx, pending_students(ctx, arms, replicate=r))
        students += distill_all(ctx, arms, s_stats, teachers, replicate=r)
        del teacher, pruned, teachers  # one replicate's teachers in memory at a time
    if until in ("teacher", "prune"):
        # Replicate 0's result, as before; with teacher.seeds > 1 every replicate's beside it
        # (ptd train and ptd prune printed replicate 0's alone: review).
        return {**reps[0][until], "replicates": [rep[until] for rep in reps]} if len(reps) > 1 else reps[0][until]
    if until == "distill":
        return {"students": students}
    from ptd.data.base import test_set_facts
    from ptd.registry import LOADED
    from ptd.report import build_results, log_not_learned, not_learned, write_report

    r0 = reps[0]
    results = build_results(cfg, r0["teacher"], r0["prune"], s_stats, students, control=r0["control"],
                            replicates=reps if len(reps) > 1 else None,
                            test_set=test_set_facts(ctx.splits.test, ctx.splits.num_classes),
                            setup={"images": {k: len(getattr(ctx.splits, k)) for k in ("train", "val", "test")},
                                   "device": str(ctx.rt.device), "amp_bf16": bool(ctx.rt.uses_amp),
                                   **({"plugins": [dict(p) for p in LOADED]} if LOADED else {})})
    def report() -> None:
        write_report(ctx.run_dir, results)
        log_not_learned(not_learned(results), results["test_set"], log, str(ctx.run_dir / P.REPORT_MD))

    main_writes(ctx, report, f"writing the report into {ctx.run_dir}")
    log(f"done in {time.perf_counter() - t0:.0f} s: {ctx.run_dir}")
    return results
