"""Smoke tests of the benchmark scripts: they run and report sane results (never timing assertions)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_speed_smoke(tmp_path: Path):
    ts = _load("train_speed")
    res = ts.main(["--quick", "--synthetic", "--steps", "2", "--block", "1", "--out", str(tmp_path)], log=lambda *_: None)

    assert set(res["timing"]) == {"teacher_ptd", "teacher_published", "distill_ptd", "distill_published"}
    for name, t in res["timing"].items():
        assert t["img_per_s_median"] > 0, name
        assert t["steps"] == 2
    assert res["speedup"]["teacher"] > 0 and res["speedup"]["distill"] > 0
    assert res["data_only"]["ptd"] > 0 and res["data_only"]["published"] > 0

    # Pruned weights exactly zero in both pipelines, with the same zero pattern, after timing and after training.
    m = res["masks"]
    assert m["ptd_pruned_exactly_zero"] and m["published_pruned_exactly_zero"] and m["identical_zero_pattern"]
    assert m["after_timing"]["published_stored_weights_zero"]
    assert abs(m["after_timing"]["sparsity"] - ts.SPARSITY) < 1e-3
    (run,) = res["accuracy"]["runs"]
    assert run["masks"]["identical_zero_pattern"]
    assert 0.0 <= run["ptd"]["test_acc"] <= 1.0 and 0.0 <= run["published"]["test_acc"] <= 1.0

    saved = json.loads((tmp_path / "train_speed.json").read_text())
    assert saved["timing"].keys() == res["timing"].keys()
    md = (tmp_path / "train_speed.md").read_text()
    assert "speedup" in md and "--quick" in md
