"""What would sharing one teacher forward among lockstep students save? The teacher's share of a KD step.

Issue 12 asks whether students that train in lockstep on the same batches (one per seed) should
share one teacher forward. The most that saves is the teacher forward's share of a distillation
step, times (1 - 1/S) for S students. This times, interleaved on one thread, the demo's teacher
forward (VGG11 x0.25, eval, inference mode) against one step of its student (the committed demo's
plan: forward, cross-entropy + KD at T 10, backward, SGD), batch 128, channels_last, fp32 and bf16
autocast.

    python benchmarks/kd_split.py      # writes benchmarks/results/kd_split.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from student_speed import time_interleaved  # noqa: E402

from ptd.measure import cpu_name  # noqa: E402
from ptd.models import build_model  # noqa: E402

TEACHER = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128]  # vgg11 x0.25
STUDENT = [8, "M", 24, "M", 48, 48, "M", 72, 96, "M", 64, 88]  # benchmarks/results/fashion_mnist_demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/kd_split.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fmt = torch.channels_last
    t = build_model("vgg", 10, 1, plan=TEACHER).to(memory_format=fmt).eval()
    s = build_model("vgg", 10, 1, plan=STUDENT).to(memory_format=fmt)
    x = torch.randn(args.batch, 1, 28, 28).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9)
    lines = ["# The teacher forward's share of a distillation step (demo sizes)", "",
             f"Command: `python benchmarks/kd_split.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {cpu_name()}, 1 thread, torch {torch.__version__}; batch {args.batch}, channels_last, "
             f"median of {args.repeats} interleaved rounds.", "",
             "| precision | teacher forward ms | student step ms | teacher share | saved per KD step, 2 / 5 students sharing |",
             "|---|---|---|---|---|"]
    for prec in ("fp32", "bf16"):
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")
        with torch.inference_mode(), amp:
            soft = t(x).float()  # the teacher's logits the step distills from (their values do not change the timing)

        def run(m):
            if m is t:
                with torch.inference_mode(), amp:
                    m(x)
                return
            with amp:
                out = m(x)
                loss = F.cross_entropy(out, y) + F.kl_div(F.log_softmax(out.float() / 10, 1), F.softmax(soft / 10, 1), reduction="batchmean")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        r = time_interleaved({"teacher": t, "student": s}, run, args.repeats, 3)
        share = r["teacher"] / (r["teacher"] + r["student"])
        lines.append(f"| {prec} | {r['teacher'] * 1e3:.2f} | {r['student'] * 1e3:.2f} | {share:.0%} | {share / 2:.0%} / {share * 4 / 5:.0%} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
