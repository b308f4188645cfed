"""``jobs: N``: a run's students trained N at a time in worker processes (ptd.jobs). Each student
is the one a 1-job run on the workers' thread count trains, bit for bit; refusals are one line."""
from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from ptd.cli import main

ARMS = ["scratch", "unpruned_teacher", "pruned_teacher", "retrained_teacher"]


def _cfg(tmp_path: Path, data: Path, **top) -> Path:
    cfg = tiny_config(data, distill={"seeds": [0, 1], "arms": ARMS, "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg.update(top)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _running(pid: str) -> bool:
    """Whether process ``pid`` still runs (a zombie or a process gone since it was listed does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _students(run: Path) -> dict[str, tuple]:
    """Every student's model file (sha256 of its bytes: ptd writes safetensors headers canonically)
    and test and validation accuracy, by stage folder."""
    out = {}
    for d in sorted((run / "distill").iterdir()):
        res = json.loads((d / "result.json").read_text())
        out[d.name] = (hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest(), res["test_acc"], res["val_acc"])
    return out


@pytest.mark.slow
def test_parallel_students_are_the_sequential_ones_bit_for_bit(tmp_path, tiny_fashion, capsys):
    one = tmp_path / "one"
    cfg = _cfg(tmp_path, tiny_fashion, threads=1, quiet=True)
    assert main(["run", str(cfg), "--out", str(one)]) == 0
    want = _students(one)
    assert len(want) == 8
    # The same run with its students deleted, re-run with 2 jobs on 2 threads: each worker trains
    # on 1 thread, from the same teachers, so every student comes back identical.
    par = tmp_path / "par"
    shutil.copytree(one, par)
    shutil.rmtree(par / "distill")
    for f in ("results.json", "report.md", "report.html"):
        (par / f).unlink()
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(par), "--set", "jobs=2", "--set", "threads=2"]) == 0
    said = "".join(capsys.readouterr())
    assert "[distill] 8 students, 2 at a time (1 thread each)" in said, said
    assert _students(par) == want
    a, b = (json.loads((r / "results.json").read_text()) for r in (one, par))
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert timeless(a["students"]) == timeless(b["students"]) and a["comparison"] == b["comparison"]


@pytest.mark.slow
def test_a_parallel_sweep_trains_the_sequential_students_bit_for_bit(tmp_path, tiny_fashion, capsys):
    """``ptd sweep`` with jobs: its students (baselines and one per distinct pruned teacher) in
    workers, each the one a 1-job sweep on 1 thread trains; then the same sweep.json."""
    from test_sweep import sweep_yaml

    cfg = sweep_yaml(tmp_path, tiny_fashion, strategies=["imp"])
    one = tmp_path / "one"
    assert main(["sweep", str(cfg), "--out", str(one), "--quiet"]) == 0
    want = _students(one)
    assert sorted(want) == sorted(f"{k}_seed{s}" for k in ("scratch", "unpruned_teacher", "imp_s0.36", "imp_s0.59") for s in (0, 1))
    par = tmp_path / "par"
    shutil.copytree(one, par)
    shutil.rmtree(par / "distill")
    for f in par.glob("sweep*"):
        f.unlink()
    capsys.readouterr()
    assert main(["sweep", str(cfg), "--out", str(par), "--quiet", "--set", "jobs=2", "--set", "threads=2"]) == 0
    said = "".join(capsys.readouterr())
    assert "[distill] 8 students, 2 at a time (1 thread each)" in said, said
    assert _students(par) == want
    timeless = lambda r: json.dumps({k: v for k, v in r.items() if k not in ("wall_s", "session_wall_s", "compute")}, sort_keys=True)
    a, b = (json.loads((r / "sweep.json").read_text()) for r in (one, par))
    assert [timeless(x) for x in a["rows"]] == [timeless(x) for x in b["rows"]]


@pytest.mark.slow
def test_a_killed_parallel_run_leaves_no_worker_and_resumes(tmp_path, tiny_fashion):
    """SIGKILL to ptd while its workers train: they die with it (PR_SET_PDEATHSIG), nothing
    else writes into the run, and the re-run finishes with the students of an uninterrupted one."""
    cfg = _cfg(tmp_path, tiny_fashion, threads=2, jobs=2, quiet=True)
    ref = tmp_path / "ref"
    assert main(["run", str(cfg), "--out", str(ref)]) == 0
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "distill")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.Popen([sys.executable, "-m", "ptd", "run", str(cfg), "--out", str(run)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any((run / "distill").glob("*/metrics.jsonl")):
        time.sleep(0.05)  # until a worker has finished an epoch of some student
    kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert kids, "no worker processes were seen"
    for _ in range(200):  # the workers get SIGKILL from the kernel when their parent dies
        alive = [k for k in kids if _running(k)]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"workers {alive} outlived their parent"
    assert main(["run", str(cfg), "--out", str(run)]) == 0
    assert _students(run) == _students(ref)


@pytest.mark.parametrize("sets, words", [
    (["jobs=0"], ["jobs: 0", "between 1 and"]),
    (["jobs=9999"], ["jobs: 9999", "between 1 and 256"]),
    (["jobs=200"], ["jobs: 200", "CPUs"]),
    (["jobs=2", "threads=1"], ["jobs: 2", "threads is 1"]),
])
def test_jobs_out_of_range_is_one_line(tmp_path, tiny_fashion, capsys, sets, words):
    cfg = _cfg(tmp_path, tiny_fashion)
    argv = ["run", str(cfg), "--out", str(tmp_path / "out")] + [x for s in sets for x in ("--set", s)]
    capsys.readouterr()
    assert main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("ptd: error: ") and "\n" not in line
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "out").exists()


def test_jobs_are_refused_where_they_cannot_run(tmp_path, tiny_fashion):
    import torch

    from ptd.config import load_config
    from ptd.config import ConfigError
    from ptd.preflight import check_jobs

    cfg = load_config(_cfg(tmp_path, tiny_fashion), ["jobs=2"])
    check_jobs(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="parallel CPU processes, but this run trains on cuda"):
        check_jobs(cfg, torch.device("cuda"))
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(ConfigError, match="torchrun"):
            check_jobs(cfg, torch.device("cpu"))
    finally:
        del os.environ["WORLD_SIZE"]


@pytest.mark.slow
def test_a_student_that_fails_in_a_worker_is_the_same_one_line(tmp_path, tiny_yaml, capsys):
    """A worker's error comes back as the error itself: the CLI prints the line a 1-job run prints."""
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["distill", str(tiny_yaml), "--set", "distill.optim.lr=1e12", "--set", "distill.arms=[scratch, pruned_teacher]",
                 "--set", "jobs=2", "--set", "threads=2", "--out", str(run)]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and "lower distill.optim.lr" in lines[0], lines
    assert lines[0].endswith(f"to reuse this run's trained and pruned teachers there, add --from {run}")


def _killed_by_the_oom_killer(task):
    os.kill(os.getpid(), signal.SIGKILL)


def _exits_with_3(task):
    sys.exit(3)


def test_a_student_worker_killed_mid_task_is_one_line_not_a_bug(tmp_path, tiny_yaml):
    """SIGKILL, as the out-of-memory killer sends it: the CLI printed "internal error ... a bug in ptd"."""
    from ptd.config import load_config
    from ptd.errors import PtdError
    from ptd.pipeline import distill_in_parallel, make_context

    cfg = load_config(tiny_yaml, ["jobs=2", "threads=2"])
    ctx = make_context(cfg, tmp_path / "run", log=lambda s: None)
    try:
        with pytest.raises(PtdError, match=r"^jobs: a student's worker process \(pid \d+\) died with signal SIGKILL before it "
                                           r"finished \(SIGKILL is typically the kernel's out-of-memory killer.*lower jobs"):
            distill_in_parallel(ctx, [(0,), (1,)], worker=_killed_by_the_oom_killer)
        # Any other death (an exit code, a crash) is not the memory case: not that line's advice.
        from ptd.jobs import WorkerDied

        with pytest.raises(WorkerDied, match="died with exit code 3"):
            distill_in_parallel(ctx, [(0,), (1,)], worker=_exits_with_3)
    finally:
        from ptd.train import checkpoint as ckpt

        ckpt.unlock_dir(tmp_path / "run")


_FAILING_POOL = """
import sys
from ptd.jobs import run_in_workers

def task(i):
    from tqdm.auto import tqdm
    for _ in tqdm(range(3), disable=True):  # a quiet bar still makes tqdm's lock
        pass
    if i == 1:
        raise ValueError("boom")
    import time
    time.sleep(0.5)  # the other worker is still busy when the pool is stopped
    return i

if __name__ == "__main__":
    try:
        run_in_workers(task, range(4), 2)
    except ValueError:
        print("failed as planned")
"""


def test_a_failed_pool_leaves_no_leaked_semaphore_warning(tmp_path):
    """A student failing in one worker stops the pool; the stopped workers' tqdm locks were
    multiprocessing semaphores, and Python's resource tracker printed "There appear to be N leaked
    semaphore objects" on stderr after ptd's one line (a bad-input probe saw it with jobs: 2)."""
    script = tmp_path / "pool.py"
    script.write_text(_FAILING_POOL)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(2):
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert r.stdout.strip() == "failed as planned", r.stderr
        assert r.stderr == "", r.stderr


def test_a_worker_whose_parent_died_while_it_started_exits_at_once(tmp_path):
    """PR_SET_PDEATHSIG only covers a parent that dies after the worker armed it; spawn imports
    torch and ptd first (2-4 s), and a parent killed then left workers that trained a student into
    the unlocked run directory (an audit: 17 of 31 kills of the parent alone). _init compares the
    parent it was given with the one it has."""
    code = ("import os, sys; from ptd.jobs import _init; _init(int(sys.argv[1]), None, ()); print('worked on')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    orphan = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, env=env, timeout=60)
    assert orphan.returncode == 1 and "worked on" not in orphan.stdout  # its parent is not pid 1: it was re-parented
    ok = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and "worked on" in ok.stdout, ok.stderr


def test_a_worker_computes_no_stage_but_a_student(tmp_path):
    """A worker's teacher, pruning, student and control stages were finished by its parent; one
    that is not means the parent is gone (an orphan recreated a deleted run directory and trained
    the teacher into it). It is refused, not computed, and nothing is written."""
    from types import SimpleNamespace

    from ptd.pipeline import RunDirError, run_stage

    ctx = SimpleNamespace(in_worker=True, is_done=lambda d: False, main=True)
    with pytest.raises(RunDirError, match="is not finished, and a worker trains students only"):
        run_stage(ctx, tmp_path / "teacher", lambda: pytest.fail("computed"))
    assert not (tmp_path / "teacher").exists()


@pytest.mark.slow
def test_killing_the_parent_as_its_workers_start_leaves_nothing_running(tmp_path, tiny_fashion):
    """SIGKILL to ptd the moment its worker processes appear (before they could arm
    PR_SET_PDEATHSIG): they exit, and nothing more is written into the run directory."""
    cfg = _cfg(tmp_path, tiny_fashion, threads=2, jobs=2, quiet=True)
    run = tmp_path / "run"
    assert main(["distill", str(cfg), "--out", str(run), "--arm", "scratch"]) == 0  # every stage before the students
    shutil.rmtree(run / "distill")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.Popen([sys.executable, "-m", "ptd", "run", str(cfg), "--out", str(run)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        except OSError:  # gone between pgrep and here
            return ""

    workers: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(workers) < 2 and p.poll() is None:
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        workers = [k for k in kids if "spawn_main" in cmdline(k) and "resource_tracker" not in cmdline(k)]
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len(workers) == 2, "no worker processes were seen"

    def tree() -> dict[str, int]:
        return {str(f.relative_to(run)): f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}

    written = tree()
    for _ in range(300):  # 15 s: each worker checks its parent once its start-up imports are done
        alive = [k for k in workers if _running(k)]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"workers {alive} outlived their parent"
    assert tree() == written


_SLEEPING_POOL = """
import os, sys, time
from ptd.jobs import run_in_workers

def task(i):
    time.sleep(300)  # still busy when the test kills ptd

def ready():
    print("ready", os.getpid(), flush=True)

if __name__ == "__main__":
    run_in_workers(task, range(4), 2, initializer=ready)
"""


def _group(pgid: int) -> list[int]:
    """Every running process of process group ``pgid`` (what a ``kill -- -PGID`` reaches)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):  # gone since it was listed
            pass
    return [p for p in out if _running(str(p))]


def _semaphore_files(pids: list[int]) -> set[int]:
    """The inodes of the /dev/shm/sem.* files (named POSIX semaphores: sem_open maps them) that
    ``pids`` map: this test's own, whatever else (another pytest-xdist worker) makes meanwhile. By
    inode, not name: the creator maps a temporary file that glibc then links to the name."""
    inodes = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # gone since it was listed
            continue
        inodes.update(int(l.split()[4]) for l in maps.splitlines() if " /dev/shm/sem." in l)
    return inodes


def _in_shm(inodes: set[int]) -> list[Path]:
    """The /dev/shm/sem.* files still there of ``inodes``."""
    out = []
    for f in Path("/dev/shm").glob("sem.*"):
        try:
            if f.stat().st_ino in inodes:
                out.append(f)
        except OSError:  # unlinked since it was listed
            pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /dev/shm are Linux's")
@pytest.mark.parametrize("kill", ["group", "parent"])
def test_a_killed_pool_leaves_no_named_semaphore(tmp_path, kill):
    """SIGKILL to ptd's process group (``kill -9 -- -PGID``, what a terminal or a supervisor does) or
    to ptd alone while its workers run: no named semaphore stays in /dev/shm. A multiprocessing
    Pool made 6, which only Python's resource tracker unlinked, and a group kill killed the tracker
    too: 6 more left in /dev/shm at every such kill (an audit). The workers use none now, so no
    kill at any moment (starting workers, a cgroup kill that takes every process) can leave one."""
    script = tmp_path / "pool.py"
    script.write_text(_SLEEPING_POOL)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, start_new_session=True)  # its own group, as ptd in a shell is
    held: set[int] = set()
    try:
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        seen, out = 0, b""
        deadline = time.monotonic() + 120  # 2 spawned workers start in about 1 s; a loaded CI machine is slower
        while seen < 2 and time.monotonic() < deadline and p.poll() is None:
            if sel.select(timeout=0.5):
                out += os.read(p.stdout.fileno(), 4096)
                seen = out.count(b"ready")
        assert seen == 2, f"the workers did not start: {out!r}"
        procs = _group(p.pid)
        held = _semaphore_files(procs)
        if kill == "group":
            os.killpg(p.pid, signal.SIGKILL)
        else:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 60  # the workers die with ptd (PR_SET_PDEATHSIG), any helper at its pipe's end
        while _group(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group(p.pid), f"processes {_group(p.pid)} outlived the kill"
        left = _in_shm(held)
        assert not left, f"{len(left)} named semaphores left in /dev/shm by a {kill} kill: {sorted(map(str, left))}"
        assert not held, f"the workers' processes held {len(held)} named semaphores: a kill at another moment can leave them"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.stdout.close()
        for f in _in_shm(held):  # what a failing run of this test leaked, not left for the next
            f.unlink(missing_ok=True)


_DYING_POOL = """
import os, signal, sys, time
from ptd.jobs import run_in_workers

def task(i):
    if i == 1 and sys.argv[1] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    time.sleep(0.2)
    return i

def init():
    if sys.argv[1] == "init":
        raise ValueError("no data")
    if sys.argv[1] == "init_killed":
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer while the worker loads its data: its task unread

if __name__ == "__main__":
    try:
        run_in_workers(task, range(4), 2, initializer=init)
    except Exception as e:
        print(type(e).__name__, e, "| cause:", type(e.__cause__).__name__)
"""


@pytest.mark.parametrize("how, said", [
    ("killed", "WorkerDied a worker process (pid "),
    ("init", "ValueError no data | cause: RemoteTraceback"),
    ("init_killed", "WorkerDied a worker process (pid "),  # was ConnectionResetError, a "file" error to the CLI
])
def test_a_worker_that_dies_or_cannot_start_fails_the_run_at_once(tmp_path, how, said):
    """A worker killed while it holds a task (out of memory), or whose initializer raises, is an
    error here, raised once the other workers were stopped. A multiprocessing Pool started a new
    worker in its place and waited for ever for the lost task's result (and, for an initializer that
    raises, started and lost workers for ever)."""
    script = tmp_path / "pool.py"
    script.write_text(_DYING_POOL)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(said), (r.stdout, r.stderr)
    if how in ("killed", "init_killed"):
        assert "died with signal SIGKILL before it finished its task" in r.stdout, r.stdout
    assert r.stderr == "", r.stderr


_SLOW_IMPORT_POOL = """
import os, sys, time
if __name__ != "__main__":  # a spawned worker importing this module: slow, as torch and ptd are (2-4 s)
    os.write(1, f"importing {os.getpid()}\\n".encode())  # one write: the two workers' lines do not interleave
    time.sleep(2)
from ptd.jobs import run_in_workers

def task(i):
    return i

if __name__ == "__main__":
    got = []
    run_in_workers(task, range(4), 2, on_result=got.append)
    print("done", sorted(got), flush=True)
"""


def test_ctrl_c_reaching_a_worker_still_importing_prints_nothing_of_its_own(tmp_path):
    """Ctrl-C reaches ptd's whole process group; a worker still importing torch and ptd (before its
    initializer ignores SIGINT) printed its own KeyboardInterrupt traceback under ptd's one line.
    Workers now start with SIGINT ignored. Here the signal reaches the workers alone, so the run
    goes on and must finish as if nothing had been sent."""
    script = tmp_path / "pool.py"
    script.write_text(_SLOW_IMPORT_POOL)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        pids = []
        while len(pids) < 2:
            line = p.stdout.readline()
            assert line, f"the workers did not start: {p.stderr.read()}"
            if line.startswith("importing"):
                pids.append(int(line.split()[1]))
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "done [0, 1, 2, 3]" in out, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
