"""DDP under torchrun (gloo on CPU): two processes train one teacher, rank 0 writes the run dir."""
import json
from pathlib import Path
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("compile", ["off", "default"])  # DDP around a unit whose model is compiled in place
def test_torchrun_two_processes(tmp_path, tiny_fashion, compile):
    cfg = tiny_config(tiny_fashion, device="cpu", threads=1, compile=compile,
                      teacher={"model": {"arch": "vgg", "kwargs": {"plan": [16, "M", 32, "M", 32]}},
                               "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
                      prune={"target_sparsity": 0.2, "retrain": {"epochs": 1, "batch_size": 32, "lr": 0.02}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "ptd", "prune", str(p), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "rank0" in l or "Error" in l)[-4000:]
    teacher = json.loads((out / "teacher" / "result.json").read_text())
    n_train = 480  # 600 images, 20% held out for validation
    per_rank_batches = (n_train // 2) // 32  # each rank sees a disjoint half
    assert teacher["steps"] == 2 * per_rank_batches
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 2 and env["compile"] == compile
    assert 0.0 <= teacher["test_acc"] <= 1.0
    level = json.loads((out / "prune" / "level_1" / "sparsity.json").read_text())
    assert level["sparsity"] == pytest.approx(0.2, abs=1e-3)
    # The pruned teacher saved by rank 0 has its pruned weights at exactly zero.
    from ptd.pruning.masks import load_masks
    from ptd.train.checkpoint import load_tensors

    w = load_tensors(out / "prune" / "level_1" / "model.safetensors")
    for name, m in load_masks(out / "prune" / "level_1" / "masks.safetensors").items():
        assert (w[name][~m] == 0).all()
    if compile == "off":  # --from under torchrun: rank 0 copies, every rank waits for it, then derives
        again = tmp_path / "again"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "ptd", "student", str(p), "--out", str(again), "--quiet", "--from", str(out),
                            "--set", "student.round_to=1"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
        for f in ("teacher/model.safetensors", "prune/level_1/model.safetensors", "prune/level_1/masks.safetensors"):
            assert (again / f).read_bytes() == (out / f).read_bytes()
        assert (again / "student" / "done").is_file() and not list(tmp_path.glob(".*.tmp"))


_SHUTDOWN_SCRIPT = """
import atexit, sys
from pathlib import Path
import torch.distributed as dist
out = Path(sys.argv[1])
# Registered first, so it runs last (atexit is LIFO): after ptd's own teardown.
atexit.register(lambda: (out / f"rank{dist.get_rank() if dist.is_initialized() else 'x'}_{dist.is_initialized()}").touch())
from ptd.train.distributed import init_distributed, all_sum
import torch
d = init_distributed("cpu")
(out / f"rank{d.rank}_sum").write_text(str(all_sum([1.0], torch.device("cpu"))[0]))
"""


@pytest.mark.slow
def test_the_process_group_is_torn_down_before_exit(tmp_path):
    """init_distributed registers the group's teardown: at exit no group is left to process
    teardown (where gloo's threads once aborted rank 0 of a finished run with SIGABRT)."""
    script = tmp_path / "w.py"
    script.write_text(_SHUTDOWN_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank0_sum").read_text() == "2.0" and (tmp_path / "rank1_sum").read_text() == "2.0"
    assert (tmp_path / "rankx_False").is_file()  # the last exit handler of both ranks found no group
    assert not list(tmp_path.glob("rank*_True")), "a process group was still up at exit"


_THREADS_SCRIPT = """
import json, os, sys
from pathlib import Path
import ptd.train.distributed as D

def gloo_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
        except OSError:  # the thread ended while listed
            pass
    return sorted(n for n in names if "gloo" in n)

teardown = D.shutdown_distributed
def shutdown_and_count():  # what init_distributed registers at exit, with the threads before and after
    up = gloo_threads()
    teardown()
    Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps({"up": up, "after": gloo_threads()}))
D.shutdown_distributed = shutdown_and_count
from ptd.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_no_gloo_thread_outlives_the_process_groups_teardown(tmp_path, tiny_fashion):
    """At exit the group's teardown stops gloo's worker threads, on a fresh run and on a re-run of
    a finished one. A model built on the meta device after the group started (preflight does)
    imported torch.distributed.nn.functional, whose `group=group.WORLD` default arguments then held
    the group: destroy_process_group freed nothing, the threads ran on into interpreter
    finalization, and one retiring the last collective there aborted the process (SIGABRT,
    "terminate called without an active exception", exit 1 from torchrun) after every file was
    written (3 of ~20 runs in the new-user trial, 3 of 72 re-runs of a finished run measured). The
    abort is a race; the threads left alive are not, and are checked here."""
    cfg = tiny_config(tiny_fashion, device="cpu", threads=1, teacher={"optim": {"epochs": 1, "batch_size": 32, "lr": 0.05}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "w.py"
    script.write_text(_THREADS_SCRIPT)
    for case in ("fresh", "finished"):  # the second trains nothing: every stage is reused
        seen = tmp_path / case
        seen.mkdir()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                            str(seen), "train", str(p), "--out", str(tmp_path / "run"), "--quiet"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        for rank in (0, 1):
            threads = json.loads((seen / f"rank{rank}.json").read_text())
            assert threads["up"], f"{case}, rank {rank}: no gloo thread seen while the group was up (renamed?)"
            assert threads["after"] == [], f"{case}, rank {rank}: {threads['after']} still running after the teardown"


def _torchrun(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ptd", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_runs_the_whole_pipeline_and_says_things_once(tmp_path, tiny_fashion):
    """`ptd run` under torchrun writes results.json and both reports, and prints the report once.
    Every rank used to return before rank 0 had written report.md, the other rank then failed
    reading it, and torchrun killed rank 0 mid-write: no run ever finished (4 of 4). A refusal
    under torchrun is one `ptd: error:` line, not one per rank."""
    cfg = tiny_config(tiny_fashion, device="cpu", threads=1,
                      teacher={"optim": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
                      prune={"target_sparsity": 0.2, "retrain": {"epochs": 1, "batch_size": 32, "lr": 0.02}},
                      distill={"seeds": [0], "arms": ["scratch", "pruned_teacher"],
                               "optim": {"epochs": 1, "batch_size": 32, "lr": 0.05}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = _torchrun("run", str(p), "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    for f in ("results.json", "report.md", "report.html"):
        assert (out / f).is_file(), f
    assert r.stdout.count("# ") >= 1 and r.stdout.count((out / "report.md").read_text().splitlines()[0]) == 1
    assert len(json.loads((out / "results.json").read_text())["students"]) == 2
    # The [plan] line and "done in" came from every rank (new-user trial: each twice at 2 processes).
    said = r.stdout + r.stderr
    assert said.count("[plan] ") == 1 and said.count("done in ") == 1, said[-3000:]
    before = sorted(x.name for x in out.iterdir())
    r = _torchrun("run", str(p), "--out", str(out), "--set", "teacher.optim.bogus=1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("ptd: error:")]
    assert len(errors) == 1 and "teacher.optim.bogus" in errors[0], r.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == before


def test_a_loss_that_cannot_train_under_ddp_is_refused_before_any_work(tmp_path, tiny_fashion, capsys, monkeypatch):
    """CRD's memory banks hold one row per training sample: under DDP each rank updated only its own
    samples' rows and rank 0's buffers overwrote the rest every step (the audit measured 192 of 384
    rows learned per epoch). Every loss that says so (single_process_only) is refused in one line
    under torchrun when the run distills; in one process, or for a stage that does not distill, it
    is not."""
    from ptd.cli import main
    from ptd.distill import LOSSES

    assert [n for n in LOSSES.names() if LOSSES.get(n).single_process_only] == ["crd"]
    cfg = tiny_config(tiny_fashion, device="cpu", threads=1, distill={"loss": ["kd", "crd"]})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for cmd in ("run", "distill"):
        assert main([cmd, str(p), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ptd: error: distill.loss: crd cannot train under torchrun (WORLD_SIZE=2)")
        assert not (tmp_path / "run").exists()
    from ptd.preflight import check_losses_under_ddp
    from ptd.config import load_config

    check_losses_under_ddp(load_config(str(p)), distills=False)  # ptd train / prune under torchrun: no loss runs
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_losses_under_ddp(load_config(str(p)))


def test_under_torchrun_rank_0_alone_says_a_refusal_and_a_dead_peer_is_not_called_a_bug(tmp_path, capsys, monkeypatch):
    """A refusal every rank raises (config, preflight, run directory: on_every_rank) is said once,
    by rank 0 (two ranks printed every refusal twice). An error of one rank's own (a damaged image in
    its shard) is said by that rank, named (silenced, rank 0 could only say a peer stopped). A
    collective that fails because another rank died names that, not "a bug in ptd"."""
    import tempfile

    import ptd.cli as cli
    from ptd.errors import PtdError, on_every_rank

    def refuse(args):
        with on_every_rank():
            raise PtdError("x: bad; fix x")

    def own(args):
        raise PtdError("cannot read image /d/7.png; replace it")

    def peer_died(args):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:29500: Connection reset by peer")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for fn, rank, lines in ((refuse, "0", ["ptd: error: x: bad; fix x"]), (refuse, "1", []),
                            (own, "0", ["ptd: error: cannot read image /d/7.png; replace it"]),
                            (own, "1", ["ptd: error: rank 1: cannot read image /d/7.png; replace it"])):
        monkeypatch.setattr(cli, "cmd_stage", fn)
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["run", "c.yaml"]) == 2
        assert capsys.readouterr().err.splitlines() == lines
    monkeypatch.setenv("RANK", "1")  # a usage error: argparse exits, silent on rank 1
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "c.yaml", "--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "cmd_stage", peer_died)
    assert cli.main(["run", "c.yaml"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("ptd: error: rank 1: another process of this torchrun run stopped (")
    assert "bug in ptd" not in err[0] and len(list(tmp_path.glob("ptd-traceback-*"))) == 1  # kept, in case it was ptd's
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the same error is ptd's own
    assert cli.main(["run", "c.yaml"]) == 1
    assert "this is a bug in ptd" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ranks_split_the_image_check_and_say_the_first_bad_file_once(tmp_path):
    """Each rank checked every image of a folder dataset before training (world times the work on
    one machine); they now split it. With bad files in both ranks' shares each rank printed its own
    line, in any order; the ranks now agree on the first bad file in the split's order, and rank 0
    alone says it, as one process would."""
    from test_bad_data import config, write_imagefolder
    from ptd.config import load_config
    from ptd.data import load_configured

    root = write_imagefolder(tmp_path / "data", per=200)  # 404 files: chunks of 256, rank 1 checks the second
    p = config(tmp_path, "imagefolder", root)
    sp = load_configured(load_config(p).data, 0)
    order = [f for s in (sp.train, sp.val, sp.test) for f, _ in s.samples]
    out = tmp_path / "run"

    def errors() -> list[str]:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "ptd", "train", p, "--out", str(out), "--quiet", "--set", "threads=1", "--set", "data.workers=0",
                            "--set", "data.image_size=16", "--set", "data.crop_padding=0"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and not out.exists(), r.stderr[-3000:]  # refused before the run directory was made
        return [l for l in r.stderr.splitlines() if l.startswith("ptd: error")]

    late, early = Path(order[300]), Path(order[100])  # in rank 1's share, then in rank 0's
    late.write_bytes(b"junk")
    lines = errors()
    assert len(lines) == 1 and lines[0].startswith(f"ptd: error: cannot read image {late} "), lines  # rank 0 says rank 1's
    early.write_bytes(b"junk")
    lines = errors()
    assert len(lines) == 1 and lines[0].startswith(f"ptd: error: cannot read image {early} "), lines


@pytest.mark.slow
def test_torchrun_says_a_data_refusal_only_one_rank_meets(tmp_path, tiny_fashion):
    """A refusal one process alone meets while loading (a file only its machine cannot read) was
    marked every rank's, so that rank kept silent while the others waited in the rendezvous until
    torchrun stopped them: no line at all (review). The ranks now share what they met, and rank 0
    says it once, naming the machine when the processes are on several (each may read its own copy
    of the data): here each rank is made to report another host name."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_fashion, threads=1)))
    wrap = tmp_path / "wrap.py"
    wrap.write_text(
        "import os, socket, sys\n"
        "socket.gethostname = lambda: 'node' + os.environ['RANK']\n"
        "import ptd.data\n"
        "from ptd.data import DataError\n"
        "real = ptd.data.load_configured\n"
        "def only_rank_1(dc, seed, **kw):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise DataError('cannot read /x/cache on this machine; fix it')\n"
        "    return real(dc, seed, **kw)\n"
        "ptd.data.load_configured = only_rank_1\n"
        "from ptd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrap),
                        "train", str(cfg), "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300,
                       cwd=str(Path(__file__).resolve().parents[1]))
    lines = [l for l in r.stderr.splitlines() if l.startswith("ptd: error")]
    assert r.returncode != 0 and lines == ["ptd: error: on host node1: cannot read /x/cache on this machine; fix it"], r.stderr[-3000:]
    assert not out.exists()


def test_the_refusal_the_ranks_agree_on_names_the_host_when_there_are_several():
    """Multi-node: each machine may check its own copy of the data, so "cannot read image
    /data/x.png" did not say which machine's copy is bad (last session's note). The first refusal
    by position wins (errors before the image check first); the host is named only when the
    processes span several machines."""
    from ptd.preflight import first_refusal

    one = [("a", None), ("a", (7, "cannot read image /d/7.png; replace it")), ("a", (3, "cannot read image /d/3.png; x"))]
    assert first_refusal(one) == "cannot read image /d/3.png; x"
    two = [("a", None), ("b", (7, "cannot read image /d/7.png; replace it")), ("a", None), ("b", None)]
    assert first_refusal(two) == "on host b: cannot read image /d/7.png; replace it"
    assert first_refusal([("a", (5, "bad image")), ("b", (-1, "cannot read /x; fix it"))]) == "on host b: cannot read /x; fix it"
    assert first_refusal([("a", None), ("b", None)]) is None
    # Every machine met it (a config error, data missing everywhere): no one host to name (review).
    assert first_refusal([("a", (-1, "cannot read /x; fix it")), ("b", (-1, "cannot read /x; fix it"))]) == "cannot read /x; fix it"
    assert first_refusal([("a", (2, "bad")), ("b", (2, "bad")), ("c", None)]) == "on host a, b: bad"
