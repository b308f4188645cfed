"""The same behaviour on every device this machine has: CPU always, CUDA when a GPU is visible.

Each test is parametrized over ``DEVICES`` (ids ``cpu`` / ``cuda``), so ``pytest -k cuda`` runs
exactly the GPU half (scripts/gpu_check.sh step 1) and a CPU-only machine still runs, and so
checks, the same assertions on its CPU. The GPU half exercises what only a GPU can break: bf16
autocast in CUDA kernels, channels_last tensors in cuDNN, CUDA RNG state in the resume
checkpoint, tensors that must come back to the CPU to be saved, and synchronization in timing.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from conftest import DEVICES, Kill, KillAfter, tiny_config
from ptd.config import OptimConfig
from ptd.data import Split, make_loader
from ptd.distill import build_distiller
from ptd.measure import compare_latency
from ptd.models import build_model
from ptd.pruning import MaskHook
from ptd.pruning.masks import apply_masks, count, full_masks, prunable_weights
from ptd.pruning.scores import magnitude
from ptd.pruning.select import global_topk
from ptd.students import derive_student
from ptd.train import checkpoint as ckpt
from ptd.train.loop import Runtime, Supervised, compiled_networks, fit, train_step
from ptd.train.optim import make_optimizer

OPT = OptimConfig(epochs=3, batch_size=32, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, milestones=(2,))


def runtime(device: str) -> Runtime:
    # bf16 autocast and channels_last: the settings a GPU run uses (autocast is a no-op on a CPU
    # without native bf16, which the test then checks in fp32).
    return Runtime(device=torch.device(device), amp=True, channels_last=True, quiet=True)


def banded(n: int, seed: int) -> Split:
    """4 classes on 3x16x16 uint8 images: the class is which horizontal band is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        x[i, :, 4 * c: 4 * c + 4, :] = 230
    return Split(x, y)


def loaders(rt: Runtime, seed: int = 0):
    kw = dict(mean=(0.3,) * 3, std=(0.3,) * 3, augment=False, device=rt.device, channels_last=rt.channels_last)
    return (make_loader(banded(384, 0), batch_size=32, train=True, seed=seed, **kw),
            make_loader(banded(128, 1), batch_size=64, train=False, **kw))


def net(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("vgg", 4, 3, plan=[16, "M", 32, "M", 32])


def half_masks(model, device):
    masks = full_masks(prunable_weights(model))
    masks = global_topk(magnitude(model, masks), masks, count(masks)[0] // 2)
    return {k: v.to(device) for k, v in masks.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_weights_stay_zero_and_the_net_learns_on(device):
    """Masks on the device hold through momentum, Nesterov and weight decay under autocast."""
    rt = runtime(device)
    model = rt.prepare(net())
    masks = half_masks(model, rt.device)
    apply_masks(model, masks)
    kept = count(masks)[0]
    tr, va = loaders(rt)
    r = fit(model, tr, va, OPT, rt, hooks=[MaskHook(masks)], test_loader=va)
    w = prunable_weights(model)
    assert all(w[n].device.type == rt.device.type for n in w)
    assert all(bool((w[n][~m] == 0).all()) for n, m in masks.items())  # exactly zero, not small
    assert sum(int((w[n] != 0).sum()) for n in w) <= kept  # sparsity is at least the masks'
    assert r["test_acc"] > 0.8  # 4 classes: chance is 0.25


@pytest.mark.parametrize("compile", [pytest.param("off", id="eager"), pytest.param("on", id="compiled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_a_kill_matches_an_uninterrupted_run_on(device, compile, tmp_path):
    """The resume checkpoint carries this device's RNG and optimizer state: a run killed after
    epoch 2 and resumed ends where an uninterrupted run ends. Bitwise wherever two uninterrupted
    runs agree bitwise (the CPU; CUDA unless a kernel is non-deterministic), and otherwise no
    further apart than two uninterrupted runs are from each other. Compiled too: the resumed
    process compiles again, from the restored weights."""
    rt = runtime(device)
    if compile == "on":
        rt = replace(rt, compile=compile_mode(device))
    ref_a, ref_b = rt.prepare(net()), rt.prepare(net())
    fit(ref_a, *loaders(rt), OPT, rt, out_dir=tmp_path / "a")
    fit(ref_b, *loaders(rt), OPT, rt, out_dir=tmp_path / "b")
    with pytest.raises(Kill):
        fit(rt.prepare(net()), *loaders(rt), OPT, rt, out_dir=tmp_path / "k", hooks=[KillAfter(2)])
    resumed = rt.prepare(net(seed=7))  # a fresh process starts from other weights; resume replaces them
    fit(resumed, *loaders(rt), OPT, rt, out_dir=tmp_path / "k")
    rows = [json.loads(l)["epoch"] for l in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]
    sa, sb, sr = (m.state_dict() for m in (ref_a, ref_b, resumed))
    noise = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())
    gap = max(float((sa[k].double() - sr[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())
    if device == "cpu" or noise == 0.0:
        assert gap == 0.0
    else:
        assert gap <= 4 * noise


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_trained_on_the_device_saves_and_loads_on_the_cpu(device, tmp_path):
    rt = runtime(device)
    model = rt.prepare(net())
    fit(model, loaders(rt)[0], None, replace(OPT, epochs=1), rt)
    ckpt.save_model(tmp_path / "m.safetensors", model)
    back = ckpt.load_model(tmp_path / "m.safetensors")
    assert all(p.device.type == "cpu" for p in back.parameters())
    x = torch.randn(4, 3, 16, 16)
    model.eval(), back.eval()
    # fp32 both sides: cuDNN's convolutions run in TF32 by default (10-bit mantissa, ~1e-3
    # relative), which the GPU run showed as logit differences of 1e-4; compare in true fp32.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = model(x.to(rt.device).contiguous(memory_format=torch.channels_last)).float().cpu()
        assert torch.allclose(back(x), want, rtol=1e-5, atol=1e-5)  # the same weights, other kernels


@pytest.mark.parametrize("device", DEVICES)
def test_the_student_from_masks_on_the_device_is_the_cpu_one(device):
    teacher = net()
    masks = half_masks(teacher, "cpu")
    student_cpu, plan_cpu = derive_student(teacher, masks, round_to=8, round_narrower=True)
    student_dev, plan_dev = derive_student(teacher.to(device), {k: v.to(device) for k, v in masks.items()},
                                           round_to=8, round_narrower=True)
    assert plan_dev.spec == plan_cpu.spec
    assert [tuple(p.shape) for p in student_dev.parameters()] == [tuple(p.shape) for p in student_cpu.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_latency_on_the_device_times_finished_work(device):
    """Timing waits for the device: a model 16x the work takes clearly longer, not ~the same
    (an unsynchronized CUDA timer measures only the kernel launches)."""
    # Sizes per device: large enough that the big model's work, not kernel launches, sets its time.
    side, batch, wide = (64, 256, 512) if device == "cuda" else (16, 16, 256)
    small = build_model("vgg", 10, 3, plan=[16, "M", 16])
    big = build_model("vgg", 10, 3, plan=[wide, "M", wide])
    # Interleaved, and each model's fastest run: on a shared 2-core CI machine a neighbouring test
    # stalled the small model's separate median to 62 ms against the big one's 88 (~150x its FLOPs).
    # On the CPU, one thread: with two, every op of the tiny model waits at an OpenMP barrier for a
    # thread the neighbour has descheduled, and even its fastest of 7 runs took 64 ms (CI, loaded).
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        t = compare_latency({"small": small, "big": big}, (3, side, side), batch, repeats=7, device=device)
    finally:
        torch.set_num_threads(threads)
    ts, tb = t["small"], t["big"]
    assert ts["min_ms"] > 0 and tb["min_ms"] > 2 * ts["min_ms"]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_tiny_pipeline_runs_end_to_end_on(device, tmp_path, tiny_fashion):
    from ptd.cli import main

    cfg = tiny_config(tiny_fashion, device=device, distill={"seeds": [0], "arms": ["scratch", "pruned_teacher"],
                                                              "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "results.json").read_text())
    env = json.loads((out / "env.json").read_text())
    assert env["device"].startswith(device)
    assert bool(env["gpus"]) == (device == "cuda")
    assert r["teacher"]["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert r["pruned_teacher"]["sparsity"] == pytest.approx(0.36, abs=0.002)
    assert sorted(s["arm"] for s in r["students"]) == ["pruned_teacher", "scratch"]
    # Trained on a GPU: the student stage times teacher and student there too, and the report shows it.
    cu = r["student"]["cuda_latency"]
    assert (cu is not None) == (device == "cuda")
    if cu is not None:
        assert cu["gpu"] == env["gpus"][0] and cu["batch_256"]["teacher_ms"] > 0
        v = cu["batch_64"]
        assert f"| PyTorch (eager, {cu['gpu']}) | 64 | {v['teacher_ms']:.2f} | {v['student_ms']:.2f} | {v['speedup']:.2f}x |" in (out / "report.md").read_text()


def compile_mode(device: str) -> str:
    # CUDA graphs where they exist; plain inductor on a CPU (reduce-overhead adds nothing there).
    return "reduce-overhead" if device == "cuda" else "default"


@pytest.mark.slow
@pytest.mark.parametrize("loss", [None, "kd", "at"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_steps_equal_eager_steps_on(device, loss):
    """compile changes kernels, not arithmetic: three fp32 steps from one init end where eager
    ends, to float rounding (CUDA: convolutions in TF32 on both sides). Plain training, KD with
    its frozen teacher compiled too, and AT, whose feature taps are forward hooks inside the
    compiled networks."""
    eager = Runtime(device=torch.device(device), amp=False, channels_last=True, quiet=True)
    comp = replace(eager, compile=compile_mode(device))
    batch = next(iter(loaders(eager)[0]))
    ends = []
    for rt in (eager, comp):
        model = rt.prepare(net())
        if loss is None:
            unit = Supervised(model)
        else:
            torch.manual_seed(1)  # the same teacher on both sides
            teacher = rt.prepare(build_model("vgg", 4, 3, plan=[24, "M", 48, "M", 48]))
            # AT taps the outputs of both nets' first and second conv blocks (ReLUs after each conv)
            options = {"at": {"teacher_layers": ("features.2", "features.6")}} if loss == "at" else None
            unit = build_distiller(model, teacher, loss, options=options, num_classes=4, num_samples=len(batch[0]),
                                   example_input=batch[0][:2])
        opt = make_optimizer(unit, OPT)
        counters.clear()
        with rt.training(unit):
            losses = [float(train_step(unit, opt, rt, batch, 0)[0].detach()) for _ in range(3)]
            graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (rt is comp)  # the compiled side really ran compiled code
        assert all(m._compiled_call_impl is None for m in compiled_networks(unit))  # eager again after the block
        ends.append((losses, {k: v.detach().double().cpu() for k, v in model.state_dict().items()}))
    (le, we), (lc, wc) = ends
    assert lc == pytest.approx(le, rel=1e-3)
    assert we.keys() == wc.keys()  # compiled in place: no _orig_mod. prefixes in checkpoints
    assert max(float((we[k] - wc[k]).abs().max()) for k in we) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_keeps_masks_and_learns_on(device):
    rt = replace(runtime(device), compile=compile_mode(device))
    model = rt.prepare(net())
    masks = half_masks(model, rt.device)
    apply_masks(model, masks)
    tr, va = loaders(rt)
    r = fit(model, tr, va, OPT, rt, hooks=[MaskHook(masks)], test_loader=va)
    w = prunable_weights(model)
    assert all(bool((w[n][~m] == 0).all()) for n, m in masks.items())
    assert r["test_acc"] > 0.8
    assert model._compiled_call_impl is None


def test_compile_covers_the_student_and_the_frozen_teacher():
    student, teacher = net(), net(1)
    unit = build_distiller(student, teacher, "kd", num_classes=4, num_samples=8)
    nets = compiled_networks(unit)
    assert nets[0] is student and len(nets) == 2 and nets[1] is unit.teacher
    assert compiled_networks(Supervised(student)) == [student]
    with pytest.raises(ValueError, match="reduce-overhead"):
        Runtime(compile="fast")


@pytest.mark.parametrize("device", DEVICES)
def test_device_latency_has_onnx_latencys_layout_on(device):
    from ptd.measure import device_latency

    small, big = net(), build_model("vgg", 4, 3, plan=[64, "M", 64, "M", 64])
    r = device_latency(big, small, (3, 16, 16), device, batch_sizes=(1, 8), repeats=5)
    assert set(r) == {"runtime", "device", "gpu", "repeats", "batch_1", "batch_8"}
    for b in ("batch_1", "batch_8"):
        v = r[b]
        # the speedup is the median of the rounds' ratios (ptd.measure.speedup_interval); 5 rounds raised to 6
        ratios = [a / b for a, b in zip(v["teacher_times_ms"], v["student_times_ms"])]
        assert len(ratios) == 6 and v["speedup"] == pytest.approx(statistics.median(ratios), rel=1e-3) and v["teacher_ms"] > 0
        assert v["speedup_low"] <= v["speedup"] <= v["speedup_high"]
    assert r["gpu"] == (torch.cuda.get_device_name(0) if device == "cuda" else "cpu")


def test_cuda_graph_modes_mark_their_steps():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [Runtime(device=cuda, compile=m).uses_cuda_graphs for m in ("off", "default", "reduce-overhead", "max-autotune")] == [False, False, True, True]
    assert not Runtime(device=cpu, compile="reduce-overhead").uses_cuda_graphs
    assert not Runtime(device=cpu, compile="default").uses_fast_wgrad  # dynamo cannot trace fast_wgrad's patch


def test_device_latency_out_of_memory_is_a_row_not_a_crash(monkeypatch):
    """A big teacher at batch 256 may not fit a small GPU: that batch is reported as not measured
    and the run goes on (the student stage comes after hours of teacher training)."""
    import ptd.measure as measure
    from ptd.report import latency_rows

    real = measure.compare_latency

    def oom_at_256(models, shape, b, **kw):
        if b == 256:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(models, shape, b, **kw)

    monkeypatch.setattr(measure, "compare_latency", oom_at_256)
    r = measure.device_latency(net(1), net(), (3, 16, 16), "cpu", batch_sizes=(1, 256), repeats=5)
    assert r["batch_256"] == {"error": "out of GPU memory"} and r["batch_1"]["teacher_ms"] > 0
    rows = latency_rows({}, {"cuda_latency": r})
    assert rows[-1] == ["PyTorch (eager, cpu)", "256", "n/a", "n/a", "out of GPU memory", "", ""] and rows[0][1] == "1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_latency_out_of_memory_on_cuda_is_a_row_not_a_crash():
    """The path above with the CUDA caching allocator's own error, not a stand-in: the process is
    held to 1 GiB of the GPU, and batch 8192 of a 64-channel net on 64x64 images needs 8 GiB for
    its first activation alone (8192 x 64 x 64 x 64 x 4 B). Batch 1 is still measured, and the
    memory the failed batch took is given back."""
    from ptd.measure import device_latency

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        big = build_model("vgg", 4, 3, plan=[64, "M", 64])
        r = device_latency(big, net(), (3, 64, 64), "cuda", batch_sizes=(1, 8192), repeats=3)
        after = torch.cuda.memory_reserved()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert r["batch_8192"] == {"error": "out of GPU memory"}
    assert r["batch_1"]["teacher_ms"] > 0 and r["batch_1"]["student_ms"] > 0
    assert after < 2**30


@pytest.mark.parametrize("major,amp", [(7, False), (8, True), (9, True)])  # V100/T4, A100, H100
def test_bf16_autocast_only_on_gpus_with_bf16_tensor_cores(monkeypatch, major, amp):
    from types import SimpleNamespace

    import ptd.train.loop as loop

    loop.cuda_has_native_bf16.cache_clear()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(major=major))
    try:
        assert Runtime(device=torch.device("cuda:0"), amp=True).uses_amp is amp
        assert Runtime(device=torch.device("cuda:0"), amp=False).uses_amp is False
    finally:
        loop.cuda_has_native_bf16.cache_clear()


@pytest.mark.parametrize("device", DEVICES)
def test_a_loaded_teacher_is_scored_on_the_runs_device(device):
    """teacher.check_learned scored the loaded teacher on the CPU even on a GPU run (review). It
    runs where the run trains; a teacher at chance is refused there as on the CPU."""
    from types import SimpleNamespace

    from ptd.config import load_config
    from ptd.preflight import check_teacher_learned
    from ptd.train.checkpoint import CheckpointError

    n = 600
    y = torch.arange(n) % 2
    x = (y * 255).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()  # class = brightness
    seen = []

    class Bright(torch.nn.Module):
        def __init__(self, right: bool):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0 if right else -1.0))

        def forward(self, t):
            seen.append(t.device.type)
            b = t.flatten(1).mean(1) * self.scale
            return torch.stack([-b, b], 1)

    splits = SimpleNamespace(val=Split(x, y), test=Split(x, y), mean=(0.5,), std=(0.5,), num_classes=2, classes=["dark", "bright"])
    cfg = load_config(None, ["teacher.checkpoint=/t.safetensors", "threads=1"])
    check_teacher_learned(cfg, Bright(True), splits, torch.device(device))
    assert seen and set(seen) == {device}
    with pytest.raises(CheckpointError, match=r"scores 0\.00% on 500 validation images .* not above chance \(50\.00%\)"):
        check_teacher_learned(cfg, Bright(False), splits, torch.device(device))
