"""results.json and report.md: the comparison the paper is about, as estimates with 95% intervals
(ptd.report.stats); report.html is drawn by ptd.report.html from the same files."""
from __future__ import annotations

import contextlib
import errno
from html import unescape as html_unescape  # (not `import html`: the submodule ptd.report.html takes that name)
import json
import math
import os
import re
import statistics
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ptd import paths as P
from ptd.config import ARM_TABLE, CHECKPOINTS, DataConfig, RunConfig
from ptd.errors import DamagedFileError, PtdError, counted, one_line
from ptd.io import read_json_object
from ptd.report.stats import above_chance, detectable, format_estimate, hierarchical_estimate, paired_estimate, shown_difference, t_interval, zero_width
from ptd.train import checkpoint as ckpt


class _ArmLabels(Mapping):
    """{arm: label}, read from ptd.config.ARM_TABLE at each use: the labels live in that one table,
    so an arm added there is named here (and accepted by results.json's check, ARM_NAME) with no
    second edit."""

    def __getitem__(self, arm: str) -> str:
        return ARM_TABLE[arm].label

    def __iter__(self) -> Iterator[str]:
        return iter(ARM_TABLE)

    def __len__(self) -> int:
        return len(ARM_TABLE)


ARM_LABELS: Mapping[str, str] = _ArmLabels()

# What a student owes its teacher, by the kind of teacher (ptd.config.Arm.teacher), so that an arm
# is one entry in ARM_TABLE: the parts of results.json's "compute" spent before the student's own
# training, and the results.json key of that teacher. A new kind of teacher adds its entry here
# (tests/test_report.py checks every kind in ARM_TABLE has one).
COMPUTE_BEHIND = {None: (), "unpruned": ("teacher",), "pruned": ("teacher", "pruning"), "retrained": ("teacher", "control")}
TEACHER_RESULT = {"unpruned": "teacher", "pruned": "pruned_teacher", "retrained": "retrained_teacher"}
# How a sentence names each kind of teacher; a kind without an entry is "the <kind> teacher".
TEACHER_NAMES = {"unpruned": "the unpruned teacher", "pruned": "the pruned teacher", "retrained": "the control teacher"}


def teacher_name(kind: str) -> str:
    """'the pruned teacher': the teacher of kind ``kind`` (ptd.config.Arm.teacher) in a sentence."""
    return TEACHER_NAMES.get(kind, f"the {kind} teacher")


def _and(parts: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def compute_behind(arm: str) -> tuple[str, ...]:
    """The parts of results.json's "compute" behind one student of ``arm`` besides its own training."""
    return COMPUTE_BEHIND[ARM_TABLE[arm].teacher]


FEW_SEEDS = 5  # below this, a 95% t interval is wide (t = 2.78 at 5 seeds, 4.30 at 3)
# The questions the study asks, not a property of an arm, so not derived from ARM_TABLE: an arm
# added there is summarized and reported without a comparison until one is named here.
COMPARISONS = {  # key in results.json -> (arm a, arm b), estimated as a - b
    "pruned_minus_unpruned": ("pruned_teacher", "unpruned_teacher"),
    "pruned_minus_retrained": ("pruned_teacher", "retrained_teacher"),
    "pruned_minus_scratch": ("pruned_teacher", "scratch"),
    "unpruned_minus_scratch": ("unpruned_teacher", "scratch"),
    # The paper's control against the teacher it was trained on from: does the extra training
    # alone, without pruning, move the student? Not about the pruned teacher, so not in the Answer
    # (answer_markdown takes the pruned-teacher rows); shown and called with the rest (control_note).
    "retrained_minus_unpruned": ("retrained_teacher", "unpruned_teacher"),
}


def mean_std(xs: Sequence[float]) -> dict[str, Any]:
    xs = [x for x in xs if x is not None]
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def arm_summary(rows: list[dict]) -> dict[str, Any]:
    """Mean, std and the 95% t interval of one arm's mean test accuracy.

    With one teacher (rows without a ``teacher`` key, or one value of it) the interval is over the
    students. With several teacher replicates it is over the replicates' mean accuracies (n =
    teachers, df = teachers - 1), as the comparisons' are (``paired``): students distilled from one
    teacher share it, so counting them as independent would narrow the interval (3 teachers x 3
    students, teacher sd 3 points, student sd 1: 69% coverage that way, ~95% this way; tests/test_report.py).
    """
    accs = [r["test_acc"] for r in rows]
    by_teacher: dict[Any, list[float]] = {}
    for r in rows:
        by_teacher.setdefault(r.get("teacher", 0), []).append(r["test_acc"])
    over = [statistics.fmean(v) for v in by_teacher.values()] if len(by_teacher) > 1 else accs
    out = {**mean_std(accs), "seeds": sorted(r["seed"] for r in rows), "teachers": len(by_teacher),
           "ci_over": "teachers" if len(by_teacher) > 1 else "students", "ci_low": None, "ci_high": None}
    if len(over) > 1:
        _, lo, hi = t_interval(over)
        out.update(ci_low=float(lo), ci_high=float(hi))
    # results.json keeps the t interval itself in ci_low/ci_high (its width is what says how few
    # seeds there are, and ptd compare and older readers take those keys as the t interval) and
    # the one the reports show beside it, cut to the range an accuracy can take (shown_interval).
    shown = shown_interval(out)
    out.update(ci_low_clipped=shown[0] if shown else None, ci_high_clipped=shown[1] if shown else None,
               ci_clipped=bool(shown and shown[2]))
    return out


def shown_interval(sm: Mapping[str, Any]) -> tuple[float, float, bool] | None:
    """The 95% interval of an arm's mean accuracy as report.md and report.html show it: the t
    interval (``arm_summary``'s ci_low, ci_high) cut to [0, 1], and whether it was cut; None
    without an interval. With 2 seeds t is 12.7, so two students at 83.33% and 100% gave
    [-14.22, 197.55] %: a range no accuracy can take. The mean accuracy lies in [0, 1], so the
    cut interval covers it whenever the t interval does (its level is kept). Differences between
    arms (``paired``) are cut to -1..1 the same way (``stats.shown_difference``)."""
    lo, hi = sm.get("ci_low"), sm.get("ci_high")
    if lo is None or hi is None:
        return None
    a, b = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
    return a, b, (a, b) != (lo, hi)


def paired(students: list[dict], a: str, b: str) -> dict[str, Any] | None:
    """Per-seed differences a - b as an estimate with a 95% interval (see ptd.report.stats).

    Students pair on (teacher replicate, seed): the same seed gives a student the same init and
    data order in both arms. A row's teacher replicate is its ``teacher`` key (absent: replicate 0).
    With one replicate the interval is the paired t over seeds; with several, it is taken over the
    replicates' mean differences, so the spread over teachers counts.
    """
    acc = {(s.get("teacher", 0), s["seed"], s["arm"]): s["test_acc"] for s in students}
    keys = sorted({(t, sd) for (t, sd, arm) in acc if arm == a and (t, sd, b) in acc}, key=lambda k: (str(k[0]), k[1]))
    if not keys:
        return None
    diffs = [acc[(t, sd, a)] - acc[(t, sd, b)] for t, sd in keys]
    by_teacher: dict[Any, list[float]] = {}
    for (t, _), d in zip(keys, diffs):
        by_teacher.setdefault(t, []).append(d)
    out = hierarchical_estimate(by_teacher)
    out["std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    # Keyed by seed with one teacher (as before); by "t<teacher>/s<seed>" with several.
    out["per_seed"] = ({sd: d for (_, sd), d in zip(keys, diffs)} if len(by_teacher) == 1
                       else {f"t{t}/s{sd}": d for (t, sd), d in zip(keys, diffs)})
    out["wins"] = sum(d > 0 for d in diffs)
    if len(by_teacher) > 1:  # the per-teacher view beside the pooled one: each teacher's own paired t
        out["per_teacher"] = {str(t): paired_estimate(v) for t, v in by_teacher.items()}
    out["verdict"] = verdict(out, a, b)
    return out


def verdict(est: dict[str, Any], a: str, b: str) -> str:
    """One sentence: a difference is called only when its 95% interval excludes zero."""
    la, lb = ARM_LABELS[a], ARM_LABELS[b]
    text = format_estimate(est)
    if est.get("ci_low") is None:
        return f"{la} vs {lb}: {text}; one seed gives no interval, too few to call (use 5 or more seeds)"
    unit = "teacher" if est.get("teachers", 1) > 1 else "seed"
    flat = zero_width(est["ci_low"], est["ci_high"])
    if est["called"]:
        word = "better" if est["mean"] > 0 else "worse"
        if flat:  # ptd.report.stats._summary: the sign-flip test decides where the t interval has no width
            return (f"{la} is {word} than {lb}: {text}; every {unit} gave the same difference, so the t interval has no "
                    f"width, and the exact sign-flip test decides (p = {est['sign_flip_p']:.3g})")
        return f"{la} is {word} than {lb}: {text}"
    if est.get("teachers", 1) > 1:  # n counts teacher replicates: the interval is over their means
        few = (f" (too few teacher replicates for a tight interval: n counts teachers here, and "
               f"{FEW_SEEDS} or more give one)" if est["n"] < FEW_SEEDS else "")
    else:
        few = f" (too few seeds for a tight interval: {FEW_SEEDS} or more give one)" if est["n"] < FEW_SEEDS else ""
    if not flat and est.get("sd"):
        # What "not called" can rule out: a real difference as large as this is called 4 times in 5
        # at this n and this spread (stats.detectable; at 5 seeds and sd 0.5 points a real 0.5-point
        # difference is called 40% of the time: statistics audit).
        need = 100 * detectable(est["n"]) * est["sd"]
        # Past 100 points no difference between two accuracies exists: "called 4 times in 5 only from
        # about 187.84 points" read as if one might be (new-user trial, 2 seeds on a tiny dataset).
        reach = (f"a real difference is called 4 times in 5 only from about {need:.2f} points" if need <= 100 else
                 f"no real difference is called 4 times in 5 (it would take about {need:.0f} points, past the 100 a "
                 f"difference of accuracies can reach)")
        few = ((few if est.get("teachers", 1) > 1 else "") +  # "n counts teachers here" still needs saying
               f"; at {est['n']} {unit}s and this spread, {reach} (not called is not no difference)")
    if flat:
        # Every pair gave the same difference (accuracies count whole test images, so with few
        # seeds ties happen): the t interval estimates no spread, and the sign-flip test that then
        # decides cannot reach 0.05 below 6 values (2 / 2^n).
        if est["mean"] == 0:
            return f"no difference between {la} and {lb} was measured: {text}; every {unit} gave exactly zero{few}"
        p = est.get("sign_flip_p")
        return (f"no clear difference between {la} and {lb}: {text}; every {unit} gave the same difference, so the t "
                f"interval has no width and cannot decide; the exact sign-flip test, which can, needs 6 or more {unit}s "
                f"to reach 0.05" + (f" (p = {p:.3g})" if p is not None else "") + few)
    return f"no clear difference between {la} and {lb}: {text}; the interval includes zero{few}"


def losses_of(students: list[dict]) -> list[str]:
    """The distillation losses of the teacher arms' rows, in the order they first appear (the
    config's order); rows without a ``loss`` key (runs from before several losses) count as one."""
    return list(dict.fromkeys(s["loss"] for s in students if s.get("loss") is not None))


def by_loss(students: list[dict]) -> dict[str | None, list[dict]]:
    """The students as one view per loss: that loss's teacher-arm rows plus the rows without a
    loss (the scratch arm, which has no teacher and is shared by every loss). One loss or none:
    one view of every row, keyed by that loss (None when the rows name none)."""
    losses = losses_of(students)
    if len(losses) <= 1:
        return {losses[0] if losses else None: students}
    shared = [s for s in students if s.get("loss") is None]
    return {loss: shared + [s for s in students if s.get("loss") == loss] for loss in losses}


def _summarize_one(students: list[dict]) -> dict[str, Any]:
    summary = {arm: arm_summary([s for s in students if s["arm"] == arm]) for arm in ARM_TABLE if any(s["arm"] == arm for s in students)}
    comparison = {k: v for k, (a, b) in COMPARISONS.items() if (v := paired(students, a, b)) is not None}
    return {"summary": summary, "comparison": comparison}


def summarize(students: list[dict]) -> dict[str, Any]:
    """The per-arm summaries and the paired comparisons of ``students`` (result rows with arm,
    seed, test_acc and optionally loss and teacher): what results.json holds under "summary" and
    "comparison". With several distillation losses these are the first loss's (the config's
    first), and "losses" holds {loss: {"summary", "comparison"}} for every loss, each against the
    same scratch students. ``ptd report`` recomputes them from results.json's students."""
    views = {loss: _summarize_one(rows) for loss, rows in by_loss(students).items()}
    out = dict(next(iter(views.values())))
    if len(views) > 1:
        out["losses"] = views
    return out


def replicate_rows(replicates: list[dict]) -> list[dict]:
    """One row per teacher replicate: its teacher's, pruned teacher's and control's accuracy."""
    out = []
    for rep in replicates:
        p, c = rep["prune"], rep.get("control")
        out.append({"replicate": rep["replicate"], "teacher_test_acc": rep["teacher"]["test_acc"],
                    "pruned_test_acc": p["levels"][-1]["test_acc"], "sparsity": p["sparsity"],
                    "control_test_acc": c["test_acc"] if c else None})
    return out


def not_learned(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model of a run whose test accuracy is not above chance (``ptd.report.stats.above_chance``):
    teacher, pruned teacher, control and each student. Empty when the run does not record its
    test set (results from before this check)."""
    ts = r.get("test_set")
    if not ts or not ts.get("n"):
        return []
    models = [("teacher", r["teacher"].get("test_acc")), ("pruned teacher", r["pruned_teacher"].get("test_acc"))]
    if r.get("retrained_teacher"):
        models.append(("control teacher", r["retrained_teacher"].get("test_acc")))
    for s in r.get("students", []):
        loss = f", {s['loss']}" if s.get("loss") and len(r.get("distill_losses") or []) > 1 else ""
        # stage_distill sets "teacher" (the replicate) only with teacher.seeds > 1; replicate 0 is named too.
        rep = f", teacher {s['teacher']}" if s.get("teacher") is not None else ""
        models.append((f"{ARM_LABELS.get(s['arm'], s['arm'])}{loss}, seed {s['seed']}{rep}", s.get("test_acc")))
    return failures(models, ts)


def failures(models: list[tuple[str, float | None]], test_set: dict[str, Any]) -> list[dict[str, Any]]:
    """The (name, test accuracy) pairs whose accuracy is not above the test set's chance."""
    out = []
    for name, acc in models:
        if acc is None:
            continue
        chk = above_chance(acc, test_set["n"], test_set["chance"])
        if not chk["learned"]:
            out.append({"model": name, "test_acc": acc, "p_value": chk["p_value"]})
    return out


def chance_warning(bad: list[dict[str, Any]], test_set: dict[str, Any]) -> tuple[str, str, list[str]]:
    """The one wording of the warning, for markdown, HTML and logs: (title, explanation, one item
    per model that did not learn)."""
    title = f"Warning: {counted(len(bad), 'model')} did not learn."
    why = (f"Their test accuracy is not above chance ({100 * test_set['chance']:.2f}%: always the most frequent class of "
           f"the {test_set['n']:,} test images; one-sided exact binomial test at the 1% level). Comparisons that involve "
           f"them measure noise, not teaching. Check the learning rate, the schedule's length and the data.")
    return title, why, [f"{b['model']}: {100 * b['test_acc']:.2f}% (p = {b['p_value']:.2g})" for b in bad]


def chance_lines(r: dict[str, Any], bad: list[dict[str, Any]] | None = None) -> list[str]:
    """The report's warning in markdown (``bad``: a run's ``not_learned``, by default); empty when
    every model learned."""
    bad = not_learned(r) if bad is None else bad
    if not bad:
        return []
    title, why, items = chance_warning(bad, r["test_set"])
    return [f"**{title}** {why}", ""] + [f"- {i}" for i in items] + [""]


def log_not_learned(bad: list[dict[str, Any]], test_set: dict[str, Any], log, where: str) -> None:
    """One log line per model that did not learn, pointing at the report ``where``."""
    for b in bad:
        log(f"warning: {b['model']} did not learn: test acc {b['test_acc']:.4f} is not above chance "
            f"({test_set['chance']:.4f}); see {where}")


def build_results(cfg: RunConfig, teacher: dict, prune: dict, student: dict, students: list[dict],
                  control: dict | None = None, replicates: list[dict] | None = None,
                  test_set: dict[str, Any] | None = None, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json. ``teacher``/``prune``/``control``: replicate 0's (the one the student is
    derived from); ``replicates``: every replicate's results, when there are several;
    ``test_set``: ``ptd.data.base.test_set_facts`` of the test split, for the chance check;
    ``setup``: {images: {train, val, test}, device, amp_bf16} of the session that finished the run
    (``setup_sentence``)."""
    final = prune["levels"][-1]
    stats = summarize(students)
    summary = stats["summary"]
    st, te = student["student"], student["teacher"]
    compute = {
        "teacher": {k: teacher.get(k, 0) for k in ("epochs", "steps", "wall_s")},
        "pruning": {k: prune.get(k, 0) for k in ("epochs", "steps", "wall_s")},
        "control": {k: (control or {}).get(k, 0) for k in ("epochs", "steps", "wall_s")},
        "students": {arm: {k: sum(s[k] for s in students if s["arm"] == arm) for k in ("epochs", "steps", "wall_s")} for arm in summary},
        "students_n": {arm: sum(s["arm"] == arm for s in students) for arm in summary},
    }
    # Total compute behind one student of each arm (per seed): its own training plus the teachers it needs.
    compute["total_per_student"] = {
        arm: {k: sum(compute[st][k] for st in compute_behind(arm)) + compute["students"][arm][k] / max(compute["students_n"][arm], 1)
              for k in ("epochs", "steps", "wall_s")} for arm in summary}
    return {
        "name": cfg.name,
        "dataset": cfg.data.name,
        "teacher": {"arch": cfg.teacher.model.arch, "test_acc": teacher["test_acc"], "val_acc": teacher.get("val_acc"),
                    "params": te["params"], "flops": te["flops"], "latency": te.get("latency"),
                    # teacher.checkpoint: the file stage_teacher loaded it from (its compute is then 0)
                    **({"source": teacher["source"]} if teacher.get("source") else {})},
        "pruned_teacher": {"strategy": prune["strategy"], "level": prune["final_level"], "sparsity": prune["sparsity"],
                           "test_acc": final["test_acc"], "val_acc": final.get("val_acc"), "params_nonzero": final["params_nonzero"],
                           "levels": prune["levels"]},
        "student": {"spec": student["spec"], "params": st["params"], "flops": st["flops"], "latency": st.get("latency"),
                    "params_ratio": st["params"] / te["params"], "flops_ratio": st["flops"] / te["flops"],
                    "onnx_latency": student.get("onnx_latency"), "cuda_latency": student.get("cuda_latency")},
        "retrained_teacher": {"test_acc": control["test_acc"], "val_acc": control.get("val_acc"), "epochs": control["epochs"]} if control else None,
        "students": students,
        "summary": summary,
        "comparison": stats["comparison"],
        **({"losses": stats["losses"]} if "losses" in stats else {}),
        "distill_losses": list(cfg.distill.losses),
        **({"teacher_replicates": replicate_rows(replicates), "student_from_replicate": 0} if replicates else {}),
        "compute": compute,
        # The weights each accuracy is of (the report's first sentence says them).
        "weights": weights_kept(cfg.prune.retrain_checkpoint,
                                validation=cfg.data.val_fraction > 0 and ("val_acc" not in teacher or teacher["val_acc"] is not None),
                                loaded=bool(teacher.get("source")), pruned=bool(prune["final_level"])),
        **({"test_set": test_set} if test_set else {}),
        **({"setup": setup} if setup else {}),
    }


def setup_sentence(r: Mapping[str, Any]) -> str | None:
    """How many images each split held and the precision it trained in: a report said neither, so a
    demo on half the training images or bf16 autocast on one CPU and fp32 on another read alike
    (new-user audit). None for results from before it was recorded."""
    su = r.get("setup")
    if not su:
        return None
    n = su["images"]
    how = "bf16 autocast (fp32 weights)" if su.get("amp_bf16") else "fp32"
    # Which --plugin files made the models and losses: a reader of the report alone could not tell
    # (new-user trial; env.json had them).
    plugins = "".join(f" Made with --plugin {Path(str(p.get('path'))).name} (sha256 {str(p.get('sha256'))[:12]})."
                      for p in su.get("plugins") or [] if isinstance(p, dict))
    return (f"Images: {n['train']:,} training, {n['val']:,} validation, {n['test']:,} test. Trained in {how} on "
            f"{su.get('device', '?')} (the session that finished the run; env.json records every session).{plugins}")


def points(x: float | None) -> str:
    """An accuracy (a fraction) as a table cell in percentage points, 2 decimals; "n/a" for None."""
    return "n/a" if x is None else f"{100 * x:.2f}"


def _interval_cell(shown: tuple[float, float, bool] | None, fmt: Callable[[float], str], mark: str, sep: str,
                   brackets: bool) -> str:
    """A shown interval (lo, hi, cut) as a table cell, marked ``mark`` where it was cut; "n/a" for None."""
    if shown is None:
        return "n/a"
    lo, hi, cut = shown
    text = f"{fmt(lo)}{sep}{fmt(hi)}"
    return (f"[{text}]" if brackets else text) + (f" ({mark})" if cut else "")


def diff_ci_cell(e: Mapping[str, Any], sep: str = ", ", brackets: bool = True) -> str:
    """A difference's interval as a table cell, in points: ``stats.shown_difference``, marked
    "(cut)" where the t interval ran past -100..+100 (as ``arm_ci_cell`` marks an arm's)."""
    return _interval_cell(shown_difference(e), lambda x: f"{100 * x:+.2f}", "cut", sep, brackets)


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def arm_ci_cell(sm: Mapping[str, Any], sep: str = ", ", brackets: bool = True) -> str:
    """An arm's 95% interval of the mean accuracy as a table cell, in %: ``shown_interval``,
    marked "(clipped)" where the t interval ran past 0-100 %."""
    return _interval_cell(shown_interval(sm), points, "clipped", sep, brackets)


def clipped_note(summaries: Sequence[tuple[str, Mapping[str, Any]]]) -> str | None:
    """The footnote under a table of arms whose interval was cut to 0-100 % (``shown_interval``),
    naming each such arm with its t interval; None when none was cut. ``summaries``: (label, summary)."""
    cut = [(label, sm) for label, sm in summaries if (shown := shown_interval(sm)) and shown[2]]
    if not cut:
        return None
    ns = sorted({(sm.get("teachers", 1) if sm.get("ci_over") == "teachers" else sm["n"], sm.get("ci_over") == "teachers")
                 for _, sm in cut})
    few = _and([f"{n} {'teacher replicates' if over else 'seeds'}" for n, over in ns])
    raw = "; ".join(f"{label} [{points(sm['ci_low'])}, {points(sm['ci_high'])}]" for label, sm in cut)
    return (f"(clipped): the interval is clipped to 0-100 %, the range an accuracy can take; with {few} the 95% t interval "
            f"(mean ± t × standard error) runs past that range. The t interval{'s' if len(cut) > 1 else ''}: {raw}. results.json "
            "keeps both (summary.<arm>.ci_low / ci_high, the t interval; ci_low_clipped / ci_high_clipped, the one shown).")


def _md_cell(text: str) -> str:
    """Text from a file (a path) as one markdown table cell: a | would end the cell."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|")


# Which weights a model's accuracy is of (results.json "weights"; ptd.train.loop.fit's keep, or
# "loaded" for a teacher from teacher.checkpoint), as a report says it.
WEIGHTS = ("best", "last", "loaded")
WEIGHT_MODELS = {"teacher": "the teacher", "pruned_teacher": "the pruned teacher", "retrained_teacher": "the control teacher",
                 "students": "the students"}


def weights_kept(retrain_checkpoint: str, validation: bool, loaded: bool, pruned: bool) -> dict[str, str]:
    """The weights each model of a run ends on, as ptd.pipeline trains them: the teacher and the
    students with fit's keep="best", each pruning round and control round with
    prune.retrain_checkpoint; without a validation set fit keeps the last epoch for "best". A
    loaded teacher is "loaded", and so is a pruned teacher that was not pruned (level 0: the
    teacher itself)."""
    def end(keep: str) -> str:
        return keep if validation else "last"
    teacher = "loaded" if loaded else end("best")
    return {"teacher": teacher, "pruned_teacher": end(retrain_checkpoint) if pruned else teacher,
            "retrained_teacher": end(retrain_checkpoint), "students": end("best")}


def accuracy_sentence(r: Mapping[str, Any], names: Mapping[str, str] | None = None, unit: str = "run") -> str:
    """The report's one sentence on what its accuracies are: test top-1, at which weights of each
    model (results.json "weights", from the run's config). It said "at the best-validation
    checkpoint" for every run, while pruning rounds and the control end on their last epoch by
    default (prune.retrain_checkpoint: last), a run without a validation set keeps every stage's
    last epoch, and a loaded teacher was not trained at all. A sweep says it of its own models
    (names: the models it has, by weights key; unit: "sweep"), from the same weights_kept."""
    names = dict(names or WEIGHT_MODELS)
    w = r.get("weights") or {}
    src = (r.get("teacher") or {}).get("source")
    if src and w.get("teacher") is None:
        w = {**w, "teacher": "loaded"}
    models = [m for m in names if m != "retrained_teacher" or r.get("retrained_teacher")]
    if not w:
        return f"Accuracies are test top-1 (%); at which epoch's weights is not recorded for this {unit}."
    groups: dict[str, list[str]] = {}
    for m in models:
        groups.setdefault(w.get(m) or "unknown", []).append(names[m])
    if set(groups) == {"best"}:
        return "Accuracies are test top-1 (%) at the best-validation checkpoint."
    retrained = {names.get("pruned_teacher"), names.get("retrained_teacher")}
    clauses = []
    for value, group in groups.items():
        # "its" for one model named in the singular; the students and a sweep's pruned teachers are many.
        their = "its" if len(group) == 1 and not group[0].endswith("s") else "their"
        if value == "loaded":
            clauses.append(f"{_and(group)} as loaded from {src or 'a file'} (not trained in this {unit})")
        elif value == "best":
            why = " (prune.retrain_checkpoint: best)" if retrained & set(group) else ""
            clauses.append(f"{_and(group)} at {their} best-validation epoch{why}")
        elif value == "last":
            why = (f" (the {unit} has no validation set)" if w.get("students") == "last"
                   else " (prune.retrain_checkpoint: last)" if retrained & set(group) else "")
            clauses.append(f"{_and(group)} at {their} last epoch{why}")
        else:
            # A results file from before ptd recorded it (prune.retrain_checkpoint): "at weights not
            # recorded" read as garbled (new-user audit).
            clauses.append(f"{_and(group)} at an epoch this {unit} did not record (it predates prune.retrain_checkpoint)")
    return "Accuracies are test top-1 (%): " + "; ".join(clauses) + "."


def loaded_teacher_note(r: Mapping[str, Any]) -> str | None:
    """What the compute tables leave out when the teacher was loaded from a file, or None."""
    src = (r.get("teacher") or {}).get("source")
    if not src:
        return None
    return (f"The teacher was loaded from {src}, not trained in this run: its training compute is not counted (0 epochs, "
            "steps and seconds here), so the total behind every distilled arm is a lower bound (marked so).")


def lower_bound(r: Mapping[str, Any], arm: str) -> bool:
    """Whether ``arm``'s total compute leaves out a loaded teacher's training."""
    return bool((r.get("teacher") or {}).get("source")) and "teacher" in compute_behind(arm)


COMPARISON_NOTE = (
    "Each comparison is the mean of the per-seed differences (a - b, same student seed in both arms) with its "
    "95% confidence interval; a difference is called only when the interval excludes zero. Paired t: the t interval "
    "over seeds. Teacher means, t: the differences averaged within each teacher replicate, the interval over "
    "teachers, so the variance between teachers counts. Sign-flip p: the exact permutation p-value, a check that "
    "assumes no normal distribution (it cannot go below 2/2^n, 0.0625 at 5 seeds).")


def rows_called(r: Mapping[str, Any]) -> int:
    """How many paired comparisons the report shows with a call of their own: the main table's, each
    loss's with several losses, and each teacher's beside the pooled ones with replicates."""
    losses = r.get("losses") or {}
    tables = [v["comparison"] for v in losses.values()] if len(losses) > 1 else [r.get("comparison") or {}]
    return sum(len(t) + sum(len(c.get("per_teacher") or {}) for c in t.values()) for t in tables)


def scope_note(r: Mapping[str, Any]) -> str | None:
    """What a call in this report is about, and how often noise makes one (tests/test_stats.py
    measures both): with one teacher, these teachers and not another training of them; with k
    comparisons at 95% each, some row is called by noise up to k x 5% of the time."""
    comp = r.get("comparison") or {}
    if not comp:
        return None
    parts = []
    if max((c.get("teachers", 1) for c in comp.values()), default=1) < 2:
        parts.append("Every student here learns from one training of the teacher (teacher.seeds 1), so the intervals "
                     "cover the spread over student seeds, not over trainings of the teacher: a call says these teachers "
                     "teach differently, not that another training would. Where the difference a pruned teacher makes "
                     "varies between trainings as much as between seeds and is zero on average over them, a one-teacher "
                     "run still calls it 8-9% of the time at 2 seeds and half the time at 10; teacher.seeds 2 or more puts "
                     "that spread into the interval.")
    elif any(c.get("per_teacher") for c in comp.values()):
        parts.append("The rows under \"Teacher replicates\" are each about one training of the teacher, as in a one-teacher "
                     "run: where the difference a pruned teacher makes varies between trainings as much as between seeds "
                     "and is zero on average, each is called 8-9% of the time at 2 seeds and half the time at 10. Only the "
                     "pooled rows cover that spread.")
    k = rows_called(r)
    if k > 1:
        # tests/test_stats.py measures it for the 5 rows of a run with every arm, one loss and one
        # teacher (the one table of COMPARISONS); other sets of rows get the bound alone.
        measured = " (19-22% measured for these 5)" if k == len(COMPARISONS) and set(comp) == set(COMPARISONS) else ""
        parts.append(f"Each of the {k} rows is called or not at 95% on its own: under seed noise alone a given row is "
                     f"called 5% of the time, and some one of them up to {min(100, 5 * k)}% of the time{measured}.")
    parts += [note] if (note := unpaired_note(r)) else []
    return " ".join(parts) or None


def control_note(r: Mapping[str, Any]) -> str | None:
    """What the control-minus-unpruned row asks, beside the comparisons: it is the only row about
    neither the pruned teacher nor the student alone, and a reader of "pruned minus unpruned" needs
    it (a pruned teacher is also a longer-trained one). None without that row."""
    if "retrained_minus_unpruned" not in (r.get("comparison") or {}):
        return None
    return ("Retrained minus unpruned compares the students of the control (the unpruned teacher trained as many more epochs "
            "as the pruning took) with those of the unpruned teacher: whether the extra training alone, without pruning, moves "
            "the student. Where it is called, a pruned-minus-unpruned difference may be part training, not pruning; pruned "
            "minus retrained is the row that holds the training equal. It is not about the pruned teacher, so the Answer "
            "leaves it out; it is counted with every other row where the report says how often noise makes some call.")


def unpaired_note(r: Mapping[str, Any]) -> str | None:
    """Which comparisons pair fewer students than their arms hold (an arm run for more seeds than
    another, e.g. a partial ``--arm`` run): a row's mean difference is over the pairs alone, so it
    need not be the difference of the arm means shown above it."""
    summary, short = r.get("summary") or {}, []
    for key, c in (r.get("comparison") or {}).items():
        if key not in COMPARISONS:
            continue
        a, b = COMPARISONS[key]
        pairs, held = len(c.get("per_seed") or {}), [summary.get(x, {}).get("n", 0) for x in (a, b)]
        if pairs < max(held):
            short.append(f"{key.replace('_', ' ')} pairs {pairs} of its arms' {held[0]} and {held[1]} students")
    if not short:
        return None
    return ("Comparisons pair students of the same seed (and teacher) only: " + "; ".join(short) + ". A row's mean "
            "difference is over its pairs, so it need not equal the difference of the arm means above; run the "
            "missing seeds of the other arm to compare them all.")


def student_line(r: Mapping[str, Any]) -> str | None:
    """What the student costs and gains, in one sentence: the accuracy of the students distilled from
    the pruned teacher (else the first arm) against the teacher's (with teacher replicates, the
    replicates' mean: the students learned from all of them), and the student's size and speed as
    fractions of the teacher's. The figures are the tables' own; the report gave them only in
    separate tables, to be subtracted by the reader (new-user audit)."""
    summary, t, s = r.get("summary") or {}, r.get("teacher") or {}, r.get("student") or {}
    arm = "pruned_teacher" if "pruned_teacher" in summary else next(iter(summary), None)
    if arm is None or t.get("test_acc") is None or not s.get("params_ratio"):
        return None
    sm = summary[arm]
    reps = [x["teacher_test_acc"] for x in r.get("teacher_replicates") or [] if x.get("teacher_test_acc") is not None]
    teacher = statistics.fmean(reps) if len(reps) > 1 else t["test_acc"]
    whose = f"the {len(reps)} teachers' mean" if len(reps) > 1 else "the teacher's"
    label = ARM_LABELS[arm]
    who = f"The student {label}" if label.startswith("distilled") else f"The student ({label})"
    text = (f"{who} scores {points(sm['mean'])}% (mean of {counted(sm['n'], 'student')}) against {whose} {points(teacher)}% "
            f"({100 * (sm['mean'] - teacher):+.2f} points), with {s['params_ratio']:.3f}x the teacher's parameters and "
            f"{s['flops_ratio']:.3f}x its FLOPs")
    tl, sl = ((x.get("latency") or {}).get("64") or {} for x in (t, s))
    if tl.get("median_ms") and sl.get("median_ms"):
        text += ", and " + _speed_clause(_speed(tl["median_ms"], sl["median_ms"], tl.get("times_ms"), sl.get("times_ms")), "64")
    return text + "."


def _speed_clause(sp: Mapping[str, Any], batch: str) -> str:
    """The answer's words for one speedup (:func:`_speed`): a speed is claimed only where its 95%
    interval excludes 1; a record without per-run times says it has no interval (new-user trial:
    "runs 1.76x as fast" with nothing to say that 8 runs of the same pair gave 1.07-1.76x)."""
    where = "PyTorch eager, fp32, on this machine's CPU"
    x = sp["speedup"]
    if sp["call"] == "faster":
        return f"runs {x:.2f}x as fast at batch {batch} (95% interval {sp['low']:.2f}-{sp['high']:.2f}x; {where})"
    if sp["call"] == "slower":
        return (f"takes {1 / x:.2f}x the teacher's time at batch {batch} (speedup {x:.2f}x, 95% interval "
                f"{sp['low']:.2f}-{sp['high']:.2f}x; {where})")
    if sp["low"] is not None:
        return (f"was not shown faster or slower than the teacher at batch {batch}: speedup {x:.2f}x, 95% interval "
                f"{sp['low']:.2f}-{sp['high']:.2f}x, which holds 1 ({where})")
    if sp["pairs"]:
        return (f"was not shown faster or slower than the teacher at batch {batch}: speedup {x:.2f}x over {sp['pairs']} paired runs, "
                f"too few for a 95% interval ({where})")
    speed = f"runs {x:.2f}x as fast" if x >= 1 else f"takes {1 / x:.2f}x the teacher's time"
    return f"{speed} at batch {batch} by the medians (no interval was recorded; {where})"


COMPARISONS_TITLE = "Does the pruned teacher teach better?"  # a heading both reports use, and the Answer points at
ANSWER_FOOT = f"How sure each call is, and every comparison: \"{COMPARISONS_TITLE}\" below."


def answer_lines(r: Mapping[str, Any]) -> list[str]:
    """The Answer's items, for report.md's bullets and report.html's paragraphs alike: the verdicts
    on the pruned teacher (against the unpruned teacher, the control and the student alone) and the
    student's cost. Empty when there is nothing to say."""
    comp = r.get("comparison") or {}
    lines = [c["verdict"] for k, c in comp.items() if COMPARISONS.get(k, ("",))[0] == "pruned_teacher"]
    verdicts = len(lines)
    main = comp.get("pruned_minus_unpruned")
    if main and main.get("called") and pruned_higher_note(r):
        # The Answer called "pruned teaches better" while the only word that the pruned teacher had
        # trained longer and scored higher sat three sections down (new-user trial: +1.53 [+0.64,
        # +2.42] at 4 seeds from a pruned teacher 1.26 points above its unpruned one, no control arm).
        t, p = r["teacher"], r["pruned_teacher"]
        lines.insert(lines.index(main["verdict"]) + 1,
                     f"That call does not tell pruning from training longer: the pruned teacher itself scored higher than the "
                     f"unpruned one ({points(p['test_acc'])} vs {points(t['test_acc'])}) after its retraining epochs, and this run "
                     f"has no control; adding the retrained_teacher arm (distill.arms, which grows the run) separates the two.")
    if verdicts == 3:  # tests/test_stats.py: 12.8-14.1% measured, seed noise alone
        lines.append("Each call above is at 95% on its own: with no real difference anywhere, some one of these three is "
                     "called about 13% of the time.")
    losses = r.get("losses") or {}
    if len(losses) > 1 and lines:  # the top-level comparisons are the first loss's: say so, as the arms table does
        lines.insert(0, f"With distillation loss {next(iter(losses))} (the first of distill.loss; every loss's comparisons are "
                        f"in \"Per distillation loss\" below):")
    if note := worse_than_alone_note(r):
        lines.append(note)
    if note := student_line(r):
        lines.append(note)
    return lines


def answer_markdown(r: Mapping[str, Any]) -> list[str]:
    """The report's first section: :func:`answer_lines` as bullets, with the details below it."""
    lines = answer_lines(r)
    if not lines:
        return []
    return ["## Answer", "", *[f"- {x}" for x in lines], "", ANSWER_FOOT, ""]


# ---------------------------------------------------------------- pieces both reports show
# report.md and report.html say the same things (tests/test_html.py::test_the_page_says_everything_report_md_says):
# each table below is (head, rows, align: "l" or "r" per column), rendered by md_table here and by
# ptd.report.html._table; ``sep``/``brackets`` are how an interval cell is written ("[a, b]" in
# markdown, "a .. b" on the page).

Table = tuple[list[str], list[list[str]], str]


def md_table(t: Table) -> list[str]:
    head, rows, align = t
    return ([f"| {' | '.join(head)} |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
            + [f"| {' | '.join(str(c) for c in row)} |" for row in rows])


def opening_line(r: Mapping[str, Any]) -> str:
    """The report's first sentence: the dataset, which weights the accuracies are of, the setup."""
    setup = setup_sentence(r)
    return f"Dataset: {r['dataset']}. {accuracy_sentence(r)}" + (f" {setup}" if setup else "")


TEACHERS_NOTE = ("Sparsity is of the prunable (conv and linear) weights; params (nonzero) counts every parameter, "
                 "biases and norms too. The pruned teacher runs dense: unstructured zeros save no FLOPs. FLOPs are "
                 "2 x the multiply-accumulates of one image's convolutions and matrix products (torch's FlopCounterMode).")


def teachers_table(r: Mapping[str, Any], cell: Callable[[str], str] = str) -> Table:
    """The teacher, the pruned teacher and the control; ``cell`` writes a path as a cell (``_md_cell``)."""
    t, p = r["teacher"], r["pruned_teacher"]
    loaded = f", loaded from {cell(t['source'])} (not trained here)" if t.get("source") else ""
    rows = [[f"teacher ({t['arch']}){loaded}", points(t["test_acc"]), "0", f"{t['params']:,}", f"{t['flops']:,}"],
            [f"pruned teacher ({p['strategy']}, level {p['level']})", points(p["test_acc"]), f"{p['sparsity']:.4f}",
             f"{p['params_nonzero']:,}", f"{t['flops']:,} (dense)"]]
    if r.get("retrained_teacher"):
        n = r["retrained_teacher"]["epochs"]
        rows.append([f"unpruned teacher retrained {counted(n, 'more epoch')} (control)",
                     points(r["retrained_teacher"]["test_acc"]), "0", f"{t['params']:,}", f"{t['flops']:,}"])
    return ["model", "test acc %", "sparsity", "params (nonzero)", "FLOPs"], rows, "lrrrr"


LEVELS_INTRO = "Pruning levels:"


def levels_table(r: Mapping[str, Any]) -> Table | None:
    """Each pruning level's sparsity and accuracy; None with one level pruned (or none)."""
    levels = r["pruned_teacher"]["levels"]
    if len(levels) <= 2:
        return None
    return (["level", "sparsity", "val acc %", "test acc %", "epochs"],
            [[str(lv["level"]), f"{lv['sparsity']:.4f}", points(lv.get("val_acc")), points(lv["test_acc"]), str(lv.get("epochs") or 0)]
             for lv in levels], "rrrrr")


def student_table(r: Mapping[str, Any]) -> Table:
    """The student's size beside the teacher's (and the batch-1 and batch-64 eager latencies)."""
    t, s = r["teacher"], r["student"]
    return (["model", "params", "FLOPs", "latency b1 (ms)", "latency b64 (ms)"],
            [["teacher", f"{t['params']:,}", f"{t['flops']:,}", _lat(t, "1"), _lat(t, "64")],
             [f"student ({s['spec']['arch']})", f"{s['params']:,} ({s['params_ratio']:.3f}x)", f"{s['flops']:,} ({s['flops_ratio']:.3f}x)",
              _lat(s, "1"), _lat(s, "64")]], "lrrrr")


def arms_intro(r: Mapping[str, Any]) -> str | None:
    """Which distillation loss the arms table is of."""
    if len(r.get("losses") or {}) > 1:
        return f"Distillation loss {next(iter(r['losses']))} (the first of distill.loss); every loss is in \"Per distillation loss\" below."
    if r.get("distill_losses"):
        return f"Distillation loss: {r['distill_losses'][0]}."
    return None


def arms_table(r: Mapping[str, Any], students: list[dict], sep: str = ", ", brackets: bool = True) -> Table:
    """Each arm's mean accuracy, interval, spread and seeds; ``students``: the summary's (primary_students)."""
    rows = []
    for arm, sm in r["summary"].items():
        per = ", ".join(points(x["test_acc"]) for x in sorted(students, key=lambda x: x["seed"]) if x["arm"] == arm)
        rows.append([ARM_LABELS.get(arm, arm), points(sm["mean"]), arm_ci_cell(sm, sep, brackets), points(sm["std"]), str(sm["n"]), per])
    return ["arm", "mean %", "95% CI of the mean %", "std %", "seeds", "per seed %"], rows, "lrrrrl"


def pruned_higher_note(r: Mapping[str, Any]) -> str | None:
    """A pruned teacher that itself scored higher than the unpruned one, in a run without the control."""
    t, p = r["teacher"], r["pruned_teacher"]
    if p["test_acc"] is None or t["test_acc"] is None or p["test_acc"] <= t["test_acc"] or r.get("retrained_teacher"):
        return None
    return (f"Note: the pruned teacher itself scored higher on the test set than the unpruned one ({points(p['test_acc'])} vs "
            f"{points(t['test_acc'])}); its retraining is extra training. Add the `retrained_teacher` arm (distill.arms) to "
            "separate pruning from training longer.")


def comparison_table(r: Mapping[str, Any], sep: str = ", ", brackets: bool = True) -> Table:
    return (["comparison (a - b)", "mean, points", "95% CI, points", "n", "method", "called", "sign-flip p"],
            [[key.replace("_", " "), f"{100 * c['mean']:+.2f}", diff_ci_cell(c, sep, brackets), str(c["n"]), c["method"],
              "yes" if c["called"] else "no", _p(c.get("sign_flip_p"))] for key, c in r["comparison"].items()], "lrrrllr")


def verdict_lines(r: Mapping[str, Any]) -> list[str]:
    """Every comparison's verdict with its per-seed differences."""
    return [f"{c['verdict']} (per seed: {', '.join(f'{100 * v:+.2f}' for v in c['per_seed'].values())})"
            for c in r["comparison"].values()]


LOSS_INTRO = ("Every teacher arm is distilled with each loss; the student alone (no teacher) is shared by all. "
              "Same seeds in every loss, so the comparisons pair seed by seed within a loss.")


def loss_tables(r: Mapping[str, Any], sep: str = ", ", brackets: bool = True) -> tuple[Table, str | None, Table]:
    """With several losses: each loss's arms, the footnote on clipped intervals, each loss's comparisons."""
    arms = (["loss", "arm", "mean %", "95% CI of the mean %", "n"],
            [[loss, ARM_LABELS.get(arm, arm), points(sm["mean"]), arm_ci_cell(sm, sep, brackets), str(sm["n"])]
             for loss, v in r["losses"].items() for arm, sm in v["summary"].items()], "llrrr")
    note = clipped_note([(f"{loss}: {ARM_LABELS.get(a, a)}", sm) for loss, v in r["losses"].items() for a, sm in v["summary"].items()])
    comps = (["loss", "comparison (a - b)", "mean, points", "95% CI, points", "n", "method", "called"],
             [[loss, key.replace("_", " "), f"{100 * c['mean']:+.2f}", diff_ci_cell(c, sep, brackets), str(c["n"]), c["method"],
               "yes" if c["called"] else "no"] for loss, v in r["losses"].items() for key, c in v["comparison"].items()], "llrrrll")
    return arms, note, comps


def replicate_intro(r: Mapping[str, Any]) -> str:
    reps = r["teacher_replicates"]
    return (f"{len(reps)} teachers, each trained, pruned{' and control-retrained' if r.get('retrained_teacher') else ''} from its own seeds; "
            f"every arm's students are distilled from each. The student architecture comes from replicate "
            f"{r.get('student_from_replicate', 0)}'s pruned teacher and is the same for all. The tables above show replicate 0's teachers.")


REPLICATE_NOTE = ("Per teacher (paired t over that teacher's seeds) and pooled (teacher means, t: the interval over teachers, "
                  "so the variance between teachers counts; var teacher / var student: the variance components).")


def replicate_tables(r: Mapping[str, Any], sep: str = ", ", brackets: bool = True) -> tuple[Table, Table]:
    """With teacher replicates: each replicate's teachers; each comparison per teacher and pooled."""
    teachers = (["replicate", "teacher test acc %", "pruned test acc %", "sparsity", "control test acc %"],
                [[str(x["replicate"]), points(x["teacher_test_acc"]), points(x["pruned_test_acc"]), f"{x['sparsity']:.4f}",
                  points(x["control_test_acc"])] for x in r["teacher_replicates"]], "rrrrr")
    rows = []
    for key, c in r["comparison"].items():
        for t, e in (c.get("per_teacher") or {}).items():
            rows.append([key.replace("_", " "), str(t), f"{100 * e['mean']:+.2f}", diff_ci_cell(e, sep, brackets), str(e["n"]),
                         "yes" if e["called"] else "no"])
        vt, vs = c.get("var_teacher"), c.get("var_student")
        comp = "" if vt is None or vs is None else f" (var teacher {1e4 * vt:.3f}, var student {1e4 * vs:.3f} points²)"
        rows.append([key.replace("_", " "), f"pooled{comp}", f"{100 * c['mean']:+.2f}", diff_ci_cell(c, sep, brackets),
                     f"{c['n']} teachers", "yes" if c["called"] else "no"])
    return teachers, (["comparison (a - b)", "teacher", "mean, points", "95% CI, points", "n", "called"], rows, "llrrrl")


def compute_stage_table(r: Mapping[str, Any], cell: Callable[[str], str] = str) -> Table:
    """Each stage's epochs, optimizer steps and seconds, summed over its seeds."""
    c, t = r["compute"], r["teacher"]
    teacher_row = f"teacher: loaded from {cell(t['source'])}, its training not counted" if t.get("source") else "teacher"
    rows = [[teacher_row, str(c["teacher"]["epochs"]), str(c["teacher"]["steps"]), f"{c['teacher']['wall_s']:.0f}"],
            ["pruning (all levels)", str(c["pruning"]["epochs"]), str(c["pruning"]["steps"]), f"{c['pruning']['wall_s']:.0f}"]]
    if c["control"]["epochs"]:
        rows.append(["control: unpruned teacher retrained", str(c["control"]["epochs"]), str(c["control"]["steps"]),
                     f"{c['control']['wall_s']:.0f}"])
    rows += [[f"students: {ARM_LABELS.get(arm, arm)} (all seeds)", str(v["epochs"]), str(v["steps"]), f"{v['wall_s']:.0f}"]
             for arm, v in c["students"].items()]
    return ["stage", "epochs", "optimizer steps", "wall s"], rows, "lrrr"


COMPUTE_TOTAL_INTRO = "Total compute behind one student (its teachers included):"


def compute_total_table(r: Mapping[str, Any]) -> Table:
    """The compute behind one student of each arm, its teachers' included (marked where a loaded teacher's is not)."""
    return (["arm", "epochs", "optimizer steps", "wall s"],
            [[ARM_LABELS.get(arm, arm) + (" (lower bound)" if lower_bound(r, arm) else ""), f"{v['epochs']:.0f}", f"{v['steps']:.0f}",
              f"{v['wall_s']:.0f}"] for arm, v in r["compute"]["total_per_student"].items()], "lrrr")


def _lat(s: dict, b: str) -> str:
    v = ((s.get("latency") or {}).get(b) or {}).get("median_ms")
    return "n/a" if v is None else f"{v:.2f}"


def _speed(teacher_ms: float, student_ms: float, teacher_times: Any = None, student_times: Any = None) -> dict[str, Any]:
    """The speedup of one row and its reading: from paired per-run times (teacher_times[i] and
    student_times[i] ran back to back) the median ratio with its 95% interval and a call
    (ptd.measure.speed_call: "faster" / "slower" only where the interval excludes 1, else
    "unclear"); from a record without them (runs before per-run times were kept) the ratio of the
    medians with no interval, ``pairs`` 0 and call None: nothing is called from it. Also the middle
    80% of each model's runs, where the times are there."""
    from ptd.measure import speed_call, speedup_interval

    paired = (isinstance(teacher_times, list) and isinstance(student_times, list) and teacher_times
              and len(teacher_times) == len(student_times) and all(isinstance(v, (int, float)) and v > 0 for v in teacher_times + student_times))
    if not paired:
        return {"speedup": teacher_ms / student_ms, "low": None, "high": None, "pairs": 0, "call": None, "spread": None}
    iv = speedup_interval(teacher_times, student_times)
    return {**iv, "call": speed_call(iv), "spread": [_middle_80(teacher_times), _middle_80(student_times)]}


def _middle_80(times: Sequence[float]) -> tuple[float, float]:
    """10th and 90th percentile of a model's runs (ms), as ptd.measure records them."""
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[0], q[-1]


def _pairs(label: str, rec: dict, gpu: bool = False) -> list[dict]:
    """Entries of a teacher-vs-student timing record ({"batch_<b>": {"teacher_ms", "student_ms",
    "speedup", "teacher_times_ms", "student_times_ms"} or {"error"}}), by batch size; entries with
    neither are left out."""
    out = []
    for k in sorted((k for k in rec if k.startswith("batch_")), key=lambda k: int(k[6:])):
        v = rec[k]
        if "teacher_ms" in v:
            out.append({"runtime": label, "batch": k[6:], "teacher_ms": v["teacher_ms"], "student_ms": v["student_ms"], "gpu": gpu,
                        **_speed(v["teacher_ms"], v["student_ms"], v.get("teacher_times_ms"), v.get("student_times_ms"))})
        elif "error" in v:  # e.g. out of GPU memory at that batch
            out.append({"runtime": label, "batch": k[6:], "error": v["error"], "gpu": gpu})
    return out


def latency_pairs(t: dict, s: dict) -> list[dict]:
    """Teacher vs student latency per runtime and batch size, as numbers: PyTorch's eager latency on
    the CPU (the student stage's interleaved median) and, where the run recorded them, onnxruntime's
    (both models exported and timed in turn, on the same threads) and PyTorch's on the GPU the run
    trained on (``gpu`` true). Each entry has ``teacher_ms``, ``student_ms`` and :func:`_speed`'s
    keys, or ``error``."""
    out = []
    for b in sorted((s.get("latency") or {}), key=int):
        tr, sr = (t.get("latency") or {}).get(b) or {}, s["latency"][b] or {}
        tm, sm = tr.get("median_ms"), sr.get("median_ms")
        if tm and sm:
            out.append({"runtime": "PyTorch (eager)", "batch": b, "teacher_ms": tm, "student_ms": sm, "gpu": False,
                        **_speed(tm, sm, tr.get("times_ms"), sr.get("times_ms"))})
    ort = s.get("onnx_latency") or {}
    if "error" in ort:  # the model could not be exported or run there; the run went on without it
        out.append({"runtime": "onnxruntime", "batch": "-", "error": ort["error"][:80], "gpu": False})
    n = ort.get("threads")
    out += _pairs(f"onnxruntime ({counted(n, 'thread')})", ort)
    cu = s.get("cuda_latency") or {}
    out += _pairs(f"PyTorch (eager, {cu.get('gpu')})", cu, gpu=True)
    return out


LATENCY_HEAD = ["runtime", "batch", "teacher ms", "student ms", "speedup", "95% interval", "student is"]
_CALL_CELL = {"faster": "faster", "slower": "slower", "unclear": "not told apart", None: "not called"}


def latency_rows(t: dict, s: dict) -> list[list[str]]:
    """:func:`latency_pairs` as table cells (LATENCY_HEAD): runtime, batch, teacher ms, student ms,
    speedup, its 95% interval ("not recorded" for runs from before per-run times, "too few runs"
    under 6 pairs) and the call."""
    def interval(e: dict) -> str:
        if e["low"] is not None:
            return f"[{e['low']:.2f}, {e['high']:.2f}]"
        return f"too few runs ({e['pairs']})" if e["pairs"] else "not recorded"

    return [[e["runtime"], e["batch"], "n/a", "n/a", e["error"], "", ""] if "error" in e else
            [e["runtime"], e["batch"], f"{e['teacher_ms']:.2f}", f"{e['student_ms']:.2f}", f"{e['speedup']:.2f}x", interval(e),
             _CALL_CELL[e["call"]]]
            for e in latency_pairs(t, s)]


def speed_note(t: dict, s: dict) -> str | None:
    """What the latency table's speedups may be read as, in words, or None where every row is
    called faster: the rows where the student ran slower (its 95% interval below 1); the rows whose
    interval holds 1, with each model's middle 80% of runs, so the reader sees the noise that hid
    the difference; and the rows from records with no per-run times, which have no interval and
    are not called. A ratio of medians under 1 was once called "slower" on its own: on a loaded
    2-core host the same teacher and student read 0.72x to 1.92x in onnxruntime over 7 runs while
    PyTorch's runs of each model overlapped almost entirely (new-user trial)."""
    rows = [e for e in latency_pairs(t, s) if "error" not in e]
    slow = [e for e in rows if e["call"] == "slower"]
    unclear = [e for e in rows if e["call"] == "unclear"]
    bare = [e for e in rows if e["call"] is None]
    parts = []
    if slow:
        parts.append(
            "The student ran slower than its teacher here (the speedup's 95% interval is below 1): "
            + "; ".join(f"{e['runtime']} at batch {e['batch']} ({e['speedup']:.2f}x, [{e['low']:.2f}, {e['high']:.2f}])" for e in slow)
            + ". Fewer FLOPs are not less time where kernels are bound by launches, memory traffic or tile sizes"
            + ("; on a GPU, widths that are not multiples of 32 miss cuDNN's fast kernels, and student.round_to: 32 made derived "
               "ResNet-18 students 1.3-1.4x faster than their teachers at batch 1,024 where 8 gave 0.93x (round_to: auto takes 32 "
               "on a GPU where the student stays within 10% of the surviving weights)" if any(e["gpu"] for e in slow) else "")
            + "; see docs/students.md, \"Measured: are derived students fast?\".")

    def unclear_row(e: dict) -> str:
        (t10, t90), (s10, s90) = e["spread"]
        why = (f"[{e['low']:.2f}, {e['high']:.2f}]" if e["low"] is not None
               else f"{e['pairs']} paired runs, too few for a 95% interval")
        return (f"{e['runtime']} at batch {e['batch']} ({e['speedup']:.2f}x, {why}; the middle 80% of runs took "
                f"{t10:.2f}-{t90:.2f} ms (teacher) and {s10:.2f}-{s90:.2f} ms (student))")
    if unclear:
        parts.append("These runs could not tell whether the student is faster or slower than its teacher, the speedup's 95% "
                     "interval holding 1: " + "; ".join(unclear_row(e) for e in unclear)
                     + ". At this noise a difference that size is not measured; time again on an idle machine to tell.")
    if bare:
        which = "these timings" if len(bare) == len(rows) else ", ".join(f"{e['runtime']} at batch {e['batch']}" for e in bare)
        parts.append(f"No interval was recorded for {which} (the run kept only each model's median): those speedups are "
                     "ratios of medians, and none of them is called faster or slower.")
    return " ".join(parts) or None


def latency_caption(t: dict, s: dict) -> str:
    """The sentence above the latency table (report.md and report.html alike)."""
    gpu = " (the GPU rows on the GPU the run trained on)" if (s.get("cuda_latency") or {}) else ""
    return (f"Latency, teacher vs student, fp32, on this machine's CPU (env.json names it){gpu} (median ms of interleaved runs; "
            f"speedup = teacher / student, the median over rounds in which the two ran back to back, called faster or slower "
            f"only where its 95% interval excludes 1){latency_conditions(t, s)}:")


def latency_table(t: dict, s: dict) -> list[str]:
    """The markdown of :func:`latency_rows`, or nothing when no latency was measured."""
    rows = latency_rows(t, s)
    if not rows:
        return []
    note = speed_note(t, s)
    return ([latency_caption(t, s), "", "| " + " | ".join(LATENCY_HEAD) + " |", "|---|---:|---:|---:|---:|---|---|"]
            + [f"| {' | '.join(r)} |" for r in rows] + [""] + ([note, ""] if note else []))


def latency_conditions(t: Mapping[str, Any], s: Mapping[str, Any]) -> str:
    """PyTorch's thread count and, at batch 64 (the speedup the answer quotes), the range of the
    timed runs around each median: a 1.1x speedup means little where the runs spread by 10%
    (new-user audit). One maximum over every record read "within 578%" off one noisy tail (review).
    "" for records without them."""
    recs = [rec for x in (t, s) for rec in (x.get("latency") or {}).values() if isinstance(rec, dict) and rec.get("median_ms")]
    threads = sorted({rec["threads"] for rec in recs if rec.get("threads")})
    parts = [f"PyTorch on {counted('/'.join(map(str, threads)), 'thread')}"] if threads else []
    b64 = [((x.get("latency") or {}).get("64") or {}) for x in (t, s)]
    if all(rec.get("p10_ms") is not None and rec.get("p90_ms") is not None for rec in b64):
        parts.append("at batch 64 the middle 80% of runs took " + " and ".join(
            f"{rec['p10_ms']:.2f}-{rec['p90_ms']:.2f} ms ({who})" for rec, who in zip(b64, ("teacher", "student"))))
    return f"; {', '.join(parts)}" if parts else ""


def primary_students(r: dict[str, Any]) -> list[dict]:
    """The students behind r's top-level summary: with several losses, the first loss's and the
    scratch arm's; otherwise all."""
    views = by_loss(r["students"])
    return next(iter(views.values()))


def loss_markdown(r: dict[str, Any]) -> list[str]:
    """With several distillation losses: each loss's arms and comparisons."""
    if len(r.get("losses") or {}) < 2:
        return []
    arms, note, comps = loss_tables(r)
    return (["## Per distillation loss", "", LOSS_INTRO, "", *md_table(arms)] + (["", note] if note else [])
            + ["", *md_table(comps), ""])


def replicate_markdown(r: dict[str, Any]) -> list[str]:
    """With teacher replicates: each replicate's teachers, then each comparison per teacher and pooled."""
    if not r.get("teacher_replicates"):
        return []
    teachers, comps = replicate_tables(r)
    return ["## Teacher replicates", "", replicate_intro(r), "", *md_table(teachers), "", REPLICATE_NOTE, "", *md_table(comps), ""]


def replicate_interval_note(r: dict[str, Any]) -> str | None:
    """What the arms' intervals are taken over when the run has teacher replicates (arm_summary)."""
    teachers = max((sm.get("teachers", 1) for sm in r["summary"].values()), default=1)
    if teachers < 2:
        return None
    return (f"With {teachers} teacher replicates, each interval is over the replicates' mean accuracies (n = {teachers}), "
            "as the comparisons' are: students of one teacher are not independent draws.")


def worse_than_alone_note(r: dict[str, Any]) -> str | None:
    """What to try when a distilled arm is *called* worse than the student alone. Measured where it
    happens: ResNet-18 students on Fashion-MNIST with 4 distillation epochs at the paper's lr 0.1
    and T = 10 ended 10 points below the students alone, and one diverged in its first epoch (29%)
    where lr 0.05 reached 79% (docs/students.md, benchmarks/results/round_accuracy_r18_cpu). The
    paper distills for 200 epochs; a short schedule may not recover from a loss dominated by the
    teacher's soft targets. These are things to try, not a diagnosis, except one the report can
    see: a teacher less accurate than the students alone."""
    worse = [(COMPARISONS[k][0], c) for k, c in r["comparison"].items()
             if k in COMPARISONS and COMPARISONS[k][1] == "scratch" and c["called"] and c["mean"] < 0]
    if not worse:
        return None
    names = ", ".join(f"{ARM_LABELS[a]} ({100 * c['mean']:+.2f} points)" for a, c in worse)
    epochs = sorted({s["epochs"] for s in r["students"] if s["arm"] != "scratch" and s.get("epochs")})
    ep = f"{epochs[0]}" if len(epochs) == 1 else (f"{epochs[0]}-{epochs[-1]}" if epochs else "an unrecorded number of")
    # A teacher below the students alone is the plainest reason: at alpha 0.95 the student mostly
    # imitates it (ResNet-18, docs/distillation.md: pruned teacher 87.90%, students alone 89.53% at
    # 8 epochs, KD from it 3.18 points below them at equal epochs).
    alone = (r.get("summary") or {}).get("scratch", {}).get("mean")
    # By kind of teacher, once each (two arms may share one teacher): one sentence naming them all.
    # It read "...alone (47.33%); The teacher of distilled from unpruned teacher (37.00%) is...".
    kinds = list(dict.fromkeys(ARM_TABLE[a].teacher for a, _ in worse))
    teacher_acc = {k: (r.get(TEACHER_RESULT.get(k)) or {}).get("test_acc") for k in kinds}
    weaker = [(k, acc) for k, acc in teacher_acc.items() if acc is not None and alone is not None and acc < alone]
    weak = ""
    if weaker:
        who = _and([f"{teacher_name(k)} ({points(acc)}%)" for k, acc in weaker])
        one = len(weaker) == 1
        src = r["teacher"].get("source")
        # A loaded teacher is not trained by the run: teacher.optim.epochs would change nothing.
        better = (f"A better teacher is the first thing to try: the teacher was loaded from {src} (teacher.optim does not "
                  "apply to it), so train it longer where it was made, or give a better-trained one (--teacher, in a new run)."
                  if src else "A better-trained teacher (teacher.optim.epochs, in a new run) is the first thing to try.")
        weak = (f" {who[0].upper()}{who[1:]} {'is itself' if one else 'are themselves'} less accurate than the students alone "
                f"({points(alone)}%): with most of the loss on {'its' if one else 'their'} soft targets (distill.alpha) the "
                f"student learns to match a weaker model. {better}")
    return (f"Distillation made the student worse than training it alone here: {names}. Each distilled student "
            f"trained {counted(ep, 'epoch')} (the paper distills for 200).{weak} {'Also worth' if weak else 'Worth'} trying, each against "
            "the same teachers with "
            "`ptd run CONFIG --out NEW --from RUN_DIR --set KEY=VALUE` and then `ptd compare RUN_DIR NEW`: more epochs "
            "(distill.optim.epochs; the student alone in NEW trains as long, so read the arms within NEW), a lower "
            "learning rate (distill.optim.lr; a student that diverged early at 0.1 recovered at 0.05 in docs/students.md), "
            "or less weight on the teacher (distill.alpha).")


def render_markdown(r: dict[str, Any]) -> str:
    t, s = r["teacher"], r["student"]
    lines = [f"# ptd report: {r['name']}", "", opening_line(r), ""]
    lines += chance_lines(r)
    lines += answer_markdown(r)
    lines += ["## Teachers", "", *md_table(teachers_table(r, _md_cell)), "", TEACHERS_NOTE, ""]
    if levels := levels_table(r):
        lines += [LEVELS_INTRO, "", *md_table(levels), ""]
    lines += ["## Student", "", *md_table(student_table(r)), ""]
    lines += latency_table(t, s)
    lines += ["## Students: test accuracy over seeds", ""]
    if intro := arms_intro(r):
        lines += [intro, ""]
    lines += md_table(arms_table(r, primary_students(r)))
    note = clipped_note([(ARM_LABELS[a], sm) for a, sm in r["summary"].items()])
    lines += ["", note] if note else []
    note = replicate_interval_note(r)
    lines += ["", note] if note else []
    lines += ["", f"## {COMPARISONS_TITLE}", ""]
    if note := pruned_higher_note(r):
        lines += [note, ""]
    lines += [COMPARISON_NOTE, ""]
    note = scope_note(r)
    lines += [note, ""] if note else []
    lines += [*md_table(comparison_table(r)), ""]
    lines += [f"- {v}" for v in verdict_lines(r)]
    if note := control_note(r):
        lines += ["", note]
    note = worse_than_alone_note(r)
    lines += [""] + ([note, ""] if note else []) + loss_markdown(r) + replicate_markdown(r)
    lines += ["## Compute", "", *md_table(compute_stage_table(r, _md_cell))]
    note = loaded_teacher_note(r)
    lines += ["", COMPUTE_TOTAL_INTRO, ""] + ([note, ""] if note else [])
    lines += md_table(compute_total_table(r))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- checking a file before rendering
# `ptd report` renders a results.json / sweep.json it is handed. The renderers above read their keys
# without checking each, so a file that is not what ptd writes (edited, truncated by hand, from
# another tool) is checked whole first, against what build_results / build_sweep_results write,
# and refused in one line naming the key: never a KeyError half-way through, after a write.


class _Invalid(Exception):
    """``key`` (dotted: ``students[2].test_acc``) is wrong; ``kind`` names how, as Python would."""

    def __init__(self, kind: str, key: str, what: str):
        super().__init__(f'"{key}" {what}' if key else f"the top level {what}")
        self.kind = kind


Invalid = _Invalid  # what a Check raises, for the pipeline's checks of its own stage records
Check = Callable[[Any, str], None]  # raises _Invalid for a value at a key


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)  # NaN shows as NaN, a string with its quotes
    return text if len(text) <= 40 else text[:37] + "..."


def _sub(key: str, name: str | int) -> str:
    return f"{key}[{name}]" if isinstance(name, int) else (f"{key}.{name}" if key else name)


def num(lo: float | None = None, hi: float | None = None, integer: bool = False, null: bool = False) -> Check:
    """A finite number (an integer with ``integer``) in [lo, hi]; JSON true/false is no number."""
    want = "an integer" if integer else "a number"

    def check(v: Any, key: str) -> None:
        if v is None and null:
            return
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            raise _Invalid("TypeError", key, f"is {_show(v)}, not {want}")
        try:
            finite = math.isfinite(float(v))
        except OverflowError:  # an integer past any float: the renderers format as floats
            finite = False
        if not finite:
            raise _Invalid("ValueError", key, f"is {_show(v)}, not a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            where = f"in {lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
            raise _Invalid("ValueError", key, f"is {_show(v)}, not {where}")
    return check


def _flag() -> Check:
    """true or false."""
    def check(v: Any, key: str) -> None:
        if not isinstance(v, bool):
            raise _Invalid("TypeError", key, f"is {_show(v)}, not true or false")
    return check


def text(null: bool = False, among: Collection[str] | None = None) -> Check:
    """A string (one of ``among`` when given)."""
    def check(v: Any, key: str) -> None:
        if v is None and null:
            return
        if not isinstance(v, str):
            raise _Invalid("TypeError", key, f"is {_show(v)}, not a string")
        if among is not None and v not in among:
            raise _Invalid("ValueError", key, f"is {_show(v)}, not one of {', '.join(among)}")
    return check


def obj(fields: dict[str, Check], null: bool = False) -> Check:
    """A JSON object with these keys; a key written ``name?`` may be absent. Other keys are let be
    (a newer ptd may add some)."""
    def check(v: Any, key: str) -> None:
        if v is None and null:
            return
        if not isinstance(v, dict):
            raise _Invalid("TypeError", key, f"is {_show(v)}, not an object")
        for name, sub in fields.items():
            name, optional = name.rstrip("?"), name.endswith("?")
            if name in v:
                sub(v[name], _sub(key, name))
            elif not optional:
                raise _Invalid("KeyError", _sub(key, name), "is missing")
    return check


def items(each: Check, nonempty: bool = True, null: bool = False) -> Check:
    """A JSON list of ``each``; ptd never writes the lists checked here empty."""
    def check(v: Any, key: str) -> None:
        if v is None and null:
            return
        if not isinstance(v, list):
            raise _Invalid("TypeError", key, f"is {_show(v)}, not a list")
        if nonempty and not v:
            raise _Invalid("ValueError", key, "is an empty list")
        for i, x in enumerate(v):
            each(x, _sub(key, i))
    return check


def mapping(each: Check, keys: Check | None = None, null: bool = False) -> Check:
    """A JSON object keyed by names ptd chooses (arms, batch sizes), each value ``each``."""
    def check(v: Any, key: str) -> None:
        if v is None and null:
            return
        if not isinstance(v, dict):
            raise _Invalid("TypeError", key, f"is {_show(v)}, not an object")
        for k, x in v.items():
            if keys is not None:
                keys(k, _sub(key, k))
            each(x, _sub(key, k))
    return check


def _batch_key(k: str, key: str) -> None:
    if not re.fullmatch(r"[0-9]+", k):  # the latency tables sort the batch sizes as integers
        raise _Invalid("ValueError", key, "is not a batch size (an integer)")


def _timing(v: Any, key: str) -> None:
    """A teacher-vs-student timing record (onnx_latency, cuda_latency): {"batch_<b>": {"teacher_ms",
    "student_ms"} or {"error"}, ...}, or {"error"} where nothing could be timed."""
    if v is None:
        return
    obj({"error?": text()})(v, key)
    for k, row in v.items():
        if not k.startswith("batch_"):
            continue
        _batch_key(k[6:], _sub(key, k))
        obj({"teacher_ms?": num(0), "student_ms?": num(0), "error?": text(),
             "teacher_times_ms?": items(num(0)), "student_times_ms?": items(num(0))})(row, _sub(key, k))
        if "teacher_ms" in row and not (isinstance(row.get("student_ms"), (int, float)) and row["student_ms"] > 0):
            raise _Invalid("ValueError", _sub(_sub(key, k), "student_ms"), f"is {_show(row.get('student_ms'))}, not a time > 0")


ACC = num(0, 1)  # an accuracy is a fraction of the test images
AMOUNT = num(0)  # epochs, optimizer steps, seconds
COUNT = num(0, integer=True)
COST = obj({"epochs": AMOUNT, "steps": AMOUNT, "wall_s": AMOUNT})
LATENCY = mapping(obj({"median_ms?": num(0, null=True), "times_ms?": items(num(0))}, null=True), keys=_batch_key, null=True)  # per batch size
TEST_SET_FIELDS = {"n": COUNT, "chance": ACC}  # test_set_facts: the chance check's input
TEST_SET = obj(TEST_SET_FIELDS)
ARM_NAME = text(among=ARM_LABELS)  # the live view: an arm added to ARM_TABLE passes

# What the renderers of a run read from results.json (build_results writes it). "summary",
# "comparison" and "losses" are not checked: `ptd report` recomputes them from "students".
RESULTS_SCHEMA = obj({
    "name": text(), "dataset": text(),
    "teacher": obj({"arch": text(), "test_acc": ACC, "params": COUNT, "flops": COUNT, "latency?": LATENCY, "source?": text(null=True)}),
    "pruned_teacher": obj({"strategy": text(), "level": COUNT, "sparsity": ACC, "test_acc": num(0, 1, null=True),
                           "params_nonzero": COUNT,
                           "levels": items(obj({"level": COUNT, "sparsity": ACC, "test_acc": num(0, 1, null=True),
                                                "val_acc?": num(0, 1, null=True), "epochs?": num(0, null=True)}))}),
    "student": obj({"spec": obj({"arch": text()}), "params": COUNT, "flops": COUNT, "params_ratio": AMOUNT, "flops_ratio": AMOUNT,
                    "latency?": LATENCY, "onnx_latency?": _timing, "cuda_latency?": _timing}),
    "retrained_teacher?": obj({"test_acc": ACC, "epochs": AMOUNT}, null=True),
    "students": items(obj({"arm": ARM_NAME, "seed": num(integer=True), "test_acc": ACC, "loss?": text(null=True),
                           "teacher?": num(integer=True, null=True), "replicate?": num(integer=True, null=True)})),
    "distill_losses?": items(text(), nonempty=False, null=True),
    "teacher_replicates?": items(obj({"replicate": num(integer=True), "teacher_test_acc": num(0, 1, null=True),
                                      "pruned_test_acc": num(0, 1, null=True), "sparsity": ACC,
                                      "control_test_acc": num(0, 1, null=True)}), nonempty=False, null=True),
    "student_from_replicate?": num(integer=True, null=True),
    "compute": obj({"teacher": COST, "pruning": COST, "control": COST, "students": mapping(COST, keys=ARM_NAME),
                    "total_per_student": mapping(COST, keys=ARM_NAME)}),
    "test_set?": obj(TEST_SET_FIELDS, null=True),  # absent in runs from before the chance check
    "setup?": obj({"images": obj({"train": COUNT, "val": COUNT, "test": COUNT}), "device": text(),
                   "amp_bf16": _flag()}, null=True),  # absent in runs from before it was recorded
    # absent in runs from before it: `ptd report` fills it in from config.yaml where it can
    "weights?": obj({f"{m}?": text(null=True, among=WEIGHTS) for m in WEIGHT_MODELS}, null=True),
})


def validate(schema: Check, data: Any, path: Path, fix: str, what: str = "ptd results file") -> None:
    """Refuse ``data`` (the contents of ``path``) unless ``schema`` holds, in one line naming the
    key and ``fix``."""
    try:
        schema(data, "")
    except _Invalid as e:
        raise ReportError(f"{path} is not a {what} ({e.kind}: {e}); {fix}") from None


def load_report_input(path: Path, fix: str, what: str = "ptd results file") -> Any:
    """The JSON in ``path`` (results.json or sweep.json); a ReportError naming the file otherwise."""
    try:
        raw = path.read_text()
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or one_line(e)}; make it readable by this user "
                          f"(chmod u+r {path}) or {fix}") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a file that is not text, lists nested past any use
        raise ReportError(f"{path} is not a {what} ({type(e).__name__}: {one_line(e)}); {fix}") from None


# Raised by a renderer on input no check above describes: the file is still the user's, so the
# answer is the same one line, not a traceback.
RENDER_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError)


# ---------------------------------------------------------------- writing a report's files


RUN_OUTPUTS = (P.RESULTS, P.REPORT_MD, P.REPORT_HTML)  # a run's report files, in the order they are written


def check_outputs(paths: Sequence[Path]) -> None:
    """Refuse, before any file is written (and before the minutes of drawing), outputs whose
    rename into place must fail: a folder in the way, a folder this user cannot write to."""
    for path in paths:
        _check_target(path)


def _check_target(path: Path) -> None:
    again = "then run the command again"
    if path.is_dir() and not path.is_symlink():  # the rename replaces a file or a link, never a folder
        raise ReportError(f"cannot write {path}: a folder is in the way (the report writes a file there); "
                          f"move or rename that folder, {again}")
    parent = path.parent
    ids = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK, **ids):
        raise ReportError(f"cannot write {path}: this user cannot write to {parent} (permission or a read-only file system); "
                          f"make it writable (chmod u+w {parent}) or copy the run to a writable place, {again}")


def _write_fix(e: OSError, path: Path) -> str:
    again = "then run the command again"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on that disk, {again}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {path.parent} writable (chmod u+w {path.parent}) or copy the run to a writable place, {again}"
    if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return f"move away what is in the way at that path, {again}"
    return f"check that folder and its disk, {again}"


def commit_outputs(files: list[tuple[Path, Any]]) -> None:
    """Write a report's files, each already rendered in full: a dict as JSON, a str as text, bytes
    as they are. Every target is checked first; each file is then written atomically
    (ptd.train.checkpoint), so a failure leaves it whole: the files before it new, the rest as
    they were. A failure is a ReportError naming the path and the fix."""
    check_outputs([path for path, _ in files])
    for path, content in files:
        try:
            if isinstance(content, dict):
                ckpt.write_json(path, content)
            elif isinstance(content, bytes):
                ckpt.write_bytes(path, content)
            else:
                ckpt.write_text(path, content)
        except OSError as e:
            raise ReportError(f"cannot write {path}: {e.strerror or one_line(e)}; {_write_fix(e, path)}") from None


def render_report(run_dir: str | Path, results: dict[str, Any]) -> list[tuple[Path, Any]]:
    """results.json, report.md and report.html (figures embedded) of ``run_dir``, rendered in
    memory as (path, content), in the order they are written."""
    from ptd.report.html import render_run_html

    run_dir = Path(run_dir)
    md = render_markdown(results)
    page = render_run_html(run_dir, results)
    return [(run_dir / name, content) for name, content in zip(RUN_OUTPUTS, (results, md, page))]


def write_report(run_dir: str | Path, results: dict[str, Any]) -> str:
    """results.json, report.md and report.html into ``run_dir``, each rendered before the first is
    written; returns the markdown."""
    files = render_report(run_dir, results)
    commit_outputs(files)
    return files[1][1]


def _fill_onnx_latency(run_dir: Path, student: dict[str, Any]) -> None:
    """A run finished before results.json carried the deployed latency: take it from
    student/stats.json. A missing or damaged file is passed over: it only fills in a table, and
    report.html says what is wrong with the file."""
    stats_path = run_dir / P.STUDENT / P.STATS
    if student.get("onnx_latency") or not stats_path.is_file():
        return
    try:
        ort = read_json_object(stats_path).get("onnx_latency")
        _timing(ort, "onnx_latency")
    except (DamagedFileError, _Invalid):
        return
    student["onnx_latency"] = ort


def _refresh_results(run_dir: Path, results: dict[str, Any]) -> None:
    """Today's summaries and comparisons, recomputed from the students (so a run finished before a
    change to the statistics gets today's)."""
    stats = summarize(results["students"])
    if "losses" not in stats:
        results.pop("losses", None)  # derived from the students, like the summary: absent with one loss
    results.update(stats)
    _fill_onnx_latency(run_dir, results["student"])
    _fill_run_facts(run_dir, results)


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.yaml as it ran (keys added since filled in as ptd.pipeline reads an older
    run's), or None where it is missing or damaged: the report then says less, never fails."""
    from ptd.config import with_added_keys
    from ptd.io import read_yaml_mapping

    try:
        return with_added_keys(read_yaml_mapping(run_dir / P.CONFIG))
    except (DamagedFileError, OSError):
        return None


def _fill_run_facts(run_dir: Path, results: dict[str, Any]) -> None:
    """A results.json from before it recorded them: the loaded teacher's file (teacher/result.json's
    "source", else config.yaml's teacher.checkpoint) and the weights each model ends on (from
    config.yaml). What cannot be read is left out."""
    cfg = _recorded_config(run_dir)

    def section(name: str) -> dict[str, Any]:
        v = (cfg or {}).get(name)
        return v if isinstance(v, dict) else {}

    teacher = results["teacher"]
    if "source" not in teacher:
        src = None
        try:
            src = read_json_object(run_dir / P.TEACHER / P.RESULT).get("source")
        except DamagedFileError:
            pass
        src = src or section("teacher").get("checkpoint")
        if isinstance(src, str) and src:
            teacher["source"] = src
    if results.get("weights") is None and cfg is not None:
        keep = section("prune").get("retrain_checkpoint")
        vf = section("data").get("val_fraction", DataConfig.val_fraction)
        if keep in CHECKPOINTS and isinstance(vf, (int, float)):
            validation = teacher["val_acc"] is not None if "val_acc" in teacher else vf > 0
            results["weights"] = weights_kept(keep, validation, loaded=bool(teacher.get("source")),
                                              pruned=bool(results["pruned_teacher"]["level"]))


def student_key(r: dict[str, Any], s: dict[str, Any]) -> tuple[str, Any, int, int]:
    """(arm, loss, teacher replicate, seed) of student row ``s`` of results ``r``. A student with no
    teacher (the scratch arm) has no loss: None, whatever the run's losses, so two runs' scratch
    students pair. A teacher arm's row without a loss is the run's first (older results name it
    None, newer ones by name)."""
    arm = ARM_TABLE.get(s["arm"])
    if arm is not None and arm.teacher is None:
        loss = None
    else:
        loss = s.get("loss") or (r.get("distill_losses") or [None])[0]
    return s["arm"], loss, int(s.get("teacher") or s.get("replicate") or 0), int(s["seed"])


def check_students_once(r: dict[str, Any], path: Path | str, fix: str) -> None:
    """A student listed twice is a damaged file: which of the two accuracies is the student's
    cannot be told, so ``ptd report`` and ``ptd compare`` refuse it alike, naming the file."""
    seen: set = set()
    for s in r["students"]:
        k = student_key(r, s)
        if k in seen:
            raise ReportError(f"{path} lists the student of arm {k[0]}, seed {k[3]} (teacher replicate {k[2]}, loss {k[1]}) "
                              f"twice, so it is damaged; {fix}")
        seen.add(k)


_FIGURE = re.compile(r'<img src="[^"]*" alt="([^"]*)">')  # ptd.report.html._img's tag
_NOTE = re.compile(r'<p class="note">([^<]*)</p>')  # ptd.report.html._safe's note for a section it could not draw


def check_no_figure_lost(files: list[tuple[Path, Any]], folder: Path) -> None:
    """A re-render must not replace a report.html with one that draws fewer figures: training
    curves are drawn from the stage folders' metrics.jsonl, and with distill/ deleted the old
    report.html was the only copy of the student curves, which `ptd report` overwrote with a note,
    exit 0 (bad-input audit). One line naming the figures, nothing written."""
    for path, content in files:
        if path.name != P.REPORT_HTML or not isinstance(content, str) or not path.is_file():
            continue
        try:
            old = path.read_text(errors="replace")
        except OSError:
            continue  # unreadable: check_outputs/commit_outputs say what is wrong with it
        lost = [a for a in dict.fromkeys(_FIGURE.findall(old)) if a not in set(_FIGURE.findall(content))]
        if lost:
            # Why, as the new page would have said it in place of the figure (a file not in the folder, or damaged).
            why = next((html_unescape(n) for n in _NOTE.findall(content) if "not drawn" in n or "not available" in n), None)
            raise ReportError(f"{path} draws figures this re-render cannot ({'; '.join(lost)})"
                              + (f": {why.rstrip('.')}" if why else f": the stage files they come from are no longer in {folder}")
                              + "; restore them, or copy its results to a new folder and run ptd report there (nothing was written)")


def missing_results(run_dir: Path, finish: str) -> str:
    """The line for a folder without results.json: inside a run (a stage folder, teacher/ or
    distill/<arm>_seed<s>/), the run that holds it, not the advice to finish this folder as a run
    (`ptd run CONFIG --out run/teacher` would start a new run inside the old one: new-user audit)."""
    path = run_dir / P.RESULTS
    for up in list(run_dir.absolute().parents)[:3]:
        if (up / P.CONFIG).is_file():
            return f"{path} not found: {run_dir} is a folder inside the ptd run {up}, not a run; give the run itself, {up}"
    return f"{path} not found: {run_dir} is not a finished ptd run; {finish}"


def rerender(run_dir: str | Path) -> str:
    """``ptd report RUN_DIR``: recompute the summaries and comparisons from results.json's students,
    then rewrite results.json, report.md and report.html. Returns the markdown. results.json is
    checked whole first and every file rendered before any is written: a file ptd cannot report
    on, or a folder it cannot write to, changes nothing."""
    run_dir = Path(run_dir)
    path = run_dir / P.RESULTS
    if run_dir.exists() and not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file, not a run directory; give the folder a finished `ptd run` (or `ptd sweep`) wrote "
                          f"(its --out)")
    if not path.is_file():
        raise ReportError(missing_results(run_dir, f"run `ptd run CONFIG --out {run_dir}` to finish it"))
    fix = f"re-run `ptd run CONFIG --out {run_dir}` to regenerate it, or restore the file"
    # Locked from the read to the last write: locked for the writes alone, a run that grew the
    # directory while this rendered (1-2 s) had its new results.json replaced by the one read
    # before it (crash audit).
    with _locked(run_dir):
        results = load_report_input(path, fix)
        validate(RESULTS_SCHEMA, results, path, fix)
        check_students_once(results, path, fix)
        check_outputs([run_dir / name for name in RUN_OUTPUTS])
        try:
            _refresh_results(run_dir, results)
            files = render_report(run_dir, results)
        except RENDER_ERRORS as e:
            raise ReportError(f"{path} is not a ptd results file ({type(e).__name__} while rendering: {one_line(e)}); {fix}") from None
        check_no_figure_lost(files, run_dir)
        commit_outputs(files)
    return files[1][1]


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """The run directory's lock while the report reads, renders and writes its files: no ptd run or
    sweep writes beside them, and a writer temporary a killed `ptd report` left (`.results.json.<random>.tmp`)
    is garbage, removed here as a run removes it when it opens its directory."""
    if ckpt.holds_lock(run_dir):  # a caller (a run rendering its own report) already holds it: keep it held
        yield
        return
    try:
        held = ckpt.lock_dir(run_dir)
    except OSError as e:
        raise ReportError(f"{run_dir} cannot be locked ({e.strerror or one_line(e)}); give this user permission to read it") from None
    if not held:
        raise ReportError(f"{run_dir} is in use by another ptd process (it holds the directory's lock); wait for it to finish "
                          f"or stop it, then run ptd report again")
    try:
        ckpt.remove_stale_temps(run_dir)
        yield
    finally:
        ckpt.unlock_dir(run_dir)


def rerender_sweep(sweep_dir: str | Path) -> None:
    """``ptd report SWEEP_DIR``: rewrite sweep.json (today's statistics), sweep.md, its plots and
    report.html; sweep.json is checked whole and everything rendered before any file is written."""
    from ptd.report.sweep import SWEEP_OUTPUTS, SWEEP_SCHEMA, render_sweep_report, sweep_statistics

    sweep_dir = Path(sweep_dir)
    path = sweep_dir / P.SWEEP_JSON
    fix = f"re-run `ptd sweep CONFIG --out {sweep_dir}` to regenerate it, or restore the file"
    with _locked(sweep_dir):  # from the read to the last write, as rerender
        results = load_report_input(path, fix, "ptd sweep file")
        validate(SWEEP_SCHEMA, results, path, fix, "ptd sweep file")
        check_outputs([sweep_dir / name for name in SWEEP_OUTPUTS])
        try:
            sweep_statistics(results["rows"], results["baselines"])  # today's, as build_sweep_results computes them
            files = render_sweep_report(sweep_dir, results)
        except RENDER_ERRORS as e:
            raise ReportError(f"{path} is not a ptd sweep file ({type(e).__name__} while rendering: {one_line(e)}); {fix}") from None
        check_no_figure_lost(files, sweep_dir)
        commit_outputs(files)  # sweep.json, the plots, sweep.md and report.html


class ReportError(PtdError, ValueError):
    """A run directory ptd cannot report on; the one-line message names the fix."""
