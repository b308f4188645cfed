"""The stages: teacher, pruning, student, distillation and the control teacher, each a function
of the context and earlier stages' artifacts that runs through ``run_stage``; the students of
one teacher replicate."""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ptd import paths as P
from ptd.config import ARM_TABLE, ConfigError, OptimConfig, PruneConfig, RunConfig
from ptd.models import build_from_spec, spec_to_text
from ptd.pruning import STRATEGIES, Level, PruneContext, retrain_optim
from ptd.seeding import stream_seed
from ptd.pruning.masks import MaskHook, Masks, apply_masks, count, full_masks, layer_report, load_masks, prunable_weights, require_connected, save_masks, sparsity
from ptd.train import checkpoint as ckpt
from ptd.train.loop import cleanup_resume_files
from ptd.errors import LayerCollapseError, counted, one_line
from ptd.pipeline.lineage import _input_key, is_done, sources
from ptd.pipeline.rundir import RunDirError, make_dir, read_json
from ptd.pipeline.context import Context


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency, but seeding must not be the thing that fails
        pass


# ---------------------------------------------------------------- stages


class _SaveAtEpoch:
    """Teacher-stage hook: keep the weights after epoch ``epoch`` (for IMP weight rewinding; 0: the
    initialization, saved before the first epoch). Idempotent: a re-run of the epoch (after a kill
    before its commit) rewrites the same file; a resumed run past that epoch never touches it."""

    def __init__(self, model: nn.Module, epoch: int, path: Path, main: bool):
        self.model, self.epoch, self.path, self.main = model, epoch, path, main
        self.resumed = False
        self.resume_key = f"snapshot_epoch_{epoch}"  # a sweep may keep several epochs: one state each

    def on_start(self, model: nn.Module) -> None:
        # on_start also runs after a resume, with the committed (trained) weights: not the init. A
        # hook added by a grown run finds no state of its own in the commit to say so, so a commit
        # in the folder says it too (stage_teacher saves the init before such a fit).
        if self.epoch == 0 and not self.resumed and self.main and not (self.path.parent / ckpt.RESUME_FILE).exists():
            ckpt.save_model(self.path, self.model)

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        if epoch + 1 == self.epoch and self.main:
            ckpt.save_model(self.path, self.model)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.resumed = True  # fit restores a commit: at least one epoch is behind us


def snapshot_epochs(cfg: RunConfig, strategies: Sequence[str] | None = None) -> tuple[int, ...]:
    """The teacher epochs whose weights the pruning strategies of this run need (weight rewinding),
    as the strategies declare them, in order. ``strategies``: a sweep's, each with its section of
    prune.options; default: the run's one strategy with all of prune.options. Every one is kept:
    a sweep of two weight-rewinding strategies at epochs 2 and 5 kept only 2, and the second
    strategy failed for want of epoch 5 after the teacher had trained."""
    from ptd.pruning import SPECS, options_for, strategy_options

    if strategies is None:
        wanted = [(cfg.prune.strategy, dict(cfg.prune.options))]
    else:
        wanted = [(st, options_for(cfg.prune.options, st)) for st in strategies]
    epochs = {SPECS.get(st).snapshot_epoch(strategy_options(st, opts)) for st, opts in wanted}
    return tuple(sorted(e for e in epochs if e is not None))  # 0 is an epoch too: the initialization


def run_stage(ctx: Context, d: Path, compute: Callable[[], dict], *, result_file: str = P.RESULT,
              cleanup: bool = True, inputs: Sequence[Path] | Callable[[dict], Sequence[Path]] = (),
              student: bool = False) -> tuple[dict, bool]:
    """The sequence every stage follows, once: skip if done (its result read back), else make the
    directory, ``compute()`` (a ``fit`` inside resumes from the directory's last committed epoch),
    write the result, mark done, and only then drop the resume files. Returns (result, computed now).

    ``inputs``: the files the stage is made from (earlier stages' weights, masks, stats; a user's
    checkpoint), or a function of the stage's result giving them (files the stage itself chose,
    such as the pruning's final level). ``done`` records their digests, and a finished stage whose
    inputs have changed since is refused (StaleStageError) rather than reused. ``student``: a
    distillation, the one stage a ``jobs`` worker (``ctx.in_worker``) may compute."""
    if ctx.is_done(d):
        if cleanup:  # a kill between done and the removal left the resume commit behind
            cleanup_resume_files(d)
        # A re-run said nothing of what it skipped, so a resume looked like a run that forgot a stage
        # (new-user audit).
        ctx.log(f"[reused] {_input_key(ctx.run_dir, d)}: finished earlier")
        return read_json(d / result_file), False
    if ctx.in_worker and not student:
        # An orphaned worker of a killed run (or one whose directory was deleted and started over)
        # would otherwise train the teacher or pruning there, unlocked, beside the user's re-run.
        raise RunDirError(f"{d} is not finished, and a worker trains students only: the run that started it is gone")
    if ctx.main:
        make_dir(d, f"the stage folder {d}")
    result = compute()
    ctx.write_json(d / result_file, result)
    ctx.done(d, inputs(result) if callable(inputs) else inputs)
    if cleanup:
        cleanup_resume_files(d)
    return result, True


def clone_model(ctx: Context, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same architecture and weights) on the run's device, to train apart."""
    copy = ctx.sized(build_from_spec(model.ptd_spec))
    copy.load_state_dict(model.state_dict())
    return ctx.rt.prepare(copy)


def teacher_seed(cfg: RunConfig, replicate: int = 0) -> int:
    """The data-order seed of teacher replicate ``replicate``'s training, pruning and control."""
    return stream_seed(cfg.seed, "teacher", replicate)


def student_seed(cfg: RunConfig, seed: int, replicate: int = 0) -> int:
    """The data-order seed of student ``seed`` under teacher replicate ``replicate``: the same in
    every arm and loss, so arms pair seed by seed within a replicate."""
    return stream_seed(cfg.seed, "student", seed, epoch=replicate)


def stage_teacher(ctx: Context, snapshot: Sequence[int] | str = "auto", replicate: int = 0) -> tuple[nn.Module, dict]:
    """Train (or load) teacher replicate ``replicate``; ``snapshot``: also keep its weights after
    each of these epochs ("auto": what the run's pruning strategy declares it needs)."""
    cfg, d = ctx.cfg, P.replicate_root(ctx.run_dir, replicate) / P.TEACHER
    model = ctx.new_model(cfg.teacher.model)

    def compute() -> dict:
        nonlocal model
        seed_everything(stream_seed(cfg.seed, "teacher_init", replicate))
        model = ctx.new_model(cfg.teacher.model)
        if cfg.teacher.checkpoint:
            ctx.log(f"[teacher] loading {cfg.teacher.checkpoint}")
            ckpt.load_into(model, cfg.teacher.checkpoint, "teacher")
            model = ctx.rt.prepare(model)
            result = {**ctx.scores(model), "source": str(cfg.teacher.checkpoint), "epochs": 0, "steps": 0, "wall_s": 0.0}
            if ctx.main:
                ckpt.save_model(d / P.MODEL, model)
        else:
            model = ctx.rt.prepare(model)
            ctx.log(f"[teacher] training {cfg.teacher.model.arch} for {counted(cfg.teacher.optim.epochs, 'epoch')}")
            hooks = []
            epochs = snapshot_epochs(cfg) if snapshot == "auto" else tuple(snapshot)
            if 0 in epochs and ctx.main and not P.snapshot_file(d, 0).exists():
                # The initialization, from the seed, before fit may restore trained weights: a sweep
                # grown mid-teacher by a strategy that rewinds to 0 got the trained weights as epoch 0.
                ckpt.save_model(P.snapshot_file(d, 0), model)
            for e in epochs:
                hooks.append(_SaveAtEpoch(model, int(e), P.snapshot_file(d, int(e)), ctx.main))
            result = ctx.fit(model, cfg.teacher.optim, d, teacher_seed(cfg, replicate), "teacher", hooks=hooks)
        result["params"] = sum(p.numel() for p in model.parameters())
        return result

    # A user's checkpoint is the teacher stage's input: replaced at the same path, the stage is stale.
    result, fresh = run_stage(ctx, d, compute, inputs=[Path(cfg.teacher.checkpoint)] if cfg.teacher.checkpoint else [])
    if not fresh:
        ckpt.load_into(model, d / P.MODEL, "teacher")
        model = ctx.rt.prepare(model)
    else:
        ctx.log(f"[teacher] test acc {result['test_acc']:.4f}")
    model.ptd_sources = (d / P.MODEL,)
    return model, result


def stage_prune(ctx: Context, teacher: nn.Module, teacher_result: dict, prune_cfg: PruneConfig | None = None,
                d: Path | None = None, replicate: int = 0) -> tuple[nn.Module, Masks, dict]:
    """Prune a copy of ``teacher`` by ``prune_cfg`` (default: the run's) into ``d`` (default: the
    replicate's prune/)."""
    cfg = replace(ctx.cfg, prune=prune_cfg) if prune_cfg is not None else ctx.cfg
    root = P.replicate_root(ctx.run_dir, replicate)
    d = d or root / P.PRUNE
    seed = teacher_seed(cfg, replicate)
    model = clone_model(ctx, teacher)
    masks = {n: m.to(ctx.rt.device) for n, m in full_masks(prunable_weights(model, cfg.prune.exclude_first, cfg.prune.exclude_last)).items()}
    if not masks:
        raise ConfigError("prune: the teacher has no prunable Conv/Linear weights (check prune.exclude_first / prune.exclude_last)")

    def level_dir(k: int) -> Path:
        return P.level_dir(d, k)

    def level_files(k: int) -> tuple[Path, ...]:
        """Level k's weights and masks, the inputs of level k + 1 (IMP's next round starts from them):
        a level redone differently must not leave the levels after it standing."""
        ld = level_dir(k)
        return (ld / P.MODEL, ld / P.MASKS) if k > 0 and (ld / P.MODEL).is_file() else ()

    def connected(mk: Masks, where: str) -> None:
        try:
            require_connected(mk, where)
        except LayerCollapseError as e:
            # A lower target is another config, so another --out: it need not train the teacher again.
            t = root / P.TEACHER / P.MODEL
            hint = f"; to reuse this run's trained teacher there, add --teacher {t}" if is_done(root / P.TEACHER) and t.is_file() else ""
            raise LayerCollapseError(f"{e}{hint}") from None

    def train(m: nn.Module, mk: Masks, name: str, optim: OptimConfig, hooks: Sequence[Any]) -> dict:
        connected(mk, f"prune {name}")  # before its epochs are spent on a network that cannot learn
        out = d / name
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
        # Dropout draws from torch's global RNG: unseeded, a level's first epoch depended on what the
        # session did before it (a teacher trained, or reused), and a resumed mobilenetv2 teacher was
        # pruned to other weights (review). A resume restores the commit's RNG over this.
        seed_everything(stream_seed(cfg.seed, f"prune {name}", replicate))
        r = ctx.fit(m, optim, out, seed, f"prune {name}", hooks=[MaskHook(mk), *hooks], keep=cfg.prune.retrain_checkpoint)
        # fit reloads the checkpoint it kept; apply the masks once more for exactness under GMP,
        # whose masks may have shrunk after a best-validation checkpoint was written.
        apply_masks(m, mk)
        return r  # its resume commit stays until save_level has written the level's done

    def save_level(level: Level) -> None:
        connected(level.masks, f"prune level_{level.index}")  # GMP's masks are final only now
        ld = level_dir(level.index)
        alive, total = count(level.masks)
        info = {"level": level.index, "sparsity": level.sparsity, "alive": alive, "total": total, **level.metrics,
                "layers": layer_report(level.masks)}
        if ctx.main:
            ld.mkdir(parents=True, exist_ok=True)
            ckpt.save_model(ld / P.MODEL, model)
            save_masks(ld / P.MASKS, level.masks)
            ckpt.write_json(ld / P.SPARSITY, info)
        ctx.done(ld, [*sources(teacher), *level_files(level.index - 1)])
        cleanup_resume_files(ld)  # crash consistency: only after done (else a kill retrains the level)

    def load_level(k: int) -> Level:
        ld = level_dir(k)
        cleanup_resume_files(ld)  # a kill between the level's done and the removal left it behind
        ckpt.load_into(model, ld / P.MODEL, "pruned teacher")
        mk = {n: t.to(ctx.rt.device) for n, t in load_masks(ld / P.MASKS, model).items()}
        info = read_json(ld / P.SPARSITY)
        metrics = {k2: v for k2, v in info.items() if k2 not in ("level", "sparsity", "alive", "total", "layers")}
        return Level(k, mk, metrics)

    def compute() -> dict:
        nonlocal masks
        retrain_loader = ctx.train_loader(cfg.prune.retrain.batch_size, seed)

        def batches(n: int) -> list:
            out = []
            retrain_loader.set_epoch(0)  # the same batches on a re-run (SNIP's scores must not change on resume)
            for i, b in enumerate(retrain_loader):
                if i >= n:
                    break
                out.append(b)
            return out

        example = torch.zeros((1, *ctx.input_shape), device=ctx.rt.device)
        pctx = PruneContext(model=model, masks=masks, cfg=cfg.prune, train=train, evaluate=ctx.scores, batches=batches,
                            level_done=lambda k: ctx.is_done(level_dir(k)), load_level=load_level, save_level=save_level,
                            example_input=example, teacher_dir=root / P.TEACHER, log=ctx.log,
                            extra={"steps_per_epoch": len(retrain_loader)})
        if cfg.prune.target_sparsity > 0:
            ctx.log(f"[prune] {cfg.prune.strategy} to sparsity {cfg.prune.target_sparsity}")
            levels = STRATEGIES.get(cfg.prune.strategy)(pctx)
        else:
            levels = []
        rows = [{"level": 0, "sparsity": 0.0, "val_acc": teacher_result.get("val_acc"), "test_acc": teacher_result["test_acc"],
                 "params_nonzero": sum(int((p != 0).sum()) for p in teacher.parameters()), "epochs": 0, "steps": 0, "wall_s": 0.0}]
        for lv in levels:
            rows.append({"level": lv.index, "sparsity": lv.sparsity, **{k: lv.metrics.get(k) for k in ("val_acc", "test_acc", "epochs", "steps", "wall_s")}})
        final = levels[-1] if levels else None
        if final is not None:
            # The model holds the last level already; make sure of it (strategies may have moved on).
            ckpt.load_into(model, level_dir(final.index) / P.MODEL, "pruned teacher")
            masks = final.masks
        rows[-1]["params_nonzero"] = sum(int((p != 0).sum()) for p in model.parameters())
        return {"strategy": cfg.prune.strategy, "target_sparsity": cfg.prune.target_sparsity, "final_level": final.index if final else 0,
                "sparsity": sparsity(masks) if final else 0.0, "levels": rows,
                "epochs": sum(r["epochs"] or 0 for r in rows), "steps": sum(r["steps"] or 0 for r in rows),
                "wall_s": round(sum(r["wall_s"] or 0 for r in rows), 3)}

    # Made from the teacher; it hands on its final level, which is recorded too, so a level redone
    # differently makes the whole stage stale, not only the levels after it.
    result, fresh = run_stage(ctx, d, compute, cleanup=False, inputs=lambda r: [*sources(teacher), *level_files(r["final_level"])])
    final = result["final_level"]
    # Later stages are made from the final level's weights and masks (the teacher's, unpruned).
    model.ptd_sources = (level_dir(final) / P.MODEL, level_dir(final) / P.MASKS) if final else sources(teacher)
    if not fresh:
        if final == 0:
            return model, masks, result
        return model, load_level(final).masks, result
    rows = result["levels"]
    ctx.log(f"[prune] sparsity {result['sparsity']:.4f}, test acc {rows[-1]['test_acc']:.4f} (dense {rows[0]['test_acc']:.4f})")
    return model, masks, result


def stage_student(ctx: Context, teacher: nn.Module, pruned: nn.Module, masks: Masks) -> dict:
    cfg, d = ctx.cfg, ctx.run_dir / P.STUDENT

    def compute() -> dict:
        # The student built here (its random init, kept as student_init with inherit, and its
        # measured figures) came from whatever the RNG held on entry: a session that computed the
        # earlier stages and one that reused them built different students (crash audit: a resumed
        # run's nonzero count 367,593 against 367,594).
        seed_everything(stream_seed(cfg.seed, "student_arch"))
        plan = None
        if cfg.student.source == "derive":
            from ptd.students import derive_configured

            sc = cfg.student
            student, plan = derive_configured(pruned, masks, inherit=sc.inherit, round_to=sc.round_to,
                                              round_narrower=sc.round_narrower, device_type=ctx.rt.device.type)
            if plan.round_to_choice:
                ctx.log(f"[student] round_to {plan.round_to_choice}")
            ctx.sized(student)
        else:
            student = ctx.new_model(cfg.student.model)
        spec = student.ptd_spec
        from ptd.students.report import compare, format_report

        ctx.log("[student] measuring parameters, FLOPs and CPU latency (batch 1 and 64, interleaved)")
        # Latency on the CPU, models timed in turn so machine noise hits all three alike. The pruned
        # teacher runs the same dense kernels as the teacher.
        # Same memory format and device for all three, or the comparison measures layouts, not models.
        student = ctx.rt.prepare(student)
        rep = compare(teacher, pruned, masks, student, plan, ctx.input_shape, measure_latency=ctx.main)
        lat = rep.get("latency", {})
        stats = {"spec": spec, **{k: {**v, "latency": {b: lat[b][k] for b in lat}} for k, v in rep["models"].items()},
                 "ratios": rep["ratios"], "plan": plan.to_dict() if plan is not None else None}
        text = format_report(rep)
        if ctx.main:
            from ptd.export import format_latency, onnx_latency
            from ptd.measure import MAX_SECONDS

            # The deployed speed: both models exported to ONNX (on copies) and timed in onnxruntime,
            # on as many threads as the PyTorch figures above, so the two runtimes compare like for
            # like (at 1 thread against PyTorch's 2, CIFAR VGG19 at batch 64 read 470 ms in
            # onnxruntime against 293 ms in PyTorch: a thread count, not a runtime, difference).
            try:
                # 20 paired rounds, as PyTorch's: at the 6 a 95% interval needs at least, it spans the lowest to the
                # highest ratio, and one noisy round left 3-5 of 8 rows on a loaded host untold. Capped at
                # MAX_SECONDS of timed runs per batch size past those 6 (a CIFAR VGG19: ~2 s, not ~16 s).
                stats["onnx_latency"] = onnx_latency(teacher, student, ctx.input_shape, repeats=20, threads=torch.get_num_threads(),
                                                     max_seconds=MAX_SECONDS)
                text += "\n" + "\n".join(format_latency(stats["onnx_latency"])) + "\n"
            except Exception as e:  # noqa: BLE001 -- a deployment timing must not end a run whose teachers are trained
                why = one_line(f"{type(e).__name__}: {e}")[:200]
                stats["onnx_latency"] = {"runtime": "onnxruntime CPU", "error": why}
                text += f"\nlatency in onnxruntime: not measured ({why})\n"
                ctx.log(f"[student] onnxruntime latency not measured: {why}")
            if ctx.rt.device.type == "cuda":  # where the run trains, the user will want to know too
                from ptd.measure import device_latency

                stats["cuda_latency"] = device_latency(teacher, student, ctx.input_shape, ctx.rt.device)
            ckpt.write_text(d / P.ARCHITECTURE, spec_to_text(spec))
            ckpt.write_text(d / P.ARCHITECTURE_TXT, f"# rebuild: ptd.models.build_from_spec(json.load(open('{P.ARCHITECTURE}')))\n{student}\n")
            ckpt.write_text(d / P.STUDENT_REPORT, text)
            if cfg.student.inherit:
                ckpt.save_model(d / P.STUDENT_INIT, student)
        return stats

    stats, fresh = run_stage(ctx, d, compute, result_file=P.STATS, cleanup=False, inputs=sources(teacher) + sources(pruned))
    if fresh:
        ctx.log(f"[student] {stats['spec']['arch']}: {stats['student']['params']:,} params vs teacher {stats['teacher']['params']:,}")
    return stats


def stage_distill(ctx: Context, arm: str, seed: int, student_stats: dict, teacher: nn.Module | None, d: Path | None = None,
                  loss: str | None = None, replicate: int = 0) -> dict:
    """Train the student for one arm and seed: alone (``teacher`` None) or distilled from
    ``teacher`` with ``loss`` (default: the run's first distill.loss), under teacher replicate
    ``replicate``."""
    cfg = ctx.cfg
    loss = None if teacher is None else (loss or cfg.distill.losses[0])
    d = d or P.distill_dir(P.replicate_root(ctx.run_dir, replicate), arm, seed, cfg.distill.folder_loss(loss))
    data_seed = student_seed(cfg, seed, replicate)

    def compute() -> dict:
        # The same (seed, replicate) gives every arm and loss the same student init and data order.
        seed_everything(stream_seed(cfg.seed, "student_init", seed, epoch=replicate))
        student = build_from_spec(student_stats["spec"])  # ctx.fit marks its input size before any save
        if cfg.student.inherit:
            ckpt.load_into(student, ctx.run_dir / P.STUDENT / P.STUDENT_INIT, "student")
        student = ctx.rt.prepare(student)
        unit = make_distiller(ctx, student, teacher, cfg.distill.optim, data_seed, "ce" if loss is None else loss)
        ctx.log(f"[distill] {name} seed {seed}: {counted(cfg.distill.optim.epochs, 'epoch')}")
        try:
            r = ctx.fit(student, cfg.distill.optim, d, data_seed, f"{name} s{seed}", unit=unit)
        finally:
            unit.remove_hooks()  # the teacher is shared by later arms
        return {"arm": arm, "seed": seed, "loss": loss, "test_acc": r["test_acc"], "val_acc": r["val_acc"], "best_epoch": r["best_epoch"],
                "params": student_stats["student"]["params"], "flops": student_stats["student"]["flops"],
                "epochs": r["epochs"], "steps": r["steps"], "wall_s": r["wall_s"]}

    name = cfg.distill.student_name(arm, loss)
    # What a student is made from: its architecture (and inherited weights), not stats.json, which
    # also holds measured latencies: a student stage redone after its done was lost came out with
    # other timings, and every finished distillation was then refused for good (bad-input audit).
    student_files = [ctx.run_dir / P.STUDENT / P.ARCHITECTURE] + ([ctx.run_dir / P.STUDENT / P.STUDENT_INIT] if cfg.student.inherit else [])
    result, fresh = run_stage(ctx, d, compute, inputs=[*sources(teacher), *student_files], student=True)
    if fresh:
        ctx.log(f"[distill] {name} seed {seed}: test acc {result['test_acc']:.4f}")
    # Set here, not only in compute: rows of runs finished before these keys existed get them too.
    result = {**result, "loss": loss}
    if cfg.teacher.seeds > 1:
        result["teacher"] = replicate
    return result


def make_distiller(ctx: Context, student: nn.Module, teacher: nn.Module | None, optim: OptimConfig, seed: int,
                   name: str | None = None) -> nn.Module:
    """The training unit for one distillation: loss ``name`` (default: the run's first) from
    ``teacher``, or plain cross-entropy (the ``ce`` loss) when there is no teacher (the scratch arm).
    ``seed``: the data-order seed of the student's loader (its first batch sizes the probe)."""
    from ptd.distill import build_distiller

    dc = ctx.cfg.distill
    name = "ce" if teacher is None else (name or dc.losses[0])
    loader = ctx.train_loader(optim.batch_size, seed)
    return build_distiller(
        student, teacher, name, options={k: v for k, v in dc.options.items() if k == name},
        defaults={"alpha": dc.alpha, "temperature": dc.temperature}, num_classes=ctx.splits.num_classes,
        num_samples=len(ctx.splits.train), labels=getattr(ctx.splits.train, "y", None),  # folder splits may not hold labels in memory
        epochs=optim.epochs, example_input=lambda: next(iter(loader))[0][:2], layer_map=dc.layer_map,
        batch_size=optim.batch_size,
    ).to(ctx.rt.device)


def _check_control_optim(ctx: Context, d: Path, each_round: OptimConfig) -> None:
    """control/optim.json records the optimizer the control's rounds train with, before its first
    round. ptd before 2026-11-29 trained every control with prune.retrain's: an unfinished control it
    left, resumed now, would mix the two (its finished rounds at the old rate, a half-trained one
    restoring the old optimizer state: three different models, review). Where the strategy's
    optimizer is prune.retrain's, an unrecorded control is the same training and is adopted."""
    want = {k: v for k, v in dataclasses.asdict(each_round).items() if k != "epochs"}
    want = json.loads(json.dumps(want))  # as it reads back (tuples as lists)
    rec = d / P.CONTROL_OPTIM
    started = any(d.glob("round_*"))
    if rec.is_file():
        have = read_json(rec)
        if have != want:
            raise RunDirError(f"{d}: its rounds were trained with another optimizer ({have}) than this config's control "
                              f"takes ({want}); delete {d} and the retrained_teacher students (distill/retrained_teacher_*) "
                              f"to retrain it, or pass --out a new directory")
        return
    if started and each_round != ctx.cfg.prune.retrain:
        old = dataclasses.asdict(ctx.cfg.prune.retrain)
        diff = ", ".join(f"{k} {old[k]} there, {v} here" for k, v in dataclasses.asdict(each_round).items() if k != "epochs" and old[k] != v)
        raise RunDirError(f"{d}: an unfinished control teacher started by an older ptd, which retrained it with "
                          f"prune.retrain's optimizer, where {ctx.cfg.prune.strategy}'s rounds train with another ({diff}); "
                          f"delete {d} to retrain it, or pass --out a new directory")
    if ctx.main:
        ckpt.write_json(rec, want)


def stage_control(ctx: Context, teacher: nn.Module, prune_result: dict, replicate: int = 0) -> tuple[nn.Module, dict]:
    """The control teacher: the unpruned teacher retrained round by round exactly as the pruned one
    was (same number of rounds, the strategy's retraining optimizer restarted each round:
    ``ptd.pruning.retrain_optim``), but never pruned. Weight rewinding has no dense counterpart (a
    dense teacher rewound each round would only repeat one round): its control keeps its weights."""
    cfg, d = ctx.cfg, P.replicate_root(ctx.run_dir, replicate) / P.CONTROL
    model = clone_model(ctx, teacher)
    # Made from the teacher, for as many rounds and epochs as the pruning's result says.
    inputs = [*sources(teacher), P.replicate_root(ctx.run_dir, replicate) / P.PRUNE / P.RESULT]

    def compute() -> dict:
        rounds = [lv for lv in prune_result["levels"] if lv["level"] > 0]
        each_round = retrain_optim(cfg.prune)
        _check_control_optim(ctx, d, each_round)
        total = {"epochs": 0, "steps": 0, "wall_s": 0.0}
        r: dict = {}
        for k, lv in enumerate(rounds, start=1):
            rd = P.round_dir(d, k)
            optim = replace(each_round, epochs=int(lv["epochs"] or each_round.epochs))

            def train_round(k: int = k, rd: Path = rd, optim: OptimConfig = optim) -> dict:
                ctx.log(f"[control] retraining the unpruned teacher, round {k}/{len(rounds)}")
                seed_everything(stream_seed(cfg.seed, f"control round {k}", replicate))  # as each pruning level (review)
                # The control ends its rounds as the pruning's do: it is the same training without the pruning.
                return ctx.fit(model, optim, rd, teacher_seed(cfg, replicate), f"control {k}", keep=cfg.prune.retrain_checkpoint)

            # round k continues from round k - 1's weights
            prev = [P.round_dir(d, k - 1) / P.MODEL] if k > 1 else []
            r, fresh = run_stage(ctx, rd, train_round, inputs=[*inputs, *prev])
            if not fresh:
                ckpt.load_into(model, rd / P.MODEL, "control teacher")
            for key in total:
                total[key] += r[key]
        if ctx.main:
            ckpt.save_model(d / P.MODEL, model)
        return {"rounds": len(rounds), "val_acc": r.get("val_acc"), "test_acc": r["test_acc"] if r else ctx.scores(model)["test_acc"], **total}

    result, fresh = run_stage(ctx, d, compute, cleanup=False,
                              inputs=lambda r: [*inputs, *([P.round_dir(d, r["rounds"]) / P.MODEL] if r["rounds"] else [])])
    model.ptd_sources = (d / P.MODEL,)
    if not fresh:
        ckpt.load_into(model, d / P.MODEL, "control teacher")
        return model, result
    ctx.log(f"[control] retrained unpruned teacher: test acc {result['test_acc']:.4f}")
    return model, result


def student_tasks(cfg: RunConfig, arms: Sequence[str]) -> list[tuple[str, int, str | None]]:
    """(arm, seed, loss) of every student of one teacher replicate, in the order they train: each
    teacher arm with each distill.loss, the scratch arm (no teacher, so no loss to vary) once."""
    return [(arm, seed, loss) for arm in arms
            for loss in (cfg.distill.losses if ARM_TABLE[arm].teacher is not None else (None,))
            for seed in cfg.distill.seeds]


def pending_students(ctx: Context, arms: Sequence[str], replicate: int = 0) -> list[tuple[str, int, str | None, int]]:
    """The (arm, seed, loss, replicate) of :func:`student_tasks` whose stage is not done."""
    cfg = ctx.cfg
    root = P.replicate_root(ctx.run_dir, replicate)
    return [(arm, seed, loss, replicate) for arm, seed, loss in student_tasks(cfg, arms)
            if not is_done(P.distill_dir(root, arm, seed, cfg.distill.folder_loss(loss)))]


def distill_all(ctx: Context, arms: Sequence[str], s_stats: dict, teachers: dict[str | None, nn.Module | None],
                replicate: int = 0) -> list[dict]:
    """Every student of one teacher replicate (:func:`student_tasks`)."""
    return [stage_distill(ctx, arm, seed, s_stats, teachers[ARM_TABLE[arm].teacher], loss=loss, replicate=replicate)
            for arm, seed, loss in student_tasks(ctx.cfg, arms)]
