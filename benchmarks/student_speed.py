"""Is the derived student really smaller and faster? ResNet-18 teacher -> pruned -> student, on this CPU.

For each sparsity: prune the teacher by global magnitude over every Conv/Linear weight (one shot:
with no retraining in between, the paper's IMP rounds of 20% pick exactly the same weights),
derive the student, and report parameters (student vs the pruned teacher's surviving weights),
FLOPs (torch FlopCounterMode, 2 x MACs) and measured latency at batch 1 and 64 (median of
repeated eval-mode runs after warm-up; teacher, pruned teachers and students interleaved so that
load on a shared machine hits them alike). The teacher is freshly initialised, not trained:
magnitudes of a trained net prune differently layer by layer, so widths differ from a real run,
but the size/speed relation being checked does not depend on accuracy.

Targets (issue): student params within 10% of the pruned teacher's surviving weights; speedup
over the teacher at batch 64 >= 0.7 x the FLOPs ratio.

    python benchmarks/student_speed.py            # writes benchmarks/results/student_speed.{json,md}
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ptd.measure import cpu_name
from ptd.measure import compare_latency, count_nonzero, count_params, flops
from ptd.models import build_model
from ptd.pruning.masks import apply_masks, full_masks, prunable_weights
from ptd.pruning.select import global_topk
from ptd.students import derive_student


def magnitude_prune(model, sparsity):
    params = prunable_weights(model)
    total = sum(p.numel() for p in params.values())
    keep = round(total * (1 - sparsity))
    masks = global_topk({n: p.detach().abs() for n, p in params.items()}, full_masks(params), keep)
    apply_masks(model, masks)
    return masks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.59, 0.79])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). 1 by default: on a shared 2-core VM two OpenMP threads "
                         "stall whenever a neighbour takes a core (batch-1 runs of one model ranged 15-900 ms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/student_speed")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "python benchmarks/student_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    shape = (3, args.input_size, args.input_size)

    teacher = build_model(args.arch, args.classes, 3, width=args.width)
    models = {"teacher": teacher}
    rows = []
    t_flops = flops(teacher, (1,) + shape)
    for sp in args.sparsities:
        pruned = build_model(args.arch, args.classes, 3, width=args.width)
        pruned.load_state_dict(teacher.state_dict())
        masks = magnitude_prune(pruned, sp)
        t0 = time.perf_counter()
        student, plan = derive_student(pruned, masks)
        derive_s = time.perf_counter() - t0
        alive = sum(int(m.sum()) for m in masks.values())
        s_params = count_params(student)
        s_flops = flops(student, (1,) + shape)
        models[f"pruned@{sp}"] = pruned
        models[f"student@{sp}"] = student
        rows.append({
            "sparsity": sp,
            "surviving_weights": alive,
            "pruned_teacher_nonzero": count_nonzero(pruned),
            "student_params": s_params,
            "params_vs_surviving": s_params / alive,
            "student_flops": s_flops,
            "flops_ratio": t_flops / s_flops,
            "derive_seconds": derive_s,
            "student_spec": plan.spec,
            "overrides": len(plan.overrides),
        })

    latency = {}
    for b in args.batch_sizes:
        latency[str(b)] = compare_latency(models, shape, b, repeats=args.repeats, warmup=args.warmup)
    for r in rows:
        sp = r["sparsity"]
        for b in args.batch_sizes:
            lt = latency[str(b)]
            r[f"speedup_b{b}"] = lt["teacher"]["median_ms"] / lt[f"student@{sp}"]["median_ms"]
            r[f"speedup_min_b{b}"] = lt["teacher"]["min_ms"] / lt[f"student@{sp}"]["min_ms"]
            r[f"pruned_speedup_b{b}"] = lt["teacher"]["median_ms"] / lt[f"pruned@{sp}"]["median_ms"]
        big = str(max(args.batch_sizes))
        r["targets"] = {
            "params_within_10pct": abs(r["params_vs_surviving"] - 1) <= 0.10,
            f"speedup_b{big}_ge_0.7x_flops_ratio": r[f"speedup_b{big}"] >= 0.7 * r["flops_ratio"],
        }

    result = {
        "command": command,
        "arch": args.arch, "width": args.width, "classes": args.classes, "input": list(shape),
        "pruning": "global magnitude over all Conv/Linear weights, one shot, untrained (fresh-init) teacher",
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
        "teacher": {"params": count_params(teacher), "flops": t_flops},
        "students": rows,
        "latency": latency,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result, args.batch_sizes)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if all(all(r["targets"].values()) for r in rows) else 1


def render(res, batch_sizes) -> str:
    m = res["machine"]
    lines = [
        f"# Student speed: {res['arch']} (width {res['width']}, {res['classes']} classes, input {'x'.join(map(str, res['input']))})",
        "",
        f"Command: `{res['command'].strip()}`  ",
        f"Machine: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}  ",
        f"Pruning: {res['pruning']}.  ",
        "FLOPs: torch FlopCounterMode, 2 x MACs, conv/linear only, per image. Latency: median (p10-p90) ms of",
        f"{res['latency'][str(batch_sizes[0])]['teacher']['repeats']} interleaved eval/no_grad runs after warm-up.",
        "",
        f"Teacher: {res['teacher']['params']:,} params, {res['teacher']['flops'] / 1e9:.3f} GFLOPs.",
        "",
        "| sparsity | surviving weights | student params | params / surviving | student GFLOPs | FLOPs ratio | "
        + " | ".join(f"speedup b{b}" for b in batch_sizes) + " | 0.7 x FLOPs ratio | targets |",
        "|---|---|---|---|---|---|" + "---|" * len(batch_sizes) + "---|---|",
    ]
    for r in res["students"]:
        ok = "met" if all(r["targets"].values()) else "MISSED: " + ", ".join(k for k, v in r["targets"].items() if not v)
        lines.append(
            f"| {r['sparsity']} | {r['surviving_weights']:,} | {r['student_params']:,} | {r['params_vs_surviving']:.3f} | "
            f"{r['student_flops'] / 1e9:.3f} | {r['flops_ratio']:.2f} | "
            + " | ".join(f"{r[f'speedup_b{b}']:.2f}" for b in batch_sizes)
            + f" | {0.7 * r['flops_ratio']:.2f} | {ok} |"
        )
    lines += ["", "Speedup from the fastest run of each model instead of the median (a check on load noise): "
              + "; ".join(f"{r['sparsity']}: " + ", ".join(f"b{b} {r[f'speedup_min_b{b}']:.2f}" for b in batch_sizes) for r in res["students"]) + "."]
    lines += ["", "Latency (ms, median [p10, p90]):", "", "| model | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
              "|---|" + "---|" * len(batch_sizes)]
    for name in res["latency"][str(batch_sizes[0])]:
        cells = []
        for b in batch_sizes:
            lt = res["latency"][str(b)][name]
            cells.append(f"{lt['median_ms']:.1f} [{lt['p10_ms']:.1f}, {lt['p90_ms']:.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Student widths (stem, stages, blocks):", ""]
    for r in res["students"]:
        s = r["student_spec"]
        lines.append(f"- {r['sparsity']}: stem {s.get('stem_width')}, stages {s.get('stage_widths')}, blocks {s.get('block_widths')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
