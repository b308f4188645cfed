"""`ptd sweep`: many pruned teachers (strategies x sparsities), one student, one comparison.

    runs/<name>/
      config.yaml  env.json  data.json
      teacher/                                  the one dense teacher every strategy starts from
      prune/<imp-family strategy>/level_<k>/    one IMP run to the highest sparsity; its levels
                                                are the lower sparsities (no extra training)
      prune/<strategy>_s<sparsity>/level_1/     every other strategy: one run per sparsity
      student/                                  ONE student architecture for every teacher
      distill/scratch_seed<s>/                  the student alone
      distill/unpruned_teacher_seed<s>/         KD from the dense teacher
      distill/<strategy>_s<sparsity>_seed<s>/   KD from each pruned teacher
      sweep.json  sweep.md  student_acc_vs_sparsity.png  student_acc_vs_compute.png

Every directory is a pipeline stage with its own ``done`` marker, so an interrupted sweep resumes
where it stopped and a finished one re-runs nothing.

Options for several strategies: ``prune.options`` either applies to every strategy, or is keyed
by strategy name (``options: {gmp: {end_epoch: 3}, imp: {rewind: lr}}``) to give each its own.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from tqdm.auto import tqdm

from ptd import paths as P
from ptd.config import ConfigError, PruneConfig, RunConfig
from ptd.errors import counted, on_every_rank
from ptd.models import build_from_spec
from ptd.pipeline import (Context, RunDirError, check_plugins, distill_in_parallel, finish_growth, is_done, main_writes, snapshot_epochs, make_context, read_json,
                          stage_distill, stage_prune, stage_student, stage_teacher)
from ptd.pruning import SPECS, options_for
from ptd.pruning.masks import Masks, load_masks
from ptd.pruning.select import rounds_for_target
from ptd.train import checkpoint as ckpt

COST_KEYS = ("epochs", "steps", "wall_s")


@dataclass
class PrunedTeacher:
    """One pruned teacher of the sweep: which run made it, which level of that run it is."""

    strategy: str
    target: float  # the sweep sparsity asked for
    prune_dir: Path  # the strategy's prune run
    level: int  # the level of that run that is this teacher
    prune_result: dict  # the run's prune/.../result.json

    @property
    def key(self) -> str:
        return f"{self.strategy}_s{self.target:g}"

    @property
    def ident(self) -> tuple[str, Path, int]:
        """Which trained model this is: two sweep sparsities on the same IMP level are one teacher."""
        return (self.strategy, self.prune_dir, self.level)

    @property
    def level_row(self) -> dict:
        return next(r for r in self.prune_result["levels"] if r["level"] == self.level)

    def measured_sparsity(self) -> float:
        """The level's measured sparsity (sparsity.json is the source of truth; the result row mirrors it)."""
        f = P.level_dir(self.prune_dir, self.level) / P.SPARSITY
        if f.is_file():
            return float(read_json(f)["sparsity"])
        return float(self.level_row["sparsity"])

    def cost(self) -> dict[str, float]:
        """The pruning compute behind this teacher: every level up to and including its own."""
        rows = [r for r in self.prune_result["levels"] if 1 <= r["level"] <= self.level]
        return {k: sum(float(r.get(k) or 0) for r in rows) for k in COST_KEYS}

    def load(self, ctx: Context, teacher: nn.Module) -> tuple[nn.Module, Masks]:
        ld = P.level_dir(self.prune_dir, self.level)
        model = build_from_spec(teacher.ptd_spec)  # a teacher to distill from: never saved again
        ckpt.load_into(model, ld / P.MODEL, f"pruned teacher {self.key}")
        masks = {n: m.to(ctx.rt.device) for n, m in load_masks(ld / P.MASKS, model).items()}
        model.ptd_sources = (ld / P.MODEL, ld / P.MASKS)  # what the stages made from it record (lineage)
        return ctx.rt.prepare(model).eval(), masks


def strategy_options(cfg: RunConfig, strategy: str) -> dict:
    """``prune.options`` for one strategy (see ptd.pruning.options_for)."""
    return options_for(cfg.prune.options, strategy)


def check_sweep(cfg: RunConfig) -> tuple[list[float], float]:
    """The sweep sparsities (sorted, distinct) and the one the student is derived from."""
    if len(set(cfg.sweep.sparsities)) != len(cfg.sweep.sparsities):
        raise ConfigError(f"sweep.sparsities: {list(cfg.sweep.sparsities)} lists a sparsity twice; list each once")
    sps = sorted(set(cfg.sweep.sparsities))
    frm = cfg.sweep.student_from if cfg.sweep.student_from is not None else sps[-1]
    if not any(abs(frm - s) < 1e-9 for s in sps):
        raise ConfigError(f"sweep.student_from: {frm!r} is not one of sweep.sparsities {sps}; pick one of them, or null for the highest")
    if len(set(cfg.sweep.strategies)) != len(cfg.sweep.strategies):
        raise ConfigError(f"sweep.strategies: {list(cfg.sweep.strategies)} lists a strategy twice; list each once")
    for st in cfg.sweep.strategies:
        strategy_options(cfg, st)
    return sps, frm


def prune_cfg(cfg: RunConfig, strategy: str, target: float) -> PruneConfig:
    return replace(cfg.prune, strategy=strategy, target_sparsity=target, options=strategy_options(cfg, strategy))


def prune_all(ctx: Context, teacher: nn.Module, t_res: dict, sparsities: list[float]) -> list[PrunedTeacher]:
    """Run (or load) every pruning run of the sweep; one PrunedTeacher per (strategy, sparsity)."""
    cfg, out = ctx.cfg, []
    for strategy in cfg.sweep.strategies:
        if SPECS.get(strategy).nested_levels:  # declared by the strategy when it registered
            d = ctx.run_dir / P.PRUNE / strategy
            top = max(sparsities)
            ctx.log(f"[sweep] {strategy}: one run to {top:g} gives the levels of every sweep sparsity")
            _, _, res = stage_prune(ctx, teacher, t_res, prune_cfg(cfg, strategy, top), d)
            for s in sparsities:
                out.append(PrunedTeacher(strategy, s, d, rounds_for_target(s, cfg.prune.rate), res))
        else:
            for s in sparsities:
                d = ctx.run_dir / P.PRUNE / f"{strategy}_s{s:g}"
                _, _, res = stage_prune(ctx, teacher, t_res, prune_cfg(cfg, strategy, s), d)
                out.append(PrunedTeacher(strategy, s, d, res["final_level"], res))
    return out


def check_student_dir(ctx: Context, src: PrunedTeacher, src_model: nn.Module, src_masks: Masks) -> None:
    """A finished student/ must be the one this sweep would make: `ptd run` into the same directory
    derives its student from prune.target_sparsity, which need not be the sweep's."""
    d = ctx.run_dir / P.STUDENT
    if not is_done(d):
        return
    cfg, stats = ctx.cfg, read_json(d / P.STATS)
    if cfg.student.source == "derive":
        from ptd.students import derive_configured

        sc = cfg.student
        round_to = sc.round_to
        if round_to == "auto":
            # auto's multiple depends on the device and on ptd's measured candidates, neither of
            # them in the config: a sweep resumed on a CPU after a GPU, or by a later ptd, keeps
            # the multiple its student was made with.
            round_to = (stats.get("plan") or {}).get("round_to") or round_to
        want = derive_configured(src_model, src_masks, inherit=sc.inherit, round_to=round_to, round_narrower=sc.round_narrower,
                                 device_type=ctx.rt.device.type)[0].ptd_spec
    else:
        want = ctx.new_model(cfg.student.model).ptd_spec
    if json.dumps(want, sort_keys=True) != json.dumps(stats["spec"], sort_keys=True):
        raise RunDirError(f"{d} holds a student that is not the sweep's (derived from {src.key}); it was probably made by 'ptd run' "
                          f"into the same directory; pass --out to a new directory for the sweep")


def run_sweep(cfg: RunConfig, run_dir: str | Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Teacher, every pruned teacher, one student, every distillation, then sweep.json/.md/plots."""
    log = log or (lambda s: tqdm.write(s))
    t0 = time.perf_counter()
    from ptd.preflight import preflight

    with on_every_rank():  # every rank runs these checks on the same inputs: rank 0 alone prints a refusal
        splits = preflight(cfg, run_dir, sweep=True)  # every user error up front, before the run directory is written
        check_plugins(cfg, sweep=True)
        sparsities, student_from = check_sweep(cfg)
        ctx = make_context(cfg, Path(run_dir), log, splits=splits, kind="sweep")
    try:
        out = _sweep_stages(ctx, sparsities, student_from, log, t0)
        finish_growth(ctx)
        return out
    finally:
        ckpt.unlock_dir(run_dir)


def _sweep_stages(ctx: Context, sparsities: list[float], student_from: float, log: Callable[[str], None], t0: float) -> dict[str, Any]:
    from ptd.report.sweep import build_sweep_results, write_sweep_report

    cfg = ctx.cfg
    log(sweep_plan_line(cfg))
    teacher, t_res, pruned, src = sweep_teachers(ctx, sparsities, student_from)
    src_model, src_masks = src.load(ctx, teacher)
    check_student_dir(ctx, src, src_model, src_masks)
    s_stats = stage_student(ctx, teacher, src_model, src_masks)
    del src_model, src_masks

    seeds = list(cfg.distill.seeds)
    if cfg.jobs > 1:  # the students side by side; the pass below then finds them done
        distill_in_parallel(ctx, pending_sweep_students(ctx, pruned), worker=_sweep_student_worker)
    baselines: dict[str, list[dict]] = {}
    if "scratch" in cfg.distill.arms:
        baselines["scratch"] = [stage_distill(ctx, "scratch", s, s_stats, None) for s in seeds]
    if "unpruned_teacher" in cfg.distill.arms:
        baselines["unpruned_teacher"] = [stage_distill(ctx, "unpruned_teacher", s, s_stats, teacher) for s in seeds]

    # Two sweep sparsities may land on the same IMP level: that teacher is distilled once.
    by_teacher: dict[tuple[str, Path, int], list[dict]] = {}
    rows = []
    for p in pruned:
        if p.ident not in by_teacher:
            model = None
            if not all(is_done(P.distill_dir(ctx.run_dir, p.key, s)) for s in seeds):
                model, _ = p.load(ctx, teacher)
            by_teacher[p.ident] = [stage_distill(ctx, p.key, s, s_stats, model) for s in seeds]
            del model
        else:
            log(f"[sweep] {p.key} is the same IMP level ({p.level}) as an earlier sparsity; its students are reused")
        rows.append((p, by_teacher[p.ident]))

    from ptd.data.base import test_set_facts
    from ptd.report import log_not_learned
    from ptd.report.sweep import sweep_not_learned

    results = build_sweep_results(cfg, t_res, s_stats, src, baselines, rows, session_wall_s=time.perf_counter() - t0,
                                  test_set=test_set_facts(ctx.splits.test, ctx.splits.num_classes))
    def report() -> None:
        write_sweep_report(ctx.run_dir, results)
        log_not_learned(sweep_not_learned(results), results["test_set"], log, str(ctx.run_dir / P.SWEEP_MD))

    main_writes(ctx, report, f"writing the sweep's report into {ctx.run_dir}")
    log(f"sweep done in {time.perf_counter() - t0:.0f} s: {ctx.run_dir}")
    return results


def sweep_plan_line(cfg: RunConfig) -> str:
    """What a sweep will train, in epochs, before it starts (as ptd run's [plan] line): the first
    bar's ETA is not the sweep's."""
    from ptd.preflight import planned_epochs

    plan = planned_epochs(cfg, sweep=True)
    parts = [f"teacher {counted(plan['teacher'][1], 'epoch')}" if "teacher" in plan else "teacher loaded, not trained"]
    n, e = plan["pruning"]
    parts.append(f"pruning {counted(n, 'round')} of {counted(e, 'epoch')} ({counted(len(cfg.sweep.strategies), 'strategy', 'strategies')}, "
                 f"{counted(len(cfg.sweep.sparsities), 'sparsity', 'sparsities')})")
    n, e = plan["students"]
    parts.append(f"up to {counted(n, 'student')} of {counted(e, 'epoch')} ({counted(len(cfg.distill.seeds), 'seed')}; a pruned teacher met twice is distilled once)")
    total = sum(n * e for n, e in plan.values())
    return f"[plan] {'; '.join(parts)}: up to {counted(total, 'epoch')} of training in all (a student's epoch is cheaper: a smaller net)"


def sweep_teachers(ctx: Context, sparsities: list[float], student_from: float) -> tuple[nn.Module, dict, list[PrunedTeacher], PrunedTeacher]:
    """The dense teacher (trained or read), its result, every pruned teacher (pruned or read), and
    the one the student is derived from."""
    cfg = ctx.cfg
    # The teacher stage keeps early weights for weight rewinding when a strategy declares it needs them.
    teacher, t_res = stage_teacher(ctx, snapshot=snapshot_epochs(cfg, cfg.sweep.strategies))
    teacher.eval()
    pruned = prune_all(ctx, teacher, t_res, sparsities)
    src = next(p for p in pruned if p.strategy == cfg.sweep.strategies[0] and abs(p.target - student_from) < 1e-9)
    return teacher, t_res, pruned, src


def sweep_student_keys(cfg: RunConfig, pruned: list[PrunedTeacher]) -> list[str]:
    """The distill/ folder keys of a sweep, in the order it trains them: the baseline arms, then
    one per distinct pruned teacher (two sparsities on the same IMP level share their students)."""
    keys = [arm for arm in ("scratch", "unpruned_teacher") if arm in cfg.distill.arms]
    first: dict[tuple[str, Path, int], str] = {}
    for p in pruned:
        first.setdefault(p.ident, p.key)
    return keys + list(first.values())


def pending_sweep_students(ctx: Context, pruned: list[PrunedTeacher]) -> list[tuple[str, int]]:
    """(key, seed) of every sweep student whose stage is not done."""
    return [(k, s) for k in sweep_student_keys(ctx.cfg, pruned) for s in ctx.cfg.distill.seeds
            if not is_done(P.distill_dir(ctx.run_dir, k, s))]


def _sweep_student_worker(task: tuple[str, int]) -> dict:
    """One sweep student, in a worker of ``distill_in_parallel`` (its context made by the
    pipeline's worker initializer). The teacher, the pruned teachers and the student come from
    their finished stages, read once per worker; the student's stage then runs as in the sweep."""
    from ptd.pipeline import _WORKER

    key, seed = task
    ctx = _WORKER["ctx"]
    if "sweep" not in _WORKER:
        teacher, _, pruned, src = sweep_teachers(ctx, *check_sweep(ctx.cfg))
        src_model, src_masks = src.load(ctx, teacher)
        _WORKER["sweep"] = {"teacher": teacher, "pruned": {p.key: p for p in pruned}, "models": {},
                            "stats": stage_student(ctx, teacher, src_model, src_masks)}
    w = _WORKER["sweep"]
    if key == "scratch":
        model = None
    elif key == "unpruned_teacher":
        model = w["teacher"]
    else:
        if key not in w["models"]:
            w["models"] = {key: w["pruned"][key].load(ctx, w["teacher"])[0]}  # one pruned teacher held at a time
        model = w["models"][key]
    return stage_distill(ctx, key, seed, w["stats"], model)
