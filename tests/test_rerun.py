"""A finished run re-run (the same command, the same --out) trains nothing: it builds no model for
preflight's checks, yet loads and checks the data, and every check that protects the run still
refuses what it refused (docs/resume.md)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import ptd.data.base as data_base
import ptd.preflight as pf
from ptd import paths as P
from ptd.cli import main

from conftest import finished_two_arm_run, write_fashion_like


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ptd: error:") and "Traceback" not in err[0], err
    return err[0]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def counted(monkeypatch):
    """How often the dataset is loaded and a model built for preflight's checks."""
    seen = {"loads": 0, "models": 0}
    load, model = data_base.load_dataset, pf.check_model

    def loading(*a, **k):
        seen["loads"] += 1
        return load(*a, **k)

    def building(*a, **k):
        seen["models"] += 1
        return model(*a, **k)

    monkeypatch.setattr(data_base, "load_dataset", loading)
    monkeypatch.setattr(pf, "check_model", building)
    return seen


@pytest.fixture
def finished(tmp_path):
    data = write_fashion_like(tmp_path / "fm", n_train=600)  # its own: tests here change it
    return (*finished_two_arm_run(tmp_path, data), data)


def test_a_finished_run_re_run_builds_no_model(finished, counted, capsys):
    p, out, data = finished
    results = (out / P.RESULTS).read_text()
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    assert counted == {"loads": 1, "models": 0}
    assert (out / P.RESULTS).read_text() == results
    assert (out / P.REPORT_MD).read_text() in capsys.readouterr().out


def test_a_finished_run_whose_data_changed_is_refused(finished, counted, capsys):
    """Nothing to train, but the data is loaded and fingerprinted as before, and other data refused."""
    p, out, data = finished
    write_fashion_like(data, n_train=594)  # 6 training images fewer
    files = _snapshot(out)
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 2
    assert _one_line(capsys) == (f"ptd: error: {out}: the data changed since this run started (train 480 then, 475 now; "
                                 f"val 120 then, 119 now): its finished stages were trained on the data then; restore "
                                 f"that data, or pass --out a new directory")
    assert counted["loads"] == 1 and _snapshot(out) == files


def test_a_moved_run_folder_re_runs_and_a_moved_data_folder_is_one_line(finished, counted, capsys, tmp_path):
    p, out, data = finished
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    assert main(["run", str(p), "--out", str(moved), "--quiet"]) == 0
    assert counted == {"loads": 1, "models": 0}
    data.rename(tmp_path / "fm2")  # the config still names the old folder
    files = _snapshot(moved)
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(moved), "--quiet"]) == 2
    assert str(data) in _one_line(capsys) and _snapshot(moved) == files


def test_a_changed_config_or_a_stage_left_to_train_takes_the_full_checks(finished, counted, capsys):
    p, out, _ = finished
    files = _snapshot(out)
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet", "--set", "seed=1"]) == 2
    assert "holds a run with a different config (seed: 0 there, 1 now)" in _one_line(capsys)
    assert _snapshot(out) == files
    shutil.rmtree(out / P.DISTILL / "scratch_seed0")  # a stage to train again: every check before it
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    assert counted["loads"] == 2 and counted["models"] >= 1  # one load each: the refused re-run's, this one's


def test_a_damaged_data_record_is_one_line_as_before(finished, capsys):
    p, out, _ = finished
    (out / P.DATA).write_text('{"images": ')
    files = _snapshot(out)
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"ptd: error: {out / P.DATA}: damaged (") and "ptd writes its files whole" in line, line
    assert _snapshot(out) == files
