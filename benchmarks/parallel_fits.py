"""Two fits side by side on one thread each, against one fit on two threads (``jobs: 2``).

The question behind ``jobs`` (ptd.pipeline.distill_in_parallel): on a small CPU, do two training
processes of one thread each get more steps done than one process on both threads? For the
demo's models the convolutions are small (8-128 channels, 28x28 and below), where oneDNN is
overhead-bound and a second thread inside a step gains little.

Each round times, in turn, (A) one process on 2 threads doing N steps and (B) two processes on 1
thread each doing N steps each, started together; the ratio is B's steps per second over A's.
Steps are ``ptd.train.loop.train_step`` (what ``fit`` runs) on the demo's teacher (VGG11 x0.25,
Fashion-MNIST shapes, batch 128) and on its student (derived at 0.59 global-magnitude sparsity,
``round_to: auto``) distilled with KD from the pruned teacher; the run's Runtime defaults
(channels_last, bf16 autocast where the CPU has it natively, fast_wgrad). Process start-up
(imports, model building) is outside the timed steps.

    .venv/bin/python benchmarks/parallel_fits.py                  # ~4 min on 2 cores
    .venv/bin/python benchmarks/parallel_fits.py --steps 10 --rounds 1 --out /tmp/pf   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(kind: str, threads: int, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` training steps of ``kind`` ("kd" or "teacher") on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    from ptd.distill import build_distiller
    from ptd.models import build_model
    from ptd.pruning.masks import apply_masks, full_masks, prunable_weights
    from ptd.pruning.scores import magnitude
    from ptd.pruning.select import global_topk, keep_for_target
    from ptd.students import derive_configured
    from ptd.train.loop import Runtime, Supervised, train_step

    torch.manual_seed(0)
    rt = Runtime(device=torch.device("cpu"), amp=True, channels_last=True, fast_wgrad=True, quiet=True)
    teacher = build_model("vgg11", num_classes=10, in_channels=1, width=0.25)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    if kind == "teacher":
        model = rt.prepare(teacher)
        unit = Supervised(model)
    else:
        full = full_masks(prunable_weights(teacher))
        masks = global_topk(magnitude(teacher, full), full, keep_for_target(full, 0.59))
        apply_masks(teacher, masks)
        student, _ = derive_configured(teacher, masks, device_type="cpu")
        model = rt.prepare(student)
        unit = build_distiller(model, rt.prepare(teacher).eval(), ("kd",), options={}, defaults={"alpha": 0.95, "temperature": 10.0},
                               num_classes=10, num_samples=128, labels=None, epochs=1, example_input=lambda: x[:2],
                               layer_map={}, batch_size=128)
    opt = torch.optim.SGD([p for p in unit.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
    batch = (x, y, torch.arange(128))
    with rt.training(unit):
        for _ in range(warmup):
            train_step(unit, opt, rt, batch, 0, model=model)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(unit, opt, rt, batch, 0, model=model)
        return time.perf_counter() - t0


def _spawn(kind: str, threads: int, steps: int, warmup: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, "--worker", kind, str(threads), str(steps), str(warmup)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _seconds(p: subprocess.Popen) -> float:
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"worker failed (exit {p.returncode})")
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per process (default 200)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds per workload (order alternates)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        kind, threads, steps, warmup = a.worker
        print(worker(kind, int(threads), int(steps), int(warmup)), flush=True)
        return 0
    rows = []
    for kind in ("kd", "teacher"):
        ratios = []
        for r in range(a.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            res = {}
            for which in order:
                if which == "A":
                    res["A"] = a.steps / _seconds(_spawn(kind, 2, a.steps, a.warmup))
                else:
                    ps = [_spawn(kind, 1, a.steps, a.warmup) for _ in range(2)]
                    # Both timed spans overlap fully only when both started together; the slower
                    # one bounds the pair's throughput.
                    res["B"] = 2 * a.steps / max(_seconds(p) for p in ps)
            ratios.append(res["B"] / res["A"])
            print(f"{kind} round {r + 1}: one process x 2 threads {res['A']:.1f} steps/s, two x 1 thread "
                  f"{res['B']:.1f} steps/s together: {ratios[-1]:.2f}x", flush=True)
        rows.append({"workload": kind, "ratios": ratios, "median": statistics.median(ratios)})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from ptd.measure import cpu_name

    meta = {"command": "python benchmarks/parallel_fits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "processor": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "steps": a.steps}
    (out / "parallel_fits.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Two fits on one thread each vs one fit on two threads", "",
             f"`{meta['command']}` on {meta['processor']} ({meta['cpu_count']} CPUs), {a.steps} steps per process.", "",
             "| workload | throughput ratio (two x 1 thread / one x 2 threads), per round | median |", "|---|---|---:|"]
    lines += [f"| {r['workload']} | {', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['median']:.2f} |" for r in rows]
    (out / "parallel_fits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
