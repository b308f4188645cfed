"""Are derived students fast? Training and inference speed against the FLOPs ratio, per width rounding.

Cases: the demo's student (VGG11 x0.25 on 1x28x28, 10 classes, as configs/fashion_mnist_demo.yaml)
and ResNet-18 students (200 classes), each teacher pruned by global magnitude over every
Conv/Linear weight (one shot, fresh init: the size/speed relation checked here does not depend on
accuracy) and its student derived with ``round_to`` = 1 (the paper's rule exactly) and each
candidate multiple. For fp32 and bfloat16 autocast, all in channels_last, in ONE process with
every model's runs interleaved (a shared, loaded CPU hits them alike; only ratios are reported):

* training throughput (img/s, forward + backward + SGD step at ``--train-batch``), student over
  teacher;
* inference speedup (eval, no_grad) at batch 64 and 1.

Targets (issue 7): student train throughput >= 0.8 x FLOPs ratio x the teacher's; inference
speedup at batch 64 >= 0.8 x FLOPs ratio; no student slower than its teacher (train or infer).
The parameter cost of rounding is reported against the round_to=1 student. The ``round_to`` that
meets most targets (ties: the smaller parameter deviation) is the recommended default.

    python benchmarks/student_speed.py      # writes benchmarks/results/student_speed.{json,md}
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ptd import paths as P
from ptd.errors import counted
from ptd.measure import count_params, cpu_name, flops
from ptd.models import build_model
from ptd.pruning.masks import apply_masks, full_masks, prunable_weights
from ptd.train.loop import Runtime, cpu_has_native_bf16
from ptd.pruning.select import global_topk
from ptd.students import derive_configured, derive_student

CASES = {
    # name: (arch, kwargs, classes, input (C, H, W), sparsities)
    "demo": ("vgg11", {"width": 0.25}, 10, (1, 28, 28), (0.59,)),
    "resnet18": ("resnet18", {}, 200, (3, 32, 32), (0.59, 0.79)),
}


def rounding(text: str) -> str:
    """A --round-to candidate: "8" (nearest multiple of 8), "8n" (also round_narrower) or "auto"
    (ptd's default: student.round_to auto on --device, round_narrower on)."""
    if text == "auto":
        return text
    if not text.rstrip("n").isdigit() or int(text.rstrip("n")) < 1 or text.count("n") > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a multiple like 8, 8n for round_narrower, or auto")
    return text


def multiple(rt: str) -> int:
    """The candidate's multiple, for breaking ties: the finer wins; auto counts as the finest, so
    on a tie the recommendation is ptd's default."""
    return 0 if rt == "auto" else int(rt.rstrip("n"))


def recommend(rows: list[dict], candidates: list[str]) -> tuple[dict, str]:
    """Per candidate (every student within 10% of its surviving weights, targets met, -largest
    rounding cost), and the recommended one. The default must keep every student within 10% (the
    derivation's own target); among those, the one meeting most speed targets, then the smaller
    rounding cost."""
    score = {}
    for rt in candidates:
        rs = [r for r in rows if r["round_to"] == rt]
        within = all(abs(r["weights_vs_surviving"] - 1) <= 0.10 for r in rs)
        score[rt] = (within, sum(sum(r["targets"].values()) for r in rs), -max(abs(r.get("rounding_cost") or 0) for r in rs))
    return score, max(candidates, key=lambda rt: (score[rt], -multiple(rt), not rt.endswith("n")))


def fresh_case(case: str):
    """A CASES teacher, fresh init, and its one-shot global-magnitude pruned copies:
    (teacher, [(sparsity, pruned, masks)], classes, input shape)."""
    arch, kw, classes, shape, sparsities = CASES[case]
    torch.manual_seed(0)
    teacher = build_model(arch, classes, shape[0], **kw)
    pruned_teachers = []
    for sp in sparsities:
        pruned = build_model(arch, classes, shape[0], **kw)
        pruned.load_state_dict(teacher.state_dict())
        pruned_teachers.append((sp, pruned, magnitude_prune(pruned, sp)))
    return teacher, pruned_teachers, classes, shape


def run_final_level(run_dir: str | Path) -> tuple[int, float] | None:
    """(final level, sparsity) of a finished run's prune stage, or None where it has no pruned level."""
    f = Path(run_dir) / P.PRUNE / P.RESULT
    if not f.is_file():
        return None
    result = json.loads(f.read_text())
    return (result["final_level"], result["sparsity"]) if result.get("final_level") else None


def run_case(run_dir: str | Path, shape: tuple[int, int, int]):
    """A finished ptd run's trained teacher and its final pruned level (weights and masks): the
    student its own derivation sizes, where a fresh init's magnitudes can size another (the demo's
    trained, IMP-pruned teacher keeps 0.99x its surviving weights at 16n; a fresh one 0.79x)."""
    from ptd.pruning.masks import load_masks
    from ptd.train.checkpoint import load_model

    d = Path(run_dir)
    k, sparsity = run_final_level(d)
    level = P.level_dir(d / P.PRUNE, k)
    teacher = load_model(d / P.TEACHER / P.MODEL)
    pruned = load_model(level / P.MODEL)
    masks = load_masks(level / P.MASKS, pruned)
    classes = next(m for m in reversed(list(teacher.modules())) if isinstance(m, nn.Linear)).out_features
    return teacher, [(round(sparsity, 2), pruned, masks)], classes, shape


def magnitude_prune(model: nn.Module, sparsity: float) -> dict:
    params = prunable_weights(model)
    total = sum(p.numel() for p in params.values())
    masks = global_topk({n: p.detach().abs() for n, p in params.items()}, full_masks(params), round(total * (1 - sparsity)))
    apply_masks(model, masks)
    return masks


def conv_linear_weights(m: nn.Module) -> int:
    return sum(x.weight.numel() for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))


def activations(model: nn.Module, shape) -> int:
    """Output elements of every Conv/Linear/BatchNorm layer for one image: what memory-bound ops (BN, ReLU, adds) touch."""
    n = 0

    def hook(mod, inp, out):
        nonlocal n
        n += out.numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1,) + tuple(shape)))
    finally:
        for h in hs:
            h.remove()
    return n


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(models: dict, fn, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of ``fn(model)`` per model, the models' calls interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + repeats):
        for k, m in models.items():
            sync()
            t0 = time.perf_counter()
            fn(m)
            sync()  # CUDA runs asynchronously: time the work, not its launch
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def graphed_forward(m: nn.Module, x: torch.Tensor, prec: str) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """``m(x)`` in eval mode captured as one CUDA graph: a replay launches the whole forward at
    once, as a deployed model runs (TensorRT, CUDA-graph servers), so the time is the GPU's work
    and not the ~5-10 us host cost of each of its kernel launches. The autocast cache is off
    because cached casts would outlive the capture. Returns the graph and its output tensor, which
    each replay rewrites from whatever ``x`` then holds."""
    m.eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16", cache_enabled=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side), amp:  # warm-up off the default stream, as capture requires
        for _ in range(3):
            m(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g), amp:
        out = m(x)
    return g, out


def compiled_forward(m: nn.Module, device: torch.device):
    """``m`` for inference through torch.compile as a deployment compiler would run it: inductor
    with ``freezing`` (weights become constants, so eval BatchNorm folds into the conv before it
    and BN/ReLU/add fuse into neighbouring kernels), CUDA graphs on a GPU. What this changes is
    the memory-bound work between the convolutions, which eager pays per layer in full."""
    m.eval()
    # options, not mode: the two exclude each other, and options keep freezing to this compile
    # (a global inductor setting would reach every later compile in the process). "reduce-overhead"
    # is exactly triton.cudagraphs on.
    return torch.compile(m, options={"freezing": True, "triton.cudagraphs": device.type == "cuda"}, dynamic=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--round-to", type=rounding, nargs="+", default=["1", "8", "8n", "16", "32"],
                    help="candidates: N (nearest multiple of N), Nn (the same with round_narrower), or auto (ptd's default)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--large-batch", type=int, default=0,
                    help="also time training and inference at this batch size (reported, not a target): a GPU is "
                         "launch-bound at batch 64 for these small nets, so there only a large batch shows the work ratio")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads: 1 on a shared CPU (two stall whenever a neighbour takes a core)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time inference replayed from CUDA graphs (launch overhead removed; CUDA only)")
    ap.add_argument("--compiled-infer", action="store_true",
                    help="also time inference through torch.compile (frozen weights: BN folded, BN/ReLU fused; CUDA graphs "
                         "on a GPU) at batch 64 and --large-batch; one compile per model and batch, ~10-30 s each")
    ap.add_argument("--run", help="also time the students of this finished ptd run (its trained teacher and final "
                                   "pruned level) as the case 'run'; with --input")
    ap.add_argument("--input", type=int, nargs=3, metavar=("C", "H", "W"), help="the run's input shape (the demo: 1 28 28)")
    ap.add_argument("--out", default="benchmarks/results/student_speed")
    args = ap.parse_args(argv)
    if bool(args.run) != bool(args.input):
        ap.error("--run and --input go together: the run's directory and its input shape (the demo: --input 1 28 28)")
    if args.run and run_final_level(args.run) is None:
        ap.error(f"--run {args.run}: no pruned level there (prune/result.json missing or at level 0); pass a ptd run "
                 f"directory whose prune stage finished")
    if not args.cases and not args.run:
        ap.error("nothing to time: name --cases, or a finished run with --run")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        ap.error(f"--cuda-graphs needs a CUDA device, not --device {args.device}: drop the flag or pass --device cuda")
    if "bf16" in args.precisions and device.type == "cpu" and not cpu_has_native_bf16():
        # Emulated bf16 (an AVX2-only CPU) runs matmuls ~600x slower than fp32 here: hours of
        # timing a path ptd never takes on this CPU (Runtime.uses_amp trains it in fp32).
        print("student_speed: this CPU has no native bf16 (AVX512-BF16 or AMX); timing fp32 only", file=sys.stderr)
        args.precisions = [p for p in args.precisions if p != "bf16"] or ["fp32"]
    command = "python benchmarks/student_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    cases = [(c, *fresh_case(c)) for c in args.cases] + ([("run", *run_case(args.run, tuple(args.input)))] if args.run else [])
    for case, teacher, pruned_teachers, classes, shape in cases:
        t_flops = flops(teacher, (1,) + shape)
        t_act = activations(teacher, shape)
        models = {"teacher": teacher}
        meta: dict[str, dict] = {}
        alias: dict[str, str] = {}  # candidate -> the candidate whose identical student is timed
        for sp, pruned, masks in pruned_teachers:
            alive = sum(int(m.sum()) for m in masks.values())
            base = None
            for rt in args.round_to:
                if rt == "auto":
                    student, plan = derive_configured(pruned, masks, round_to="auto", device_type=device.type)
                else:
                    student, plan = derive_student(pruned, masks, round_to=int(rt.rstrip("n")), round_narrower=rt.endswith("n"))
                key = f"student@{sp}/r{rt}"
                same = [k for k, m in meta.items() if m["sparsity"] == sp and m["spec"] == plan.spec]
                # Two candidates that give the same student are timed once: otherwise the table
                # shows the machine's noise as a difference between identical models.
                alias[key] = alias[same[0]] if same else key
                if not same:
                    models[key] = student
                w = conv_linear_weights(student)
                base = w if rt == "1" else base
                meta[key] = {"sparsity": sp, "round_to": rt, "surviving": alive, "student_weights": w, "student_params": count_params(student),
                             "flops_ratio": t_flops / flops(student, (1,) + shape), "spec": plan.spec,
                             "activation_ratio": t_act / activations(student, shape),
                             "widths": [r.width for r in plan.layers],
                             "auto_took": f"{plan.round_to}n" if rt == "auto" else None}
            for key, m in meta.items():
                if m["sparsity"] == sp:
                    m["weights_vs_surviving"] = m["student_weights"] / alive
                    # against the paper's exact student; unknown when round_to 1 is not a candidate
                    m["rounding_cost"] = m["student_weights"] / base - 1 if base else None
        for prec in args.precisions:
            ms = {k: m.to(device).to(memory_format=torch.channels_last) for k, m in models.items()}
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
            xb = torch.randn((args.train_batch,) + shape, device=device).to(memory_format=torch.channels_last)
            yb = torch.randint(0, classes, (args.train_batch,), device=device)
            if args.large_batch:
                xl = torch.randn((args.large_batch,) + shape, device=device).to(memory_format=torch.channels_last)
                yl = torch.randint(0, classes, (args.large_batch,), device=device)
            opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in ms.items()}
            inv = {id(m): k for k, m in ms.items()}

            def train_step(m, xb=xb, yb=yb):
                m.train()
                # ptd's fit trains with ptd.train.fastconv on CPU: time what it runs
                with Runtime(device=device).training(m), amp:
                    loss = nn.functional.cross_entropy(m(xb), yb)
                loss.backward()
                opts[inv[id(m)]].step()
                opts[inv[id(m)]].zero_grad(set_to_none=True)

            train = time_interleaved(ms, train_step, args.repeats, args.warmup)
            infer = {}
            if args.large_batch:
                train_large = time_interleaved(ms, lambda m: train_step(m, xl, yl), args.repeats, args.warmup)
            batches = (64, 1) + ((args.large_batch,) if args.large_batch else ())

            def reps(b: int) -> int:  # batch 1 is the noisiest: three times the rounds
                return args.repeats * (3 if b == 1 else 1)

            for b in batches:
                x = torch.randn((b,) + shape, device=device).to(memory_format=torch.channels_last)

                @torch.no_grad()
                def fwd(m, x=x):
                    m.eval()
                    with amp:
                        m(x)

                infer[b] = time_interleaved(ms, fwd, reps(b), args.warmup)
            extra: dict[str, dict[int, dict[str, float]]] = {}  # inference mode -> batch -> model -> seconds
            if args.cuda_graphs:
                extra["cuda_graphs"] = {}
                for b in batches:
                    x = torch.randn((b,) + shape, device=device).to(memory_format=torch.channels_last)
                    graphs = {id(m): graphed_forward(m, x, prec)[0] for m in ms.values()}
                    extra["cuda_graphs"][b] = time_interleaved(ms, lambda m: graphs[id(m)].replay(), reps(b), args.warmup)
                    del graphs
            if args.compiled_infer:
                extra["compiled"] = {}
                import torch._dynamo as dynamo  # (binds dynamo only: "import torch._dynamo" would make torch local here)

                # one compiled entry per model and batch size: more than dynamo's default of 8 per code object
                dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
                for b in (64,) + ((args.large_batch,) if args.large_batch else ()):
                    x = torch.randn((b,) + shape, device=device).to(memory_format=torch.channels_last)
                    fns = {id(m): compiled_forward(m, device) for m in ms.values()}

                    @torch.no_grad()
                    def cfwd(m, x=x, fns=fns):
                        if device.type == "cuda":
                            torch.compiler.cudagraph_mark_step_begin()  # a new inference step: earlier outputs may be reused
                        with amp:
                            fns[id(m)](x)

                    extra["compiled"][b] = time_interleaved(ms, cfwd, args.repeats, max(args.warmup, 3))  # warm-up compiles
                    del fns
            for key, m in meta.items():
                t = alias[key]
                r = {"case": case, "precision": prec, **{k: v for k, v in m.items() if k not in ("spec",)}, "same_student_as": None if t == key else t,
                     "teacher_train_img_s": args.train_batch / train["teacher"], "student_train_img_s": args.train_batch / train[t],
                     "train_ratio": train["teacher"] / train[t],
                     "speedup_b64": infer[64]["teacher"] / infer[64][t], "speedup_b1": infer[1]["teacher"] / infer[1][t],
                     "teacher_ms_b64": infer[64]["teacher"] * 1e3, "teacher_ms_b1": infer[1]["teacher"] * 1e3}
                if args.large_batch:
                    L = args.large_batch
                    r.update({"train_ratio_large": train_large["teacher"] / train_large[t], "speedup_large": infer[L]["teacher"] / infer[L][t],
                              "teacher_train_img_s_large": L / train_large["teacher"], "teacher_ms_large": infer[L]["teacher"] * 1e3})
                for mode, per_batch in extra.items():
                    r[mode] = {f"b{b}": {"speedup": v["teacher"] / v[t], "teacher_ms": v["teacher"] * 1e3} for b, v in per_batch.items()}
                f = r["flops_ratio"]
                r["targets"] = {"train >= 0.8 x FLOPs ratio": r["train_ratio"] >= 0.8 * f, "b64 >= 0.8 x FLOPs ratio": r["speedup_b64"] >= 0.8 * f,
                                "never slower": min(r["train_ratio"], r["speedup_b64"], r["speedup_b1"]) >= 1.0}
                rows.append(r)
                print(f"{case} {prec} {key}: FLOPs x{f:.2f} train x{r['train_ratio']:.2f} b64 x{r['speedup_b64']:.2f} b1 x{r['speedup_b1']:.2f}", flush=True)
    score, best = recommend(rows, args.round_to)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {"command": command, "run": args.run, "run_input": "x".join(map(str, args.input)) if args.input else None, "machine": {"cpu": cpu_name(), "gpu": gpu, "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                                              "python": platform.python_version()},
              "train_batch": args.train_batch, "large_batch": args.large_batch, "repeats": args.repeats, "rows": rows,
              "targets_met": {rt: score[rt][1] for rt in args.round_to},
              "within_10pct": {rt: score[rt][0] for rt in args.round_to}, "targets_total": sum(len(r["targets"]) for r in rows) // len(args.round_to),
              "recommended_round_to": best}
    write_outputs(args.out, result, render(result))
    return 0


def write_outputs(out: str | Path, result: dict, md: str) -> None:
    """``<out>.json`` and ``<out>.md`` (the folder made if needed), and the markdown on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


def render(res) -> str:
    m = res["machine"]
    lines = [
        "# Student speed: trained and inferred, teacher vs derived student, per width rounding", "",
        f"Command: `{res['command'].strip()}`  ",
        f"Machine: {m.get('gpu') or m['cpu']} ({m['device']}), {counted(m['threads'], 'torch thread')}, torch {m['torch']}; channels_last; "
        f"train batch {res['train_batch']}; median of {res['repeats']} interleaved runs (x3 at batch 1).  ",
        (("Teachers: fresh init, global magnitude over all Conv/Linear weights, one shot. demo = VGG11 x0.25 on 1x28x28 (10 classes); "
         "resnet18 = ResNet-18, 3x3 stem, 3x32x32, 200 classes." if any(r["case"] in CASES for r in res["rows"]) else "")
        + (f" run = the trained teacher and final pruned level of the ptd run `{res['run']}` (input {res['run_input']})." if res.get("run") else "")
         ).strip() + "  ",
        "train = student img/s over teacher img/s; b64/b1 = inference speedup. Targets: train and b64 >= 0.8 x FLOPs ratio; "
        "nothing below 1.0. Rounding cost: the student's Conv/Linear weights over the round_to=1 student's, minus 1. "
        "Activation ratio: the teacher's Conv/Linear/BatchNorm output elements over the student's -- what bounds the speedup "
        "where memory-bound ops (BN, ReLU, adds, layout) dominate, as in a small net at one thread.", "",
        "| case | sparsity | precision | round_to | weights / surviving | rounding cost | FLOPs ratio | activation ratio | train | b64 | b1 | 0.8 x FLOPs | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    L = res.get("large_batch")
    if L:
        lines[-2] = lines[-2].replace(" 0.8 x FLOPs |", f" train @{L} | b{L} | 0.8 x FLOPs |")
        lines[-1] += "---|---|"
    for r in res["rows"]:
        miss = [k for k, v in r["targets"].items() if not v]
        large = f"{r['train_ratio_large']:.2f} | {r['speedup_large']:.2f} | " if L else ""
        lines.append(
            f"| {r['case']} | {r['sparsity']} | {r['precision']} | {label(r)}"
            + (f" (= {r['same_student_as'].rsplit('/r', 1)[1]})" if r.get("same_student_as") else "") + " | "
            f"{r['weights_vs_surviving']:.3f} | " + (f"{r['rounding_cost']:+.1%}" if r["rounding_cost"] is not None else "-") + " | "
            f"{r['flops_ratio']:.2f} | {r['activation_ratio']:.2f} | {r['train_ratio']:.2f} | {r['speedup_b64']:.2f} | {r['speedup_b1']:.2f} | {large}{0.8 * r['flops_ratio']:.2f} | "
            + ("met" if not miss else "MISSED: " + ", ".join(miss)) + " |")
    lines += ["", "Targets met per round_to (of " + str(res["targets_total"]) + "): "
              + ", ".join(f"{k}: {v}" + ("" if res["within_10pct"][k] else " (a student off its surviving weights by > 10%: not eligible)")
                          for k, v in res["targets_met"].items())
              + f". Recommended: round_to = {res['recommended_round_to']} (eligible, most targets met, then least rounding cost; 'n': with round_narrower).", "",
              "Teacher throughput (img/s, train) and latency (ms, b64 / b1) per case and precision:", ""]
    seen = set()
    for r in res["rows"]:
        k = (r["case"], r["precision"])
        if k not in seen:
            seen.add(k)
            lines.append(f"- {r['case']} {r['precision']}: {r['teacher_train_img_s']:.0f} img/s, {r['teacher_ms_b64']:.1f} / {r['teacher_ms_b1']:.2f} ms"
                         + (f"; at batch {L}: {r['teacher_train_img_s_large']:.0f} img/s, {r['teacher_ms_large']:.1f} ms" if L else ""))
    lines += extra_table(res, "cuda_graphs", "Inference replayed from CUDA graphs (`--cuda-graphs`: one launch per forward, as deployed)")
    lines += extra_table(res, "compiled", "Inference through torch.compile (`--compiled-infer`: frozen weights, BN folded and "
                                          "BN/ReLU fused; CUDA graphs on a GPU)")
    lines += ["", "Student widths (per Conv/Linear layer, module order):", ""]
    seen = set()
    for r in res["rows"]:
        k = (r["case"], r["sparsity"], r["round_to"])
        if k not in seen:
            seen.add(k)
            lines.append(f"- {r['case']} @{r['sparsity']} round_to {label(r)}: {r['widths']}")
    return "\n".join(lines) + "\n"


def label(r: dict) -> str:
    """The row's candidate; for auto, with the multiple it took for that student."""
    return f"auto: {r['auto_took']}" if r.get("auto_took") else r["round_to"]


def extra_table(res, key: str, title: str) -> list[str]:
    """Rows that carry ``key`` ({"b<batch>": {"speedup", "teacher_ms"}}): student speedup per batch
    beside the eager one of the main table, and the teacher's latency."""
    rows = [r for r in res["rows"] if r.get(key)]
    if not rows:
        return []
    bs = list(rows[0][key])
    eager = {"b64": "speedup_b64", "b1": "speedup_b1", f"b{res.get('large_batch')}": "speedup_large"}
    lines = ["", title + ", student speedup over its teacher, against eager from the table above:", "",
             "| case | sparsity | precision | round_to | FLOPs ratio | activation ratio | "
             + " | ".join(f"{b} {key.replace('_', ' ')} | {b} eager" for b in bs) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(bs)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['sparsity']} | {r['precision']} | {label(r)} | {r['flops_ratio']:.2f} | "
                     f"{r['activation_ratio']:.2f} | " + " | ".join(f"{r[key][b]['speedup']:.2f} | {r[eager[b]]:.2f}" for b in bs) + " |")
    first = rows[0]
    lines += ["", "Teacher latency (ms): " + "; ".join(
        f"{r['case']} {r['precision']} " + ", ".join(f"{b} {v['teacher_ms']:.3f}" for b, v in r[key].items())
        for r in rows if r["round_to"] == first["round_to"] and r["sparsity"] == first["sparsity"])]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
