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
the stats record how many runs were timed.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MIN_REPEATS = 5  # timed rounds kept even past max_seconds: fewer make the percentiles meaningless
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
    times = sorted(times)
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
    }


def device_latency(
    teacher: nn.Module,
    student: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device,
    batch_sizes: Sequence[int] = (1, 64, 256),
    repeats: int = 20,
) -> dict[str, Any]:
    """Teacher vs student on ``device`` (a GPU, in the student stage), fp32 eager, interleaved, in
    the layout of ``ptd.export.onnx_latency``: ``{"batch_<b>": {"teacher_ms", "student_ms",
    "speedup"}, "device", "gpu", "repeats"}``. Batch 256 too: a large GPU is bound by kernel
    launches at 64 for CIFAR-size nets (an H100 timed a ResNet-18 at 3.1 ms for batch 64 and 2.4 ms
    for batch 1), so only a large batch shows what the smaller student saves in work."""
    device = torch.device(device)
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
        t, s = r["teacher"]["median_ms"], r["student"]["median_ms"]
        out[f"batch_{b}"] = {"teacher_ms": t, "student_ms": s, "speedup": t / s}
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
