"""Crash consistency: the one writer (atomic, fsynced, fault-injectable), the per-epoch resume
commit, the metrics view, and a pipeline killed at every write boundary that must resume to the
bit-identical result of an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ptd.errors import PtdError
from ptd.train import checkpoint as ckpt

from conftest import tiny_config, write_fashion_like

PY = sys.executable


# ----------------------------------------------------------------------------- the writer


def test_commit_fsyncs_file_and_folder_around_the_rename(tmp_path: Path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "x.json"
    ckpt.write_json(target, {"a": 1})
    kinds = [(k, Path(p).name if k == "rename" else ("dir" if Path(p) == target.parent else "tmp")) for k, p in events]
    assert kinds == [("fsync", "tmp"), ("fsync", "dir"), ("rename", "x.json"), ("fsync", "dir")]
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_write_count_and_remove_are_boundaries(tmp_path: Path, monkeypatch):
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(ckpt.TRACE_ENV, str(trace))
    n0 = ckpt.write_count()
    ckpt.write_text(tmp_path / "a.txt", "a")
    ckpt.save_tensors(tmp_path / "b.safetensors", {"w": torch.ones(2)})
    ckpt.remove(tmp_path / "a.txt")
    ckpt.remove(tmp_path / "never-existed")  # nothing to remove: not a write
    assert ckpt.write_count() == n0 + 3
    lines = trace.read_text().splitlines()
    assert lines == [f"{n0 + 1} write {tmp_path / 'a.txt'}", f"{n0 + 2} write {tmp_path / 'b.safetensors'}",
                     f"{n0 + 3} remove {tmp_path / 'a.txt'}"]
    assert not (tmp_path / "a.txt").exists()


_THREE_WRITES = """
import sys
from ptd.train import checkpoint as ckpt
d = sys.argv[1]
for i in (1, 2, 3):
    ckpt.write_text(f"{d}/f{i}", str(i))
print("finished")
"""


@pytest.mark.parametrize("n, when, present", [
    (1, "before", []), (1, "after", ["f1"]), (2, "before", ["f1"]), (2, "after", ["f1", "f2"]),
    (3, "after", ["f1", "f2", "f3"]),
])
def test_fault_env_kills_right_before_or_after_the_nth_write(tmp_path: Path, n: int, when: str, present: list[str]):
    env = {**os.environ, ckpt.FAULT_ENV: f"{n}:{when}"}
    r = subprocess.run([PY, "-c", _THREE_WRITES, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "finished" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == present  # and no half-written temporaries


def test_fault_env_typo_is_refused(tmp_path: Path):
    env = {**os.environ, ckpt.FAULT_ENV: "2:during"}
    r = subprocess.run([PY, "-c", _THREE_WRITES, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "PTD_FAULT_AT='2:during'" in r.stderr


# ----------------------------------------------------------------------------- resume commit


def _trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.5)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return m, opt, sched


def test_resume_roundtrip_is_exact_and_weights_only(tmp_path: Path):
    m, opt, sched = _trained_state()
    random.seed(5)
    np.random.seed(6)
    rows = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.25}]
    state = {"epoch": 1, "model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": ckpt.rng_state(), "hooks": [{"step": 7, "masks": {"w": torch.ones(2, dtype=torch.uint8)}}],
             "losses": [{}], "metrics": rows, "best": {"epoch": 0, "acc": 0.5}, "steps": 4, "wall_s": 1.5}
    ckpt.save_resume(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["resume.pt"]  # one file, one rename
    got = ckpt.load_resume(tmp_path)
    assert got["format"] == "ptd-resume-1" and got["epoch"] == 1 and got["metrics"] == rows
    assert got["best"] == {"epoch": 0, "acc": 0.5} and got["hooks"][0]["step"] == 7
    for k, v in m.state_dict().items():
        assert torch.equal(got["model"][k], v), k
    m2, opt2, sched2 = _trained_state()
    opt2.load_state_dict(got["optimizer"])
    sched2.load_state_dict(got["scheduler"])
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf)
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.05]


def test_rng_state_restores_torch_python_numpy(tmp_path: Path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    ckpt.save_resume(tmp_path, {"rng": ckpt.rng_state()})
    first = (torch.rand(3), random.random(), np.random.rand(2))
    ckpt.set_rng_state(ckpt.load_resume(tmp_path)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and (first[2] == again[2]).all()


def test_load_resume_missing_and_foreign(tmp_path: Path):
    assert ckpt.load_resume(tmp_path) is None
    (tmp_path / "resume.pt").write_bytes(b"garbage, not a torch file")
    with pytest.raises(ckpt.CheckpointError) as ei:
        ckpt.load_resume(tmp_path)
    msg = str(ei.value)
    assert isinstance(ei.value, PtdError) and str(tmp_path / "resume.pt") in msg and "delete" in msg and "\n" not in msg
    torch.save({"epoch": 3}, tmp_path / "resume.pt")  # a torch file, but no ptd commit
    with pytest.raises(ckpt.CheckpointError, match="not a ptd resume file"):
        ckpt.load_resume(tmp_path)


def test_remove_resume_drops_new_and_old_files(tmp_path: Path):
    for name in ("resume.pt", "last.safetensors", "last_state.pt", "model.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    ckpt.remove_resume(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# ----------------------------------------------------------------------------- metrics view


def test_metrics_view_is_rewritten_whole(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "lr": 0.1}, {"epoch": 2, "lr": 0.1}]
    ckpt.write_metrics(p, rows)
    assert p.read_text() == '{"epoch": 1, "lr": 0.1}\n{"epoch": 2, "lr": 0.1}\n'
    ckpt.write_metrics(p, rows[:1])  # a resume from an earlier commit: the view follows it
    assert ckpt.read_metrics(p) == rows[:1]


def test_read_metrics_tolerates_a_torn_last_line_only(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    assert ckpt.read_metrics(p) == []
    p.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "lr"')
    assert ckpt.read_metrics(p) == [{"epoch": 1}, {"epoch": 2}]
    p.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ckpt.CheckpointError, match="line 2"):
        ckpt.read_metrics(p)


# ----------------------------------------------------------------------------- the pipeline, killed


def _normalized_results(run: Path) -> dict:
    """results.json without what depends on the wall clock (latency, wall_s, timestamps)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("latency", "wall_s", "started") and not k.endswith("_ms")}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    return strip(json.loads((run / "results.json").read_text()))


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted(run.rglob("model.safetensors"))}


def _same(a: Path, b: Path) -> str | None:
    wa, wb = _weights(a), _weights(b)
    if sorted(wa) != sorted(wb):
        return f"model files differ: {sorted(set(wa) ^ set(wb))}"
    for f in wa:
        for k in wa[f]:
            if not torch.equal(wa[f][k], wb[f][k]):
                return f"{f}: {k} differs"
    if _normalized_results(a) != _normalized_results(b):
        return "results.json differs"
    for f in sorted(a.rglob("metrics.jsonl")):
        ra = [{k: v for k, v in r.items() if k != "wall_s"} for r in ckpt.read_metrics(f)]
        rb = [{k: v for k, v in r.items() if k != "wall_s"} for r in ckpt.read_metrics(b / f.relative_to(a))]
        if ra != rb:
            return f"{f.relative_to(a)} differs ({len(ra)} vs {len(rb)} rows)"
    return None


def _crash_config(tmp_path: Path) -> Path:
    data = write_fashion_like(tmp_path / "fm", n_train=200, n_test=60)
    cfg = tiny_config(data, threads=1,
                      teacher={"optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
                      prune={"target_sparsity": 0.2, "retrain": {"epochs": 1, "batch_size": 64, "lr": 0.02}},
                      distill={"seeds": [0], "arms": ["scratch", "pruned_teacher"],
                               "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05}})
    cfg["device"] = "cpu"
    p = tmp_path / "crash.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _ptd_run(cfg: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for k in (ckpt.FAULT_ENV, ckpt.TRACE_ENV):
        if k not in env:
            e.pop(k, None)
    return subprocess.run([PY, "-m", "ptd", "run", str(cfg), "--out", str(out), "--quiet"], env=e,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="passes once the loop and stages commit through save_resume/write_metrics/remove_resume (lead wires it)")
def test_kill_at_every_write_boundary_resumes_identically(tmp_path: Path):
    cfg = _crash_config(tmp_path)
    ref = tmp_path / "ref"
    trace = tmp_path / "trace.txt"
    r = _ptd_run(cfg, ref, **{ckpt.TRACE_ENV: str(trace)})
    assert r.returncode == 0, r.stderr
    total = len(trace.read_text().splitlines())
    covered, failures = 0, []
    # PTD_CRASH_WRITES=3,4,9 (debugging): only those boundaries; by default every one.
    only = {int(v) for v in os.environ.get("PTD_CRASH_WRITES", "").split(",") if v.strip()}
    k = 1
    while True:  # every k until a run completes without reaching its k-th write
        finished = False
        if only and k not in only:
            if k > max(only):
                break
            k += 1
            continue
        for when in ("before", "after"):
            out = tmp_path / f"k{k}_{when}"
            r = _ptd_run(cfg, out, **{ckpt.FAULT_ENV: f"{k}:{when}"})
            if r.returncode == 0:
                finished = True
                break
            assert r.returncode == -signal.SIGKILL, (k, when, r.stderr[-2000:])
            covered += 1
            r = _ptd_run(cfg, out)
            if r.returncode != 0:
                failures.append(f"{k}:{when}: resume failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            diff = _same(ref, out)
            if diff:
                failures.append(f"{k}:{when}: {diff}")
        if finished:
            break
        k += 1
    print(f"\nfault injection: {covered} write boundaries covered ({total} writes in an uninterrupted run)")
    assert covered == 2 * (len([k for k in only if k <= total]) if only else total)
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="passes once the loop and stages commit through save_resume/write_metrics/remove_resume (lead wires it)")
def test_kill_at_random_moments_resumes_identically(tmp_path: Path):
    cfg = _crash_config(tmp_path)
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    assert _ptd_run(cfg, ref).returncode == 0
    span = time.perf_counter() - t0
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = 0
    env = {k: v for k, v in os.environ.items() if k not in (ckpt.FAULT_ENV, ckpt.TRACE_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    for _ in range(6):
        proc = subprocess.Popen([PY, "-m", "ptd", "run", str(cfg), "--out", str(out), "--quiet"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * span)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert _ptd_run(cfg, out).returncode == 0
    print(f"\nrandom kills: {kills}")
    assert _same(ref, out) is None
