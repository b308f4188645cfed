"""Where does a derived student's inference time go, kernel by kernel, against its teacher's?

benchmarks/student_speed.py found derived ResNet-18 students no faster than their teachers on an
H200 (bf16, batch 1,024), eager, from CUDA graphs and compiled alike, for 1.7-2.4x fewer FLOPs.
This profiles both models' eval forward with torch.profiler (CUDA kernel times where there is a
GPU; aten op times on a CPU) and sums the time by kind of kernel -- convolution/GEMM, BatchNorm,
elementwise (ReLU, residual adds), layout and dtype copies, other -- so the table says which kind
fails to shrink with the FLOPs. The top kernels of each model are listed with their calls and time.

    python benchmarks/gpu_kernels.py --device cuda --out benchmarks/results/gpu_h200/gpu_kernels
    python benchmarks/gpu_kernels.py --case demo --batch 8 --device cpu --out /tmp/k   # smoke
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from student_speed import CASES, magnitude_prune, write_outputs  # noqa: E402

from ptd.measure import cpu_name, flops  # noqa: E402
from ptd.models import build_model  # noqa: E402
from ptd.students import derive_student  # noqa: E402

# Kernel (or aten op) name -> kind, first match wins. cuDNN/CUTLASS convolution kernels carry
# "conv", "implicit" (implicit GEMM), "xmma", "cutlass", "sm90"/"sm80" (architecture-tagged
# tensor-core kernels) or "gemm" in their names; BatchNorm's "bn"/"batch_norm"; PyTorch's
# elementwise kernels "elementwise"/"vectorized"; layout changes and casts "nchw"/"nhwc"/
# "transpose"/"copy"/"convert"/"to_copy".
KINDS = (
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_", "native_batch_norm")),
    ("conv/gemm", ("conv", "implicit", "xmma", "cutlass", "sm90", "sm80", "gemm", "wgrad", "dgrad", "addmm", "mm")),
    ("layout/cast", ("nchw", "nhwc", "transpose", "copy", "convert", "to_copy", "permute", "contiguous")),
    ("elementwise", ("elementwise", "vectorized", "relu", "add", "clamp", "threshold")),
    ("pool/reduce", ("pool", "reduce", "mean", "avg")),
)


def kind(name: str) -> str:
    n = name.lower()
    return next((k for k, keys in KINDS if any(s in n for s in keys)), "other")


def profile_forward(model: nn.Module, x: torch.Tensor, prec: str, calls: int) -> dict[str, dict]:
    """{kernel name: {"us": total self time over ``calls`` forwards, "calls"}} of the eval forward."""
    cuda = x.device.type == "cuda"
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
    model.eval()
    with torch.inference_mode(), amp:
        for _ in range(5):  # cuDNN's algorithm search and lazy init, outside the profile
            model(x)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(calls):
                model(x)
            if cuda:
                torch.cuda.synchronize()
    out: dict[str, dict] = {}
    for e in prof.key_averages():
        if cuda:
            dev = getattr(e, "device_type", None)
            if dev is None or "CUDA" not in str(dev):
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
        else:
            if not e.key.startswith("aten::") or e.key in ("aten::empty", "aten::empty_strided", "aten::as_strided", "aten::view"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            out[e.key] = {"us": float(us), "calls": int(e.count)}
    return out


def by_kind(kernels: dict[str, dict], calls: int) -> dict[str, float]:
    """Milliseconds per forward, by kind."""
    k: dict[str, float] = defaultdict(float)
    for name, v in kernels.items():
        k[kind(name)] += v["us"] / calls / 1000
    return dict(k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="resnet18", choices=list(CASES))
    ap.add_argument("--sparsity", type=float, default=None, help="default: the case's largest")
    ap.add_argument("--round-to", default="8n", help="the student's rounding, as in student_speed.py (8n: 8 with round_narrower)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--calls", type=int, default=10, help="profiled forwards per model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/gpu_kernels")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    arch, kw, classes, shape, sparsities = CASES[args.case]
    sp = args.sparsity if args.sparsity is not None else max(sparsities)
    torch.manual_seed(0)
    teacher = build_model(arch, classes, shape[0], **kw)
    pruned = build_model(arch, classes, shape[0], **kw)
    pruned.load_state_dict(teacher.state_dict())
    masks = magnitude_prune(pruned, sp)
    student, plan = derive_student(pruned, masks, round_to=int(args.round_to.rstrip("n")), round_narrower=args.round_to.endswith("n"))
    f_ratio = flops(teacher, (1,) + shape) / flops(student, (1,) + shape)
    models = {"teacher": teacher, "student": student}
    x = torch.randn((args.batch,) + shape, device=device).to(memory_format=torch.channels_last)
    result = {"command": "python benchmarks/gpu_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(), "torch": torch.__version__,
              "case": args.case, "sparsity": sp, "round_to": args.round_to, "batch": args.batch, "flops_ratio": f_ratio,
              "widths": [r.width for r in plan.layers], "precisions": {}}
    for prec in args.precisions:
        res = {}
        for name, m in models.items():
            m = m.to(device).to(memory_format=torch.channels_last)
            kern = profile_forward(m, x, prec, args.calls)
            res[name] = {"by_kind_ms": by_kind(kern, args.calls), "total_ms": sum(v["us"] for v in kern.values()) / args.calls / 1000,
                         "top": sorted(({"kernel": k[:140], "ms_per_forward": v["us"] / args.calls / 1000, "calls_per_forward": v["calls"] / args.calls,
                                         "kind": kind(k)} for k, v in kern.items()), key=lambda r: -r["ms_per_forward"])[:10]}
        result["precisions"][prec] = res
    write_outputs(args.out, result, render(result))
    return 0


def render(r: dict) -> str:
    lines = [f"# Kernel time by kind, teacher vs derived student ({r['machine']})", "",
             f"Command: `{r['command'].strip()}`  ",
             f"{r['case']} @{r['sparsity']} round_to {r['round_to']}, eval forward at batch {r['batch']}, channels_last, torch {r['torch']}; "
             f"FLOPs ratio teacher / student {r['flops_ratio']:.2f}. Time: the profiler's self time of every CUDA kernel (aten op on a CPU), "
             "per forward. Student widths: " + str(r["widths"]), ""]
    for prec, res in r["precisions"].items():
        t, s = res["teacher"], res["student"]
        kinds = sorted(set(t["by_kind_ms"]) | set(s["by_kind_ms"]), key=lambda k: -t["by_kind_ms"].get(k, 0))
        lines += [f"## {prec}", "", "| kind | teacher ms | student ms | teacher / student |", "|---|---:|---:|---:|"]
        for k in kinds:
            a, b = t["by_kind_ms"].get(k, 0.0), s["by_kind_ms"].get(k, 0.0)
            lines.append(f"| {k} | {a:.3f} | {b:.3f} | {a / b:.2f}x |" if b else f"| {k} | {a:.3f} | {b:.3f} | - |")
        lines.append(f"| **all** | **{t['total_ms']:.3f}** | **{s['total_ms']:.3f}** | **{t['total_ms'] / s['total_ms']:.2f}x** |")
        for name in ("teacher", "student"):
            lines += ["", f"Top kernels, {name} ({prec}):", "", "| ms / forward | calls / forward | kind | kernel |", "|---:|---:|---|---|"]
            lines += [f"| {k['ms_per_forward']:.3f} | {k['calls_per_forward']:.0f} | {k['kind']} | `{k['kernel']}` |" for k in res[name]["top"]]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
