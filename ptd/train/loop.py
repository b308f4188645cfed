"""The one training loop. Pruning, distillation and DDP extend it through hooks and a training
unit; none of them fork it.

- ``unit``: the ``nn.Module`` that is optimized, moved to the device, DDP-wrapped, checkpointed and
  resumed, called as ``unit(x, y, index, epoch) -> (loss, logits, {term: value})``. It contains
  ``model`` (whose weights are the stage's product) and may hold more trainable state (a
  distillation loss's regressor or memory bank). Default: ``Supervised(model)``, cross-entropy.
  Batches are ``(x, y)`` or ``(x, y, index)``; index is the samples' positions in the split.
- hooks: objects with any of ``on_start(model)``, ``before_step(model)`` (after backward, before
  the optimizer step), ``after_step(model)``, ``end_epoch(epoch, metrics)``, ``allow_best(epoch)
  -> bool`` (False: this epoch may not become the best checkpoint), and optionally
  ``state_dict()/load_state_dict()`` so a resumed run restores them, each by its ``resume_key``
  (default: its class name; unique among a fit's stateful hooks), never by its position in the list.
- Every epoch ends in ONE commit (``resume.pt``, see ptd.train.checkpoint and docs/resume.md):
  the unit's weights, optimizer, scheduler, RNG, hook states and the metrics rows become visible
  together by one rename, or not at all. metrics.jsonl is a view rewritten from the committed rows;
  the weights ``keep`` names (the best validation epoch's, or the last's) are kept as
  model.safetensors and loaded back at the end.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ptd import paths as P
from ptd.config import CHECKPOINTS, COMPILE_MODES, OptimConfig
from ptd.errors import DivergedError
from ptd.seeding import stream_seed
from ptd.train import checkpoint as ckpt
from ptd.train.distributed import Dist, all_sum, broadcast_buffers, broadcast_object, first_true
from ptd.train.fastconv import small_image_wgrad
from ptd.train.optim import make_optimizer, make_scheduler



@functools.lru_cache(maxsize=None)  # read /proc/cpuinfo once, not at every autocast (about 1.8 s per demo)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16).

    Elsewhere oneDNN emulates bf16 and autocast would make training slower, not faster.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def cuda_has_native_bf16(index: int | None = None) -> bool:
    """True on GPUs with bfloat16 tensor cores: NVIDIA compute capability 8.0 and up (A100, H100,
    RTX 30xx and later), and ROCm GPUs. Older ones (V100, T4) have none, so bf16 autocast there is
    emulated or refused by kernels: ptd trains in fp32 on them (env.json's amp_bf16 says which)."""
    if torch.version.hip:
        return True
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).major >= 8


@dataclass(frozen=True)
class Runtime:
    """Where and how to run: resolved once by the caller."""

    device: torch.device = torch.device("cpu")
    # bfloat16 autocast: on GPUs and CPUs with native bf16 (cuda_has_native_bf16, cpu_has_native_bf16).
    # Weights, optimizer state and the loss stay float32; only matmul/conv inputs are rounded to bf16.
    amp: bool = False
    channels_last: bool = True
    quiet: bool = False
    dist: Dist = field(default_factory=Dist)
    # CPU: weight gradients of convs on small images by one GEMM instead of oneDNN's kernel
    # (ptd.train.fastconv; 1.45x on the CIFAR VGG19 step here). Off: stock kernels throughout.
    fast_wgrad: bool = True
    # torch.compile of the networks while they train (ptd.config.COMPILE_MODES); see compiled().
    compile: str = "off"

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"Runtime.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    @property
    def uses_cuda_graphs(self) -> bool:
        # torch.compile's "max-autotune" turns CUDA graphs on as "reduce-overhead" does
        return self.compile in ("reduce-overhead", "max-autotune") and self.device.type == "cuda"

    @property
    def uses_amp(self) -> bool:
        return self.amp and ((self.device.type == "cuda" and cuda_has_native_bf16(self.device.index))
                             or (self.device.type == "cpu" and cpu_has_native_bf16()))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.uses_amp)

    @property
    def uses_fast_wgrad(self) -> bool:
        # Not under torch.compile: dynamo cannot trace the patched conv forward (a functools.partial),
        # and inductor makes its own choice of weight-gradient kernel anyway.
        return self.fast_wgrad and self.device.type == "cpu" and self.compile == "off"

    def training(self, unit: nn.Module):
        """The context a unit trains in: ``fit`` wraps its epochs in it; a benchmark stepping
        ``train_step`` by hand enters it too, so it times what ``fit`` runs."""
        return _training(unit, self)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


@contextlib.contextmanager
def _training(unit: nn.Module, rt: Runtime):
    """Yields what small_image_wgrad yields (the number of convs it patched)."""
    with small_image_wgrad(unit, enabled=rt.uses_fast_wgrad) as patched:
        with (compiled(unit, rt.compile) if rt.compile != "off" else contextlib.nullcontext()):
            yield patched


def compiled_networks(unit: nn.Module) -> list[nn.Module]:
    """The networks a unit runs: its ``model`` (Supervised) or ``student`` (Distiller), and the
    frozen ``teacher`` a Distiller holds outside its submodules. Loss modules stay eager."""
    nets = [getattr(unit, name, None) for name in ("model", "student")] + [unit.__dict__.get("teacher")]
    nets = [m for m in nets if isinstance(m, nn.Module)]
    return nets or [unit]


@contextlib.contextmanager
def compiled(unit: nn.Module, mode: str):
    """torch.compile the unit's networks in place (``nn.Module.compile``: state_dict keys, hooks
    and the objects the caller holds stay the same) for the duration of the block; eager again
    after it, so checkpoints, export, latency and derivation never see a compiled module.

    Dynamo's caches are reset on entry: every ``fit`` compiles its own models afresh (a pipeline
    trains many model instances, which would otherwise pile up in one cache and fall back to
    eager at its size limit)."""
    import torch._dynamo

    nets = compiled_networks(unit)
    torch._dynamo.reset()
    for m in nets:
        m.compile(mode=None if mode == "default" else mode)
    try:
        yield unit
    finally:
        for m in nets:
            m._compiled_call_impl = None


class Supervised(nn.Module):
    """The default unit: ``model`` trained on cross-entropy with the labels, no extra terms."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None,
                epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits, {}


def _split_batch(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


def _check_unit(unit: nn.Module, model: nn.Module) -> None:
    if unit is not model and not any(m is model for m in unit.modules()):
        raise ValueError("fit: the training unit must contain the model as a submodule")


def _restore(state: dict[str, Any], path: Path, unit: nn.Module, opt: torch.optim.Optimizer, sched: Any,
             hooks: Sequence[Any]) -> None:
    """Put a committed epoch back: unit weights, optimizer, scheduler, hook states, RNG."""
    try:
        unit.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        saved = state.get("hooks") or {}
        if isinstance(saved, dict):
            for h in hooks:
                if hasattr(h, "load_state_dict") and _hook_key(h) in saved:
                    h.load_state_dict(saved[_hook_key(h)])
        else:  # a list: written before hooks had keys, when states matched by position
            for h, hs in zip(hooks, saved):
                if hs is not None and hasattr(h, "load_state_dict"):
                    h.load_state_dict(hs)
    except (KeyError, RuntimeError, ValueError) as e:  # written for another model or by another ptd
        raise ckpt.CheckpointError(f"{path / ckpt.RESUME_FILE}: does not fit this stage's model or optimizer "
                                   f"({ckpt.one_line(e)[:160]}); delete it to restart the stage from its first epoch") from None
    # Last: restoring weights and hooks draws no random numbers, but keep the order obvious.
    ckpt.set_rng_state(state["rng"])


def _hook_key(hook: Any) -> str:
    return getattr(hook, "resume_key", None) or type(hook).__name__


def _hook_states(hooks: Sequence[Any]) -> dict[str, Any]:
    """The stateful hooks' states by key. By position, a grown run that put a new hook before an
    old one handed the old one's state to the new one (and none to the old)."""
    return {_hook_key(h): h.state_dict() for h in hooks if hasattr(h, "state_dict")}


def _check_hook_keys(hooks: Sequence[Any]) -> None:
    keys = [_hook_key(h) for h in hooks if hasattr(h, "state_dict")]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"fit: stateful hooks share the resume_key {', '.join(twice)}; give each its own")


def train_step(net: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, batch: Sequence[torch.Tensor], epoch: int,
               hooks: Sequence[Any] = (), model: nn.Module | None = None):
    """One optimizer step of ``net`` (a unit, maybe DDP-wrapped) on ``batch``; returns
    (loss, logits, terms, y), all still on the device (no host sync). ``fit`` runs exactly this."""
    x, y, index = _split_batch(batch)
    if rt.uses_cuda_graphs:  # a new step: the graphs may reuse the last step's output buffers
        torch.compiler.cudagraph_mark_step_begin()
    with rt.autocast():
        loss, logits, terms = net(x, y, index, epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    target = model if model is not None else net
    _call(hooks, "before_step", target)
    opt.step()
    _call(hooks, "after_step", target)
    return loss, logits, terms, y


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, rt: Runtime) -> dict[str, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy over the whole loader: over the whole
    split for a loader sharded over ranks, each sample once (its padding is not counted)."""
    real = getattr(loader, "real_samples", None)  # this rank's samples before its share's padding
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=rt.device)
    # Per-sample losses, summed exactly at the end (math.fsum): a running float sum rounds by how
    # the split is cut into batches, so eval_batch_size, a key a resume may change, moved val_loss
    # in its last bits in every stage (crash audit). One small vector per batch, kept on the device.
    losses: list[torch.Tensor] = []
    n = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        if rt.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with rt.autocast():
            logits = model(x)
        if real is not None and n + y.numel() > real:  # padding: repeats of samples another rank counts
            keep = max(0, real - n)
            logits, y = logits[:keep], y[:keep]
        losses.append(F.cross_entropy(logits.float(), y, reduction="none"))
        correct += (logits.argmax(1) == y).sum().double()
        n += y.numel()
    model.train(was_training)
    c, n = correct.item(), float(n)
    s = math.fsum(torch.cat(losses).double().cpu().tolist()) if losses else 0.0
    if getattr(loader, "world_size", 1) > 1:  # a sharded loader: add up the ranks' counts
        c, s, n = all_sum([c, s, n], rt.device)
    if n == 0:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    return {"acc": c / n, "loss": s / n, "n": int(n)}


def _divergence(train_loss_sum: float, unit: nn.Module, val: dict[str, float] | None) -> str | None:
    """What says an epoch diverged, or None: a nan/inf training loss, weights (parameters or
    BatchNorm statistics), or validation loss.

    The training loss is computed before each step's update, so a single last step that blows the
    weights up shows only in the weights (and the validation loss after them). One reduction per
    parameter an epoch, on the device. Per rank: under DDP ``fit`` makes the decision collective.
    """
    if not math.isfinite(train_loss_sum):
        return f"the training loss became {train_loss_sum}"
    # BatchNorm's running statistics too: they can overflow while every weight stays finite (lr
    # 1,000 on the tiny config: running_var inf), and the epoch would be committed with a
    # model.safetensors that ptd's own loader then refuses, naming the wrong fix.
    checked = ckpt.finite_names(unit)
    named = [(n, t.detach()) for n, t in unit.state_dict(keep_vars=True).items() if n in checked and t.is_floating_point()]
    if named and not bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        bad = next(n for n, t in named if not bool(torch.isfinite(t).all()))
        return f"the weights became nan or inf (first: {bad})"
    if val is not None and val.get("n") and not math.isfinite(val["loss"]):
        return f"the validation loss became {val['loss']}"
    return None


def _call(hooks: Sequence[Any], name: str, *args: Any) -> None:
    for h in hooks:
        fn = getattr(h, name, None)
        if fn is not None:
            fn(*args)


@dataclass
class _Progress:
    """Where a stage stands: what each commit records besides the unit, optimizer, scheduler, RNG
    and hook states, and restores on resume. A fresh stage starts at epoch 0 with nothing kept."""

    start: int = 0  # the first epoch to train: one past the last commit's
    steps: int = 0
    wall: float = 0.0  # seconds, summed over resumed sessions
    best_acc: float = -math.inf
    best_epoch: int = -1  # of the weights kept (0-based); -1: none yet
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's rows, one per committed epoch


@dataclass
class _EpochSums:
    """An epoch's training sums, added over ranks: divided by ``seen`` they are metrics.jsonl's means."""

    steps: int  # this rank's optimizer steps
    loss: float
    correct: float
    seen: float
    terms: dict[str, float]  # each loss term's sum, in the order the unit named them


def fit(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any | None,
    optim: OptimConfig,
    rt: Runtime,
    out_dir: str | Path | None = None,
    unit: nn.Module | None = None,
    hooks: Sequence[Any] = (),
    test_loader: Any | None = None,
    desc: str = "train",
    optim_key: str = "optim",
    keep: str = "best",
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model`` in place for ``optim.epochs`` epochs; return a summary.

    The model ends holding the weights ``keep`` names: "best", the best-validation epoch's (the
    last epoch's when there is no validation set); "last", the last epoch's. With ``out_dir``,
    resumes from its last finished epoch if one is there. The summary has best_val_acc and
    best_epoch (of the weights kept: with "last", the last epoch's), test_acc (at those weights,
    when ``test_loader`` is given), epochs, steps, wall_s (summed over resumed sessions).

    An epoch whose mean training loss is nan or infinite raises ``DivergedError`` before it is
    committed (``optim_key`` names the config section to fix in its message): the run directory
    keeps the last finite epoch, and a re-run of the same config stops at the same epoch again.

    ``seed``: under DDP, the root of each rank's per-epoch RNG stream (dropout); unused on one process.
    """
    if keep not in CHECKPOINTS:
        raise ValueError(f"fit: keep must be one of {', '.join(CHECKPOINTS)}, got {keep!r}")
    out = Path(out_dir) if out_dir is not None else None
    unit = (unit if unit is not None else Supervised(model)).to(rt.device)
    _check_unit(unit, model)
    _check_hook_keys(hooks)
    net = _wrap(unit, rt)
    opt = make_optimizer(unit, optim)
    sched = make_scheduler(opt, optim)
    run = _resume(out, rt, model, unit, opt, sched, hooks)

    _call(hooks, "on_start", model)
    n_batches = len(train_loader)
    resumed = f" (resumed after epoch {run.start})" if run.start else ""  # from the directory's last commit
    if run.start and rt.dist.is_main:
        # A line as well as the bar's label: under --quiet (no bars) a resume was invisible, and a
        # bar's label goes with the bar (leave=False) (new-user audit).
        tqdm.write(f"[resumed] {desc}: after epoch {run.start} of {optim.epochs}, its last commit")
    bar = tqdm(total=optim.epochs * n_batches, initial=run.start * n_batches, desc=desc + resumed, unit="step",
               disable=rt.quiet or not rt.dist.is_main, dynamic_ncols=True, leave=False)
    best_state = None  # the kept weights in memory: used only without out_dir (ranks other than 0 hold them unused)
    net.train()
    with rt.training(unit):  # e.g. ptd.train.fastconv, for the epochs only
        for epoch in range(run.start, optim.epochs):
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]  # the rate this epoch trains at (logged before the scheduler moves it)
            sums = _train_epoch(net, opt, sched, rt, train_loader, n_batches, epoch, optim.epochs, hooks, model, bar, seed)
            run.steps += sums.steps
            val = _validate(unit, model, val_loader, rt)
            diverged = _diverged(sums.loss, unit, val, rt)
            if diverged:
                # Without this a diverged stage trains on nan weights to its end, and its nan or
                # chance-level model flows into the next stage and the comparison. Checked before
                # the commit, so the run directory keeps the last finite epoch.
                bar.close()
                raise _diverged_error(diverged, desc, epoch, optim, optim_key, lr, out, unit, rt)
            run.wall += time.perf_counter() - t0
            val_acc = val["acc"] if val is not None else None
            improved = _keeps_epoch(epoch, val_acc, run.best_acc, hooks, keep, optim.epochs)
            if improved:
                run.best_acc, run.best_epoch = (val_acc if val_acc is not None else -math.inf), epoch
            row = _metrics_row(epoch, lr, sums, val, run, improved)
            if val_acc is not None:
                bar.set_postfix(epoch=f"{epoch + 1}/{optim.epochs}", loss=f"{row['train_loss']:.3f}", val_acc=f"{val_acc:.4f}")
            # Hooks first: what they write (a rewind snapshot) and what they change (GMP's masks) belongs
            # to this epoch's commit. A kill before the commit re-runs the epoch, which redoes both.
            _call(hooks, "end_epoch", epoch, row)
            run.rows.append(row)
            if out is not None and rt.dist.is_main:
                _commit(out, epoch, unit, model, opt, sched, hooks, rt, run, improved)
            elif improved:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()

    _load_kept(model, out, best_state)
    result = {"best_val_acc": run.best_acc if run.best_acc > -math.inf else None, "best_epoch": run.best_epoch + 1,
              "epochs": optim.epochs, "steps": run.steps, "wall_s": round(run.wall, 3)}
    if test_loader is not None:
        result["test_acc"] = evaluate(model, test_loader, rt)["acc"]
    return result


def _wrap(unit: nn.Module, rt: Runtime) -> nn.Module:
    """What ``train_step`` calls: the unit, DDP-wrapped under torchrun."""
    if not rt.dist.enabled:
        return unit
    # The one place DDP wraps: the whole unit, so loss modules sync too.
    dev_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(unit, device_ids=dev_ids)


def _resume(out: Path | None, rt: Runtime, model: nn.Module, unit: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            hooks: Sequence[Any]) -> _Progress:
    """Put ``out``'s last commit back (see _restore) and return its progress; a fresh one without."""
    # The last commit, or None; one of another world size is refused (ckpt.check_world_size).
    state = ckpt.load_resume(out, world_size=rt.dist.world_size) if out is not None else None
    if state is None:
        return _Progress()
    _restore(state, out, unit, opt, sched, hooks)
    run = _Progress(start=state["epoch"] + 1, steps=state["steps"], wall=state["wall_s"], best_acc=state["best"]["acc"],
                    best_epoch=state["best"]["epoch"], rows=list(state["metrics"]))
    if rt.dist.is_main:  # the view follows the commit (a kill may have left it an epoch behind, or torn)
        _sync_metrics_view(out / P.METRICS, run.rows)
        if run.best_epoch == state["epoch"]:  # the kept weights are the commit's: a kill may have come before their save
            ckpt.save_model(out / P.MODEL, model)
    return run


def _train_epoch(net: nn.Module, opt: torch.optim.Optimizer, sched: Any, rt: Runtime, loader: Any, n_batches: int,
                 epoch: int, epochs: int, hooks: Sequence[Any], model: nn.Module, bar: Any, seed: int) -> _EpochSums:
    """One epoch of ``train_step``s, then the scheduler's step; the sums added over ranks."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if rt.dist.enabled:
        # Ranks are seeded alike, so dropout (any draw from torch's global RNG in a step) dropped
        # the same units of every rank's own samples. Each epoch draws from its own (seed,
        # epoch, rank) stream instead: ranks differ, and a resumed epoch draws what it drew
        # (the commit keeps rank 0's RNG alone). One process keeps its seeded RNG as it was.
        torch.manual_seed(stream_seed(seed, "step_rng", epoch=epoch, rank=rt.dist.rank))
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device)
    seen = steps = 0
    term_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(loader):
        loss, logits, terms, y = train_step(net, opt, rt, batch, epoch, hooks, model)
        steps += 1
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach().float() * y.numel()
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0) + v.detach().float() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        bar.update(1)
        if i % 50 == 0 or i == n_batches - 1:  # a host sync every 50 steps, and the epoch's last
            # The epoch's mean loss so far, as metrics.jsonl's train_loss ends it (one process;
            # under torchrun rank 0's share, the bar being rank 0's): one batch's
            # loss, shown every 50 steps, froze a short epoch on its first step (new-user audit).
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{(loss_sum / seen).item():.3f}")
    sched.step()
    total = all_sum([loss_sum.item(), correct.item(), float(seen), *(t.item() for t in term_sums.values())], rt.device)
    return _EpochSums(steps, total[0], total[1], total[2], dict(zip(term_sums, total[3:])))


def _validate(unit: nn.Module, model: nn.Module, val_loader: Any | None, rt: Runtime) -> dict[str, float] | None:
    """The epoch's validation metrics (``evaluate``), or None without a validation set."""
    # Every rank evaluates rank 0's model, the one rank 0 saves: DDP left each rank rank 0's
    # buffers plus one BatchNorm update from its own last batch, so val metrics, the best
    # epoch, hooks' rows and the divergence decision differed by rank (val_loss every epoch).
    if rt.dist.enabled:
        broadcast_buffers(unit)
    return evaluate(model, val_loader, rt) if val_loader is not None and len(val_loader) else None


def _diverged(train_loss_sum: float, unit: nn.Module, val: dict[str, float] | None, rt: Runtime) -> str | None:
    """``_divergence``, decided for every rank together."""
    diverged = _divergence(train_loss_sum, unit, val)
    # Collective: parameters are not re-broadcast after DDP's start, so a rank's weights can go
    # bad alone. Every rank raises the first diverged rank's error; a rank that trained on
    # would hang (or fail) in its next step's all-reduce, waiting for the ranks that stopped.
    if rt.dist.enabled:
        src = first_true(diverged is not None)
        diverged = None if src is None else broadcast_object(diverged, src)
    return diverged


def _diverged_error(why: str, desc: str, epoch: int, optim: OptimConfig, optim_key: str, lr: float, out: Path | None,
                    unit: nn.Module, rt: Runtime) -> DivergedError:
    """The error a diverged epoch raises: what diverged, where, and the config key to lower."""
    kept = f"{out} keeps epochs 1-{epoch}" if out is not None and epoch else "no epoch of it was kept"
    # A distillation unit's loss terms carry their own weights, which can diverge it as well.
    weights = ", or the loss weights of distill.options" if hasattr(unit, "student") else ""
    err = DivergedError(f"{desc}: {why} in epoch {epoch + 1} of {optim.epochs} (lr {lr:g}): training "
                        f"diverged; lower {optim_key}.lr (or its weight_decay{weights}) and run again into a new "
                        f"--out ({kept})")
    err.every_rank = rt.dist.enabled  # decided together: every rank raises this one error, rank 0 says it
    return err


def _keeps_epoch(epoch: int, val_acc: float | None, best_acc: float, hooks: Sequence[Any], keep: str, epochs: int) -> bool:
    """Whether this epoch's weights become the ones the stage keeps."""
    # Ties go to the earlier epoch, as in the published code (training/Tester.py keeps a
    # checkpoint only when accuracy > best); without validation the last epoch counts as best.
    improved = val_acc is None or val_acc > best_acc
    # A hook may veto early checkpoints (GMP: weights from before its final mask are not a level).
    improved = improved and all(h.allow_best(epoch) for h in hooks if hasattr(h, "allow_best"))
    if keep == "last":  # only the last epoch's weights are the stage's (and only they are saved)
        improved = epoch == epochs - 1
    return improved


def _metrics_row(epoch: int, lr: float, sums: _EpochSums, val: dict[str, float] | None, run: _Progress,
                 improved: bool) -> dict[str, Any]:
    """The epoch's row of metrics.jsonl (and of the commit, and what end_epoch hooks see)."""
    val_acc = val["acc"] if val is not None else None
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums.loss / max(sums.seen, 1),
           "train_acc": sums.correct / max(sums.seen, 1), "val_loss": val["loss"] if val else None,
           "val_acc": val_acc, "steps": run.steps, "wall_s": round(run.wall, 3), "best": improved}
    if sums.terms:  # each loss term, averaged over the epoch's samples like train_loss
        row["terms"] = {k: v / max(sums.seen, 1) for k, v in sums.terms.items()}
    return row


def _commit(out: Path, epoch: int, unit: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            hooks: Sequence[Any], rt: Runtime, run: _Progress, improved: bool) -> None:
    """Commit the epoch (rank 0): resume.pt, then the kept weights if they are this epoch's, then the view."""
    ckpt.save_resume(out, {  # THE commit point of this epoch
        "epoch": epoch, "model": unit.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "world_size": rt.dist.world_size,  # a resume at another world size is refused (ckpt.check_world_size)
        "rng": ckpt.rng_state(), "hooks": _hook_states(hooks),
        "metrics": run.rows, "best": {"epoch": run.best_epoch, "acc": run.best_acc}, "steps": run.steps, "wall_s": run.wall})
    # The kept weights after their commit, never before: saved first, a kill before the
    # commit left the weights of an epoch the resume then re-ran, and where the re-run
    # differs (CUDA; other threads) and does not improve, the stage ended on weights its
    # record never scored (crash audit). A kill between the two is mended on resume (_resume).
    if improved:
        ckpt.save_model(out / P.MODEL, model)
    ckpt.write_metrics(out / P.METRICS, run.rows)  # a view of the commit; a kill here leaves it behind


def _load_kept(model: nn.Module, out: Path | None, best_state: dict[str, torch.Tensor] | None) -> None:
    """Back to the weights kept (the best-validation epoch's, or with keep="last" the last epoch's)."""
    if out is not None:
        from ptd.train.distributed import barrier

        barrier()
        ckpt.load_into(model, out / P.MODEL)
    elif best_state is not None:
        model.load_state_dict(best_state)


def cleanup_resume_files(out_dir: str | Path) -> None:
    """Drop the per-epoch resume commit once a stage's ``done`` is written (it can be as big as the
    model). Never before ``done``: a kill in between would retrain the whole stage."""
    ckpt.remove_resume(out_dir)  # missing files are fine: under DDP every rank calls this


def _sync_metrics_view(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the committed rows unless it already holds exactly them."""
    want = "".join(json.dumps(r) + "\n" for r in rows)
    have = path.read_text(errors="replace") if path.is_file() else ("" if rows else None)
    if have != want and (rows or have is not None):
        ckpt.write_metrics(path, rows)
