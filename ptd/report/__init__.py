"""results.json and report.md: the comparison the paper is about, with its spread over seeds."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from ptd.config import ARMS, RunConfig
from ptd.train import checkpoint as ckpt

ARM_LABELS = {
    "scratch": "student alone (no teacher)",
    "unpruned_teacher": "KD from unpruned teacher",
    "pruned_teacher": "KD from pruned teacher",
    "retrained_teacher": "KD from unpruned teacher retrained as long (control)",
}


def mean_std(xs: Sequence[float]) -> dict[str, Any]:
    xs = [x for x in xs if x is not None]
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def paired(students: list[dict], a: str, b: str) -> dict[str, Any] | None:
    """Per-seed differences a - b (same seed = same student init and data order in both arms)."""
    acc = {(s["arm"], s["seed"]): s["test_acc"] for s in students}
    seeds = sorted({s["seed"] for s in students if (a, s["seed"]) in acc and (b, s["seed"]) in acc})
    if not seeds:
        return None
    diffs = [acc[(a, s)] - acc[(b, s)] for s in seeds]
    out = mean_std(diffs)
    out["per_seed"] = dict(zip(seeds, diffs))
    out["wins"] = sum(d > 0 for d in diffs)
    out["verdict"] = verdict(diffs, a, b)
    return out


def verdict(diffs: Sequence[float], a: str, b: str) -> str:
    """A deliberately cautious reading: a difference counts only if every seed agrees in sign and
    the mean is over two standard errors from zero with at least 3 seeds."""
    n = len(diffs)
    m = statistics.fmean(diffs)
    pts = f"{100 * m:+.2f} points"
    if n < 3:
        return f"{ARM_LABELS[a]} vs {ARM_LABELS[b]}: {pts} over {n} seed(s); too few seeds to call (use 3 or more)"
    se = statistics.stdev(diffs) / math.sqrt(n)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if same_sign and abs(m) > 2 * se:
        word = "better" if m > 0 else "worse"
        return f"{ARM_LABELS[a]} is {word} than {ARM_LABELS[b]}: {pts} (± {100 * se:.2f} s.e.), consistent over {n} seeds"
    return f"no clear difference between {ARM_LABELS[a]} and {ARM_LABELS[b]}: {pts} (± {100 * se:.2f} s.e.) over {n} seeds"


def build_results(cfg: RunConfig, teacher: dict, prune: dict, student: dict, students: list[dict],
                  control: dict | None = None) -> dict[str, Any]:
    final = prune["levels"][-1]
    summary = {arm: {**mean_std([s["test_acc"] for s in students if s["arm"] == arm]), "seeds": sorted(s["seed"] for s in students if s["arm"] == arm)}
               for arm in ARMS if any(s["arm"] == arm for s in students)}
    st, te = student["student"], student["teacher"]
    compute = {
        "teacher": {k: teacher.get(k, 0) for k in ("epochs", "steps", "wall_s")},
        "pruning": {k: prune.get(k, 0) for k in ("epochs", "steps", "wall_s")},
        "control": {k: (control or {}).get(k, 0) for k in ("epochs", "steps", "wall_s")},
        "students": {arm: {k: sum(s[k] for s in students if s["arm"] == arm) for k in ("epochs", "steps", "wall_s")} for arm in summary},
    }
    # Total compute behind one student of each arm (per seed): its own training plus the teachers it needs.
    behind = {"scratch": [], "unpruned_teacher": ["teacher"], "pruned_teacher": ["teacher", "pruning"],
              "retrained_teacher": ["teacher", "control"]}
    compute["total_per_student"] = {
        arm: {k: sum(compute[st][k] for st in behind[arm]) + compute["students"][arm][k] / max(summary[arm]["n"], 1)
              for k in ("epochs", "steps", "wall_s")} for arm in summary}
    return {
        "name": cfg.name,
        "dataset": cfg.data.name,
        "teacher": {"arch": cfg.teacher.model.arch, "test_acc": teacher["test_acc"], "val_acc": teacher.get("val_acc"),
                    "params": te["params"], "flops": te["flops"], "latency": te.get("latency")},
        "pruned_teacher": {"strategy": prune["strategy"], "level": prune["final_level"], "sparsity": prune["sparsity"],
                           "test_acc": final["test_acc"], "val_acc": final.get("val_acc"), "params_nonzero": final["params_nonzero"],
                           "levels": prune["levels"]},
        "student": {"spec": student["spec"], "params": st["params"], "flops": st["flops"], "latency": st.get("latency"),
                    "params_ratio": st["params"] / te["params"], "flops_ratio": st["flops"] / te["flops"]},
        "retrained_teacher": {"test_acc": control["test_acc"], "val_acc": control.get("val_acc"), "epochs": control["epochs"]} if control else None,
        "students": students,
        "summary": summary,
        "comparison": {k: v for k, v in {
            "pruned_minus_unpruned": paired(students, "pruned_teacher", "unpruned_teacher"),
            "pruned_minus_retrained": paired(students, "pruned_teacher", "retrained_teacher"),
            "pruned_minus_scratch": paired(students, "pruned_teacher", "scratch"),
            "unpruned_minus_scratch": paired(students, "unpruned_teacher", "scratch"),
        }.items() if v is not None},
        "compute": compute,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _lat(s: dict, b: str) -> str:
    v = ((s.get("latency") or {}).get(b) or {}).get("median_ms")
    return "n/a" if v is None else f"{v:.2f}"


def render_markdown(r: dict[str, Any]) -> str:
    t, p, s = r["teacher"], r["pruned_teacher"], r["student"]
    lines = [f"# ptd report: {r['name']}", "", f"Dataset: {r['dataset']}. Accuracies are test top-1 (%) at the best-validation checkpoint.", ""]
    lines += ["## Teachers", "", "| model | test acc % | sparsity | params (nonzero) | FLOPs |", "|---|---:|---:|---:|---:|",
              f"| teacher ({t['arch']}) | {_pct(t['test_acc'])} | 0 | {t['params']:,} | {t['flops']:,} |",
              f"| pruned teacher ({p['strategy']}, level {p['level']}) | {_pct(p['test_acc'])} | {p['sparsity']:.4f} | {p['params_nonzero']:,} | |"]
    if r.get("retrained_teacher"):
        lines.append(f"| unpruned teacher retrained {r['retrained_teacher']['epochs']} more epochs (control) | {_pct(r['retrained_teacher']['test_acc'])} | 0 | {t['params']:,} | |")
    lines.append("")
    if len(p["levels"]) > 2:
        lines += ["Pruning levels:", "", "| level | sparsity | val acc % | test acc % | epochs |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {lv['level']} | {lv['sparsity']:.4f} | {_pct(lv.get('val_acc'))} | {_pct(lv['test_acc'])} | {lv.get('epochs') or 0} |" for lv in p["levels"]]
        lines.append("")
    lines += ["## Student", "", "| model | params | FLOPs | latency b1 (ms) | latency b64 (ms) |", "|---|---:|---:|---:|---:|",
              f"| teacher | {t['params']:,} | {t['flops']:,} | {_lat(t, '1')} | {_lat(t, '64')} |",
              f"| student ({s['spec']['arch']}) | {s['params']:,} ({s['params_ratio']:.3f}x) | {s['flops']:,} ({s['flops_ratio']:.3f}x) | {_lat(s, '1')} | {_lat(s, '64')} |", ""]
    lines += ["## Students: test accuracy over seeds", "", "| arm | mean % | std % | seeds | per seed % |", "|---|---:|---:|---:|---|"]
    for arm, sm in r["summary"].items():
        per = ", ".join(_pct(x["test_acc"]) for x in sorted(r["students"], key=lambda x: x["seed"]) if x["arm"] == arm)
        lines.append(f"| {ARM_LABELS[arm]} | {_pct(sm['mean'])} | {_pct(sm['std'])} | {sm['n']} | {per} |")
    lines += ["", "## Does the pruned teacher teach better?", ""]
    if p["test_acc"] is not None and p["test_acc"] > t["test_acc"] and not r.get("retrained_teacher"):
        lines += [f"Note: the pruned teacher is itself more accurate than the unpruned one ({_pct(p['test_acc'])} vs {_pct(t['test_acc'])}); "
                  "its retraining is extra training. Add the `retrained_teacher` arm (distill.arms) to separate pruning from training longer.", ""]
    for key, c in r["comparison"].items():
        lines.append(f"- {c['verdict']} (per seed: {', '.join(f'{100 * v:+.2f}' for v in c['per_seed'].values())})")
    c = r["compute"]
    lines += ["", "## Compute", "", "| stage | epochs | optimizer steps | wall s |", "|---|---:|---:|---:|",
              f"| teacher | {c['teacher']['epochs']} | {c['teacher']['steps']} | {c['teacher']['wall_s']:.0f} |",
              f"| pruning (all levels) | {c['pruning']['epochs']} | {c['pruning']['steps']} | {c['pruning']['wall_s']:.0f} |"]
    if c["control"]["epochs"]:
        lines.append(f"| control: unpruned teacher retrained | {c['control']['epochs']} | {c['control']['steps']} | {c['control']['wall_s']:.0f} |")
    for arm, v in c["students"].items():
        lines.append(f"| students: {ARM_LABELS[arm]} (all seeds) | {v['epochs']} | {v['steps']} | {v['wall_s']:.0f} |")
    lines += ["", "Total compute behind one student (its teachers included):", "", "| arm | epochs | optimizer steps | wall s |", "|---|---:|---:|---:|"]
    for arm, v in c["total_per_student"].items():
        lines.append(f"| {ARM_LABELS[arm]} | {v['epochs']:.0f} | {v['steps']:.0f} | {v['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, results: dict[str, Any]) -> str:
    run_dir = Path(run_dir)
    ckpt.write_json(run_dir / "results.json", results)
    md = render_markdown(results)
    ckpt.write_text(run_dir / "report.md", md)
    return md
