"""Free disk space is checked before work starts: a run (or a sweep of many students) whose
weights, masks and training commits would not fit on the output folder's file system is refused in
one line, exit 2, before anything is written; a resumed run counts only what is left."""
from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

import ptd.preflight as pf
from ptd import paths as P
from ptd.cli import main
from ptd.config import load_config

from conftest import tiny_config

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int) -> list[str]:
    asked: list[str] = []

    def usage(path):
        asked.append(str(path))
        return Usage(10 * free + 1, 9 * free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


@pytest.fixture
def cfg_file(tmp_path, tiny_fashion) -> Path:
    cfg = tiny_config(tiny_fashion, distill={"seeds": [0], "arms": ["scratch", "pruned_teacher"],
                                             "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["threads"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _bytes(cfg_file: Path, out: Path, until: str = "report") -> tuple[int, int]:
    cfg = load_config(cfg_file)
    from ptd.data.base import load_configured

    splits = load_configured(cfg.data, cfg.seed)
    teacher = pf.check_model(cfg.teacher.model, "teacher.model", splits)
    return pf.planned_bytes(cfg, out, teacher, pf.check_derivable(cfg, teacher, splits), until=until)


def test_a_disk_too_small_for_the_run_is_refused_before_any_work(cfg_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new" / "run"
    asked = _free(monkeypatch, 5 * 2**20)  # 5 MiB: under the 64 MiB margin alone
    assert main(["run", str(cfg_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"run directory {out}: the run will write about " in err and "MiB margin" in err
    assert f"the file system of {tmp_path} has 5.0 MiB free; free space there, or pass --out a folder" in err, err
    assert asked == [str(tmp_path)] and not (tmp_path / "new").exists()  # the nearest folder that exists; nothing made


def test_enough_room_passes_and_the_need_is_the_estimate_with_its_margin(cfg_file, tmp_path, monkeypatch):
    kept, peak = _bytes(cfg_file, tmp_path / "run")
    need = int((kept + peak) * pf.DISK_MARGIN[0] + pf.DISK_MARGIN[1])
    _free(monkeypatch, need - 1)
    with pytest.raises(pf.PreflightError, match="free space there"):
        pf.preflight(load_config(cfg_file), tmp_path / "run")
    _free(monkeypatch, need)
    pf.preflight(load_config(cfg_file), tmp_path / "run")


def test_a_resumed_run_counts_only_what_is_left(cfg_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fresh, _ = _bytes(cfg_file, out)
    assert main(["train", str(cfg_file), "--out", str(out), "--quiet"]) == 0
    left, _ = _bytes(cfg_file, out)
    cfg = load_config(cfg_file)
    from ptd.data.base import load_configured

    teacher = pf.check_model(cfg.teacher.model, "teacher.model", load_configured(cfg.data, cfg.seed))
    assert fresh - left == pf._tensor_bytes(teacher) + pf.SMALL_FILES_PER_STAGE  # the finished teacher is not counted again
    assert main(["run", str(cfg_file), "--out", str(out), "--quiet"]) == 0
    assert _bytes(cfg_file, out) == (0, 0)  # finished: nothing left to write
    _free(monkeypatch, 0)
    assert main(["run", str(cfg_file), "--out", str(out), "--quiet"]) == 0  # a finished run's re-run writes no weights
    assert (out / P.RESULTS).is_file()


def test_a_resumed_sweep_counts_each_finished_pruning_once(tmp_path, tiny_fashion):
    """A sweep's one-shot or GMP point keeps its level as prune/<strategy>_s<sparsity>/level_1: one
    finished point is one level done, not two (which left a resumed sweep's estimate a level short)."""
    cfg_d = tiny_config(tiny_fashion, threads=1)
    cfg_d["sweep"] = {"sparsities": [0.36, 0.59], "strategies": ["gmp"], "student_from": 0.59}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(p)
    from ptd.data.base import load_configured

    teacher = pf.check_model(cfg.teacher.model, "teacher.model", load_configured(cfg.data, cfg.seed))
    run = tmp_path / "sweep"
    fresh, _ = pf.planned_bytes(cfg, run, teacher, None, sweep=True)
    for d in (run / P.PRUNE / "gmp_s0.36", run / P.PRUNE / "gmp_s0.36" / "level_1"):
        d.mkdir(parents=True)
        (d / P.DONE).write_text("{}")
    left, _ = pf.planned_bytes(cfg, run, teacher, None, sweep=True)
    from ptd.pruning.masks import prunable_weights

    masks = sum(w.numel() for w in prunable_weights(teacher).values())  # one byte each
    assert fresh - left == pf._tensor_bytes(teacher) + masks + pf.SMALL_FILES_PER_STAGE
