"""Conv weight gradients on CPU: oneDNN's kernel against one GEMM (ptd.train.fastconv), per shape and per step.

Part 1 times, per layer shape of the nets ptd trains (batch 128, 3x3, stride 1, channels_last),
aten's weight gradient (``convolution_backward`` with only the weight's output) against
``ptd.train.fastconv.weight_grad``, in bf16 and fp32, interleaved, median of ``--repeats``. It is
where ``MAX_OUT_PIXELS`` (the largest output, per image, at which the GEMM form is used) comes
from, and it reports the GEMM's achieved GFLOP/s against the machine's matmul peak.

Part 2 times whole training steps (ptd's ``train_step`` under ``Runtime.training``: bf16 autocast
where native, channels_last) with ``fast_wgrad`` off and on, interleaved: CIFAR VGG19, its st79
student, CIFAR ResNet-18 and the demo's VGG11 x0.25 on Fashion-MNIST.

    python benchmarks/conv_wgrad.py              # writes benchmarks/results/conv_wgrad.{md,json}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_speed import matmul_peak  # noqa: E402

from ptd.config import OptimConfig  # noqa: E402
from ptd.measure import cpu_name  # noqa: E402
from ptd.models import build_model  # noqa: E402
from ptd.train.fastconv import MAX_OUT_PIXELS, weight_grad  # noqa: E402
from ptd.train.loop import Runtime, Supervised, cpu_has_native_bf16, train_step  # noqa: E402
from ptd.train.optim import make_optimizer  # noqa: E402

# (in channels, out channels, image side): the wide late layers of CIFAR nets, the demo's layers,
# and larger images where the GEMM form loses (its patch matrix is 9x the input).
SHAPES = [(512, 512, 2), (512, 512, 4), (256, 512, 4), (128, 128, 3), (128, 128, 1), (64, 64, 7),
          (512, 512, 8), (256, 256, 8), (128, 128, 16), (64, 64, 32)]
ST79 = [64, 64, "M", 128, 128, "M", 249, 217, 197, 163, "M", 111, 81, 76, 74, "M", 72, 60, 57, 89]  # PAPER.md
DEMO_STUDENT = [8, "M", 24, "M", 48, 48, "M", 72, 96, "M", 64, 88]  # benchmarks/results/fashion_mnist_demo
STEPS = {  # name: (arch, kwargs, input shape, classes)
    "vgg19 (CIFAR-100)": ("vgg19", {}, (3, 32, 32), 100),
    "vgg19-st79 student": ("vgg", {"plan": ST79}, (3, 32, 32), 100),
    "resnet18 (CIFAR-100)": ("resnet18", {"stem": "cifar"}, (3, 32, 32), 100),
    "demo teacher vgg11 x0.25": ("vgg11", {"width": 0.25}, (1, 28, 28), 10),
    "demo student": ("vgg", {"plan": DEMO_STUDENT}, (1, 28, 28), 10),
}


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def aten_wgrad(g, x, w):
    return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


def shape_rows(batch: int, repeats: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for cin, cout, side in SHAPES:
            cl = torch.channels_last
            x = torch.randn(batch, cin, side, side, dtype=dtype).contiguous(memory_format=cl)
            w = torch.randn(cout, cin, 3, 3, dtype=dtype).contiguous(memory_format=cl)
            g = torch.randn(batch, cout, side, side, dtype=dtype).contiguous(memory_format=cl)
            # Both paths against the fp32 gradient of the same (already rounded) inputs: on a CPU
            # without native bf16, oneDNN's emulated kernel rounds partial sums too, so the two
            # bf16 results differ from each other by more than either differs from the truth
            # (AMD EPYC, AVX2: 2.6e-2 apart at 8x8).
            ref = aten_wgrad(g.float(), x.float(), w.float())
            aten, got = aten_wgrad(g, x, w).float(), weight_grad(g, x, w.shape, (1, 1), (1, 1)).float()
            t = interleaved({"aten": lambda: aten_wgrad(g, x, w), "gemm": lambda: weight_grad(g, x, w.shape, (1, 1), (1, 1))}, repeats)
            a, b = statistics.median(t["aten"]), statistics.median(t["gemm"])
            flop = 2 * batch * side * side * cout * cin * 9
            rows.append({"dtype": str(dtype).removeprefix("torch."), "cin": cin, "cout": cout, "side": side,
                         "aten_ms": a * 1e3, "gemm_ms": b * 1e3, "speedup": a / b, "gemm_gflops": flop / b / 1e9,
                         "rel_diff": float((ref - got).abs().max() / ref.abs().max()),
                         "aten_rel_diff": float((ref - aten).abs().max() / ref.abs().max()),
                         "used_by_default": side * side <= MAX_OUT_PIXELS.get(dtype, 0)})
    return rows


def step_rows(batch: int, repeats: int) -> list[dict]:
    rows = []
    for name, (arch, kw, shape, classes) in STEPS.items():
        units, opts, rts = {}, {}, {}
        for on in (False, True):
            torch.manual_seed(0)
            rts[on] = Runtime(amp=True, channels_last=True, quiet=True, fast_wgrad=on)
            units[on] = Supervised(rts[on].prepare(build_model(arch, num_classes=classes, in_channels=shape[0], **kw)))
            opts[on] = make_optimizer(units[on], OptimConfig())
        x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (batch,))

        def step(on):
            with rts[on].training(units[on]):
                train_step(units[on], opts[on], rts[on], (x, y), 0)

        t = interleaved({"stock": lambda: step(False), "fast": lambda: step(True)}, repeats, warmup=2)
        ratios = sorted(a / b for a, b in zip(t["stock"], t["fast"]))
        rows.append({"model": name, "stock_ms": statistics.median(t["stock"]) * 1e3, "fast_ms": statistics.median(t["fast"]) * 1e3,
                     "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
                     "bf16": rts[True].uses_amp})
    return rows


def render(res: dict) -> str:
    bf16_peak = f"{res['peak_gflops']['bf16']:.0f} GFLOP/s" if "bf16" in res["peak_gflops"] else "not measured (bf16 is not native)"
    L = ["# Conv weight gradients on CPU: oneDNN vs one GEMM (ptd.train.fastconv)", "",
         f"Command: `{res['command']}`  ",
         f"Machine: {res['cpu']}, {res['threads']} threads, torch {res['torch']}; batch {res['batch']}, 3x3 convs, "
         f"channels_last; median of {res['repeats']} interleaved rounds. bf16 matmul peak here "
         f"{bf16_peak}, fp32 {res['peak_gflops']['fp32']:.0f} GFLOP/s (best square matmul "
         f"over 1 s, n={res['peak_n']}; benchmarks/pipeline_speed.py's matmul_peak).", "",
         "## Per layer: the weight gradient alone", "",
         "| dtype | in -> out channels | image | oneDNN ms | GEMM ms | speedup | GEMM GFLOP/s (of peak) | GEMM max rel. err. | oneDNN max rel. err. | used by default |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["shapes"]:
        pk = res["peak_gflops"].get("fp32" if r["dtype"] == "float32" else "bf16")
        share = f"{r['gemm_gflops'] / pk:.2f}" if pk else "-"  # no peak where bf16 is emulated
        L.append(f"| {r['dtype']} | {r['cin']} -> {r['cout']} | {r['side']}x{r['side']} | {r['aten_ms']:.2f} | {r['gemm_ms']:.2f} | "
                 f"{r['speedup']:.2f}x | {r['gemm_gflops']:.0f} ({share}) | {r['rel_diff']:.1e} | "
                 + (f"{r['aten_rel_diff']:.1e} | " if "aten_rel_diff" in r else "- | ") +
                 f"{'yes' if r['used_by_default'] else 'no'} |")
    L += ["", f"Default limits (`MAX_OUT_PIXELS`, output pixels per image): "
          + ", ".join(f"{str(k).removeprefix('torch.')} {v}" for k, v in MAX_OUT_PIXELS.items()) + ".", "",
          "## Per training step: `fast_wgrad` off vs on (ptd's `train_step`, bf16 autocast where native)", "",
          "| model | off ms | on ms | speedup median [min, max] |", "|---|---:|---:|---|"]
    for r in res["steps"]:
        L.append(f"| {r['model']} | {r['stock_ms']:.0f} | {r['fast_ms']:.0f} | {r['ratio_median']:.2f}x "
                 f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] |")
    return "\n".join(L) + "\n"


def accuracy(seeds: list[int], train_images: int) -> dict:
    """Does the GEMM weight gradient change what training reaches? benchmarks/train_speed.py's
    accuracy run (its pruned demo-sized teacher retrained 1 epoch on Fashion-MNIST with its mask
    hook, bf16 autocast where native), once with ``fast_wgrad`` off and once on, per seed: the
    same init, batches and augmentation, so only the weight gradients' rounding differs."""
    import copy

    import train_speed as ts
    from ptd.data import load_dataset
    from ptd.train.loop import fit

    splits = load_dataset("fashion_mnist", train_subset=train_images)
    teacher, masks = ts.pruned_teacher(seed=0)
    optim = OptimConfig(epochs=1, batch_size=128, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for on in (False, True):
            rt = ts.make_runtime(True, fast_wgrad=on)
            torch.manual_seed(seed)
            m = rt.prepare(copy.deepcopy(teacher))
            tr = ts.ptd_loader(splits.train, splits.mean, splits.std, 128, True, seed)
            te = ts.ptd_loader(splits.test, splits.mean, splits.std, 256, False, seed)
            r = fit(m, tr, None, optim, rt, hooks=[ts.MaskHook(masks)], test_loader=te)
            row["on" if on else "off"] = r["test_acc"]
        rows.append(row)
        print(f"  seed {seed}: test acc off {row['off']:.4f}, on {row['on']:.4f}", flush=True)
    from ptd.report.stats import paired_estimate  # the report's own paired t

    e = paired_estimate([r["on"] - r["off"] for r in rows])
    return {"train_images": train_images, "test_images": len(splits.test), "rows": rows, "mean_diff": e["mean"],
            "ci95": [e["ci_low"], e["ci_high"]] if e["ci_low"] is not None else None}


def render_accuracy(res: dict) -> str:
    a = res["accuracy"]
    L = ["# Does `fast_wgrad` change what training reaches?", "", f"Command: `{res['command']}`  ",
         f"Machine: {res['cpu']}, {res['threads']} threads, torch {res['torch']}. benchmarks/train_speed.py's pruned "
         f"teacher (VGG11 x0.25, 0.59 sparsity) retrained 1 epoch on {a['train_images']} Fashion-MNIST images with its "
         f"mask hook, bf16 autocast, batch 128; test on {a['test_images']} images. Per seed, off and on share init, "
         "batches and augmentation: only the weight gradients' rounding differs.", "",
         "| seed | fast_wgrad off | on | on - off |", "|---|---:|---:|---:|"]
    for r in a["rows"]:
        L.append(f"| {r['seed']} | {r['off']:.4f} | {r['on']:.4f} | {r['on'] - r['off']:+.4f} |")
    ci = a["ci95"]
    L += ["", f"Mean on - off: {a['mean_diff']:+.4f}" + (f", 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}] (paired t)" if ci else "")
          + ". One test accuracy on 10,000 images has a sampling error of about 0.004; one epoch's seed-to-seed spread is larger."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--step-repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny run for the smoke test")
    ap.add_argument("--accuracy", action="store_true",
                    help="instead of timing: test accuracy after 1 epoch with fast_wgrad off vs on (conv_wgrad_accuracy.md)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        global SHAPES, STEPS
        SHAPES = [(32, 32, 2), (16, 16, 8)]
        STEPS = {"demo teacher vgg11 x0.25": STEPS["demo teacher vgg11 x0.25"]}
    res = {"command": "python benchmarks/conv_wgrad.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "batch": args.batch,
           "repeats": args.repeats, "peak_n": 512 if args.quick else 2048}
    if not args.accuracy:  # the timing tables' "of peak"; bf16 only where native: emulated, one 2048^3 product takes ~1 min
        res["peak_gflops"] = {k: matmul_peak(dt, res["peak_n"], "cpu", seconds=0.5 if args.quick else 1.0) / 1e9
                              for k, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))
                              if k == "fp32" or cpu_has_native_bf16()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.accuracy:
        res["accuracy"] = accuracy(args.seeds, args.train_images)
        stem, text = "conv_wgrad_accuracy", render_accuracy(res)
    else:
        res["shapes"] = shape_rows(args.batch, args.repeats)
        res["steps"] = step_rows(args.batch, args.step_repeats)
        stem, text = "conv_wgrad", render(res)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
