"""What every DDP rank must agree on: pruning masks, the model it evaluates, the divergence
decision, the world size a stage resumes at, and a worker's life once torchrun is gone.

The two-rank checks share ONE launch of two gloo processes (each torch + ptd import costs seconds
on a shared CPU): ``_worker`` runs them all and saves what each rank saw; the tests compare.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ptd.config import OptimConfig, PruneConfig
from ptd.data import make_loader

from test_train import data as split  # 4 classes, one bright band each: learnable in an epoch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- shared by the workers and the tests

def net() -> nn.Module:
    """The same weights on every rank and in the single-process reference (BatchNorm included)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def shard(rank: int, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of rank ``rank``'s own data: what SNIP's ``ctx.batches`` gives each rank."""
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def loaders(rank: int = 0, world: int = 1):
    """A training loader sharded over ``world`` ranks (each its own half) and an unsharded val loader."""
    kw = dict(mean=(0.3,), std=(0.3,), augment=False)
    return (make_loader(split(128, 0), batch_size=16, train=True, seed=0, rank=rank, world_size=world, **kw),
            make_loader(split(64, 1), batch_size=32, train=False, **kw))


def bn_model() -> nn.Module:
    from ptd.models import build_model

    torch.manual_seed(0)
    return build_model("vgg", 4, 1, plan=[8, "M", 16, "M"])


def gmp_net(rank: int) -> nn.Module:
    """``net()`` with weights of rank ``rank``'s own."""
    m, g = net(), torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return m


def dropout_net() -> nn.Module:
    torch.manual_seed(0)
    # Dropout on the Linear's output (never exactly 0 before it), so its zeros are its mask alone.
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4))


def run_strategy(name: str, model: nn.Module, data, target: float, **options):
    """Run a registered strategy with stand-ins for the pipeline's callbacks (retraining trains
    nothing): the masks it retrains with and the masks it saves, per level."""
    import ptd.pruning.strategies  # noqa: F401  (registers them)
    from ptd.pruning.base import PruneContext, get_strategy
    from ptd.pruning.masks import full_masks, prunable_weights

    trained, saved = [], []

    def train(m, masks, run_name, optim, hooks):
        trained.append({n: t.clone() for n, t in masks.items()})
        return {"val_acc": 0.0, "test_acc": 0.0}

    ctx = PruneContext(model=model, masks=full_masks(prunable_weights(model)),
                       cfg=PruneConfig(strategy=name, target_sparsity=target, options=options),
                       train=train, evaluate=lambda m: {}, batches=lambda n: data[:n], level_done=lambda k: False,
                       load_level=None, save_level=lambda lv: saved.append({n: t.clone() for n, t in lv.masks.items()}),
                       example_input=torch.zeros(1, 1, 8, 8))
    get_strategy(name)(ctx)
    return trained, saved


def rank_masks(model: nn.Module, rank: int):
    """Masks at sparsity 0.5 from scores that differ by rank: any score a rank computes from its own data."""
    from ptd.pruning.masks import full_masks, prunable_weights
    from ptd.pruning.scores import random_scores
    from ptd.pruning.select import global_topk, keep_for_target

    full = full_masks(prunable_weights(model))
    return global_topk(random_scores(full, torch.Generator().manual_seed(rank)), full, keep_for_target(full, 0.5))


def register_rank_strategies(rank: int) -> None:
    """Two strategies whose selection differs by rank: one through ``prune_once``, one (as IMP and
    GMP do) calling ``ctx.train`` and ``ctx.save_level`` itself."""
    from ptd.pruning.base import Level, prune_once, register_strategy

    def direct(ctx):
        masks = rank_masks(ctx.model, rank)
        ctx.train(ctx.model, masks, "level_1", ctx.cfg.retrain, ())
        ctx.save_level(Level(1, masks, {}))
        return []

    register_strategy("rank_once", lambda ctx: prune_once(ctx, "rank_once", lambda: rank_masks(ctx.model, rank)))
    register_strategy("rank_direct", direct)


# ---------------------------------------------------------------- the two-rank run

def _worker(out: Path) -> None:
    """One rank: everything it saw goes to ``out/rank<r>.pt``, part by part (a part that hangs or
    fails leaves the earlier ones for the test's message)."""
    from ptd.errors import DivergedError
    from ptd.pruning.masks import full_masks, prunable_weights
    from ptd.pruning.scores import snip
    from ptd.train.distributed import init_distributed
    from ptd.train.loop import Runtime, evaluate, fit

    torch.set_num_threads(1)
    d = init_distributed("cpu")
    r = d.rank
    got: dict = {}

    def save(key, value):
        got[key] = value
        torch.save(got, out / f"rank{r}.pt")

    # F2: data-dependent scores, each rank on its own shard.
    m = net()
    save("snip_scores", snip(m, full_masks(prunable_weights(m)), shard(r)))
    save("snip", run_strategy("snip", net(), shard(r), 0.5, batches=2))
    save("imp", run_strategy("imp", net(), shard(r), 0.36))
    save("oneshot", run_strategy("oneshot", net(), shard(r), 0.5))
    register_rank_strategies(r)
    save("rank_once", run_strategy("rank_once", net(), shard(r), 0.5))
    save("rank_direct", run_strategy("rank_direct", net(), shard(r), 0.5))

    # F4: BatchNorm, each rank on its half of the split; keep="last", so the saved model is the last epoch's.
    rt = Runtime(quiet=True, channels_last=False, dist=d)
    tr, va = loaders(r, d.world_size)
    rows = []

    class Rows:
        def end_epoch(self, epoch, row):
            rows.append((row["val_loss"], row["val_acc"]))

    model = bn_model()
    fit(model, tr, va, OptimConfig(epochs=2, batch_size=16, lr=0.05), rt, out_dir=out / "fit", hooks=[Rows()], keep="last")
    save("rows", rows)
    save("saved_val", evaluate(model, va, rt))  # fit ended holding the file rank 0 wrote

    # F4: rank 1's weights alone go nan in the last step of epoch 1.
    class Poison:
        n = 0

        def after_step(self, model):
            self.n += 1
            if r == 1 and self.n == len(tr):
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")

    try:
        fit(bn_model(), tr, va, OptimConfig(epochs=2, batch_size=16, lr=0.05), rt, out_dir=out / "div", hooks=[Poison()], desc="teacher")
        save("diverged", None)
    except DivergedError as e:
        save("diverged_every_rank", e.every_rank)
        save("diverged", str(e))

    # GMP: a ramp event on weights that differ by rank (ties broken by a last bit, in real runs) keeps rank 0's masks.
    from ptd.pruning.strategies.gmp import GMPHook

    hook = GMPHook(full_masks(prunable_weights(gmp_net(r))), 0.5, 0, 1, 1, steps_per_epoch=1)
    hook.prune_to(gmp_net(r), sum(int(m.numel()) for m in hook.masks.values()) // 2)
    save("gmp_event", dict(hook.masks))

    # Dropout: each rank its own masks; a run stopped after epoch 2 and resumed equals one that was not.
    class Stop(Exception):
        pass

    class StopAfter2:
        def end_epoch(self, epoch, row):
            if epoch == 1:
                raise Stop  # every rank, before epoch 2's commit: no collective is left waiting

    def drop_fit(out_dir, hooks=()):
        m, seen = dropout_net(), []
        m[2].register_forward_hook(lambda mod, i, o: seen.append((o == 0).clone()) if mod.training else None)
        try:
            fit(m, tr, va, OptimConfig(epochs=3, batch_size=16, lr=0.05), rt, out_dir=out_dir, hooks=hooks, keep="last", seed=7)
        except Stop:
            pass
        return m, seen

    ref, seen = drop_fit(out / "drop_ref")
    save("dropout_masks", seen)
    drop_fit(out / "drop_run", [StopAfter2()])
    again, _ = drop_fit(out / "drop_run")
    save("dropout_weights", (ref.state_dict(), again.state_dict()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[Path, list[dict], str, bool]:
    out = tmp_path_factory.mktemp("ddp_sync")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
        code = f"import test_ddp_sync as t; from pathlib import Path; t._worker(Path({str(out)!r}))"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:  # a rank waiting in a collective the other never joins
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail("the two ranks hung:\n" + "\n".join(l[-2000:] for l in logs))
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").is_file() else {} for r in range(2)]
    return out, got, "\n".join(l[-3000:] for l in logs), all(p.returncode == 0 for p in procs)


def ranks_saw(launch, *keys: str) -> tuple[Path, list[dict]]:
    """What both ranks saved for ``keys``; a failure with both ranks' output when one did not get there."""
    out, got, logs, _ = launch
    if not all(k in g for g in got for k in keys):
        pytest.fail(f"a rank stopped before {', '.join(keys)}:\n{logs}")
    return out, got


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_snip_on_two_shards_gives_one_mask_set_of_the_global_batch(launch):
    from ptd.pruning.masks import full_masks, prunable_weights
    from ptd.pruning.scores import snip
    from ptd.pruning.select import global_topk, keep_for_target

    _, (r0, r1) = ranks_saw(launch, "snip_scores", "snip")
    # Scores of the global batch: one process given both ranks' batches.
    m = net()
    full = full_masks(prunable_weights(m))
    ref = snip(m, full, shard(0) + shard(1))
    for got in (r0, r1):
        for n in ref:
            torch.testing.assert_close(got["snip_scores"][n], ref[n], rtol=1e-5, atol=1e-8)
    (t0, s0), (t1, s1) = r0["snip"], r1["snip"]
    assert len(t0) == len(s0) == 1
    assert _same(t0[0], t1[0]) and _same(s0[0], s1[0]) and _same(t0[0], s0[0])  # retrained and saved alike on both ranks
    assert _same(s0[0], global_topk(r0["snip_scores"], full, keep_for_target(full, 0.5)))  # the global batch's selection
    # The scores of each rank's shard alone select other masks: what each rank pruned before.
    own = [global_topk(snip(net(), full, shard(r)), full, keep_for_target(full, 0.5)) for r in range(2)]
    assert not _same(own[0], own[1])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,target", [("imp", 0.36), ("oneshot", 0.5)])
def test_magnitude_strategies_prune_as_one_process_does(launch, strategy, target):
    _, (r0, r1) = ranks_saw(launch, strategy)
    ref_trained, ref_saved = run_strategy(strategy, net(), shard(0), target)
    for got in (r0, r1):
        trained, saved = got[strategy]
        assert len(trained) == len(ref_trained) == len(saved) == len(ref_saved) >= 1
        assert all(_same(a, b) for a, b in zip(trained + saved, ref_trained + ref_saved))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["rank_once", "rank_direct"])
def test_every_rank_retrains_and_saves_rank_0s_masks_whatever_its_scores(launch, strategy):
    _, (r0, r1) = ranks_saw(launch, strategy)
    own = [rank_masks(net(), r) for r in range(2)]
    assert not _same(own[0], own[1])
    for got in (r0, r1):
        trained, saved = got[strategy]
        assert len(trained) == len(saved) == 1 and _same(trained[0], own[0]) and _same(saved[0], own[0])


@pytest.mark.slow
def test_every_rank_evaluates_the_model_rank_0_saves(launch):
    out, (r0, r1) = ranks_saw(launch, "rows", "saved_val")
    assert len(r0["rows"]) == 2 and r0["rows"] == r1["rows"]  # val loss and accuracy, every epoch
    last_loss, last_acc = r0["rows"][-1]
    for got in (r0, r1):
        assert (got["saved_val"]["loss"], got["saved_val"]["acc"]) == (last_loss, last_acc)
    from ptd.train import checkpoint as ckpt

    assert ckpt.load_resume(out / "fit")["world_size"] == 2


@pytest.mark.slow
def test_a_rank_that_diverges_alone_stops_every_rank_with_one_message(launch):
    _, (r0, r1) = ranks_saw(launch, "diverged")
    msg = r0["diverged"]
    assert msg is not None and msg == r1["diverged"]
    # Marked as every rank's: the CLI prints it once, on rank 0 (rank 1 printed it again, "rank 1: ...").
    assert r0["diverged_every_rank"] is True and r1["diverged_every_rank"] is True
    assert msg.startswith("teacher: the weights became nan or inf (first: model.features.0.weight) in epoch 1 of 2"), msg
    assert launch[3], launch[2]  # and both ranks ended cleanly


@pytest.mark.slow
def test_a_gmp_event_keeps_rank_0s_masks_on_every_rank(launch):
    from ptd.pruning.masks import full_masks, prunable_weights
    from ptd.pruning.select import global_topk
    from ptd.pruning.scores import magnitude

    _, (r0, r1) = ranks_saw(launch, "gmp_event")
    assert _same(r0["gmp_event"], r1["gmp_event"])
    own = gmp_net(1)  # what rank 1 would have chosen from its own weights
    masks = full_masks(prunable_weights(own))
    mine = global_topk(magnitude(own, masks), masks, sum(int(m.numel()) for m in masks.values()) // 2)
    assert not _same(mine, r1["gmp_event"])


@pytest.mark.slow
def test_ranks_drop_their_own_units_and_a_resumed_run_drops_the_same(launch):
    # Seeded alike, every rank dropped the same units of its own samples, step after step.
    _, (r0, r1) = ranks_saw(launch, "dropout_masks", "dropout_weights")
    steps = len(r0["dropout_masks"])
    assert steps == len(r1["dropout_masks"]) == 3 * 4  # 3 epochs of 64 samples a rank, batch 16
    assert not any(torch.equal(a, b) for a, b in zip(r0["dropout_masks"], r1["dropout_masks"]))
    for got in (r0, r1):
        ref, resumed = got["dropout_weights"]
        assert _same(ref, resumed)  # bit for bit on CPU
    assert _same(r0["dropout_weights"][0], r1["dropout_weights"][0])  # and DDP kept the ranks' weights equal


# ---------------------------------------------------------------- F5: world size of a resumed stage

def test_a_stage_is_not_resumed_with_another_number_of_processes(tmp_path, monkeypatch):
    from ptd.train import checkpoint as ckpt
    from ptd.train.checkpoint import CheckpointError
    from ptd.train.loop import Runtime, fit

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime(quiet=True, channels_last=False)
    tr, va = loaders()
    fit(bn_model(), tr, va, OptimConfig(epochs=1, batch_size=16, lr=0.05), rt, out_dir=tmp_path)
    state = ckpt.load_resume(tmp_path)
    assert state["world_size"] == 1
    ckpt.save_resume(tmp_path, {**state, "world_size": 2})  # as a torchrun --nproc_per_node=2 would have left it
    want = (f"{tmp_path} was started with 2 processes and is resumed with 1; re-run it with 2 processes "
            f"(e.g. torchrun --nproc_per_node=2), or pass --out a new directory")
    with pytest.raises(CheckpointError) as e:
        fit(bn_model(), tr, va, OptimConfig(epochs=2, batch_size=16, lr=0.05), rt, out_dir=tmp_path)
    assert str(e.value) == want
    with pytest.raises(CheckpointError) as e:  # as the run directory is opened, before anything is written
        ckpt.check_resume(tmp_path)
    assert str(e.value) == want
    ckpt.save_resume(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"was started with 1 process and is resumed with 2; re-run it as one process \(without torchrun\)"):
        ckpt.check_resume(tmp_path, world_size=2)
    # A commit from before the field: its world size is unknown, and it resumes as it did.
    legacy = {k: v for k, v in state.items() if k != "world_size"}
    ckpt.save_resume(tmp_path, legacy)
    ckpt.check_resume(tmp_path, world_size=2)
    r = fit(bn_model(), tr, va, OptimConfig(epochs=2, batch_size=16, lr=0.05), rt, out_dir=tmp_path)
    assert r["steps"] == 2 * len(tr)


@pytest.mark.slow
def test_only_the_stages_a_command_trains_have_their_world_size_checked(tmp_path, tiny_fashion, monkeypatch):
    # `ptd train` was refused for a distill stage a 2-process run had left unfinished, which it never touches.
    import yaml

    from conftest import tiny_config
    from ptd.config import load_config
    from ptd.pipeline import run_pipeline
    from ptd.train import checkpoint as ckpt
    from ptd.train.checkpoint import CheckpointError
    from ptd.train.loop import Runtime, fit

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tiny_fashion)))
    cfg = load_config(tmp_path / "c.yaml", ["teacher.optim.epochs=1", "distill.seeds=[0]", "distill.optim.epochs=1"])
    run = tmp_path / "run"
    run_pipeline(cfg, run, until="teacher")
    tr, va = loaders()
    stage = run / "distill" / "pruned_teacher_seed0"
    fit(bn_model(), tr, va, OptimConfig(epochs=1, batch_size=16, lr=0.05), Runtime(quiet=True, channels_last=False), out_dir=stage)
    ckpt.save_resume(stage, {**ckpt.load_resume(stage), "world_size": 2})  # as a 2-process distill would have left it
    run_pipeline(cfg, run, until="teacher")  # trains no student: opens
    run_pipeline(cfg, run, until="distill", arms=["scratch"])  # another arm's stage: not this command's either
    for until, arms in (("distill", None), ("report", ["pruned_teacher"])):
        with pytest.raises(CheckpointError, match=f"{stage} was started with 2 processes and is resumed with 1"):
            run_pipeline(cfg, run, until=until, arms=arms)
    from ptd.pipeline import _stage_runs

    # A sweep names its students by sweep point, not arm: it checks every stage (make_context's default).
    assert _stage_runs(cfg, Path("distill/imp_s0.59_seed0"), None, None)
    assert not _stage_runs(cfg, Path("distill/imp_s0.59_seed0"), "report", None)
    assert _stage_runs(cfg, Path("teachers/r1/prune/level_2"), "prune", None)
    assert not _stage_runs(cfg, Path("teachers/r1/control/round_1"), "prune", None)


# ---------------------------------------------------------------- F7: orphaned workers stop

_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stderr=open(sys.argv[3], "w"))
print(child.pid, flush=True)
time.sleep(120)
"""

_CHILD = """
import pathlib, sys, time
from ptd.train.distributed import watch_parent
watch_parent(0.2)
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet (PID 1 of a container may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_a_worker_whose_launcher_is_killed_exits(tmp_path):
    """torchrun starts workers in their own session: killing torchrun's process group (or torchrun
    with SIGKILL) orphans them. The watchdog init_distributed starts stops them."""
    ready, err = tmp_path / "ready", tmp_path / "child.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(ready), str(err)], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60  # the child imports torch first
        while not ready.is_file() and time.monotonic() < deadline and not _gone(child):
            time.sleep(0.1)
        assert ready.is_file(), err.read_text()
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        while not _gone(child) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert _gone(child), "the orphaned child kept running"
        assert time.monotonic() - t0 < 5
        line = err.read_text().strip()
        assert line.startswith(f"ptd: error: the launcher of this worker (pid {parent.pid}, e.g. torchrun) is gone; worker pid {child} stops") \
            and "\n" not in line
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


_CHILD_LATE = """
import pathlib, sys, time
import ptd  # what `python -m ptd` does first: the launcher is recorded now
pathlib.Path(sys.argv[1]).write_text("imported")
time.sleep(1.5)  # importing torch, loading the config: the launcher is killed meanwhile
from ptd.train.distributed import watch_parent
watch_parent(0.2)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_a_worker_whose_launcher_died_before_the_watch_started_exits(tmp_path):
    """torchrun killed 3 s after the launch: its workers, still importing torch, were handed to
    init before watch_parent read their parent, so it read init and they waited in the rendezvous
    for good. The parent is the one recorded when ptd was imported."""
    ready, err = tmp_path / "ready", tmp_path / "child.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD_LATE, str(ready), str(err)], env=env,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not ready.is_file() and time.monotonic() < deadline and not _gone(child):
            time.sleep(0.05)
        assert ready.is_file(), err.read_text()
        parent.kill()  # before the child starts its watch
        parent.wait()
        t0 = time.monotonic()
        while not _gone(child) and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        assert _gone(child), "the orphaned child kept running"
        assert f"ptd: error: the launcher of this worker (pid {parent.pid}" in err.read_text()
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


def test_a_diverged_stage_keeps_its_every_rank_mark_when_the_pipeline_adds_its_advice(tmp_path, tiny_yaml, monkeypatch):
    """Context.fit re-raises a DivergedError with the --from/--teacher advice as a new error: the
    mark that makes rank 0 alone print it under torchrun was lost with the old one."""
    import ptd.pipeline as pipeline
    from ptd.config import load_config
    from ptd.errors import DivergedError

    ctx = pipeline.make_context(load_config(tiny_yaml), tmp_path / "run")
    try:
        for stage in ("teacher", "prune"):
            (tmp_path / "run" / stage).mkdir()
            pipeline.mark_done(tmp_path / "run" / stage)

        def diverges(*a, **k):
            e = DivergedError("student s0: loss nan in epoch 1 of 2")
            e.every_rank = True  # as fit marks it under DDP
            raise e

        monkeypatch.setattr(pipeline.context, "fit", diverges)  # the module whose Context.fit calls it
        with pytest.raises(DivergedError) as e:
            ctx.fit(bn_model(), ctx.cfg.distill.optim, tmp_path / "run" / "distill" / "x", 0, "student s0")
        assert str(e.value).endswith(f"add --from {tmp_path / 'run'}") and e.value.every_rank is True
    finally:
        from ptd.train import checkpoint as ckpt

        ckpt.unlock_dir(tmp_path / "run")
