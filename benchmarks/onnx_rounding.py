"""Are the paper-recipe students fast where they are deployed? onnxruntime, exact widths vs rounded.

configs/cifar100_vgg19.yaml and configs/tiny_imagenet_resnet18.yaml set ``student.round_to: 1``
(the paper's width rule exactly, so the student is the published plans' kind). A new-user audit
found such students slower than their teachers in onnxruntime. This measures it at the recipes'
real sizes: each teacher (fresh init: speed does not depend on accuracy) pruned by global
magnitude over every Conv/Linear weight to the recipe's sparsity, its student derived with
``round_to`` 1, 8 and ``auto`` (for this CPU), all exported to ONNX and timed in onnxruntime with
``ptd.export.onnx_latency`` (median of interleaved runs, teacher and student alike), batch 1 and 64.
Only ratios are reported (a shared CPU): speedup = teacher ms / student ms.

    python benchmarks/onnx_rounding.py      # writes benchmarks/results/onnx_rounding.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from student_speed import magnitude_prune  # noqa: E402

from ptd.export import onnx_latency  # noqa: E402
from ptd.measure import count_params, cpu_name, flops  # noqa: E402
from ptd.models import build_model  # noqa: E402
from ptd.students import derive_configured  # noqa: E402

CASES = {
    # name: (arch, kwargs, classes, input (C, H, W), sparsity): the two paper recipes
    "cifar100_vgg19": ("vgg19", {}, 100, (3, 32, 32), 0.79),
    "tiny_imagenet_resnet18": ("resnet18", {"stem": "cifar"}, 200, (3, 64, 64), 0.59),
    # The same recipe shrunk for a quick try (--set teacher.model.width=0.25), as the audit ran it:
    # channels of 4-40, where one odd width costs the blocked kernels most.
    "cifar100_vgg19_x0.25": ("vgg19", {"width": 0.25}, 100, (3, 32, 32), 0.79),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--round-to", nargs="+", default=["1", "8", "auto"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads (the student stage uses torch's)")
    ap.add_argument("--out", default="benchmarks/results/onnx_rounding")
    a = ap.parse_args(argv)
    rows = []
    for case in a.cases:
        arch, kw, classes, shape, sparsity = CASES[case]
        torch.manual_seed(0)
        teacher = build_model(arch, classes, shape[0], **kw).eval()
        pruned = build_model(arch, classes, shape[0], **kw)
        pruned.load_state_dict(teacher.state_dict())
        masks = magnitude_prune(pruned, sparsity)
        t_flops = flops(teacher, shape)
        for rt in a.round_to:
            student, plan = derive_configured(pruned, masks, round_to=rt if rt == "auto" else int(rt), device_type="cpu")
            student.eval()
            lat = onnx_latency(teacher, student, shape, repeats=a.repeats, threads=a.threads)
            pick = plan.round_to_choice.split(" (")[0].split(": ")[-1] if plan.round_to_choice else ""  # "auto on cpu: 8 (...)" -> "8"
            row = {"case": case, "round_to": rt + (f" (took {pick})" if pick else ""),
                   "params_ratio": count_params(teacher) / count_params(student), "flops_ratio": t_flops / flops(student, shape),
                   **{f"b{b}": lat[f"batch_{b}"]["speedup"] for b in (1, 64)}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    md = [f"# onnxruntime speed of derived students: exact widths (round_to 1) vs rounded",
          "", f"`python benchmarks/onnx_rounding.py` on {cpu_name()}, onnxruntime with {a.threads} threads, median of "
          f"{a.repeats} interleaved runs; fresh-init teachers pruned by global magnitude to the recipes' sparsity. "
          "Speedup = teacher ms / student ms (above 1: the student is faster).", "",
          "| recipe | round_to | teacher/student params | FLOPs | speedup b1 | speedup b64 |", "|---|---|---:|---:|---:|---:|"]
    md += [f"| {r['case']} | {r['round_to']} | {r['params_ratio']:.2f}x | {r['flops_ratio']:.2f}x | {r['b1']:.2f}x | {r['b64']:.2f}x |"
           for r in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps({"cpu": cpu_name(), "threads": a.threads, "repeats": a.repeats, "rows": rows}, indent=2) + "\n")
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
