"""benchmarks/tv_zoo.py's table: a partial run (--only) replaces only its own rows and says where they came from."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def zoo(monkeypatch):
    spec = importlib.util.spec_from_file_location("_bench_tv_zoo", ROOT / "benchmarks" / "tv_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ran = []

    def child(cmd, **kw):  # stands in for the per-model process: a refusal row, as `--one NAME` prints it
        name = cmd[cmd.index("--one") + 1]
        ran.append(name)
        row = {"model": name, "params": 1_000_000, "prune_s": 0.1, "status": "refused", "reason": f"new reason for {name}", "derive_s": 0.2}
        return subprocess.CompletedProcess(cmd, 0, stdout="ZOO " + json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(mod.subprocess, "run", child)
    monkeypatch.setattr(mod, "_this_run", lambda args, argv: {
        "command": "python benchmarks/tv_zoo.py " + " ".join(argv), "sparsity": args.sparsity, "round_to": args.round_to,
        "cpu_budget_s": args.cpu_budget, "wall_budget_s": args.budget, "cpu": "Other CPU", "torch": "9.9", "date": "2026-11-30",
        "code": "abc1234"}, raising=False)
    mod.ran = ran
    return mod


def _table(tmp_path: Path) -> Path:
    """A committed table of three models from one full run, as tables were written before runs were recorded per row."""
    rows = [{"model": m, "params": 2_000_000, "prune_s": 1.0, "status": "refused", "reason": f"old reason for {m}", "derive_s": 9.9, "wall_s": 12.0}
            for m in ("alexnet", "swin_t", "vit_b_16")]
    res = {"command": "python benchmarks/tv_zoo.py --max-params 1e9", "sparsity": 0.59, "round_to": 1, "cpu_budget_s": 60.0,
           "wall_budget_s": 600.0, "cpu": "Intel(R) Xeon(R) Processor", "torch": "2.14.1+cu130", "rows": rows}
    out = tmp_path / "tv_zoo"
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    return out


def test_a_partial_run_replaces_only_its_rows_and_keeps_the_header(zoo, tmp_path):
    out = _table(tmp_path)
    zoo.main(["--render", "--out", str(out)])
    before_md = out.with_suffix(".md").read_text().splitlines()
    before = json.loads(out.with_suffix(".json").read_text())

    assert zoo.main(["--only", "swin_t", "vit_b_16", "--out", str(out)]) == 0
    assert zoo.ran == ["swin_t", "vit_b_16"]
    md = out.with_suffix(".md").read_text().splitlines()
    res = json.loads(out.with_suffix(".json").read_text())
    # The header still describes the run the other rows came from.
    assert "Command: `python benchmarks/tv_zoo.py --max-params 1e9`  " in md
    assert any(ln.startswith("Machine: Intel(R) Xeon(R) Processor, 1 thread per model, torch 2.14.1+cu130; budget 60") for ln in md)
    assert {k: res[k] for k in ("command", "cpu", "torch")} == {k: before[k] for k in ("command", "cpu", "torch")}
    # The re-run rows say which run they came from, and that run is listed.
    assert res["reruns"] == [{"command": f"python benchmarks/tv_zoo.py --only swin_t vit_b_16 --out {out}", "cpu": "Other CPU", "torch": "9.9",
                              "cpu_budget_s": 60.0, "wall_budget_s": 600.0, "date": "2026-11-30", "code": "abc1234",
                              "models": ["swin_t", "vit_b_16"]}]
    assert any(ln.startswith("- run 2: `python benchmarks/tv_zoo.py --only swin_t vit_b_16") and "on Other CPU, torch 9.9, 2026-11-30, code abc1234" in ln
               for ln in md)
    assert [ln for ln in md if ln.startswith("| swin_t (run 2) |")] == ["| swin_t (run 2) | 1.0M | refused | - | - | - | - | 0.2 | - | new reason for swin_t |"]
    # Every other row is exactly as it was, in the .md and in the .json.
    alexnet = [ln for ln in before_md if ln.startswith("| alexnet |")]
    assert alexnet and [ln for ln in md if ln.startswith("| alexnet |")] == alexnet
    assert res["rows"][0] == before["rows"][0] and [r["model"] for r in res["rows"]] == ["alexnet", "swin_t", "vit_b_16"]


def test_later_partial_runs_take_over_rows_and_a_run_with_none_left_goes(zoo, tmp_path):
    out = _table(tmp_path)
    zoo.main(["--only", "swin_t", "vit_b_16", "--out", str(out)])
    zoo.main(["--only", "vit_b_16", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert [rr["models"] for rr in res["reruns"]] == [["swin_t"], ["vit_b_16"]]
    md = out.with_suffix(".md").read_text()
    assert "| swin_t (run 2) |" in md and "| vit_b_16 (run 3) |" in md and "| alexnet |" in md
    zoo.main(["--only", "swin_t", "--out", str(out)])  # run 2 has no row left: it goes, the runs are numbered again
    res = json.loads(out.with_suffix(".json").read_text())
    assert [rr["models"] for rr in res["reruns"]] == [["vit_b_16"], ["swin_t"]]
    md = out.with_suffix(".md").read_text()
    assert "| vit_b_16 (run 2) |" in md and "| swin_t (run 3) |" in md and "run 4" not in md


def test_a_full_run_is_the_whole_table(zoo):
    run = {"command": "c", "sparsity": 0.59, "round_to": 1, "cpu_budget_s": 60.0, "wall_budget_s": 600.0, "cpu": "X", "torch": "t",
           "date": "d", "code": "h"}
    rows = [{"model": "b"}, {"model": "a"}]
    res = zoo.merge(None, run, rows, ["a", "b", "c"])
    assert "reruns" not in res and res["rows"] == [{"model": "a"}, {"model": "b"}] and res["cpu"] == "X"


def test_a_partial_run_at_another_sparsity_is_refused_and_the_table_kept(zoo, tmp_path, capsys):
    out = _table(tmp_path)
    zoo.main(["--render", "--out", str(out)])
    files = {p: p.read_bytes() for p in (out.with_suffix(".json"), out.with_suffix(".md"))}
    assert zoo.main(["--only", "swin_t", "--sparsity", "0.79", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--sparsity 0.59" in err and "this run asks 0.79" in err
    assert zoo.ran == [] and all(p.read_bytes() == b for p, b in files.items())
