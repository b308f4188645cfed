"""report.html: one self-contained page per run (and per sweep), drawn from the run directory's files.

Every figure is a PNG embedded as a base64 data URI, and the style sheet is inline, so the file
can be mailed or archived alone. What it reads (all optional except results.json / sweep.json):

    results.json                         arms, students, comparisons, compute (ptd.report)
    <stage>/**/metrics.jsonl             one JSON row per epoch: training curves of every stage
    prune/level_<k>/sparsity.json        per-layer sparsity of the final pruned teacher
    student/stats.json                   teacher vs student widths per layer, latencies

A missing file leaves its section out with a one-line note, never an error: an old or partial run
still renders.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ptd import paths as P
from ptd.errors import DamagedFileError, counted
from ptd.io import read_json_object
from ptd.report import (ANSWER_FOOT, ARM_LABELS, COMPARISON_NOTE, COMPARISONS_TITLE, COMPUTE_TOTAL_INTRO, LEVELS_INTRO, LOSS_INTRO, REPLICATE_NOTE,
                        TEACHERS_NOTE, Table, answer_lines, arms_intro, arms_table, chance_warning, clipped_note, comparison_table,
                        compute_behind, compute_stage_table, compute_total_table, control_note, latency_rows, levels_table, loaded_teacher_note,
                        loss_tables, not_learned, opening_line, points, primary_students, pruned_higher_note, replicate_interval_note,
                        replicate_intro, replicate_tables, scope_note, shown_interval, student_table, summarize, teachers_table,
                        verdict_lines, worse_than_alone_note)
from ptd.report.stats import format_estimate, shown_difference
from ptd.report import LATENCY_HEAD, latency_caption, speed_note  # the latency table's words, as report.md's

ARM_COLORS = {"scratch": "#444444", "unpruned_teacher": "#1f77b4", "pruned_teacher": "#d62728", "retrained_teacher": "#2ca02c"}
SEED_STYLES = ("-", "--", ":", "-.")
# Loop bookkeeping columns of metrics.jsonl that are not curves worth a panel.
_NOT_CURVES = {"epoch", "best", "steps", "wall_s", "lr", "train_loss", "val_loss", "train_acc", "val_acc"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0} .note{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
.answer{border-left:5px solid #888;background:#f7f7f7;padding:.6em 1em;margin:1em 0}
.answer.yes{border-color:#2a7} .answer.no{border-color:#c80}
.answer p{margin:.3em 0} img{max-width:100%;height:auto;display:block;margin:.4em 0}
"""


# ---------------------------------------------------------------- helpers


def _figure(w: float = 10.0, h: float = 3.4, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, cols, i + 1) for i in range(cols)]


def png_data_uri(fig) -> str:
    """The figure as a base64 PNG data URI (no file on disk)."""
    buf = io.BytesIO()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[Any]], left: int | str = 1) -> str:
    """An HTML table; the first ``left`` columns are text (left-aligned), the rest numbers; or
    ``left`` "l"/"r" per column, as ptd.report's shared tables give it."""
    def cell(tag: str, i: int, v: Any) -> str:
        text = left[i] == "l" if isinstance(left, str) else i < left
        return f'<{tag}{" class=l" if text else ""}>{_esc(v)}</{tag}>'
    out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run: the rows before it still count
            if isinstance(row, dict):  # ptd writes one object per line; anything else is not a row
                rows.append(row)
    return rows


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _shared(t: Table) -> str:
    """One of ptd.report's tables (the ones report.md shows too) as HTML."""
    head, rows, align = t
    return _table(head, rows, align)


def _para(text: str | None, cls: str = "") -> str:
    """A paragraph of report text, or nothing for None."""
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{_esc(text)}</p>" if text else ""


def _section(title: str, body: str) -> str:
    return f"<h2>{_esc(title)}</h2>\n{body}\n"


def _safe(build: Callable[[], str], what: str) -> str:
    """A section whose inputs are missing or malformed becomes a note, not a failed report."""
    try:
        return build()
    except FileNotFoundError as e:  # a copy of a run's results without its stage folders (benchmarks/results/*)
        return f'<p class="note">{_esc(what)}: not drawn, {_esc(e.filename)} is not in this folder.</p>'
    except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError, ArithmeticError) as e:
        return f'<p class="note">{_esc(what)}: not available ({type(e).__name__}: {_esc(e)}).</p>'


# ---------------------------------------------------------------- figures


def _rows_figure(n_rows: int):
    """A row plot (one row per arm or comparison) with a narrow text column at its right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 1.6 + 0.55 * n_rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 2, width_ratios=[3.2, 1.0])
    ax, num = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
    for a in (ax, num):
        a.set_ylim(n_rows - 0.5, -0.5)
    num.set_axis_off()
    return fig, ax, num


def _limit_to_data(ax, num, points: list[float], intervals: list[tuple], lo: float | None = None, hi: float | None = None,
                   signed: bool = False) -> None:
    """x limits around the data points (padded), not around intervals that can be 100s of points
    wide at 2 seeds (those run off the edge, caps hidden); each row's mean and interval are
    written in the text column ``num``."""
    if points:
        a, b = min(points), max(points)
        pad = max(0.15 * (b - a), 1.0)
        a, b = a - pad, b + pad
        ax.set_xlim(a if lo is None else max(a, lo), b if hi is None else min(b, hi))
    sign = "+" if signed else ""
    num.text(0.04, -0.5, "mean  [95% CI]", ha="left", va="bottom", fontsize=8, color="0.35")
    for i, (low, high, m, *mark) in enumerate(intervals):  # mark: a word after the interval ("clipped")
        txt = f"{100 * m:{sign}.2f}" + ("" if low is None else f"  [{100 * low:{sign}.2f}, {100 * high:{sign}.2f}]") + "".join(mark)
        num.text(0.04, i, txt, ha="left", va="center", fontsize=8.5)


def plot_arms(r: dict[str, Any]) -> str:
    """Student test accuracy per arm: every seed's point, the mean and its 95% interval."""
    arms = list(r["summary"])
    fig, ax, num = _rows_figure(len(arms))
    for i, arm in enumerate(arms):
        sm = r["summary"][arm]
        accs = sorted((s["seed"], s["test_acc"]) for s in r["students"] if s["arm"] == arm)
        n = len(accs)
        # Points spread vertically a little so equal accuracies stay visible (fixed, not random).
        ys = [i + 0.18 * ((k - (n - 1) / 2) / max(n - 1, 1)) for k in range(n)]
        color = ARM_COLORS.get(arm, "tab:purple")
        ax.scatter([100 * a for _, a in accs], ys, s=22, color=color, alpha=0.7, zorder=3)
        if (shown := shown_interval(sm)) is not None:  # cut to 0-100 %, as the tables show it
            lo, hi, _ = shown
            ax.errorbar([100 * sm["mean"]], [i], xerr=[[100 * (sm["mean"] - lo)], [100 * (hi - sm["mean"])]],
                        fmt="D", color="black", capsize=5, markersize=6, zorder=4)
        else:
            ax.plot([100 * sm["mean"]], [i], "D", color="black", zorder=4)
    for key, label, style in (("teacher", "teacher", "--"), ("pruned_teacher", "pruned teacher", ":"), ("retrained_teacher", "control teacher", "-.")):
        t = r.get(key)
        if t and t.get("test_acc") is not None:
            ax.axvline(100 * t["test_acc"], color="0.5", linestyle=style, linewidth=1, label=f"{label}: {points(t['test_acc'])}")
    pts = [100 * s["test_acc"] for s in r["students"] if s["arm"] in r["summary"]]
    pts += [100 * t["test_acc"] for k in ("teacher", "pruned_teacher", "retrained_teacher") if (t := r.get(k)) and t.get("test_acc") is not None]
    shown = [shown_interval(r["summary"][a]) or (None, None, False) for a in arms]
    _limit_to_data(ax, num, pts, [(lo, hi, r["summary"][a]["mean"], " clipped" if cut else "") for a, (lo, hi, cut) in zip(arms, shown)],
                   lo=0, hi=100)
    ax.set_yticks(range(len(arms)), [ARM_LABELS.get(a, a).replace(" retrained as long", "\nretrained as long") for a in arms], fontsize=8.5)
    ax.set_xlabel("student test accuracy (%); dots: seeds; diamond and bar: mean and 95% CI")
    ax.grid(True, axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles), frameon=False,
                  title="the teachers' own test accuracy", title_fontsize=7.5)
    return png_data_uri(fig)


def plot_comparisons(r: dict[str, Any]) -> str:
    """Each paired comparison: the per-seed differences, the mean and its 95% interval, zero marked."""
    items = list(r["comparison"].items())
    fig, ax, num = _rows_figure(len(items))
    for i, (key, c) in enumerate(items):
        diffs = list(c["per_seed"].values())
        n = len(diffs)
        ys = [i + 0.18 * ((k - (n - 1) / 2) / max(n - 1, 1)) for k in range(n)]
        ax.scatter([100 * d for d in diffs], ys, s=18, color="0.55", zorder=3)
        color = ("#2a7" if c["mean"] > 0 else "#c33") if c.get("called") else "black"
        shown = shown_difference(c)  # cut to -100..+100 points, as the tables show it
        if shown is not None:
            ax.errorbar([100 * c["mean"]], [i], xerr=[[100 * (c["mean"] - shown[0])], [100 * (shown[1] - c["mean"])]],
                        fmt="o", color=color, capsize=5, markersize=6, zorder=4)
        else:
            ax.plot([100 * c["mean"]], [i], "o", color=color, zorder=4)
    ax.axvline(0, color="black", linewidth=0.8)
    _limit_to_data(ax, num, [0.0] + [100 * d for _, c in items for d in c["per_seed"].values()],
                   [(*(shown_difference(c) or (None, None))[:2], c["mean"]) for _, c in items], signed=True)
    ax.set_yticks(range(len(items)), [k.replace("_", " ") for k, _ in items], fontsize=8.5)
    ax.set_xlabel("difference in student test accuracy (points, a - b); grey: seeds; bar: 95% CI (colored when it excludes 0)")
    ax.grid(True, axis="x", alpha=0.3)
    return png_data_uri(fig)


NO_STAGE_DIRS = ("No training curves: this folder holds the run's results without its stage folders (teacher/, prune/, "
                 "distill/, ...); render the report in the run directory itself to draw them.")


def stage_curves(run_dir: Path, replicate: int = 0) -> dict[str, list[tuple[str, list[dict]]]]:
    """metrics.jsonl files of teacher replicate ``replicate`` (0: the run directory's own stages;
    k: those under teachers/r<k>/), grouped by stage directory (teacher, prune, control,
    distill, ...), each as (path relative to the run, rows) in natural order."""
    root = P.replicate_root(run_dir, replicate)
    out: dict[str, list[tuple[str, list[dict]]]] = {}
    for p in sorted(root.rglob("metrics.jsonl"), key=_natural):
        rel = p.parent.relative_to(root)
        if not rel.parts or (replicate == 0 and rel.parts[0] == P.REPLICATES):
            continue  # replicate 0 does not own the other replicates' stages
        rows = read_jsonl(p)
        if rows:
            out.setdefault(rel.parts[0], []).append((str(p.parent.relative_to(run_dir)), rows))
    return out


def _extra_keys(runs: list[tuple[str, list[dict]]]) -> list[str]:
    keys: list[str] = []
    for _, rows in runs:
        for row in rows:
            for k, v in row.items():
                if k not in _NOT_CURVES and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    return keys[:4]  # loss terms and the like; more would make the panels unreadable


def plot_curves(runs: list[tuple[str, list[dict]]], style: Callable[[str], dict], xlabel: str = "epoch") -> str:
    """Loss, validation accuracy and learning rate per epoch (plus up to 4 logged extras, e.g. loss
    terms or sparsity), one line per run, styled by ``style(run name)``."""
    extras = _extra_keys(runs)
    cols = 3 + len(extras)
    fig, axes = _figure(min(4.0 * cols, 16), 3.3, cols)
    labelled: set[str] = set()
    for name, rows in runs:
        st = style(name)
        lab = st.pop("label", name)
        show = lab not in labelled
        labelled.add(lab)
        xs = [int(r["epoch"]) for r in rows]
        kw = dict(marker="." if len(rows) < 30 else None, linewidth=1.2, **st)
        axes[0].plot(xs, [r.get("train_loss") for r in rows], label=lab if show else None, **kw)
        if any(r.get("val_loss") is not None for r in rows):
            axes[0].plot(xs, [r.get("val_loss") for r in rows], alpha=0.5, **{**kw, "linestyle": ":"})
        if any(r.get("val_acc") is not None for r in rows):
            axes[1].plot(xs, [100 * r["val_acc"] if r.get("val_acc") is not None else None for r in rows], **kw)
        axes[2].plot(xs, [r.get("lr") for r in rows], **kw)
        for ax, k in zip(axes[3:], extras):
            if any(k in r for r in rows):
                ax.plot(xs, [r.get(k) for r in rows], **kw)
    titles = ["loss (solid: train, dotted: val)", "validation accuracy (%)", "learning rate"] + extras
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7.5)
    axes[0].legend(fontsize=7, loc="best")
    return png_data_uri(fig)


def _teacher_style(name: str) -> dict:
    top = name.split("/")[0]
    return {"teacher": {"color": "#1f77b4", "label": "teacher"}, "prune": {"color": "#d62728", "label": "pruning (levels in turn)"},
            "control": {"color": "#2ca02c", "label": "control (rounds in turn)"}}.get(top, {"color": "0.4", "label": top})


def _student_style(name: str) -> dict:
    m = re.match(r"(?:.*/)?(?P<arm>[a-z_]+?)(?:-(?P<loss>[a-z0-9_]+))?_seed(?P<seed>\d+)$", name)
    if not m:
        return {"color": "0.4", "label": name}
    arm, seed = m["arm"], int(m["seed"])
    return {"color": ARM_COLORS.get(arm, "tab:purple"), "linestyle": SEED_STYLES[seed % len(SEED_STYLES)],
            "label": ARM_LABELS.get(arm, arm)}


def plot_layer_sparsity(layers: list[dict]) -> str:
    names = [l["layer"].removesuffix(".weight") for l in layers]
    fig, (ax,) = _figure(10, 0.8 + 0.26 * len(names))
    ax.barh(range(len(names)), [100 * l["sparsity"] for l in layers], color="#d62728", alpha=0.8)
    for i, l in enumerate(layers):
        ax.text(100 * l["sparsity"] + 0.5, i, f"{100 * l['sparsity']:.1f}% of {l['total']:,}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7.5)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, 110)
    ax.set_xlabel("weights pruned in the layer (%)")
    ax.grid(True, axis="x", alpha=0.3)
    return png_data_uri(fig)


def plot_widths(layers: list[dict]) -> str:
    names = [l["name"] for l in layers]
    fig, (ax,) = _figure(10, 0.8 + 0.3 * len(names))
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], [l["teacher_width"] for l in layers], height=0.4, color="#1f77b4", label="teacher")
    ax.barh([y + 0.2 for y in ys], [l["width"] for l in layers], height=0.4, color="#ff7f0e", label="student")
    ax.set_yticks(list(ys), names, fontsize=7.5)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("output channels / features of the layer")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return png_data_uri(fig)


def plot_compute(r: dict[str, Any], stats: dict | None) -> str:
    """Epochs behind one student per arm, split by where they were spent; CPU latency per model."""
    c = r["compute"]
    arms = list(c["total_per_student"])
    models = [("teacher", "teacher"), ("pruned_teacher", "pruned teacher\n(dense kernels)"), ("student", "student")]
    lat: dict[str, dict[str, float]] = {}
    for key, label in models:
        src = (stats or {}).get(key) or r.get(key) or {}
        for b, v in (src.get("latency") or {}).items():
            if v and v.get("median_ms") is not None and "timed_as" not in v:  # not timed: the teacher's own figure
                lat.setdefault(b, {})[label] = v["median_ms"]
    fig, axes = _figure(12, 0.9 + 0.5 * max(len(arms), 3), 1 + len(lat))
    ax = axes[0]
    parts = [("teacher", "#1f77b4"), ("pruning", "#d62728"), ("control", "#2ca02c")]
    left = [0.0] * len(arms)
    for part, color in parts:
        vals = [float(c[part]["epochs"]) if part in compute_behind(a) else 0.0 for a in arms]
        if any(vals):
            ax.barh(range(len(arms)), vals, left=left, color=color, label=part)
            left = [x + v for x, v in zip(left, vals)]
    own = [float(c["students"][a]["epochs"]) / max(r["summary"][a]["n"], 1) for a in arms]
    ax.barh(range(len(arms)), own, left=left, color="#999999", label="the student's own")
    ax.set_yticks(range(len(arms)), [ARM_LABELS.get(a, a).replace(" retrained as long", "\nretrained as long") for a in arms], fontsize=7.5)
    ax.set_ylim(len(arms) - 0.5, -0.5)
    ax.set_xlabel("training epochs behind one student" + (" (the loaded teacher's own training not counted)"
                                                           if r["teacher"].get("source") else ""))
    ax.legend(fontsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    for ax2, (b, d) in zip(axes[1:], sorted(lat.items(), key=lambda kv: int(kv[0]))):
        labels = [lab for _, lab in models if lab in d]
        ax2.barh(range(len(labels)), [d[l] for l in labels], color=["#1f77b4", "#d62728", "#ff7f0e"][: len(labels)])
        for i, l in enumerate(labels):
            ax2.text(d[l], i, f" {d[l]:.2f}", va="center", fontsize=7.5)
        ax2.set_yticks(range(len(labels)), labels, fontsize=7.5)
        ax2.set_ylim(len(labels) - 0.5, -0.5)
        ax2.set_xlim(0, 1.25 * max(d.values()))
        ax2.set_xlabel(f"CPU latency, batch {b}: median ms")
        ax2.grid(True, axis="x", alpha=0.3)
    return png_data_uri(fig)


# ---------------------------------------------------------------- pages


def _answer(r: dict[str, Any]) -> str:
    """report.md's Answer (``answer_lines``), the main verdict in bold."""
    comp = r.get("comparison", {})
    main = comp.get("pruned_minus_unpruned")
    cls = "yes" if main and main.get("called") else "no"
    items = answer_lines(r)
    lines = [f"<p><b>{_esc(x)}</b></p>" if main and x == main["verdict"] else _para(x) for x in items]
    if not lines:
        lines = ["<p>No paired comparison: the run has fewer than two arms with a common seed.</p>"]
    return f'<div class="answer {cls}">' + "".join(lines) + "</div>" + (_para(ANSWER_FOOT, "sub") if items else "")


def _page(title: str, sub: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n<h1>{_esc(title)}</h1>\n"
            f'<p class="sub">{_esc(sub)}</p>\n{body}</body></html>\n')


def render_run_html(run_dir: str | Path, results: dict[str, Any] | None = None) -> str:
    """The page for one run; ``results`` defaults to the run's results.json."""
    run_dir = Path(run_dir)
    r = results if results is not None else json.loads((run_dir / "results.json").read_text())
    if any("method" not in c for c in r.get("comparison", {}).values()) or any("ci_low" not in a for a in r.get("summary", {}).values()):
        r = {**r, **summarize(r["students"])}  # a results.json from before the interval statistics
    t, p = r["teacher"], r["pruned_teacher"]
    n_seeds = max((sm["n"] for sm in r["summary"].values()), default=0)
    body = [_section("Answer", _answer(r))]
    bad = not_learned(r)
    if bad:
        title, why, items = chance_warning(bad, r["test_set"])
        body.insert(0, f'<div class="answer no"><p><b>{_esc(title)}</b> {_esc(why)}</p><ul>'
                       + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul></div>")
    several = len(r.get("losses") or {}) > 1
    r_all, r = r, {**r, "students": primary_students(r)}  # the top-level summary's students (first loss)

    # In report.md's order: the replicates' note says "the tables above show replicate 0's teachers".
    def teachers() -> str:
        levels = levels_table(r)
        return (_shared(teachers_table(r)) + _para(TEACHERS_NOTE, "note")
                + (_para(LEVELS_INTRO) + _shared(levels) if levels else ""))
    body.append(_section("Teachers", _safe(teachers, "teachers")))
    body.append(_section("Student", _safe(lambda: _shared(student_table(r)), "student")))

    def arms() -> str:
        cut = clipped_note([(ARM_LABELS.get(a, a), sm) for a, sm in r["summary"].items()])
        note = replicate_interval_note(r)
        return (_img(plot_arms(r), "student test accuracy per arm, every seed and the 95% interval") + _para(arms_intro(r))
                + _shared(arms_table(r, r["students"], " .. ", brackets=False)) + _para(cut, "note") + _para(note))
    one = (r.get("distill_losses") or [None])[0]
    body.append(_section("Students: test accuracy over seeds" + (f" (loss {next(iter(r['losses']))}, the first of distill.loss)" if several else
                                                                 f" (loss {one})" if one else ""),
                         _safe(arms, "student accuracy per arm")))

    def comps() -> str:
        if not r.get("comparison"):
            return '<p class="note">No comparisons.</p>'
        verdicts = "<ul>" + "".join(f"<li>{_esc(v)}</li>" for v in verdict_lines(r)) + "</ul>"
        return (_img(plot_comparisons(r), "paired differences with 95% intervals") + _para(pruned_higher_note(r))
                + _para(COMPARISON_NOTE, "note") + _para(scope_note(r))
                + _shared(comparison_table(r, " .. ", brackets=False)) + verdicts + _para(control_note(r)))
    body.append(_section(COMPARISONS_TITLE, _safe(comps, "comparisons")))

    def per_loss() -> str:
        flat = {f"{loss}: {k}": c for loss, v in r["losses"].items() for k, c in v["comparison"].items()}
        arms, cut, comps = loss_tables(r, " .. ", brackets=False)
        return (_img(plot_comparisons({"comparison": flat}), "paired differences per distillation loss") + _para(LOSS_INTRO, "note")
                + _shared(arms) + _para(cut, "note") + _shared(comps))
    if several:
        body.append(_section("Per distillation loss", _safe(per_loss, "per-loss comparisons")))

    def replicates() -> str:
        teachers, comps = replicate_tables(r, " .. ", brackets=False)
        return _para(replicate_intro(r), "note") + _shared(teachers) + _para(REPLICATE_NOTE, "note") + _shared(comps)
    if r.get("teacher_replicates"):
        body.append(_section("Teacher replicates: per teacher and pooled", _safe(replicates, "teacher replicates")))

    n_reps = max(1, len(r.get("teacher_replicates") or []))
    try:
        per_rep = [stage_curves(run_dir, k) for k in range(n_reps)]
        curves_error = None
    except (OSError, ValueError) as e:  # an unreadable metrics.jsonl: the curve sections say so, the rest renders
        per_rep, curves_error = [], e

    def curves() -> list[dict[str, list[tuple[str, list[dict]]]]]:
        if curves_error is not None:
            raise curves_error
        return per_rep

    def tag(k: int) -> str:
        return f"<h3>Teacher replicate {k}</h3>" if n_reps > 1 else ""

    def teacher_curves() -> str:
        parts = []
        for k, rep in enumerate(curves()):
            teacher = rep.get("teacher", [])
            others = [x for s in rep if s not in ("teacher", "distill") for x in rep[s]]
            if not teacher and not others:
                parts.append(tag(k) + (f'<p class="note">{NO_STAGE_DIRS}</p>' if not (P.replicate_root(run_dir, k) / P.TEACHER).is_dir()
                                       else '<p class="note">No metrics.jsonl for the teacher stages (teacher loaded from a checkpoint?).</p>'))
                continue
            parts.append(tag(k) + _img(plot_curves(teacher + chain_after(teacher, others), _teacher_style,
                                                   "epoch (pruning levels and control rounds in turn, after the teacher)"),
                                       f"teacher, pruning and control training curves{f' of replicate {k}' if n_reps > 1 else ''}"))
        src = t.get("source")
        return "".join(parts) + ('<p class="note">Pruning retrains level after level and the control retrains the unpruned teacher '
                                 "round after round, both starting where the teacher's training ended"
                                 + (f" (the teacher was loaded from {_esc(src)}, not trained in this run: it has no curve)" if src else "")
                                 + ".</p>")
    body.append(_section("Training curves: teacher, pruning, control", _safe(teacher_curves, "teacher training curves")))

    def student_curves() -> str:
        parts = []
        for k, rep in enumerate(curves()):
            runs = rep.get("distill", [])
            if runs:
                parts.append(tag(k) + _img(plot_curves(runs, _student_style),
                                           f"student training curves{f' under teacher replicate {k}' if n_reps > 1 else ''}"))
        if not parts:
            return f'<p class="note">{NO_STAGE_DIRS}</p>' if not (run_dir / P.DISTILL).is_dir() else '<p class="note">No student metrics.jsonl.</p>'
        return "".join(parts) + '<p class="note">Color: arm; line style: seed.</p>'
    body.append(_section("Training curves: students", _safe(student_curves, "student training curves")))

    def sparsity() -> str:
        f = run_dir / "prune" / f"level_{p['level']}" / "sparsity.json"
        if not f.is_file():  # a results-only folder: _safe's "not in this folder" note
            raise FileNotFoundError(2, "No such file", str(f))
        info = read_json_object(f)  # a damaged one's note names it (json.loads said "Expecting value: line 1 column 1")
        layers = info["layers"]
        return (_img(plot_layer_sparsity(layers), "per-layer sparsity of the pruned teacher")
                + f'<p class="note">Level {info["level"]}: {info["alive"]:,} of {info["total"]:,} prunable weights kept '
                f'(sparsity {info["sparsity"]:.4f}).</p>')
    body.append(_section("Per-layer sparsity of the pruned teacher", _safe(sparsity, "per-layer sparsity") if p.get("level") else
                         '<p class="note">The teacher was not pruned (target sparsity 0).</p>'))

    stats, stats_error = None, None
    if (run_dir / "student" / "stats.json").is_file():
        try:
            stats = read_json_object(run_dir / "student" / "stats.json")
        except DamagedFileError as e:  # the page is a view: the sections that need the file say so, the rest render
            stats_error = e

    def widths() -> str:
        s = r["student"]
        size = (f'<p class="note">Student {_esc(s["spec"]["arch"])}: {s["params"]:,} params ({s["params_ratio"]:.3f}x the teacher), '
                f'{s["flops"]:,} FLOPs ({s["flops_ratio"]:.3f}x).')
        if stats_error is not None:
            return size + f' The per-layer plot: not drawn ({_esc(stats_error)}).</p>'
        if stats is None:  # a copy of the results alone: say so rather than guess how the student was made
            return size + f' The per-layer plot needs {_esc(run_dir / "student" / "stats.json")}, which is not in this folder.</p>'
        plan = stats.get("plan")
        if not plan:
            return size + ' The student was named in the config, not derived: no per-layer plan.</p>'
        return _img(plot_widths(plan["layers"]), "teacher vs student widths per layer") + size + f' Rule: {_esc(plan.get("rule", ""))}</p>'
    body.append(_section("Teacher vs student widths per layer", _safe(widths, "widths")))

    def compute() -> str:
        lat = latency_rows(r["teacher"], r["student"])  # ptd report fills onnx_latency in for older runs (rerender)
        # The speedup's interval as the page writes every interval ("a .. b"), report.md's "[a, b]".
        lat = [[re.sub(r"^\[(.+?), (.+?)\]$", r"\1 .. \2", c) for c in row] for row in lat]
        loaded = loaded_teacher_note(r)
        return (_img(plot_compute(r, stats), "compute per arm and latency per model")
                + _shared(compute_stage_table(r)) + _para(COMPUTE_TOTAL_INTRO)
                + (f'<p class="note">{_esc(loaded)}</p>' if loaded else "")
                + _shared(compute_total_table(r))
                + (f'<p class="note">{_esc(latency_caption(r["teacher"], r["student"]))}</p>'
                   + _table(LATENCY_HEAD, lat, left=1) if lat else "")
                + (f'<p class="note">{_esc(note)}</p>' if (note := speed_note(r["teacher"], r["student"])) else ""))
    body.append(_section("Compute and latency", _safe(compute, "compute")))

    sub = (f"{opening_line(r)} {counted(len(r['summary']), 'arm')}, up to {counted(n_seeds, 'student seed')}. "
           "Rendered by ptd from results.json and the stage files beside it.")
    return _page(f"ptd report: {r['name']}", sub, "\n".join(body))


def chain_after(first: list[tuple[str, list[dict]]], runs: list[tuple[str, list[dict]]]) -> list[tuple[str, list[dict]]]:
    """Renumber the epochs of ``runs`` so that within each top directory (prune/, control/) they
    follow each other, all starting after the last epoch of ``first`` (the teacher)."""
    start = max((int(row["epoch"]) for _, rows in first for row in rows), default=0)
    at: dict[str, int] = {}
    out = []
    for name, rows in runs:
        top = name.split("/")[0]
        base = at.get(top, start)
        out.append((name, [{**row, "epoch": base + int(row["epoch"])} for row in rows]))
        at[top] = base + max(int(row["epoch"]) for row in rows)
    return out


# ---------------------------------------------------------------- sweep


def render_sweep_html(sweep_dir: str | Path, results: dict[str, Any] | None = None) -> str:
    """The page for a sweep: its two plots (drawn afresh, embedded), the students table with each
    pruned teacher's paired comparison against the unpruned teacher's student."""
    from ptd.report.plots import plot_acc_vs_compute, plot_acc_vs_sparsity

    sweep_dir = Path(sweep_dir)
    r = results if results is not None else json.loads((sweep_dir / "sweep.json").read_text())
    body = []

    def plots() -> str:
        parts = []
        for fn, alt in ((plot_acc_vs_sparsity, "student accuracy vs teacher sparsity"), (plot_acc_vs_compute, "student accuracy vs total compute")):
            buf = io.BytesIO()
            fn(r, buf)
            parts.append(_img("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), alt))
        return "".join(parts)
    body.append(_section("Plots", _safe(plots, "sweep plots")))

    def table() -> str:
        rows = []
        for arm, b in r["baselines"].items():
            a = b["student_acc"]
            rows.append([b["label"], "0" if arm == "unpruned_teacher" else "-", points(a["mean"]), points(a["std"]),
                         ", ".join(points(s["test_acc"]) for s in b["students"]), "", "", ""])
        k = 0
        for x in r["rows"]:
            a, v = x["student_acc"], x.get("vs_unpruned_teacher")
            fam = (v or {}).get("family")
            k = fam["rows"] if fam else k
            rows.append([f"{x['strategy']} s{x['target_sparsity']:g}", f"{x['sparsity']:.4f}", points(a["mean"]), points(a["std"]),
                         ", ".join(points(s["test_acc"]) for s in x["students"]),
                         format_estimate(v) if v and "ci_low" in v else "", ("yes" if v.get("called") else "no") if v else "",
                         ("yes" if fam["called"] else "no") if fam else ""])
        why = (f"<p>Called row by row: each row's own 95% interval, 5% false calls per row, so up to {min(100, 5 * k)}% somewhere "
               f"in a sweep of {k} comparisons. Called over the sweep: Holm's step-down, a row called when its interval at 1 - 0.05/m "
               f"excludes zero, m being the comparisons not called before it (first {100 * (1 - 0.05 / k):.2f}%, Bonferroni's level), "
               f"at most 5% chance of any false call among the {k} (rows on one IMP level share their students and count once)."
               "</p>") if k > 1 else ""
        return _table(["teacher", "sparsity", "student mean %", "std %", "per seed %", "vs unpruned teacher's student", "called row by row",
                       "called over the sweep"], rows, left=1) + why
    body.append(_section("Students", _safe(table, "students table")))

    def reading() -> str:
        # sweep.md's Reading, as written there: the page had none of it (the whole-sweep Holm count,
        # the extra-training caveat, the best-mean warning), only the tables (new-user trial).
        from ptd.report.sweep import reading_lines

        items: list[str] = []
        for line in reading_lines(r):
            if line.startswith("  - ") and items:
                items[-1] += f"<ul><li>{_esc(line[4:])}</li></ul>"
            elif line.startswith("- "):
                items.append(_esc(line[2:]))
        return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
    body.append(_section("Reading", _safe(reading, "reading")))
    t, s = r["teacher"], r["student"]
    loaded = f", loaded from {t['source']}: its training is in no compute figure" if t.get("source") else ""
    sub = (f"Dataset {r['dataset']}; teacher {t['arch']} ({t['params']:,} params, test {points(t['test_acc'])} %{loaded}); "
           f"student {s['arch']} ({s['params']:,} params); {counted(len(r['seeds']), 'seed')}. Rendered by ptd from sweep.json.")
    return _page(f"ptd sweep: {r['name']}", sub, "\n".join(body))
