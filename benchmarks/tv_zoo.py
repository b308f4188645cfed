"""Every torchvision classifier through ptd's student derivation: derived within 10% of the surviving weights, or refused.

For each model that ``torchvision.models.list_models(module=torchvision.models)`` lists: build it
(random init, no download, 10 classes), prune it by global magnitude over every Conv/Linear weight
to ``--sparsity`` (one shot), derive the student with fresh weights (channel surgery: the ``tv:``
path), and compare the student's Conv/Linear weights with the surviving ones. Each model runs in
its own process with a budget of ``--cpu-budget`` CPU seconds (build + prune + derive; RLIMIT_CPU,
so load from other jobs on a shared machine does not count) and ``--budget`` wall-clock seconds
(a model that hangs without computing), so a slow or stuck model is cut off and reported instead
of hanging the table. Models over ``--max-params`` parameters are not built at all: on this
2-core CPU their build and global sort alone exceed the budget (the table says so).

Two ratios: over all Conv/Linear layers, and over the layers that run in the traced forward pass
(eval mode). They differ where a model has layers that only run in training (GoogLeNet's and
Inception-v3's auxiliary heads): those are not part of the inference graph, so derivation leaves
them as they are, pruned weights and all. The verdict uses the traced ratio.

    python benchmarks/tv_zoo.py                 # writes benchmarks/results/tv_zoo.{json,md}
    python benchmarks/tv_zoo.py --only swin_t resnet50

A run with ``--only`` replaces only the rows it ran: the table's header still describes the run
every other row came from, and the re-run rows are marked with the run they came from (its
command, machine, torch, date and code listed under the header), since their timings were taken
elsewhere or at other code. It must use the table's ``--sparsity`` and ``--round-to``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(name: str, sparsity: float, round_to: int) -> dict:
    import torch
    import torch.nn as nn

    from ptd.models import build_model
    from ptd.pruning.masks import apply_masks, full_masks, prunable_weights
    from ptd.pruning.select import global_topk
    from ptd.students import DerivationError, derive_student

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    c0 = time.process_time()
    model = build_model(f"tv:{name}", 10)
    params = prunable_weights(model)
    total = sum(p.numel() for p in params.values())
    masks = global_topk({n: p.detach().abs() for n, p in params.items()}, full_masks(params), round(total * (1 - sparsity)))
    apply_masks(model, masks)
    t1 = time.perf_counter()
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "prune_s": round(t1 - t0, 1)}
    try:
        student, plan = derive_student(model, masks, round_to=round_to)
    except DerivationError as e:
        row.update(status="refused", reason=str(e), derive_s=round(time.perf_counter() - t1, 1))
        return row
    row["derive_s"] = round(time.perf_counter() - t1, 1)
    row["cpu_s"] = round(time.process_time() - c0, 1)  # build + prune + derive, CPU seconds: what load on a shared machine does not inflate
    alive = sum(int(m.sum()) for m in masks.values())
    s_weights = sum(m.weight.numel() for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    traced_nnz = sum(r.nnz for r in plan.layers)
    traced_student = sum(r.student_weights for r in plan.layers)
    clamped_rows = [r for r in plan.layers if r.note.startswith("clamped")]
    clamped = len(clamped_rows)
    if clamped_rows:  # the widest ask first: why the student falls short of the surviving weights
        worst = max(clamped_rows, key=lambda r: (r.estimate or 0) / r.teacher_width)
        row["clamped_example"] = f"{worst.name} asks {worst.estimate} > teacher's {worst.teacher_width}"
    row.update(
        status="derived",
        method=plan.method,
        ratio_all=s_weights / alive,
        ratio_traced=traced_student / traced_nnz,
        untraced_layers=len(prunable_weights(model)) - len(plan.layers),
        clamped_layers=clamped,
        trace_size=plan.spec.get("trace_size"),
    )
    row["within_10pct"] = abs(row["ratio_traced"] - 1) <= 0.10
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.59)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--cpu-budget", type=float, default=60.0,
                    help="CPU seconds per model (build + prune + derive) before it is cut off (RLIMIT_CPU: immune to load from other jobs)")
    ap.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds per model before it is cut off (catches a model that hangs without computing)")
    ap.add_argument("--max-params", type=float, default=150e6)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    ap.add_argument("--out", default=str(HERE / "results" / "tv_zoo"))
    args = ap.parse_args(argv)
    if args.one:
        print("ZOO " + json.dumps(one(args.one, args.sparsity, args.round_to)), flush=True)
        return 0

    import torch
    import torchvision

    from ptd.students.graph import DerivationError, check_layers

    every = sorted(torchvision.models.list_models(module=torchvision.models))
    out_json = Path(args.out).with_suffix(".json")
    if args.render:
        _write(json.loads(out_json.read_text()), every, Path(args.out))
        return 0

    names = args.only or every
    rows = []
    previous = None
    if args.only and out_json.is_file():  # re-run some models: the others keep their rows, and their run
        previous = json.loads(out_json.read_text())
        for key, flag in (("sparsity", "--sparsity"), ("round_to", "--round-to")):
            if previous.get(key) != getattr(args, key):
                print(f"tv_zoo: {out_json} was run with {flag} {previous.get(key)}, this run asks {getattr(args, key)}: its rows would not "
                      f"compare; pass {flag} {previous.get(key)}, or run every model (no --only) to replace the table", file=sys.stderr)
                return 2
    run = _this_run(args, argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for i, name in enumerate(names):
        meta = _meta_model(name)
        n_params = sum(p.numel() for p in meta.parameters()) if meta is not None else 0  # 0: the child counts them instead
        if n_params > args.max_params:
            reason = f"{n_params / 1e6:.0f}M parameters: building and sorting them alone exceeds the {args.cpu_budget:.0f} s budget on this CPU"
            try:  # what derive_student would say of its layer types alone (no weights needed)
                check_layers(meta)
            except DerivationError as e:
                reason += f"; derive_student refuses it anyway ({str(e).split(': ', 1)[-1]})"
            rows.append({"model": name, "params": n_params, "status": "skipped", "reason": reason})
        else:
            cmd = [sys.executable, __file__, "--one", name, "--sparsity", str(args.sparsity), "--round-to", str(args.round_to)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.budget, env=env,
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (int(args.cpu_budget), int(args.cpu_budget) + 5)))
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("ZOO ")), None)
                if line is None and p.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
                    rows.append({"model": name, "params": n_params, "status": "timeout",
                                 "reason": f"not derived within the {args.cpu_budget:.0f} CPU-second budget (build + prune + derive)"})
                elif line is None:
                    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    rows.append({"model": name, "params": n_params, "status": "failed", "reason": err[:200]})
                else:
                    rows.append(json.loads(line[4:]))
            except subprocess.TimeoutExpired:
                rows.append({"model": name, "params": n_params, "status": "timeout",
                             "reason": f"still running after {args.budget:.0f} s wall-clock (build + prune + derive): cut off"})
            rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
        r = rows[-1]
        print(f"[{i + 1}/{len(names)}] {name}: {r['status']} "
              + (f"ratio {r['ratio_traced']:.3f}" if r["status"] == "derived" else r.get("reason", "")), flush=True)
        _write(merge(previous, run, rows, every), every, Path(args.out))
    return 0


def _this_run(args, argv) -> dict:
    """What the table says of a run: its command, machine, torch, budgets, date and code."""
    import torch

    from ptd.measure import cpu_name

    git = ["git", "-C", str(HERE.parent)]
    try:
        code = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        if subprocess.run(git + ["status", "--porcelain", "--", "ptd", "benchmarks/tv_zoo.py"], capture_output=True, text=True).stdout.strip():
            code += " with uncommitted changes"
    except (OSError, subprocess.CalledProcessError):
        code = "unknown"
    return {"command": "python benchmarks/tv_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "sparsity": args.sparsity, "round_to": args.round_to, "cpu_budget_s": args.cpu_budget, "wall_budget_s": args.budget,
            "cpu": cpu_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()), "code": code}


RUN_KEYS = ("command", "cpu", "torch", "cpu_budget_s", "wall_budget_s", "date", "code")


def merge(previous: dict | None, run: dict, rows: list[dict], every: list[str]) -> dict:
    """The table after ``run`` gave ``rows``: a full run (no ``previous``) is the whole table; a
    partial one replaces only its own rows. The top-level keys describe the run most rows came
    from (the first full one), ``reruns`` each later partial run with the models it gave, in order;
    a run none of whose rows is left is dropped."""
    if previous is None:
        res = dict(run)
        res["rows"] = [r for n in every for r in rows if r["model"] == n]
        return res
    mine = {r["model"] for r in rows}
    res = {k: v for k, v in previous.items() if k not in ("rows", "reruns")}
    reruns = [{**rr, "models": [m for m in rr["models"] if m not in mine]} for rr in previous.get("reruns", [])]
    reruns = [rr for rr in reruns if rr["models"]]
    reruns.append({**{k: run[k] for k in RUN_KEYS}, "models": [n for n in every if n in mine]})
    res["reruns"] = reruns
    by_name = {r["model"]: r for r in previous["rows"]}
    by_name.update({r["model"]: r for r in rows})
    res["rows"] = [by_name[n] for n in every if n in by_name]
    return res


def _meta_model(name: str):
    """The model built on the meta device (no memory, no init), or None if its builder cannot run there.

    RegNet's builder computes its stage widths with tensors and reads them back (``.tolist()``),
    which a meta tensor cannot do: that one step runs on the CPU. Without it the parent could not
    count tv:regnet_y_128gf (637M parameters) and ran it, which the 60 CPU-second budget cut off
    in its build and global sort (it has grouped convs: derive_student refuses it at once)."""
    import torch
    import torchvision
    from torchvision.models import regnet

    orig = regnet.BlockParams.__dict__["from_init_params"]

    def on_cpu(cls, *a, **k):
        with torch.device("cpu"):
            return orig.__func__(cls, *a, **k)

    regnet.BlockParams.from_init_params = classmethod(on_cpu)
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, num_classes=10)
    except Exception:  # noqa: BLE001 -- a builder that needs real data
        return None
    finally:
        regnet.BlockParams.from_init_params = orig


def _note(r: dict) -> str:
    notes = []
    if r["untraced_layers"]:
        notes.append(f"{r['untraced_layers']} layers run only in training (auxiliary heads): left as they are")
    if not r["within_10pct"]:
        ex = r.get("clamped_example") or "a layer"
        notes.append(f"short of the surviving weights: channel surgery cannot add channels and the rule asks for more ({ex}); "
                     "the layers feeding it would have to widen instead")
    return "; ".join(notes)


def _write(res: dict, names: list[str], out: Path) -> None:
    rows = res["rows"]
    reruns = res.get("reruns", [])
    run_of = {m: i + 2 for i, rr in enumerate(reruns) for m in rr["models"]}  # run 1: the header's
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        f"# torchvision classifiers -> ptd students (global magnitude to {res['sparsity']}, random init, 10 classes)", "",
        f"Command: `{res['command'].strip()}`  ",
        f"Machine: {res['cpu']}, 1 thread per model, torch {res['torch']}"
        + (f", {res['date']}, code {res['code']}" if "date" in res else "")  # tables written before runs recorded them: neither
        + f"; budget {res['cpu_budget_s']:.0f} CPU seconds per model "
        f"(build + prune + derive; {res['wall_budget_s']:.0f} s wall-clock at most), each in its own process.  ",
        "Ratio: the student's Conv/Linear weights over the pruned teacher's surviving ones, over the layers of the traced "
        "(eval) forward pass; `all` counts every layer (training-only auxiliary heads are left as they are).", "",
    ]
    if reruns:
        lines += ["Rows marked (run N) come from a later run with `--only`, not the one above; their timings were taken there:", ""] + [
            f"- run {i + 2}: `{rr['command'].strip()}` on {rr['cpu']}, torch {rr['torch']}, {rr['date']}, code {rr['code']}, budget "
            f"{rr['cpu_budget_s']:.0f} CPU s ({rr['wall_budget_s']:.0f} s wall): {', '.join(rr['models'])}."
            for i, rr in enumerate(reruns)
        ] + [""]
    lines += [
        "| model | params | status | student / surviving (traced) | (all) | within 10% | clamped layers | derive s (wall) | CPU s (all) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = r["model"] + (f" (run {run_of[r['model']]})" if r["model"] in run_of else "")
        if r["status"] == "derived":
            ok = "yes" if r["within_10pct"] else "NO"
            lines.append(f"| {model} | {r['params'] / 1e6:.1f}M | derived | {r['ratio_traced']:.3f} | {r['ratio_all']:.3f} | {ok} | "
                         f"{r['clamped_layers']} | {r['derive_s']} | {r.get('cpu_s', '-')} | {_note(r)} |")
        else:
            lines.append(f"| {model} | {r['params'] / 1e6:.1f}M | {r['status']} | - | - | - | - | {r.get('derive_s', '-')} | - | {r['reason']} |")
    n = {s: sum(1 for r in rows if r["status"] == s) for s in ("derived", "refused", "timeout", "skipped", "failed")}
    ok = sum(1 for r in rows if r.get("within_10pct"))
    lines += ["", f"{len(rows)} of {len(names)} models: {n['derived']} derived ({ok} within 10%), {n['refused']} refused, "
              f"{n['timeout']} over budget, {n['skipped']} skipped for size, {n['failed']} failed."]
    done = {r["model"] for r in rows}
    missing = [m for m in names if m not in done]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): {', '.join(missing)} -- `python benchmarks/tv_zoo.py --only {' '.join(missing)}` adds them."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
