"""What a model costs: parameters, nonzero parameters, FLOPs, measured latency, layer widths.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass and
reported as that counter counts them: a multiply-accumulate is 2 FLOPs, and only the ops it knows
(convolutions, linear layers, matmuls, attention) count -- BatchNorm, activations, pooling and
residual adds do not. They are dense FLOPs: an unstructured-pruned teacher runs the same dense
kernels, so its FLOPs equal the unpruned teacher's. Latency is wall-clock time of eval-mode
``no_grad`` forward passes: the median (and 10th / 90th percentiles) of up to ``repeats`` timed
runs after ``warmup`` untimed ones, on the threads torch is set to use. One untimed run is
enough: oneDNN creates its primitives in the first call, and the second is already within the
round-to-round spread (CIFAR VGG19 at batch 64, 2 threads: 336 ms, then 317, 305, 319, 312 ms;
its student 126, then 115, 137, 123 ms). ``max_seconds`` caps the timed runs of one call (at
least ``MIN_REPEATS`` rounds are kept): a CIFAR VGG19 at batch 64 takes ~0.3 s a forward, so 20
rounds of two models would cost ~10 s of every run for a median that 5 rounds already pin down;
the stats record how many runs were timed, and their times in the order they ran.

A speedup is read from the rounds, not from the two medians: in round i teacher and student ran
back to back (order alternating), so the ratio teacher_i / student_i sees the same machine load,
and :func:`speedup_interval` gives the median of those ratios a 95% interval that assumes nothing
about the shape of the noise (the sign test's order statistics). On a shared 2-core VM the runs
of one model spread over 12.6-369.6 ms at batch 64 (new-user trial): the noise has bursts that no
normal-theory interval models, and the medians of two such samples moved a fixed pair's speedup
from 1.07x to 1.76x across 8 runs.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Timed rounds kept even past max_seconds: 6 is the fewest paired rounds whose sign interval
# reaches 95% ([min, max] of 6 ratios: 1 - 2 / 2**6 = 96.9%; 5 give 93.8%), and fewer make the
# percentiles meaningless.
MIN_REPEATS = 6
CONFIDENCE = 0.95  # of speedup_interval: a call of "faster" or "slower" is wrong at most 2.5% of the time each way
MAX_SECONDS = 2.0  # default cap on the timed runs of one latency call, in seconds of wall time


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Nonzero entries over all parameters (weights, biases, BatchNorm)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """(C, H, W) of one sample, from (C, H, W) or (N, C, H, W)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        return shape[1:]
    if len(shape) == 3:
        return shape
    raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape}")


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (2 x multiply-accumulates) of one forward pass on an input of ``input_shape``.

    ``input_shape``: (N, C, H, W), or (C, H, W) for a single image.
    """
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    device, dtype = _param_device_dtype(model)
    x = torch.zeros(shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    repeats: int = 20,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    max_seconds: float | None = MAX_SECONDS,
) -> dict[str, Any]:
    """Milliseconds per forward pass of a ``batch_size`` batch: median, 10th and 90th percentile.

    The model is timed on ``device`` (moved there on a copy if it lives elsewhere), in eval mode
    under ``no_grad``; inputs are random normal.
    """
    return compare_latency({"model": model}, input_shape, batch_size, repeats, warmup, device, max_seconds)["model"]


def compare_latency(
    models: dict[str, nn.Module],
    input_shape: Sequence[int],
    batch_size: int,
    repeats: int = 20,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    max_seconds: float | None = MAX_SECONDS,
) -> dict[str, dict[str, Any]]:
    """:func:`latency` for several models, their timed runs interleaved (A B C, B C A, ...).

    On a shared or throttling CPU, load that comes and goes then hits every model alike, so
    their ratios are fairer than from back-to-back measurements. Rounds stop early once the
    timed runs add up to ``max_seconds`` (None: no cap) and ``MIN_REPEATS`` rounds are done.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"latency needs repeats >= 1, warmup >= 0, batch_size >= 1; got repeats={repeats}, "
                         f"warmup={warmup}, batch_size={batch_size}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"latency max_seconds must be > 0 or None, got {max_seconds}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prepared: dict[str, tuple[nn.Module, torch.Tensor, bool]] = {}
    for name, model in models.items():
        cur, dtype = _param_device_dtype(model)
        m = model if cur == device else copy.deepcopy(model).to(device)
        x = torch.randn((batch_size,) + _sample_shape(input_shape), device=device, dtype=dtype)
        prepared[name] = (m, x, m.training)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    try:
        with torch.no_grad():
            for m, x, _ in prepared.values():
                m.eval()
                for _ in range(warmup):
                    m(x)
            sync()
            spent_ms = 0.0
            for r in range(repeats):
                if max_seconds is not None and r >= MIN_REPEATS and spent_ms >= max_seconds * 1000.0:
                    break
                for name in names[r % len(names):] + names[: r % len(names)]:
                    m, x, _ = prepared[name]
                    t0 = time.perf_counter()
                    m(x)
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1000.0)
                    spent_ms += times[name][-1]
    finally:
        for m, _, was_training in prepared.values():
            m.train(was_training)
    return {name: _stats(times[name], batch_size, len(times[name]), warmup, device) for name in names}


def _stats(times: list[float], batch_size: int, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    ordered, times = list(times), sorted(times)
    if len(times) == 1:
        p10 = p90 = times[0]
    else:
        q = statistics.quantiles(times, n=10, method="inclusive")
        p10, p90 = q[0], q[-1]
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p10_ms": p10,
        "p90_ms": p90,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "threads": torch.get_num_threads(),
        # Each run's ms in the order the rounds ran: round i of every model in one
        # compare_latency call ran back to back, so speedup_interval pairs them by index.
        "times_ms": [_ms(t) for t in ordered],
    }


def sign_rank(n: int, confidence: float = CONFIDENCE) -> int | None:
    """The k of the distribution-free interval [x_(k), x_(n+1-k)] (1-based order statistics) for
    the median of ``n`` independent draws: the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2)
    <= k - 1), is at least ``confidence``. None where even [min, max] falls short (n < 6 at 95%)."""
    alpha, cdf, k = (1.0 - confidence) / 2.0, 0.0, 0
    for j in range(n):
        cdf += math.comb(n, j) / 2.0 ** n
        if cdf > alpha + 1e-12:
            break
        k = j + 1
    return k or None


def speedup_interval(teacher_ms: Sequence[float], student_ms: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The speedup teacher / student over paired rounds (teacher_ms[i] and student_ms[i] ran back to
    back), as the median of the per-round ratios with its sign-test interval.

    Why this rule: the interval assumes only that the rounds' ratios are independent draws with
    one median, not that they are normal; load bursts on a shared host are one-sided and heavy
    (a run 30x its median), which breaks a t interval on log ratios, and a bootstrap undercovers
    at the 6-20 rounds timed here. Its coverage is exact for any continuous noise: a student as
    fast as its teacher is called "slower" (its whole interval below 1) at most (1 - confidence) / 2
    of the time (2.1% at 20 rounds, 1.6% at 6; tests/test_speed_claims.py measures it on synthetic
    load). Returns {"speedup", "low", "high", "pairs", "confidence"}; low, high and confidence are
    None where the rounds are too few for the interval (sign_rank)."""
    if len(teacher_ms) != len(student_ms) or not teacher_ms:
        raise ValueError(f"speedup_interval needs paired rounds: {len(teacher_ms)} teacher times, {len(student_ms)} student times")
    if not all(t > 0 for t in teacher_ms) or not all(t > 0 for t in student_ms):
        raise ValueError("speedup_interval needs times > 0")
    ratios = sorted(t / s for t, s in zip(teacher_ms, student_ms))
    n = len(ratios)
    k = sign_rank(n, confidence)
    out: dict[str, Any] = {"speedup": statistics.median(ratios), "low": None, "high": None, "pairs": n, "confidence": None}
    if k is not None:
        out.update(low=ratios[k - 1], high=ratios[n - k], confidence=1.0 - 2.0 * sum(math.comb(n, j) for j in range(k)) / 2.0 ** n)
    return out


def paired_row(teacher_ms: Sequence[float], student_ms: Sequence[float]) -> dict[str, Any]:
    """One batch size of a teacher-vs-student timing record (onnx_latency, device_latency): the
    medians, the paired speedup with its interval (speedup_interval) and the runs themselves, so a
    report can show their spread and recompute the interval."""
    # From the times as stored, so a report recomputing the interval from the record gets these figures.
    teacher_ms, student_ms = [_ms(t) for t in teacher_ms], [_ms(t) for t in student_ms]
    iv = speedup_interval(teacher_ms, student_ms)
    return {"teacher_ms": statistics.median(teacher_ms), "student_ms": statistics.median(student_ms), "speedup": iv["speedup"],
            "speedup_low": iv["low"], "speedup_high": iv["high"], "confidence": iv["confidence"],
            "teacher_times_ms": teacher_ms, "student_times_ms": student_ms}


def _ms(t: float) -> float:
    """A run's ms as records keep it: to the nanosecond (perf_counter's resolution), which keeps a
    0.02 ms onnxruntime run to 0.005%."""
    return round(t, 6)


def speed_call(interval: Mapping[str, Any]) -> str:
    """"faster" or "slower" where :func:`speedup_interval`'s interval excludes 1, else "unclear"
    (an interval that holds 1, or none: too few rounds)."""
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "unclear"
    return "faster" if low > 1.0 else "slower" if high < 1.0 else "unclear"


def device_latency(
    teacher: nn.Module,
    student: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device,
    batch_sizes: Sequence[int] = (1, 64, 256),
    repeats: int = 20,
) -> dict[str, Any]:
    """Teacher vs student on ``device`` (a GPU, in the student stage), fp32 eager, interleaved, in
    the layout of ``ptd.export.onnx_latency``: ``{"batch_<b>": paired_row(...), "device", "gpu",
    "repeats"}`` (speedup: the median of the rounds' ratios, with its interval). Batch 256 too: a large GPU is bound by kernel
    launches at 64 for CIFAR-size nets (an H100 timed a ResNet-18 at 3.1 ms for batch 64 and 2.4 ms
    for batch 1), so only a large batch shows what the smaller student saves in work."""
    device = torch.device(device)
    repeats = max(repeats, MIN_REPEATS)  # the fewest rounds whose speedup interval reaches 95% (sign_rank)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    out: dict[str, Any] = {"runtime": "PyTorch eager", "device": str(device), "gpu": name, "repeats": repeats}
    for b in batch_sizes:
        try:
            r = compare_latency({"teacher": teacher, "student": student}, input_shape, b, repeats=repeats, device=device)
        except torch.cuda.OutOfMemoryError:
            # A measurement must not end a run that has trained its teachers: a large teacher at
            # batch 256 can exceed a small GPU. The batch is recorded as not measured.
            if device.type == "cuda":
                torch.cuda.empty_cache()
            out[f"batch_{b}"] = {"error": "out of GPU memory"}
            continue
        out[f"batch_{b}"] = paired_row(r["teacher"]["times_ms"], r["student"]["times_ms"])
    return out


def layer_widths(model: nn.Module) -> list[tuple[str, int]]:
    """(name, output channels) of every Conv/Linear layer, in module order."""
    return [
        (n, m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, LAYER_TYPES)
    ]


def summarize(
    model: nn.Module,
    input_shape: Sequence[int],
    masks: Mapping[str, torch.Tensor] | None = None,  # ptd.pruning's Masks: name -> 0/1 tensor
    *,
    measure_latency: bool = False,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    max_seconds: float | None = MAX_SECONDS,
) -> dict[str, Any]:
    """Parameters (total, nonzero), FLOPs of one image, layer widths; latency per batch size if asked.

    With ``masks``: also the masked weights' count and how many of them are alive.
    """
    shape = _sample_shape(input_shape)
    out: dict[str, Any] = {
        "params": count_params(model),
        "nonzero": count_nonzero(model),
        "flops": flops(model, (1,) + shape),
        "input_shape": list(shape),
        "layer_widths": [[n, w] for n, w in layer_widths(model)],
    }
    if masks is not None:
        out["masked_weights"] = sum(m.numel() for m in masks.values())
        out["alive_weights"] = sum(int(m.sum()) for m in masks.values())
    if measure_latency:
        out["latency"] = {
            str(b): latency(model, shape, b, repeats=repeats, warmup=warmup, device=device, max_seconds=max_seconds)
            for b in batch_sizes
        }
    return out


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for run records and benchmarks."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
