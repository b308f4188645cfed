"""``ptd compare RUN_A RUN_B``: the students of two finished runs, paired by seed.

The question it answers is one a single run cannot: what does a change to the student side
(another ``student.round_to``, a named student, another loss setting) do to accuracy, students of
the same arm and seed side by side. Two runs made with ``--from`` share their teacher and pruned
teacher, so the difference is the change alone. The same statistics as the report: per-seed
differences (B minus A), their mean and 95% paired-t interval, called only when the interval
excludes 0 (``ptd.report.stats``; false-positive rate 5% under pure seed noise). Runs with several
teacher replicates (teacher.seeds > 1) are estimated over the teachers' mean differences, as the
report does (``hierarchical_estimate``): students of one teacher share its luck.

Students are partners when arm, distillation loss, teacher replicate and seed are the same; the
runs must have been tested on the same test set. Students without a partner (a run grown to more
seeds or arms than the other) are named below the table, and so are the config.yaml keys the two
runs differ in (the change a ``--from`` run tried, and anything else beside it). Reads only.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ptd import paths as P
from ptd.report import (ARM_LABELS, RESULTS_SCHEMA, ReportError, _recorded_config, check_students_once, load_report_input,
                        missing_results, student_key, validate)
from ptd.report.stats import format_estimate, hierarchical_estimate, zero_width


def load_finished(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's results.json, checked as ``ptd report`` checks it; one-line ReportError otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / P.RESULTS
    if run_dir.exists() and not run_dir.is_dir():
        raise ReportError(f"{run_dir} is a file, not a run directory; give the folder a finished `ptd run` wrote "
                          f"(the one holding {P.RESULTS})")
    if not path.is_file() and (run_dir / P.SWEEP_JSON).is_file():
        raise ReportError(f"{run_dir} is a sweep, not a run: ptd compare takes two run directories (`ptd run --out`); "
                          f"a sweep's own comparison of its teachers is its {P.SWEEP_MD} (`ptd report {run_dir}`)")
    if not path.is_file():
        raise ReportError(missing_results(run_dir, f"finish it (`ptd run CONFIG --out {run_dir}`) or give a finished run's directory"))
    fix = f"re-run `ptd run CONFIG --out {run_dir}` to regenerate it, or restore the file"
    results = load_report_input(path, fix)
    validate(RESULTS_SCHEMA, results, path, fix)
    check_students_once(results, path, fix)
    return results


Key = tuple[str, "str | None", int, int]  # (arm, loss, teacher replicate, seed)


def _keyed(r: dict[str, Any]) -> dict[Key, float]:
    """{(arm, loss, teacher replicate, seed): test accuracy} (``student_key``); load_finished has
    refused a file that lists a student twice."""
    out: dict[Key, float] = {}
    for s in r["students"]:
        k = student_key(r, s)
        out[k] = s["test_acc"]
    return out


def compare_runs(a: dict[str, Any], b: dict[str, Any], a_name: str = "A", b_name: str = "B") -> list[dict[str, Any]]:
    """One row per (arm, loss) the two runs share: n paired seeds, each run's mean accuracy, and
    the paired estimate of B minus A. ReportError when they share no student or were tested on
    different test sets (a difference would then be the data's)."""
    ta, tb = a.get("test_set"), b.get("test_set")
    if a.get("dataset") != b.get("dataset") or (ta and tb and ta != tb):
        raise ReportError(f"{a_name} and {b_name} were tested on different data ({a.get('dataset')} {ta or ''} against "
                          f"{b.get('dataset')} {tb or ''}); compare runs of the same dataset and test set")
    for r, name in ((a, a_name), (b, b_name)):  # also for results not read by load_finished
        check_students_once(r, name, "re-run `ptd run CONFIG --out RUN_DIR` to regenerate it, or restore the file")
    sa, sb = _keyed(a), _keyed(b)
    groups: dict[tuple[str, str | None], list[Key]] = {}  # (arm, loss) -> the students both runs have
    for k in sorted(set(sa) & set(sb), key=lambda k: (k[0], k[1] or "", k[2], k[3])):
        groups.setdefault(k[:2], []).append(k)
    if not groups:
        raise ReportError(f"no student of {a_name} has a partner in {b_name} (the same arm, loss and seed): "
                          f"{a_name} has {sorted({k[0] for k in sa})} seeds {sorted({k[3] for k in sa})}, {b_name} has "
                          f"{sorted({k[0] for k in sb})} seeds {sorted({k[3] for k in sb})}; grow one run with the "
                          f"other's distill.arms and distill.seeds")
    rows = []
    order = list(ARM_LABELS)
    for (arm, loss), keys in sorted(groups.items(), key=lambda g: (order.index(g[0][0]) if g[0][0] in order else len(order), g[0][1] or "")):
        by_t: dict[int, list[float]] = {}  # teacher replicate -> B minus A per seed
        for k in keys:
            by_t.setdefault(k[2], []).append(sb[k] - sa[k])
        rows.append({"arm": arm, "loss": loss, "n": len(keys), "teachers": len(by_t), "seeds": len({k[3] for k in keys}),
                     "a_mean": statistics.fmean(sa[k] for k in keys), "b_mean": statistics.fmean(sb[k] for k in keys),
                     "b_minus_a": hierarchical_estimate(by_t)})
    return rows


def unpaired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Key]]:
    """The students of each run with no partner in the other ({"A": [...], "B": [...]}, sorted):
    the rows are over the pairs alone, so a run grown to more seeds or arms than the other has
    students no row counts, and the reader must be told which."""
    sa, sb = set(_keyed(a)), set(_keyed(b))
    order = list(ARM_LABELS)

    def key(k: Key) -> tuple:
        return (order.index(k[0]) if k[0] in order else len(order), k[0], k[1] or "", k[2], k[3])
    return {"A": sorted(sa - sb, key=key), "B": sorted(sb - sa, key=key)}


def _unpaired_line(left: dict[str, list[Key]], losses: set[str | None], a_name: str, b_name: str) -> str | None:
    """One sentence naming every unpaired student by arm and seed (and by loss where the runs'
    teacher arms used more than one, ``losses``; by teacher replicate where one is not 0)."""
    parts = []
    for side, name in (("A", a_name), ("B", b_name)):
        groups: dict[tuple[str, str | None, int], list[int]] = {}
        for arm, loss, t, seed in left[side]:
            groups.setdefault((arm, loss, t), []).append(seed)
        several_t = any(t for _, _, t in groups)
        named = []
        for (arm, loss, t), seeds in groups.items():
            what = ARM_LABELS.get(arm, arm) + (f" ({loss})" if len(losses) > 1 and loss and arm != "scratch" else "")
            where = f" of teacher {t}" if several_t else ""
            named.append(f"{what}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}{where}")
        if named:
            parts.append(f"in {side} ({name}) with no partner in {'B' if side == 'A' else 'A'}: " + "; ".join(named))
    if not parts:
        return None
    return ("Left out of every row (no student of the same arm, loss, teacher replicate and seed in the other run): "
            + "; ".join(parts) + ". Grow the other run with those distill.arms, distill.seeds (and distill.loss) to pair them.")


def _flat(m: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: value}; lists and scalars are values, an empty mapping has
    no keys (``options: {}`` and no options at all set nothing alike)."""
    if not isinstance(m, dict):
        return {prefix: m}
    out: dict[str, Any] = {}
    for k, v in m.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(a_cfg: dict[str, Any], b_cfg: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, A's value, B's value) for every config key whose values differ, ``name`` aside
    (it names the run, not what it did); a key one config lacks has the value ``MISSING`` there."""
    fa, fb = _flat(a_cfg), _flat(b_cfg)
    return [(k, fa.get(k, MISSING), fb.get(k, MISSING)) for k in sorted(set(fa) | set(fb))
            if k != "name" and fa.get(k, MISSING) != fb.get(k, MISSING)]


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


MISSING = _Missing()


def _value(v: Any) -> str:
    """A config value as YAML writes it in a flow (0.5, null, [0, 1], vgg11)."""
    if v is MISSING:
        return repr(v)
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10 ** 6).strip()
    return text.removesuffix("...").strip()


def config_line(a_dir: str | Path, b_dir: str | Path) -> str:
    """What the runs' config.yaml files (as ptd reads them, keys added since filled in) differ in:
    the change a ``--from`` run was made to try, and anything else that differs beside it."""
    cfgs = [(_recorded_config(Path(d)), side) for d, side in ((a_dir, "A"), (b_dir, "B"))]
    lacking = [side for cfg, side in cfgs if cfg is None]
    if lacking:
        return (f"Config: not compared, {' and '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no readable "
                f"{P.CONFIG}.")
    diff = config_differences(cfgs[0][0], cfgs[1][0])
    if not diff:
        return f"Config: the runs' {P.CONFIG} files differ in no key but name."
    return ("Config keys that differ (A, then B): "
            + "; ".join(f"{k}: {_value(va)} in A, {_value(vb)} in B" for k, va, vb in diff) + ".")


def _student(r: dict[str, Any]) -> str:
    st = r["student"]
    plan = st["spec"].get("plan")
    widths = ", ".join(str(w) for w in plan if w != "M") if isinstance(plan, list) else st["spec"]["arch"]
    return f"{st['params']:,} parameters, {st['flops']:,} FLOPs ({widths})"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_comparison(rows: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str,
                      config: str | None = None) -> str:
    """The markdown ``ptd compare`` prints: what each run's student is (and ``config``, the line of
    :func:`config_line`), one row per arm, then what the rows leave out and how to read them."""
    lines = [f"A: {a_name}: student {_student(a)}; teacher {_pct(a['teacher']['test_acc'])}, "
             f"pruned teacher {_pct(a['pruned_teacher']['test_acc'])}",
             f"B: {b_name}: student {_student(b)}; teacher {_pct(b['teacher']['test_acc'])}, "
             f"pruned teacher {_pct(b['pruned_teacher']['test_acc'])}",
             *([config] if config else []),
             "",
             "| arm | teachers | seeds | A % | B % | B minus A | called |",
             "|---|---:|---:|---:|---:|---|---|"]
    several = len({r["loss"] for r in rows if r["arm"] != "scratch"}) > 1  # name the loss only where it tells rows apart
    for r in rows:
        e = r["b_minus_a"]
        name = ARM_LABELS.get(r["arm"], r["arm"]) + (f" ({r['loss']})" if several and r["loss"] and r["arm"] != "scratch" else "")
        called = ("yes: B higher" if e["direction"] > 0 else "yes: B lower") if e["called"] else "no"
        lines.append(f"| {name} | {r['teachers']} | {r['seeds']} | {100 * r['a_mean']:.2f} | {100 * r['b_mean']:.2f} | "
                     f"{format_estimate(e)} | {called} |")
    k = len(rows)
    lines += ["", "Paired by arm, loss, teacher replicate and seed; called only when the 95% interval excludes 0 "
                  "(false-positive rate 5% per row when the runs' students differ by seed noise alone"
              + (f"; that some one of these {k} rows is called, up to {min(100, 5 * k)}%" if k > 1 else "") + ")."]
    losses = {k[1] for r in (a, b) for k in _keyed(r) if k[0] != "scratch"}
    if note := _unpaired_line(unpaired(a, b), losses, a_name, b_name):
        lines.append(note)
    # Told apart by their test accuracy: two trainings that score alike to the last image are not
    # told apart here (the run directories' weights are not read).
    differ = [x for x in ("teacher", "pruned_teacher") if (a.get(x) or {}).get("test_acc") != (b.get(x) or {}).get("test_acc")]
    if differ and not any(r["teachers"] > 1 for r in rows):
        # One teacher each, and not the same one (another machine, seed or config trained it): the
        # rows' intervals cover the students' seed noise, not the spread between teacher trainings,
        # so a call can be these two teachers' difference (measured: the same config on a CPU and an
        # H100, teachers 90.35% and 90.79%, gave a called control row).
        label = {"teacher": "teacher", "pruned_teacher": "pruned teacher"}
        names = " and ".join(f"{label[x]}s" for x in differ)
        accs = "; ".join(f"{label[x]} {_pct(a[x]['test_acc'])} in A, {_pct(b[x]['test_acc'])} in B" for x in differ)
        lines.append(f"The runs' {names} differ ({accs}): a teacher arm's row compares students of two different "
                     f"teachers, and its interval covers seed noise only, not how much another training of the teacher "
                     f"would move it; a call there may be the teachers' difference (teacher.seeds 2 or more in both runs "
                     f"puts that spread into the interval).")
    if any(r["teachers"] > 1 for r in rows):
        lines.append("With several teachers, n counts teachers: the interval is over each teacher's mean difference "
                     "(its students share its luck, so they are not independent).")
    if any(zero_width(r["b_minus_a"]["ci_low"], r["b_minus_a"]["ci_high"]) for r in rows):
        lines.append("An interval of no width (every seed gave the same difference, as identical students do) cannot "
                     "decide: such a row is called only by the exact sign-flip test (p below 0.05, which takes 6 or more "
                     "seeds), and never when the difference is zero.")
    if any(r["b_minus_a"]["ci_low"] is None for r in rows):
        lines.append("One seed (or one teacher's mean) gives no interval: grow both runs with more distill.seeds.")
    return "\n".join(lines)
