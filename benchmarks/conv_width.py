"""Does a 3x3 conv get slower when it gets narrower? One conv per channel width, timed alone.

benchmarks/gpu_kernels.py found a derived ResNet-18 student's convolutions slower than its
teacher's on an H200 in bf16, for 2.4x fewer FLOPs. This times a single 3x3 convolution (stride 1,
padding 1, no bias) at 32x32, batch 1,024, channels_last, eval, for each (in, out) width pair:
the widths a derived student's first stage gets (40, 48, 56, 72, 88) against the teacher's (64)
and other multiples of 32. It reports the median milliseconds and TFLOP/s (2 x MACs). GPU times
come from CUDA events around each call; CPU times from the wall clock. cuDNN's autotuner is off, as
in ptd's runs, and on in a second pass for a few pairs.

    python benchmarks/conv_width.py --device cuda --out benchmarks/results/gpu_h200/conv_width_bf16
    python benchmarks/conv_width.py --device cpu --batch 8 --precision fp32 --out /tmp/cw   # smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

PAIRS = [(64, 64), (56, 56), (48, 48), (40, 56), (40, 40), (32, 32), (64, 56), (56, 64), (72, 72), (88, 88), (96, 96), (128, 128)]
AUTOTUNED = [(64, 64), (56, 56), (40, 56), (88, 88)]


def time_conv(cin: int, cout: int, batch: int, side: int, device: torch.device, prec: str, repeats: int) -> float:
    """Median milliseconds of one eval forward of the conv (after 5 warm-up calls)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, side, side, device=device).to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    ts = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
        for i in range(5 + repeats):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                conv(x)
                b.record()
                torch.cuda.synchronize()
                ms = a.elapsed_time(b)
            else:
                t0 = time.perf_counter()
                conv(x)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= 5:
                ts.append(ms)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/conv_width")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for autotune, pairs in ((False, PAIRS), (True, AUTOTUNED)):
        torch.backends.cudnn.benchmark = autotune
        for cin, cout in pairs:
            ms = time_conv(cin, cout, args.batch, args.side, device, args.precision, args.repeats)
            flop = 2 * args.batch * args.side * args.side * 9 * cin * cout
            rows.append({"cin": cin, "cout": cout, "cudnn_benchmark": autotune, "ms": ms, "tflop_per_s": flop / ms / 1e9})
            print(f"{'autotuned ' if autotune else ''}cin {cin:4d} cout {cout:4d}: {ms:.3f} ms  {flop / ms / 1e9:.1f} TFLOP/s", flush=True)
    torch.backends.cudnn.benchmark = False
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"command": "python benchmarks/conv_width.py " + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine,
           "torch": torch.__version__, "precision": args.precision, "batch": args.batch, "side": args.side, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    base = next(r["ms"] for r in rows if (r["cin"], r["cout"]) == (64, 64) and not r["cudnn_benchmark"])
    lines = [f"# One 3x3 conv per width ({machine}, {args.precision}, batch {args.batch}, {args.side}x{args.side}, channels_last)", "",
             f"Command: `{res['command']}`", "", "| in | out | cuDNN autotuner | ms | TFLOP/s | time vs 64->64 | FLOPs vs 64->64 |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['cin']} | {r['cout']} | {'on' if r['cudnn_benchmark'] else 'off'} | {r['ms']:.3f} | {r['tflop_per_s']:.1f} | "
              f"{r['ms'] / base:.2f} | {r['cin'] * r['cout'] / 4096:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
