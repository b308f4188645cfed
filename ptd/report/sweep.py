"""sweep.json, sweep.md and the two sweep plots: student accuracy against teacher sparsity and
against the total compute behind each student."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ptd import paths as P
from ptd.config import RunConfig
from ptd.errors import counted
from ptd.report import (ACC, AMOUNT, ARM_LABELS, ARM_NAME, COST, COUNT, TEST_SET, accuracy_sentence, chance_lines, commit_outputs, diff_ci_cell,
                        failures, items, mapping, mean_std, num, obj, paired, points, text, weights_kept)
from ptd.report.stats import t_quantile

PLOTS = ("student_acc_vs_sparsity.png", "student_acc_vs_compute.png")
SWEEP_OUTPUTS = (P.SWEEP_JSON, *PLOTS, P.SWEEP_MD, P.REPORT_HTML)  # a sweep's report files, in the order they are written
COST_KEYS = ("epochs", "steps", "wall_s")


def _cost(r: dict) -> dict[str, float]:
    return {k: float(r.get(k) or 0) for k in COST_KEYS}


def _add(*costs: dict[str, float]) -> dict[str, float]:
    return {k: round(sum(c[k] for c in costs), 3) for k in COST_KEYS}


def _own(students: list[dict]) -> dict[str, float]:
    """One student's own training: the mean over its seeds (the seeds share one schedule)."""
    n = max(len(students), 1)
    return {k: round(sum(float(s.get(k) or 0) for s in students) / n, 3) for k in COST_KEYS}


def _seed_rows(students: list[dict]) -> list[dict]:
    return [{"seed": s["seed"], "test_acc": s["test_acc"], "val_acc": s.get("val_acc"), "best_epoch": s.get("best_epoch")}
            for s in sorted(students, key=lambda s: s["seed"])]


def _vs(students: list[dict], arm: str, base: list[dict] | None, base_arm: str) -> dict | None:
    """Per-seed paired difference of these students (arm ``arm``) against the baseline arm
    ``base_arm`` (same seeds); the verdict names both arms by their labels."""
    if not base:
        return None
    both = [{**s, "arm": arm} for s in students] + [{**s, "arm": base_arm} for s in base]
    r = paired(both, arm, base_arm)
    if r is not None:
        r["per_seed"] = {str(k): v for k, v in r["per_seed"].items()}
    return r


def family_intervals(rows: list[dict], key: str) -> None:
    """Adds to each row's ``key`` comparison the sweep's k such comparisons as one family
    (``family``), so a claim like "some pruned teacher helped" holds its 5% false-positive rate
    over the whole sweep. A row's own 95% interval keeps 5% per row only: with 9 rows where no
    pruned teacher helps, at least one is called "better" ~15% of the time at 5 seeds
    (tests/test_sweep.py), and up to k x 5% in general.

    The interval (``ci_low``, ``ci_high``, ``level``) is Bonferroni's, each at 1 - 0.05/k: the k
    intervals cover their true differences together at least 95% of the time. The call
    (``called``) is Holm's step-down, which keeps the same 5% chance of any false call and calls
    every row Bonferroni calls and more where several rows differ (all 9 rows 3 sds apart at 5
    seeds: 46% -> 68% of the real rows called; tests/test_sweep.py): a row is called when its
    interval at 1 - 0.05/m excludes zero, m being the comparisons not called before it, and the
    steps go on while some row is called (``called_at``: the level of the step that called it).
    Run on the intervals and ``stats.is_called`` itself, not on separate p-values: a row is called
    at level L exactly when its own p-value (the t test's, or the sign-flip test's where every
    difference is equal) is under 1 - L, so this is Holm's procedure on those p-values, and each
    call is still an interval that excludes zero. Both hold under any dependence between the rows,
    which share the baseline's students. Needs the per-seed differences; rows without them are
    left out of k, and rows of one teacher (two sparsities on the same IMP level: the same
    students) are one comparison, called or not together."""
    from ptd.report.stats import LEVEL, is_called, snap, t_interval

    alpha = 1 - LEVEL
    have = [r for r in rows if r.get(key) and len(r[key].get("per_seed") or {}) >= 2]
    groups: dict = {}
    for r in have:
        groups.setdefault((r.get("prune_dir"), r.get("level")) if r.get("prune_dir") is not None else id(r), []).append(r)
    k = len(groups)

    values = {id(r): snap(r[key]["per_seed"].values()) for r in have}

    def at(r: dict, level: float) -> tuple[float, float, bool]:
        v = values[id(r)]
        m, lo, hi = (float(x) for x in t_interval(v, level))
        return lo, hi, is_called(m, lo, hi, v, level)

    for r in have:
        lo, hi, _ = at(r, 1 - alpha / k)
        r[key]["family"] = {"rows": k, "level": 1 - alpha / k, "ci_low": lo, "ci_high": hi, "method": "Holm",
                            "called": False, "called_at": None}
    left = dict(groups)
    while left:  # Holm's step-down: the first step is Bonferroni's; each call loosens the next
        level = 1 - alpha / len(left)
        new = [g for g, rs in left.items() if all(at(r, level)[2] for r in rs)]
        if not new:
            break
        for g in new:
            for r in left.pop(g):
                r[key]["family"].update(called=True, called_at=level)


def sweep_statistics(rows: list[dict], baselines: dict[str, dict]) -> None:
    """Fill in every statistic of sweep.json from the per-seed rows it keeps (each row's and
    baseline's ``students``): their ``student_acc``; each row's paired comparisons against the
    unpruned teacher's and the scratch students, with the sweep's family intervals; each
    baseline's against the scratch students. The one place they are computed: the sweep writes
    them (build_sweep_results) and ``ptd report`` recomputes them, and the two must agree."""
    base = {arm: b["students"] for arm, b in baselines.items()}
    for row in rows:
        row["student_acc"] = mean_std([s["test_acc"] for s in row["students"]])
        row["vs_unpruned_teacher"] = _vs(row["students"], "pruned_teacher", base.get("unpruned_teacher"), "unpruned_teacher")
        row["vs_scratch"] = _vs(row["students"], "pruned_teacher", base.get("scratch"), "scratch")
    for key in ("vs_unpruned_teacher", "vs_scratch"):
        family_intervals(rows, key)
    for arm, b in baselines.items():
        b["student_acc"] = mean_std([s["test_acc"] for s in b["students"]])
        b["vs_scratch"] = _vs(b["students"], arm, base.get("scratch"), "scratch") if arm != "scratch" else None


# The models a sweep's accuracies are of, by results "weights" key: one teacher, a pruned teacher
# per row, and the students (a sweep trains no control).
SWEEP_WEIGHT_MODELS = {"teacher": "the teacher", "pruned_teacher": "the pruned teachers", "students": "the students"}


def _weights_sentence(r: dict[str, Any], sch: dict[str, Any]) -> str:
    """Which epoch's weights the sweep's accuracies are of: the run report's sentence, from the same
    ptd.report.weights_kept. A sweep.json from before prune.retrain_checkpoint was recorded says
    nothing of the pruned teachers ("not recorded")."""
    keep = sch.get("retrain_checkpoint")
    w = weights_kept(keep or "best", validation=sch.get("validation") is not False,
                     loaded=bool(r["teacher"].get("source")), pruned=True)
    if keep is None and sch.get("validation") is not False:
        w["pruned_teacher"] = None
    return accuracy_sentence({"weights": w, "teacher": r["teacher"]}, SWEEP_WEIGHT_MODELS, unit="sweep")


def build_sweep_results(cfg: RunConfig, t_res: dict, s_stats: dict, src: Any, baselines: dict[str, list[dict]],
                        rows: list[tuple[Any, list[dict]]], session_wall_s: float = 0.0,
                        test_set: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the sweep measured, as one JSON-able dict (see docs/sweep.md for the fields)."""
    tc = _cost(t_res)
    te, st = s_stats["teacher"], s_stats["student"]
    out_rows = []
    for p, students in rows:
        pc = {k: round(v, 3) for k, v in p.cost().items()}
        own = _own(students)
        lr = p.level_row
        out_rows.append({
            "strategy": p.strategy, "target_sparsity": p.target, "sparsity": p.measured_sparsity(), "level": p.level,
            "prune_dir": str(p.prune_dir.relative_to(p.prune_dir.parents[1])),
            "teacher_test_acc": lr.get("test_acc"), "teacher_val_acc": lr.get("val_acc"),
            "students": _seed_rows(students),
            "compute": {"teacher": tc, "pruning": pc, "teacher_total": _add(tc, pc), "student": own, "total_per_student": _add(tc, pc, own)},
        })
    base_out = {}
    for arm, students in baselines.items():
        behind = tc if arm == "unpruned_teacher" else _cost({})
        own = _own(students)
        base_out[arm] = {"label": ARM_LABELS[arm], "teacher_test_acc": t_res["test_acc"] if arm == "unpruned_teacher" else None,
                         "students": _seed_rows(students),
                         "compute": {"teacher_total": behind, "student": own, "total_per_student": _add(behind, own)}}
    # From the per-seed rows just kept, as `ptd report` recomputes them from sweep.json.
    sweep_statistics(out_rows, base_out)
    # The whole sweep's training, each run counted once (IMP levels share one run).
    prune_runs = {str(p.prune_dir): _cost(p.prune_result) for p, _ in rows}
    distill_runs = {(s["arm"], s["seed"]): _cost(s) for _, ss in rows for s in ss}
    distill_runs.update({(s["arm"], s["seed"]): _cost(s) for ss in baselines.values() for s in ss})
    total = _add(tc, *prune_runs.values(), *distill_runs.values())
    derived = cfg.student.source == "derive"
    return {
        "name": cfg.name,
        "dataset": cfg.data.name,
        "train_subset": cfg.data.train_subset,
        "seeds": list(cfg.distill.seeds),
        "strategies": list(cfg.sweep.strategies),
        "sparsities": sorted(set(cfg.sweep.sparsities)),
        "schedules": {"teacher_epochs": cfg.teacher.optim.epochs, "retrain_epochs_per_level": cfg.prune.retrain.epochs,
                      "distill_epochs": cfg.distill.optim.epochs, "imp_rate": cfg.prune.rate,
                      "alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature,
                      "retrain_checkpoint": cfg.prune.retrain_checkpoint, "validation": cfg.data.val_fraction > 0},
        "teacher": {"arch": cfg.teacher.model.arch, "width": cfg.teacher.model.width, "test_acc": t_res["test_acc"],
                    "val_acc": t_res.get("val_acc"), "params": te["params"], "flops": te["flops"], "compute": tc,
                    # teacher.checkpoint: the file it was loaded from; its training is then not in the compute columns
                    **({"source": t_res["source"]} if t_res.get("source") else {})},
        "student": {"arch": s_stats["spec"]["arch"], "source": cfg.student.source, "params": st["params"], "flops": st["flops"],
                    "params_ratio": st["params"] / te["params"], "flops_ratio": st["flops"] / te["flops"],
                    "derived_from": {"strategy": src.strategy, "sparsity": src.target} if derived else None},
        "baselines": base_out,
        "rows": out_rows,
        "compute": {"sweep_total": total, "session_wall_s": round(session_wall_s, 1)},
        **({"test_set": test_set} if test_set else {}),
    }


def sweep_not_learned(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model of a sweep whose test accuracy is not above chance (as ``ptd.report.not_learned``)."""
    if not r.get("test_set", {}).get("n"):
        return []
    models = [("teacher", r["teacher"]["test_acc"])]
    for row in r["rows"]:
        at = f"{row['strategy']} teacher at sparsity {row['target_sparsity']:g}"
        models.append((at, row.get("teacher_test_acc")))
        models += [(f"distilled from the {at}, seed {x['seed']}", x["test_acc"]) for x in row["students"]]
    for b in r["baselines"].values():
        models += [(f"{b['label']}, seed {x['seed']}", x["test_acc"]) for x in b["students"]]
    return failures(models, r["test_set"])


# ---------------------------------------------------------------- markdown


def _acc(ms: dict) -> str:
    if ms.get("mean") is None:
        return "n/a"
    return f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}"


def _per_seed(students: list[dict]) -> str:
    return ", ".join(points(s["test_acc"]) for s in students)


def _diff(v: dict | None) -> str:
    if not v:
        return ""
    return f"{100 * v['mean']:+.2f} ({v['wins']}/{v['n']})"


def _ci_cell(v: dict | None) -> str:
    """A row's 95% interval and whether it is called row by row / over the whole sweep (Holm):
    sweep.md showed the mean difference and the wins alone, its intervals only in report.html
    (new-user audit)."""
    if not v or v.get("ci_low") is None:
        return "n/a"
    fam = v.get("family") or {}
    called = ("yes" if v.get("called") else "no") + " / " + ("n/a" if not fam else "yes" if fam.get("called") else "no")
    return f"{diff_ci_cell(v)}, {called}"


def _num(x: float) -> str:
    return f"{x:,.0f}"


def reading_lines(r: dict[str, Any]) -> list[str]:
    """sweep.md's Reading, as markdown list items ("- ", nested "  - "): what the sweep's numbers
    say and do not. report.html shows the same items (ptd.report.html)."""
    lines: list[str] = []
    t, n_seeds = r["teacher"], len(r["seeds"])
    # The sweep's family size (pruned teachers with a paired comparison), for the whole-sweep lines.
    k = next((v["family"]["rows"] for x in r["rows"] if (v := x["vs_unpruned_teacher"]) and v.get("family")), 0)
    un = r["baselines"].get("unpruned_teacher")
    sc = r["baselines"].get("scratch")
    if un and sc:
        v = un["vs_scratch"]
        # With its interval and call, as every other comparison here: "-14.09 (0/2) points" alone read as a
        # finding (new-user trial: 95% CI [-71.07, +42.90] at 2 seeds, not called).
        ci = (f", 95% CI [{100 * v['ci_low']:+.2f}, {100 * v['ci_high']:+.2f}], {'called' if v['called'] else 'not called'}"
              if v and v.get("ci_low") is not None and v.get("ci_high") is not None else "")
        lines.append(f"- distilled from the unpruned teacher vs the student alone: {_diff(v) or 'n/a'} points (wins/seeds){ci}.")
    if un and r["rows"]:
        def names(xs: list[dict]) -> str:
            return " (" + ", ".join(f"{x['strategy']} s{x['target_sparsity']:g}" for x in xs) + ")" if xs else ""

        better = [x for x in r["rows"] if (v := x["vs_unpruned_teacher"]) and v["called"] and v["mean"] > 0]
        fam = [x for x in r["rows"] if (v := x["vs_unpruned_teacher"]) and (f := v.get("family")) and f["called"] and v["mean"] > 0]
        # k counts pruned teachers, not rows: two sweep sparsities on one IMP level share their
        # students (family_intervals); "3 of 2" came of counting the one and the other (review).
        shared = k < sum(1 for x in r["rows"] if (v := x["vs_unpruned_teacher"]) and v.get("family"))
        once = " (rows on one IMP level share their students and count once)" if shared else ""
        if k > 1:
            fam_teachers = len({(x.get("prune_dir"), x.get("level")) for x in fam})
            # Holm's words, not Bonferroni's: the call is Holm's step-down (family_intervals), so
            # a row can be called here whose Bonferroni interval (sweep.json) includes zero.
            lines.append(f"- Pruned teachers whose student beat the unpruned teacher's, over the whole sweep: {fam_teachers} of {k}{once}"
                         f"{names(fam)}, by Holm's step-down for {k} comparisons: a row is called when its interval at 1 - 0.05/m "
                         f"excludes zero, m being the comparisons not called before it (first {100 * (1 - 0.05 / k):.2f}%, "
                         f"Bonferroni's level); the chance of any false call among them is at most 5%.")
        lines.append(f"- Pruned teachers whose student beat the unpruned teacher's, row by row (each row's own 95% CI above 0): "
                     f"{len(better)} of {len(r['rows'])} rows{names(better)}"
                     + (f"; where no pruned teacher helps, some one of {k} comparisons is called by chance up to {min(100, 5 * k)}% "
                        "of the time (Bonferroni's bound; measured 14-18% at 9 rows and 2-10 seeds), so read these one at a time."
                        if k > 1 else "."))
        best = max(r["rows"], key=lambda x: x["student_acc"]["mean"] or 0)
        lines.append(f"- Best mean student: {best['strategy']} s{best['target_sparsity']:g}, {_acc(best['student_acc'])} %, "
                     f"against {_acc(un['student_acc'])} % from the unpruned teacher"
                     + (f" (the highest of {len(r['rows'])} means: picked for being high, it tends to overstate what that row would give again)." if len(r["rows"]) > 1 else "."))
        top = max((x["student_acc"]["mean"] for x in [*r["rows"], un] if x["student_acc"]["mean"] is not None), default=None)
        if sc and top is not None and sc["student_acc"]["mean"] is not None and sc["student_acc"]["mean"] > top:
            # "Best mean student" named a distilled one while the student alone beat them all by 14 points
            # (new-user trial): the sweep then compares teachers that each made the student worse.
            lines.append(f"- The student alone (no teacher) scored {_acc(sc['student_acc'])} %, above every distilled student's mean (by "
                         f"means, not a call): where distillation makes the student worse whatever the teacher, the rows above rank "
                         f"how much each teacher hurt, not which teaches better; more distillation epochs, a lower distillation lr or "
                         f"less weight on the teacher (distill.optim.epochs, distill.optim.lr, distill.alpha) are what to try first.")
    stronger = [x for x in r["rows"] if x["teacher_test_acc"] is not None and x["teacher_test_acc"] > t["test_acc"]]
    if stronger:
        lines.append(f"- {len(stronger)} of {len(r['rows'])} pruned teachers themselves scored higher on the test set than the unpruned teacher "
                     f"({points(t['test_acc'])} %): their retraining is also extra training. A student gain from such a teacher "
                     "cannot be credited to sparsity alone; a longer-trained dense teacher is the control that would separate the two.")
    if n_seeds < 2:
        lines.append("- One seed: no interval, so nothing above is called; more seeds (distill.seeds) give intervals.")
    elif n_seeds < 3:
        # Not "no claim is made": the rows above are called or not by their intervals, which at 2
        # seeds have 1 degree of freedom (t = 12.7), so only large, consistent differences pass.
        # The family column at 2 seeds: Holm's first step is Bonferroni's interval, t_{1 - 0.05/(2k)}
        # with 1 degree of freedom (114.6 for 9 rows), and no later step is taken unless it calls,
        # so over the whole sweep almost nothing is called (0.00-0.07% of null sweeps: statistics audit).
        fam = (f", and the whole-sweep calls (Holm) start at intervals with t = {float(t_quantile(1, 1 - 0.05 / k)):.1f}, so they "
               f"call almost nothing" if k > 1 else "")
        lines.append(f"- Only {n_seeds} seeds: each interval above has 1 degree of freedom (t = 12.7){fam}; only a large, "
                     f"consistent difference is called.")
    else:
        lines.append("- Verdicts (a difference is called only when the 95% CI of the per-seed differences excludes 0):")
        for x in r["rows"]:
            if x["vs_unpruned_teacher"]:
                lines.append(f"  - {x['strategy']} s{x['target_sparsity']:g}: {x['vs_unpruned_teacher']['verdict']}")
    tot = r["compute"]["sweep_total"]
    lines += [f"- Whole sweep: {counted(_num(tot['epochs']), 'training epoch')}, {counted(_num(tot['steps']), 'optimizer step')}, "
              f"{_num(tot['wall_s'])} s of training wall time (evaluation excluded); this invocation took {r['compute']['session_wall_s']:.0f} s (finished stages are skipped)."]
    return lines


def render_sweep_markdown(r: dict[str, Any], plots: bool = True) -> str:
    t, s, sch = r["teacher"], r["student"], r["schedules"]
    n_seeds = len(r["seeds"])
    src = s["derived_from"]
    warn = chance_lines(r, sweep_not_learned(r))
    lines = [f"# ptd sweep: {r['name']}", "", *warn,
             f"Dataset {r['dataset']}" + (f" (train_subset {r['train_subset']})" if r.get("train_subset") else "") +
             f". Teacher {t['arch']} (width {t['width']:g}, {t['params']:,} params), "
             + (f"loaded from {t['source']}, not trained in this sweep: its training is in no compute column, so every "
                f"total behind a distilled student is a lower bound. " if t.get("source") else f"trained {counted(sch['teacher_epochs'], 'epoch')}. ") +
             f"Student {s['arch']}, {s['params']:,} params ({s['params_ratio']:.3f}x the teacher), "
             + (f"derived from the {src['strategy']} teacher at sparsity {src['sparsity']:g}" if src else "named in the config")
             + "; every teacher is distilled into this same student. "
             f"Retraining {counted(sch['retrain_epochs_per_level'], 'epoch')} per pruning level "
             f"(IMP rate {sch['imp_rate']:g}), distillation {counted(sch['distill_epochs'], 'epoch')} (alpha {sch['alpha']:g}, T {sch['temperature']:g}). "
             + _weights_sentence(r, sch) +
             f" ± is the std over {counted(n_seeds, 'student seed')} "
             f"({', '.join(map(str, r['seeds']))}).", ""]

    lines += ["## Teachers", "",
              "| teacher | target | sparsity | level | teacher test acc % | teacher + pruning epochs | steps | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|",
              f"| unpruned | 0 | 0 | 0 | {points(t['test_acc'])} | {_num(t['compute']['epochs'])} | {_num(t['compute']['steps'])} | {_num(t['compute']['wall_s'])} |"]
    for row in r["rows"]:
        c = row["compute"]["teacher_total"]
        lines.append(f"| {row['strategy']} | {row['target_sparsity']:g} | {row['sparsity']:.4f} | {row['level']} | {points(row['teacher_test_acc'])} "
                     f"| {_num(c['epochs'])} | {_num(c['steps'])} | {_num(c['wall_s'])} |")
    lines += ["", "IMP levels are counted cumulatively: the teacher at level n paid for rounds 1..n.", ""]

    lines += ["## Students", "",
              "Δ: mean per-seed difference to the KD-from-unpruned-teacher student, in points (seeds where the pruned teacher's student won / seeds), "
              "with its 95% interval and whether it is called row by row (its own interval excludes zero) / over the whole sweep "
              "(by Holm's step-down over the sweep's pruned teachers; see \"Reading\"). "
              "Total: compute behind one student (teacher + pruning + its own distillation).", "",
              "| teacher | sparsity | student test acc % (mean ± std) | per seed % | Δ vs unpruned KD | 95% CI, called: row / sweep | total epochs | total steps | total wall s |",
              "|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for arm, b in r["baselines"].items():
        c = b["compute"]["total_per_student"]
        lines.append(f"| {b['label']} | {'0' if arm == 'unpruned_teacher' else '-'} | {_acc(b['student_acc'])} | {_per_seed(b['students'])} | | "
                     f"| {_num(c['epochs'])} | {_num(c['steps'])} | {_num(c['wall_s'])} |")
    for row in r["rows"]:
        c = row["compute"]["total_per_student"]
        v = row["vs_unpruned_teacher"]
        lines.append(f"| {row['strategy']} s{row['target_sparsity']:g} | {row['sparsity']:.4f} | {_acc(row['student_acc'])} | {_per_seed(row['students'])} "
                     f"| {_diff(v)} | {_ci_cell(v) if v else ''} | {_num(c['epochs'])} | {_num(c['steps'])} | {_num(c['wall_s'])} |")
    lines.append("")

    strategies = r["strategies"]
    if len(strategies) > 1:
        lines += ["## Same sparsity, different pruning", "",
                  "Student test acc % (mean ± std) and, in brackets, total epochs behind one student.", "",
                  "| target sparsity | " + " | ".join(strategies) + " |", "|---:|" + "---:|" * len(strategies)]
        for sp in r["sparsities"]:
            cells = []
            for stg in strategies:
                row = next((x for x in r["rows"] if x["strategy"] == stg and abs(x["target_sparsity"] - sp) < 1e-9), None)
                cells.append("" if row is None else f"{_acc(row['student_acc'])} [{_num(row['compute']['total_per_student']['epochs'])}]")
            lines.append(f"| {sp:g} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Reading", "", *reading_lines(r), ""]
    if plots:
        lines += ["## Plots", "", f"![student accuracy vs teacher sparsity]({PLOTS[0]})", "", f"![student accuracy vs total compute]({PLOTS[1]})", ""]
    return "\n".join(lines)


def render_sweep_report(run_dir: str | Path, results: dict[str, Any]) -> list[tuple[Path, Any]]:
    """sweep.json, the two plots, sweep.md and report.html of ``run_dir``, rendered in memory as
    (path, content), in the order they are written."""
    from ptd.report.html import render_sweep_html
    from ptd.report.plots import plot_acc_vs_compute, plot_acc_vs_sparsity

    run_dir = Path(run_dir)
    pngs = []
    for plot in (plot_acc_vs_sparsity, plot_acc_vs_compute):
        buf = io.BytesIO()
        plot(results, buf)
        pngs.append(buf.getvalue())
    contents = (results, *pngs, render_sweep_markdown(results), render_sweep_html(run_dir, results))
    return [(run_dir / name, content) for name, content in zip(SWEEP_OUTPUTS, contents)]


def write_sweep_report(run_dir: str | Path, results: dict[str, Any]) -> str:
    """sweep.json, sweep.md, the plots and report.html into ``run_dir``, all rendered before the
    first is written; returns the markdown."""
    files = render_sweep_report(run_dir, results)
    commit_outputs(files)
    return next(c for p, c in files if p.name == P.SWEEP_MD)


# What the sweep's renderers read from sweep.json (build_sweep_results writes it); the paired
# comparisons and student_acc are not checked: `ptd report` recomputes them from the students.
_SEEDS = items(obj({"seed": num(integer=True), "test_acc": ACC}))
SWEEP_SCHEMA = obj({
    "name": text(), "dataset": text(), "train_subset?": num(0, integer=True, null=True),
    "seeds": items(num(integer=True)), "strategies": items(text()), "sparsities": items(ACC),
    "schedules": obj({**{k: AMOUNT for k in ("teacher_epochs", "retrain_epochs_per_level", "distill_epochs", "imp_rate", "alpha",
                                             "temperature")},
                      "retrain_checkpoint?": text(null=True, among=("best", "last"))}),  # absent in sweeps from before it
    "teacher": obj({"arch": text(), "width": AMOUNT, "test_acc": ACC, "params": COUNT, "compute": COST, "source?": text(null=True)}),
    "student": obj({"arch": text(), "params": COUNT, "params_ratio": AMOUNT,
                    "derived_from": obj({"strategy": text(), "sparsity": ACC}, null=True)}),
    "baselines": mapping(obj({"label": text(), "students": _SEEDS, "compute": obj({"total_per_student": COST})}), keys=ARM_NAME),
    "rows": items(obj({"strategy": text(), "target_sparsity": ACC, "sparsity": ACC, "level": COUNT,
                       "teacher_test_acc": num(0, 1, null=True), "students": _SEEDS,
                       "compute": obj({"teacher_total": COST, "total_per_student": COST})})),
    "compute": obj({"sweep_total": COST, "session_wall_s": AMOUNT}),
    "test_set?": TEST_SET,
})
