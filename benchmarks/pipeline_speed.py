"""Whole-pipeline speed: ptd against a re-creation of the published code's pipeline, on this machine.

The short CIFAR-100 pipeline of issue 12, on fabricated CIFAR-100 files written here in the real
format (python pickles ``cifar-100-python/{train,test,meta}``):

    teacher VGG19-BN, 1 epoch -> one 20% global-magnitude IMP round, 1 retraining epoch
    -> Hinton KD (alpha 0.95, T 10) for 2 epochs into vgg19-rwd-st79 (the published st79 plan)

run two ways, alternating (ptd, published, published, ptd, ...), one pair per seed:

ptd        ``ptd.pipeline.run_pipeline`` with a config: the library as a user runs it.
published  ``PublishedPipeline`` below: a RE-CREATION, written for this benchmark, of how the
           published code (github ososos888/prune-then-distill) runs the same schedule: a
           torchvision CIFAR100 dataset with per-image PIL transforms (RandomCrop(32, 4),
           RandomHorizontalFlip, ToTensor, Normalize) in a torch DataLoader (num_workers 0),
           rebuilt for every stage; NCHW float32; Conv/Linear/BatchNorm layers that multiply a
           mask buffer into their weights on every forward; validation AND test evaluation every
           epoch; torch.save of the weights at every new best validation accuracy and after
           every stage; its own plain training loop. It is not the published code itself.

Reported: end-to-end and per-stage time ratios (published / ptd) per pair with their spread, the
test accuracy of the distilled student per seed for both, and the achieved FLOP/s of ptd's
teacher and student (KD) training steps (through ``ptd.train.loop.fit``, the library's public
loop) and of the published way's (its own loop and loader) against this machine's measured fp32
and bf16 matmul peak (bf16 only where native), with the ceiling that follows: the best peak over
the published step's FLOP/s, the most any implementation of the same FLOPs could gain.

    python benchmarks/pipeline_speed.py                     # ~15 min on 2 busy cores
    python benchmarks/pipeline_speed.py --quick --out /tmp/ps   # smoke test, < 1 min
    python benchmarks/pipeline_speed.py --device cuda --n-train 50000 --n-test 10000 --seeds 0   # GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
# The published vgg19_rwd_st79 student (its models/cifar_vgg.py plan "19_st_79"); PAPER.md.
ST79 = [40, 49, "M", 111, 97, "M", 225, 187, 224, 170, "M", 356, 233, 220, 99, "M", 111, 84, 297, 122]
CIFAR100_MEAN, CIFAR100_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)  # the published constants
ALPHA, TEMPERATURE = 0.95, 10.0
STAGES = ("startup", "teacher", "prune", "student", "distill", "report")


# ----------------------------------------------------------------------------- fabricated data
def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write fabricated CIFAR-100 pickles (torchvision's "python version" layout) under ``root``.

    Each class is a fixed random low-frequency colour pattern; images are that pattern shifted by
    up to 3 pixels plus noise, so a short schedule learns something and accuracy means something.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    # 100 prototypes: 4x4 colour grids upsampled to 32x32 (low frequency survives crop/flip).
    protos = g.uniform(40, 215, size=(100, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)

    def make(n: int) -> dict:
        labels = g.integers(0, 100, size=n)
        shifts = g.integers(-3, 4, size=(n, 2))
        imgs = np.empty((n, 3, 32, 32), dtype=np.float64)
        for i, (c, (dy, dx)) in enumerate(zip(labels, shifts)):
            imgs[i] = np.roll(protos[c], (int(dy), int(dx)), axis=(1, 2))
        imgs += g.normal(0, 30, size=imgs.shape)
        data = np.clip(imgs, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                "filenames": [f"img_{i}.png" for i in range(n)], "batch_label": "fabricated"}

    for name, n in (("train", n_train), ("test", n_test)):
        with open(folder / name, "wb") as f:
            pickle.dump(make(n), f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)],
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f)
    return root


# ----------------------------------------------------------------------------- the schedule
def schedule(args: argparse.Namespace) -> dict[str, Any]:
    """The one schedule both pipelines run (the paper's CIFAR-100 optimizer, shortened)."""
    def opt(epochs: int, wd: float) -> dict:
        return {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9, "nesterov": True,
                "weight_decay": wd, "milestones": [], "gamma": 0.1}
    return {"teacher": opt(args.teacher_epochs, 5e-4), "retrain": opt(args.retrain_epochs, 2e-4),
            "distill": opt(args.distill_epochs, 5e-4), "rate": 0.2, "val_fraction": args.val_fraction,
            "width": args.width, "compile": args.compile}


def scaled(plan: list, width: float) -> list:
    return [p if p == "M" else max(1, int(round(p * width))) for p in plan]


# ----------------------------------------------------------------------------- ptd
def ptd_config(data_root: Path, sch: dict, seed: int, device: str, threads: int | None):
    from ptd.config import load_config

    import yaml

    cfg = {
        "name": "pipeline_speed", "seed": seed, "device": device, "quiet": True, "threads": threads, "compile": sch.get("compile", "off"),
        "data": {"name": "cifar100", "root": str(data_root), "val_fraction": sch["val_fraction"], "crop_padding": 4, "hflip": True},
        "teacher": {"model": {"arch": "vgg19", "width": sch["width"]}, "optim": sch["teacher"]},
        "prune": {"strategy": "imp", "target_sparsity": sch["rate"], "rate": sch["rate"], "retrain": sch["retrain"]},
        "student": {"source": "named", "model": {"arch": "vgg", "kwargs": {"plan": scaled(ST79, sch["width"])}}},
        "distill": {"loss": "kd", "alpha": ALPHA, "temperature": TEMPERATURE, "seeds": [seed], "arms": ["pruned_teacher"],
                    "optim": sch["distill"]},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


def run_ptd(data_root: Path, work: Path, sch: dict, seed: int, device: str, threads: int | None) -> dict[str, Any]:
    """One ptd run; stage times from the pipeline's own log lines ("[teacher] ...", "[prune] ...")."""
    from ptd.pipeline import run_pipeline

    marks: list[tuple[float, str]] = []

    def log(line: str) -> None:
        tag = line[1:line.index("]")] if line.startswith("[") and "]" in line else "report"
        marks.append((time.perf_counter(), tag))

    t0 = time.perf_counter()
    cfg = ptd_config(data_root, sch, seed, device, threads)
    res = run_pipeline(cfg, work, log=log)
    t1 = time.perf_counter()
    stages = {s: 0.0 for s in STAGES}
    prev_t, prev_tag = t0, "startup"
    for t, tag in marks:
        tag = {"control": "prune"}.get(tag, tag)
        if tag != prev_tag:  # a stage ends where the next one logs its first line
            stages[prev_tag if prev_tag in stages else "report"] += t - prev_t
            prev_t, prev_tag = t, tag
    stages[prev_tag if prev_tag in stages else "report"] += t1 - prev_t
    del res
    acc = json.loads((work / "distill" / f"pruned_teacher_seed{seed}" / "result.json").read_text())["test_acc"]
    return {"total_s": t1 - t0, "stages": stages, "test_acc": acc, "epoch_s": epoch_seconds(work)}


def epoch_seconds(run_dir: Path) -> dict[str, list[float]]:
    """Seconds of every epoch of each training stage, from the run directory's metrics.jsonl (their
    ``wall_s`` is cumulative within one fit, evaluation included). With compile on, a fit's first
    epoch carries its compile; the later ones show the compiled speed."""
    dirs = {"teacher": [run_dir / "teacher"], "prune": sorted((run_dir / "prune").glob("level_*")),
            "distill": sorted((run_dir / "distill").glob("*_seed*"))}
    out: dict[str, list[float]] = {}
    for stage, ds in dirs.items():
        out[stage] = []
        for d in ds:
            walls = [json.loads(line)["wall_s"] for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
            out[stage] += [b - a for a, b in zip([0.0] + walls, walls)]
    return out


def steady_epoch_s(epochs: list[float]) -> float | None:
    """Median epoch after a fit's first (which pays compile and warm-up); None with one epoch."""
    return statistics.median(epochs[1:]) if len(epochs) > 1 else None


# ----------------------------------------------------------------------------- the published way (re-creation)
class PubConv2d(nn.Conv2d):
    """Re-creation: a conv whose mask buffer is multiplied into weight and bias on every forward."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("weight_mask", torch.ones_like(self.weight))
        self.register_buffer("bias_mask", torch.ones_like(self.bias))

    def forward(self, x):
        return F.conv2d(x, self.weight_mask * self.weight, self.bias_mask * self.bias, self.stride, self.padding)


class PubLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("weight_mask", torch.ones_like(self.weight))
        self.register_buffer("bias_mask", torch.ones_like(self.bias))

    def forward(self, x):
        return F.linear(x, self.weight_mask * self.weight, self.bias_mask * self.bias)


class PubBatchNorm2d(nn.BatchNorm2d):
    """Re-creation: BatchNorm whose affine weights are masked on every forward, too."""

    def __init__(self, n):
        super().__init__(n)
        self.register_buffer("weight_mask", torch.ones_like(self.weight))
        self.register_buffer("bias_mask", torch.ones_like(self.bias))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked += 1
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight_mask * self.weight, self.bias_mask * self.bias,
                            self.training, self.momentum, self.eps)


class PubVGG(nn.Module):
    """Re-creation of the published CIFAR VGG: conv-BN-ReLU per plan entry, AvgPool2d(2), fc."""

    def __init__(self, plan: list, num_classes: int = 100):
        super().__init__()
        layers, c = [], 3
        for p in plan:
            if p == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [PubConv2d(c, p, 3, padding=1), PubBatchNorm2d(p), nn.ReLU()]
                c = p
        self.layers = nn.Sequential(*layers)
        self.fc = PubLinear(c, num_classes)
        for m in self.modules():
            if isinstance(m, (PubConv2d, PubLinear)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.avg_pool2d(self.layers(x), 2)
        return self.fc(x.flatten(1))


class PublishedPipeline:
    """The re-creation of the published code's pipeline (see the module docstring)."""

    def __init__(self, data_root: Path, work: Path, sch: dict, seed: int, device: str):
        self.root, self.work, self.sch, self.seed = data_root, work, sch, seed
        self.device = torch.device(device)
        work.mkdir(parents=True, exist_ok=True)

    def loaders(self, batch_size: int):
        """Built anew per stage, as the published get_dataloader is called by every stage."""
        import torchvision
        import torchvision.transforms as T

        import hashlib

        folder = self.root / "cifar-100-python"
        md5 = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in ("train", "test", "meta")}

        class CIFAR100(torchvision.datasets.CIFAR100):  # fabricated files: torchvision checks their md5s
            train_list = [["train", md5["train"]]]
            test_list = [["test", md5["test"]]]
            meta = {**torchvision.datasets.CIFAR100.meta, "md5": md5["meta"]}

        norm = [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm])
        full = CIFAR100(str(self.root), train=True, download=False, transform=train_tf)
        n_val = round(len(full) * self.sch["val_fraction"])
        # As published: the validation part of the split keeps the training transforms.
        train, val = torch.utils.data.random_split(full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(self.seed))
        test = CIFAR100(str(self.root), train=False, download=False, transform=T.Compose(norm))
        dl = torch.utils.data.DataLoader
        return dl(train, batch_size=batch_size, shuffle=True), dl(val, batch_size=batch_size), dl(test, batch_size=128)

    def test(self, model: nn.Module, loader) -> float:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                out = model(x)
                F.cross_entropy(out, y).item()
                correct += int((out.argmax(1) == y).sum().item())
                total += y.numel()
        return correct / max(total, 1)

    def train(self, model: nn.Module, o: dict, name: str, teacher: nn.Module | None = None) -> float:
        """Published train loop: initial val eval; per epoch train, val eval (+save best), test eval."""
        train, val, test = self.loaders(o["batch_size"])
        opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"], weight_decay=o["weight_decay"])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=o["milestones"], gamma=o["gamma"])
        best, best_path = 0.0, self.work / f"{name}_val_weight_temp.pth"
        self.test(model, val)
        for _ in range(o["epochs"]):
            self.epoch(model, opt, train, teacher)
            acc = self.test(model, val)
            if acc > best:
                best = acc
                torch.save(model.state_dict(), best_path)
            self.test(model, test)
            sched.step()
        if best_path.exists():
            model.load_state_dict(torch.load(best_path))
            best_path.unlink()
        return self.test(model, test)

    def epoch(self, model: nn.Module, opt: torch.optim.Optimizer, train, teacher: nn.Module | None = None,
              max_batches: int | None = None) -> int:
        """The published training epoch (its steps and its loader's per-image transforms); returns
        the images trained on. ``max_batches``: stop early (the FLOP/s measurement)."""
        model.train()
        if teacher is not None:
            teacher.eval()
        images = 0
        for i, (x, y) in enumerate(train):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            opt.zero_grad()
            out = model(x)
            if teacher is None:
                loss = F.cross_entropy(out, y)
            else:
                with torch.no_grad():
                    t_out = teacher(x)
                t = TEMPERATURE
                loss = (nn.KLDivLoss(reduction="batchmean")(F.log_softmax(out / t, 1), F.softmax(t_out / t, 1)) * (ALPHA * t * t)
                        + F.cross_entropy(out, y) * (1 - ALPHA))
            loss.item()
            loss.backward()
            opt.step()
            images += y.numel()
        return images

    def prune(self, model: nn.Module, rate: float) -> None:
        """Global L1 unstructured pruning of ``rate`` of the remaining conv/linear weights, on a copy."""
        work = copy.deepcopy(model)
        layers = [m for m in work.modules() if isinstance(m, (PubConv2d, PubLinear))]
        scores = torch.cat([(m.weight * m.weight_mask).abs().flatten()[m.weight_mask.flatten() > 0] for m in layers])
        k = int(round(rate * scores.numel()))
        threshold = torch.kthvalue(scores, k).values if k > 0 else scores.min() - 1
        for m in layers:
            m.weight_mask.mul_(((m.weight * m.weight_mask).abs() > threshold).float())
        # Copy the masks back to the original model, as the published mask_copy does.
        for (n, b), (_, b2) in zip(model.named_buffers(), work.named_buffers()):
            if n.endswith("_mask"):
                b.copy_(b2)

    def run(self) -> dict[str, Any]:
        sch, stages = self.sch, {s: 0.0 for s in STAGES}
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        teacher = PubVGG(scaled(VGG19, sch["width"])).to(self.device)
        t1 = time.perf_counter()
        stages["startup"] = t1 - t0
        self.train(teacher, sch["teacher"], "pre")
        torch.save(teacher.state_dict(), self.work / "pre_model.pth")
        t2 = time.perf_counter()
        stages["teacher"] = t2 - t1
        self.prune(teacher, sch["rate"])
        self.train(teacher, sch["retrain"], "post")
        torch.save(copy.deepcopy(teacher).state_dict(), self.work / "post_model_0.80.pth")
        t3 = time.perf_counter()
        stages["prune"] = t3 - t2
        torch.manual_seed(self.seed)
        student = PubVGG(scaled(ST79, sch["width"])).to(self.device)
        acc = self.train(student, sch["distill"], "kd", teacher=teacher)
        torch.save(student.state_dict(), self.work / "kd_model.pth")
        t4 = time.perf_counter()
        stages["distill"] = t4 - t3
        return {"total_s": t4 - t0, "stages": stages, "test_acc": acc}


# ----------------------------------------------------------------------------- FLOP/s against the peak
def matmul_peak(dtype: torch.dtype, n: int, device: str, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of an n x n x n torch.matmul (2 n^3 FLOPs), best of repeated timed runs."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(data_root: Path, sch: dict, device: str, batches: int) -> dict[str, Any]:
    """Achieved FLOP/s of ptd's teacher and KD student training steps, through ptd.train.loop.fit.

    FLOPs per trained image = 3 x forward FLOPs (forward, backward for inputs and for weights) of
    the trained model, plus 1 x forward of the teacher under KD; counted by ptd.measure.flops.
    """
    from ptd.config import OptimConfig
    from ptd.data import load_dataset, make_loader
    from ptd.distill import build_distiller
    from ptd.measure import flops
    from ptd.models import build_model
    from ptd.train.loop import Runtime, fit

    splits = load_dataset("cifar100", str(data_root), val_fraction=sch["val_fraction"], seed=0)
    rt = Runtime(device=torch.device(device), amp=True, channels_last=True, quiet=True)
    o = sch["teacher"]
    n = min(len(splits.train), batches * o["batch_size"])
    from ptd.data.base import take

    loader = make_loader(take(splits.train, torch.arange(n)), batch_size=o["batch_size"], train=True, mean=splits.mean, std=splits.std,
                         device=rt.device, seed=0, crop_padding=4, channels_last=True)
    optim = OptimConfig(epochs=1, batch_size=o["batch_size"], lr=0.01, weight_decay=5e-4)
    teacher = rt.prepare(build_model("vgg19", num_classes=100, width=sch["width"]))
    student = rt.prepare(build_model("vgg", num_classes=100, plan=scaled(ST79, sch["width"])))
    f_t, f_s = flops(teacher, (3, 32, 32)), flops(student, (3, 32, 32))
    out: dict[str, Any] = {"uses_bf16_autocast": rt.uses_amp, "images": (n // o["batch_size"]) * o["batch_size"]}
    fit(teacher, loader, None, optim, rt)  # warm-up: allocator, oneDNN primitive caches
    for name, model, loss, per_img in (("teacher", teacher, None, 3 * f_t),
                                       ("student_kd", student, "kd", 3 * f_s + f_t)):
        kw = {} if loss is None else {"unit": build_distiller(model, teacher, "kd", options={"kd": {"alpha": ALPHA, "temperature": TEMPERATURE}},
                                                             num_classes=100, num_samples=n)}
        r = fit(model, loader, None, optim, rt, **kw)
        r = fit(model, loader, None, optim, rt, **kw)  # the second run is timed (first: warm-up)
        out[name] = {"flops_per_image": per_img, "images_per_s": out["images"] / r["wall_s"],
                     "flop_per_s": per_img * out["images"] / r["wall_s"]}
    # The published way's steps on the same architectures and FLOP counts: its loop, its loader
    # (per-image PIL transforms), NCHW float32 with masks multiplied in. How close IT runs to the
    # machine's peak bounds what any faster implementation can gain over it.
    pub = PublishedPipeline(data_root, data_root.parent / "published_steps", sch, 0, device)
    train, _, _ = pub.loaders(o["batch_size"])
    p_teacher = PubVGG(scaled(VGG19, sch["width"])).to(pub.device)
    p_student = PubVGG(scaled(ST79, sch["width"])).to(pub.device)
    for name, model, teacher, per_img in (("published_teacher", p_teacher, None, out["teacher"]["flops_per_image"]),
                                          ("published_student_kd", p_student, p_teacher, out["student_kd"]["flops_per_image"])):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        pub.epoch(model, opt, train, teacher, max_batches=batches)  # warm-up, as for ptd's side
        t = time.perf_counter()
        images = pub.epoch(model, opt, train, teacher, max_batches=batches)
        wall = time.perf_counter() - t
        out[name] = {"flops_per_image": per_img, "images_per_s": images / wall, "flop_per_s": per_img * images / wall}
    return out


def step_ceiling(steps: dict[str, Any], peak: dict[str, float | None]) -> dict[str, Any]:
    """How far ptd's steps are from the hardware's limit, and what that limit allows against the
    published way: per step, ``best_peak / published FLOP/s`` is the largest speedup ANY
    implementation doing the same FLOPs could reach (it would run at the matmul peak of the
    fastest arithmetic this machine has: bf16 where it is native, else fp32)."""
    best = max(v for v in peak.values() if v)
    out: dict[str, Any] = {"best_peak_flop_per_s": best}
    for k in ("teacher", "student_kd"):
        p, pub = steps[k]["flop_per_s"], steps[f"published_{k}"]["flop_per_s"]
        out[k] = {"achieved_ratio": p / pub, "ceiling_ratio": best / pub, "ptd_of_best_peak": p / best,
                  "published_of_fp32_peak": pub / peak["fp32"]}
    return out


# ----------------------------------------------------------------------------- driver
def spread(xs: list[float]) -> dict[str, Any]:
    if not xs:  # e.g. steady epochs of one-epoch stages
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test (< 1 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one alternating pair per seed")
    p.add_argument("--n-train", type=int, default=2560, help="fabricated training images (val_fraction of them validate)")
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of teacher and student")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--retrain-epochs", type=int, default=1)
    p.add_argument("--distill-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="off", help="ptd's compile key for its side (e.g. reduce-overhead on a GPU); "
                   "each stage then pays its compile in its first epoch")
    p.add_argument("--flops-batches", type=int, default=4, help="batches per timed FLOP/s run")
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--out", default="benchmarks/results", help="folder for pipeline_speed.json/.md")
    p.add_argument("--tag", default="pipeline_speed", help="file name stem of the results")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.n_train, a.n_test, a.width, a.flops_batches, a.peak_n, a.batch_size = a.seeds[:1], 160, 64, 0.125, 1, 256, 32
    if a.threads:
        torch.set_num_threads(a.threads)
    return a


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from ptd.measure import cpu_name

    a = parse_args(argv)
    sch = schedule(a)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Import once before timing: both sides share torchvision (~3-10 s to import here), and the
    # first side of the first pair must not pay it for the other.
    import torchvision.datasets  # noqa: F401
    import ptd.pipeline, ptd.data, ptd.distill, ptd.students.report  # noqa: F401,E401
    # Likewise torch._dynamo, which torch.optim imports at the first optimizer either side makes
    # (~3 s here): paid once per process, by whichever side ran first.
    import torch._dynamo  # noqa: F401
    # With compile on, ptd also runs eager in the same pair: the compile's gain through a whole
    # pipeline, on the same machine, is what the compiled side alone cannot say.
    sides = ("ptd", "published") + (("ptd_eager",) if sch["compile"] != "off" else ())
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    (out_dir / f"{a.tag}.runs.jsonl").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="ptd_pipeline_speed_") as tmp:
        data_root = write_cifar100(Path(tmp) / "data", a.n_train, a.n_test)
        for i, seed in enumerate(a.seeds):
            order = sides if i % 2 == 0 else sides[::-1]  # ABBA: drift hits every side alike
            for side in order:
                work = Path(tmp) / f"{side}_{seed}"
                if side.startswith("ptd"):
                    s = sch if side == "ptd" else {**sch, "compile": "off"}
                    r = run_ptd(data_root, work, s, seed, a.device, a.threads)
                else:
                    r = PublishedPipeline(data_root, work, sch, seed, a.device).run()
                r["seed"] = seed
                runs[side].append(r)
                with open(out_dir / f"{a.tag}.runs.jsonl", "a") as f:  # kept if a long run is interrupted
                    f.write(json.dumps({"side": side, **r}) + "\n")
                log(f"{side:9s} seed {seed}: {r['total_s']:7.1f} s, test acc {r['test_acc']:.4f}  "
                    + " ".join(f"{k} {v:.1f}" for k, v in r["stages"].items() if v))
        flo = step_flops(data_root, sch, a.device, a.flops_batches)
    # bf16 only where it is native: emulated (an AVX2-only CPU) it runs at ~0.2% of fp32 here, and
    # one 2048^3 product would take a minute to say so. ptd trains in fp32 there (Runtime.uses_amp).
    native_bf16 = flo["uses_bf16_autocast"] or a.device.startswith("cuda")
    peak = {"fp32": matmul_peak(torch.float32, a.peak_n, a.device),
            "bf16": matmul_peak(torch.bfloat16, a.peak_n, a.device) if native_bf16 else None}
    ratios = [pub["total_s"] / p["total_s"] for p, pub in zip(runs["ptd"], runs["published"])]
    stage_ratios = {s: spread([pub["stages"][s] / p["stages"][s] for p, pub in zip(runs["ptd"], runs["published"])])
                    for s in ("teacher", "prune", "distill") if all(p["stages"][s] > 0 for p in runs["ptd"])}
    for k in ("teacher", "student_kd", "published_teacher", "published_student_kd"):
        flo[k]["of_fp32_peak"] = flo[k]["flop_per_s"] / peak["fp32"]
        flo[k]["of_bf16_peak"] = flo[k]["flop_per_s"] / peak["bf16"] if peak["bf16"] else None
    # Seconds per epoch of each training stage, evaluation and checkpoints included (the GPU report).
    epochs = {"teacher": sch["teacher"]["epochs"], "prune": sch["retrain"]["epochs"], "distill": sch["distill"]["epochs"]}
    per_epoch = {side: {s: spread([r["stages"][s] / n for r in rs]) for s, n in epochs.items()} for side, rs in runs.items()}
    # ptd's epochs one by one: the first of each fit against the steady ones after it (compile cost).
    epoch_detail = {side: {s: {"first": spread([r["epoch_s"][s][0] for r in rs]),
                               "steady": spread([v for r in rs if (v := steady_epoch_s(r["epoch_s"][s])) is not None])}
                           for s in epochs} for side, rs in runs.items() if side.startswith("ptd")}
    compile_gain = None
    if "ptd_eager" in runs:  # eager / compiled, per stage and end to end, pair by pair
        compile_gain = {"end_to_end": spread([e["total_s"] / c["total_s"] for c, e in zip(runs["ptd"], runs["ptd_eager"])])}
        for s in epochs:
            compile_gain[s] = spread([e["stages"][s] / c["stages"][s] for c, e in zip(runs["ptd"], runs["ptd_eager"])])
            st = [(steady_epoch_s(e["epoch_s"][s]), steady_epoch_s(c["epoch_s"][s])) for c, e in zip(runs["ptd"], runs["ptd_eager"])]
            if all(x is not None and y for x, y in st):
                compile_gain[f"{s}_steady_epoch"] = spread([x / y for x, y in st])
    gpu = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None
    result = {"machine": {"cpu": cpu_name(), "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__},
              "args": vars(a), "schedule": sch, "runs": runs, "end_to_end_ratio": spread(ratios), "stage_ratio": stage_ratios, "per_epoch_s": per_epoch,
              "epoch_detail": epoch_detail, "compile_gain": compile_gain,
              "test_acc": {side: [r["test_acc"] for r in rs] for side, rs in runs.items()},
              "matmul_peak_flop_per_s": peak, "train_step": flo, "step_ceiling": step_ceiling(flo, peak)}
    (out_dir / f"{a.tag}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{a.tag}.md").write_text(render_md(result))
    log(render_md(result))
    return result


def render_md(r: dict[str, Any]) -> str:
    e = r["end_to_end_ratio"]
    lines = [f"# pipeline_speed: ptd vs the published code's way (re-creation), {r['machine']['gpu'] or r['machine']['cpu']}",
             "", f"threads {r['machine']['threads']}, torch {r['machine']['torch']}; schedule: teacher {r['schedule']['teacher']['epochs']} ep, "
             f"IMP 20% + {r['schedule']['retrain']['epochs']} ep, KD {r['schedule']['distill']['epochs']} ep into st79 "
             f"(width {r['schedule']['width']}), {r['args']['n_train']} train / {r['args']['n_test']} test images"
             + (f"; ptd with compile: {r['schedule']['compile']}" if r['schedule'].get('compile', 'off') != 'off' else "") + ".", "",
             f"**End to end: published / ptd = {e['median']:.2f}x** (min {e['min']:.2f}, max {e['max']:.2f}, {e['n']} alternating pairs)", "",
             "| seed | side | total s | " + " | ".join(STAGES) + " | test acc |", "|---" * (len(STAGES) + 4) + "|"]
    for side, rs in r["runs"].items():
        for x in rs:
            lines.append(f"| {x['seed']} | {side} | {x['total_s']:.1f} | " + " | ".join(f"{x['stages'][s]:.1f}" for s in STAGES)
                         + f" | {x['test_acc']:.4f} |")
    lines += ["", "Per-stage ratio published / ptd (median [min, max]); ptd's startup and student stage have no published counterpart:", ""]
    lines += [f"- {s}: {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]" for s, v in r["stage_ratio"].items()]
    lines += ["", "Seconds per epoch (median; stage time / its epochs, evaluation and checkpoints included): " + "; ".join(
        f"{side}: " + ", ".join(f"{s} {v['median']:.1f}" for s, v in pe.items()) for side, pe in r["per_epoch_s"].items())]
    ed = r.get("epoch_detail")
    if ed:
        lines += ["", "ptd's epochs one by one (median s): a fit's first epoch (compile and warm-up) / the steady ones after it: " + "; ".join(
            f"{side}: " + ", ".join(f"{s} {v['first']['median']:.2f} / " + (f"{v['steady']['median']:.2f}" if v["steady"]["n"] else "-")
                                    for s, v in sd.items()) for side, sd in ed.items())]
    cg = r.get("compile_gain")
    if cg:
        lines += ["", f"Compile ({r['schedule']['compile']}) against eager, ptd eager / ptd compiled, same pairs (median [min, max]):", ""]
        lines += [f"- {k.replace('_', ' ')}: {v['median']:.2f}x [{v['min']:.2f}, {v['max']:.2f}]" for k, v in cg.items()]
    acc = r["test_acc"]
    lines += ["", "Distilled student test accuracy, mean over seeds: " + ", ".join(
        f"{k} {statistics.mean(v):.4f} (sd {statistics.pstdev(v):.4f}, n {len(v)})" for k, v in acc.items()), ""]
    pk, ts = r["matmul_peak_flop_per_s"], r["train_step"]
    bf16 = f"bf16 {pk['bf16'] / 1e9:.1f} GFLOP/s" if pk["bf16"] else "bf16 not native (emulated; not measured)"
    lines += [f"Matmul peak: fp32 {pk['fp32'] / 1e9:.1f} GFLOP/s, {bf16} "
              f"(n={r['args']['peak_n']}); ptd bf16 autocast in use: {ts['uses_bf16_autocast']}", "",
              "| training step | GFLOP/image | images/s | GFLOP/s | of fp32 peak | of bf16 peak |", "|---|---|---|---|---|---|"]
    for k in ("teacher", "student_kd", "published_teacher", "published_student_kd"):
        if k not in ts:  # results written before the published steps were timed
            continue
        v = ts[k]
        of_bf16 = f"{v['of_bf16_peak']:.2f}" if v.get("of_bf16_peak") is not None else "-"
        lines.append(f"| {k.replace('_', ' ', 1) if k.startswith('published') else 'ptd ' + k} | {v['flops_per_image'] / 1e9:.3f} | "
                     f"{v['images_per_s']:.1f} | {v['flop_per_s'] / 1e9:.1f} | {v['of_fp32_peak']:.2f} | {of_bf16} |")
    c = r.get("step_ceiling")
    if c:
        lines += ["", "Against the hardware's limit (best matmul peak here: "
                  f"{c['best_peak_flop_per_s'] / 1e9:.1f} GFLOP/s). The ceiling is the speedup over the published step that an "
                  "implementation of the same FLOPs running at that peak would reach; no end-to-end ratio can exceed it by "
                  "more than what ptd saves outside the steps:", ""]
        lines += [f"- {k}: ptd step {v['achieved_ratio']:.2f}x the published step, ceiling {v['ceiling_ratio']:.2f}x "
                  f"(ptd at {v['ptd_of_best_peak']:.2f} of the best peak; the published step at {v['published_of_fp32_peak']:.2f} "
                  "of the fp32 peak)" for k, v in c.items() if k != "best_peak_flop_per_s"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
