"""The sweep's two figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Both take the dict that ``ptd.report.sweep.build_sweep_results`` returns (what sweep.json holds).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from ptd.errors import counted

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DODGE_DEX = 0.025  # sideways shift between strategies at one compute, in decades (about 6%)
BASELINE_STYLE = {"unpruned_teacher": ("tab:gray", "--"), "scratch": ("black", ":")}


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: str | Path | BinaryIO) -> Path | BinaryIO:
    """To a file path (format from its suffix) or a binary file object (PNG, for report.html)."""
    if hasattr(path, "write"):
        fig.savefig(path, format="png")
        return path
    path = Path(path)
    fig.savefig(path)
    return path


def _ms(d: dict) -> tuple[float, float]:
    a = d["student_acc"]
    return 100 * (a["mean"] or 0.0), 100 * (a["std"] or 0.0)


def _by_strategy(r: dict[str, Any]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in r["rows"]:
        out.setdefault(row["strategy"], []).append(row)
    return {k: sorted(v, key=lambda x: x["sparsity"]) for k, v in out.items()}


def _title(r: dict[str, Any]) -> str:
    s = r["student"]
    return (f"{r['name']}: every teacher distilled into one {s['arch']} student ({s['params']:,} params); "
            f"mean ± std over {counted(len(r['seeds']), 'seed')}")


def plot_acc_vs_sparsity(r: dict[str, Any], path: str | Path | BinaryIO) -> Path | BinaryIO:
    """Student test accuracy against the teacher's measured sparsity, one line per strategy, with
    the unpruned-teacher KD student and the scratch student as horizontal mean ± std bands."""
    fig, ax = _figure()
    for i, (strategy, rows) in enumerate(_by_strategy(r).items()):
        xs = [100 * x["sparsity"] for x in rows]
        ms = [_ms(x) for x in rows]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker=MARKERS[i % len(MARKERS)], capsize=4,
                    linewidth=1.5, label=f"distilled from {strategy}-pruned teacher")
    for arm, b in r["baselines"].items():
        color, ls = BASELINE_STYLE.get(arm, ("tab:brown", "-."))
        m, s = _ms(b)
        ax.axhline(m, color=color, linestyle=ls, linewidth=1.2, label=f"{b['label']}: {m:.2f} ± {s:.2f}")
        if s > 0:
            ax.axhspan(m - s, m + s, color=color, alpha=0.12, linewidth=0)
    ax.set_xlabel("teacher sparsity (% of conv + linear weights pruned)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(_title(r), fontsize=8.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_acc_vs_compute(r: dict[str, Any], path: str | Path | BinaryIO, unit: str = "epochs") -> Path | BinaryIO:
    """Student test accuracy against the total compute behind one student (teacher training,
    pruning and its own distillation), ``unit`` "epochs" or "steps"; log x axis."""
    if unit not in ("epochs", "steps"):
        raise ValueError(f"unit {unit!r}: use 'epochs' or 'steps'")
    fig, ax = _figure()
    groups = _by_strategy(r)
    # One-retraining strategies put all their sparsities at one compute, often the same for several
    # strategies: shift each strategy sideways a little (log space) where it shares an x with others.
    at_x: dict[float, list[str]] = {}
    for strategy, rows in groups.items():
        for x in {row["compute"]["total_per_student"][unit] for row in rows}:
            at_x.setdefault(x, []).append(strategy)
    dodged = False
    for i, (strategy, rows) in enumerate(groups.items()):
        xs, left = [], []
        for row in rows:
            x = row["compute"]["total_per_student"][unit]
            sharing = at_x[x]
            pos = sharing.index(strategy) - (len(sharing) - 1) / 2
            if len(sharing) > 1:
                dodged = True
                x *= 10 ** (DODGE_DEX * pos)
            xs.append(x)
            left.append(pos < 0)  # the left-shifted strategy labels its points on the left
        ms = [_ms(x) for x in rows]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker=MARKERS[i % len(MARKERS)], capsize=4,
                    linewidth=1.0, alpha=0.9, label=f"distilled from {strategy}-pruned teacher")
        for x, (m, _), row, lf in zip(xs, ms, rows, left):
            ax.annotate(f"{100 * row['sparsity']:.0f}%", (x, m), textcoords="offset points", xytext=(-5 if lf else 5, -3),
                        ha="right" if lf else "left", fontsize=6.5)
    for arm, b in r["baselines"].items():
        color, _ = BASELINE_STYLE.get(arm, ("tab:brown", "-."))
        m, s = _ms(b)
        x = b["compute"]["total_per_student"][unit]
        ax.errorbar([x], [m], yerr=[s], marker="*" if arm == "unpruned_teacher" else "x", markersize=10, color=color,
                    capsize=4, linestyle="none", label=b["label"])
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    what = "epochs" if unit == "epochs" else "optimizer steps"
    ax.set_xlabel(f"total {what} behind one student: teacher + pruning + distillation (log scale)")
    if dodged:
        fig.text(0.99, 0.005, "strategies at equal compute are shifted sideways slightly for legibility; labels: teacher sparsity",
                 ha="right", va="bottom", fontsize=6, color="0.35")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(_title(r), fontsize=8.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    return _save(fig, path)
