"""DDP under torchrun (gloo on CPU): two processes train one teacher, rank 0 writes the run dir."""
import json
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
