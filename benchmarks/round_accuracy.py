"""What does a width rounding cost in accuracy? Students of the same pruned teacher, per ``round_to``.

One config is trained up to its pruned teacher once (``ptd prune``); then, per ``--round-to``
candidate, ``ptd run --from`` that base derives the student at that multiple and trains its arms
over ``--seeds`` (``student.round_narrower`` as the config says; ptd's default is on, so "32" is
32n). The candidates' runs share the teacher and pruned teacher byte for byte, so the difference
between them is the rounding alone. Each later candidate is compared with the first
(``ptd.report.compare``: per-seed differences, mean and 95% paired-t interval, called only when it
excludes 0). ``--parallel`` trains the candidates side by side, one process each: on a GPU a small
student is launch-bound and two processes overlap; on a CPU they share its cores (set threads).

    python benchmarks/round_accuracy.py configs/fashion_mnist_resnet18.yaml --round-to 8 32 \\
        --seeds 0 1 2 3 4 --out benchmarks/results/round_accuracy_r18 [--set device=cuda] [--parallel]

writes ``round_accuracy.{json,md}`` into ``--out``, and keeps the run directories under
``--work`` (default: ``--out``/runs) so a re-run resumes them.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from ptd import paths as P
from ptd.measure import cpu_name
from ptd.models import build_from_spec
from ptd.report import ARM_LABELS
from ptd.report.compare import compare_runs, load_finished
from ptd.report.stats import format_estimate


def ptd(*args: str, log: Path) -> subprocess.Popen:
    """``python -m ptd ARGS`` in its own process, its output into ``log``."""
    return subprocess.Popen([sys.executable, "-m", "ptd", *args], stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(procs: list[tuple[str, subprocess.Popen, Path]]) -> None:
    for name, p, log in procs:
        if p.wait() != 0:
            tail = log.read_text().strip().splitlines()[-5:]
            raise SystemExit(f"round_accuracy: {name} failed (exit {p.returncode}; {log}):\n" + "\n".join(tail))


def conv_widths(spec: dict) -> list[int]:
    """The out-channels of the student's Conv2d layers, in order (rebuilt from its spec)."""
    return [m.out_channels for m in build_from_spec(spec).modules() if isinstance(m, nn.Conv2d)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--round-to", nargs="+", type=int, required=True, help="student.round_to candidates; the first is the baseline")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--arms", nargs="+", default=["scratch", "pruned_teacher"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every ptd command")
    ap.add_argument("--parallel", action="store_true", help="train the candidates side by side, one process each")
    ap.add_argument("--out", default="benchmarks/results/round_accuracy")
    ap.add_argument("--work", help="run directories (default: OUT/runs)")
    args = ap.parse_args(argv)
    if len(args.round_to) < 2 or len(set(args.round_to)) != len(args.round_to):
        ap.error(f"--round-to {args.round_to}: give two or more different multiples (the first is the baseline)")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    sets = [x for s in args.set for x in ("--set", s)] + ["--quiet"]
    t0 = time.perf_counter()
    base = work / "base"
    finish([("ptd prune", ptd("prune", args.config, "--out", str(base), *sets, log=work / "base.log"), work / "base.log")])
    t_base = time.perf_counter() - t0
    runs, procs = {}, []
    common = ["--set", f"distill.seeds=[{','.join(map(str, args.seeds))}]", "--set", f"distill.arms=[{','.join(args.arms)}]"]
    for r in args.round_to:
        runs[r] = work / f"round_{r}"
        log = work / f"round_{r}.log"
        procs.append((f"ptd run round_to={r}", ptd("run", args.config, "--from", str(base), "--out", str(runs[r]), *sets, *common,
                                                    "--set", f"student.round_to={r}", log=log), log))
        if not args.parallel:
            finish(procs[-1:])
    finish(procs)
    wall = time.perf_counter() - t0
    res = {r: load_finished(d) for r, d in runs.items()}
    first = args.round_to[0]
    students = {}
    for r, x in res.items():
        cfg = yaml.safe_load((runs[r] / P.CONFIG).read_text())
        students[r] = {"round_to": r, "round_narrower": cfg["student"]["round_narrower"], "params": x["student"]["params"],
                       "flops": x["student"]["flops"], "conv_widths": conv_widths(x["student"]["spec"]),
                       "accuracy": {a: {s["seed"]: s["test_acc"] for s in x["students"] if s["arm"] == a} for a in args.arms}}
    comparisons = {r: compare_runs(res[first], res[r], f"round_to {first}", f"round_to {r}") for r in args.round_to[1:]}
    t = res[first]
    run_env = json.loads((runs[first] / P.ENV).read_text())  # what the students trained on, as ptd recorded it
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": ", ".join(run_env.get("gpus") or []) if run_env.get("device", "").startswith("cuda") else run_env.get("processor") or cpu_name(),
           "amp_bf16": run_env.get("amp_bf16")}
    doc = {"config": args.config, "sets": args.set, "seeds": args.seeds, "arms": args.arms, "parallel": args.parallel, "env": env,
           "teacher_test_acc": t["teacher"]["test_acc"], "pruned_teacher_test_acc": t["pruned_teacher"]["test_acc"],
           "wall_s": {"base": t_base, "total": wall}, "students": students,
           "comparisons": comparisons}
    out.mkdir(parents=True, exist_ok=True)
    (out / "round_accuracy.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "round_accuracy.md").write_text(render(doc))
    print(render(doc))
    return 0


def render(doc: dict) -> str:
    st = doc["students"]
    rts = list(st)
    first = rts[0]
    name = {r: f"{r}{'n' if s['round_narrower'] else ''}" for r, s in st.items()}
    lines = [f"# Width rounding against accuracy: {doc['config']}", "",
             f"`python benchmarks/round_accuracy.py {doc['config']} --round-to {' '.join(map(str, rts))} --seeds "
             f"{' '.join(map(str, doc['seeds']))}{''.join(' --set ' + s for s in doc['sets'])}{' --parallel' if doc['parallel'] else ''}` "
             f"on {doc['env']['device']} (torch {doc['env']['torch']}), {doc['wall_s']['total']:.0f} s "
             f"(teacher and pruning {doc['wall_s']['base']:.0f} s).", "",
             f"One teacher ({100 * doc['teacher_test_acc']:.2f}%) and one pruned teacher ({100 * doc['pruned_teacher_test_acc']:.2f}%), "
             "shared by every student below (`ptd run --from`).", "",
             "| round_to | parameters | FLOPs | conv widths |", "|---|---:|---:|---|"]
    for r, s in st.items():
        lines.append(f"| {name[r]} | {s['params']:,} | {s['flops']:,} | {', '.join(map(str, s['conv_widths']))} |")
    lines += ["", "Test accuracy, %:", "",
              "| arm | round_to | " + " | ".join(f"seed {x}" for x in doc["seeds"]) + " | mean |",
              "|---|---|" + "---:|" * (len(doc["seeds"]) + 1)]
    for a in doc["arms"]:
        for r, s in st.items():
            acc = s["accuracy"][a]
            vals = [acc.get(x, acc.get(str(x))) for x in doc["seeds"]]
            lines.append(f"| {ARM_LABELS.get(a, a)} | {name[r]} | " + " | ".join(f"{100 * v:.2f}" for v in vals)
                         + f" | {100 * sum(vals) / len(vals):.2f} |")
    lines += ["", f"Each candidate minus round_to {name[first]}, paired by seed (95% t interval; called only when it excludes 0):", ""]
    for r, rows in doc["comparisons"].items():
        for row in rows:
            e = row["b_minus_a"]
            lines.append(f"- {name[r]} minus {name[first]}, {ARM_LABELS.get(row['arm'], row['arm'])}: {format_estimate(e)} "
                         f"({'called' if e['called'] else 'not called'})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
