"""benchmarks/pipeline_speed.py: its fabricated data, its re-creation of the published pipeline, and a
quick end-to-end run (sane results, never timing assertions); plus the latency time cap it relies on."""
from __future__ import annotations

import importlib.util
import json
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ps():
    spec = importlib.util.spec_from_file_location("_bench_pipeline_speed", ROOT / "benchmarks" / "pipeline_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fabricated_cifar100_reads_as_the_real_format(ps, tmp_path: Path):
    from ptd.data import load_dataset

    ps.write_cifar100(tmp_path, n_train=50, n_test=20)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    assert raw["data"].dtype.name == "uint8" and raw["data"].shape == (50, 3072) and len(raw["fine_labels"]) == 50
    s = load_dataset("cifar100", str(tmp_path), val_fraction=0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (40, 10, 20, 100)
    # The published side reads the same files through torchvision, despite their md5s.
    pub = ps.PublishedPipeline(tmp_path, tmp_path / "w", ps.schedule(ps.parse_args(["--quick"])), 0, "cpu")
    train, val, test = pub.loaders(8)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and len(test.dataset) == 20


def test_published_prune_masks_a_fifth_of_the_weights(ps):
    torch.manual_seed(0)
    m = ps.PubVGG(ps.scaled(ps.VGG19, 0.125))
    pub = ps.PublishedPipeline.__new__(ps.PublishedPipeline)
    pub.prune(m, 0.2)
    layers = [l for l in m.modules() if isinstance(l, (ps.PubConv2d, ps.PubLinear))]
    alive = sum(int(l.weight_mask.sum()) for l in layers)
    total = sum(l.weight_mask.numel() for l in layers)
    assert abs(alive / total - 0.8) < 1e-3
    # The mask takes effect in the forward pass: a fully masked model outputs its biases only.
    for l in layers:
        l.weight_mask.zero_()
    m.eval()
    out = m(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out[0], out[1])


def test_quick_run_reports_ratios_accuracy_and_flops(ps, tmp_path: Path):
    res = ps.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *_: None)
    saved = json.loads((tmp_path / "pipeline_speed.json").read_text())
    assert saved["end_to_end_ratio"] == res["end_to_end_ratio"] and (tmp_path / "pipeline_speed.md").is_file()
    assert len((tmp_path / "pipeline_speed.runs.jsonl").read_text().splitlines()) == 2  # one line per finished run
    p, pub = res["runs"]["ptd"][0], res["runs"]["published"][0]
    for r in (p, pub):
        assert r["total_s"] > 0 and 0 <= r["test_acc"] <= 1
        assert r["stages"]["teacher"] > 0 and r["stages"]["prune"] > 0 and r["stages"]["distill"] > 0
        # The stages account for the whole run (up to timer granularity).
        assert abs(sum(r["stages"].values()) - r["total_s"]) < 0.05 * r["total_s"] + 0.5
    assert res["end_to_end_ratio"]["median"] == pytest.approx(pub["total_s"] / p["total_s"])
    assert set(res["stage_ratio"]) == {"teacher", "prune", "distill"}
    peak = res["matmul_peak_flop_per_s"]
    # bf16's peak is measured only where bf16 is native (ptd then autocasts); emulated, it is skipped.
    assert peak["fp32"] > 1e8 and (peak["bf16"] > 1e8 if res["train_step"]["uses_bf16_autocast"] else peak["bf16"] is None)
    for k in ("teacher", "student_kd", "published_teacher", "published_student_kd"):
        step = res["train_step"][k]
        assert step["flop_per_s"] > 0 and step["flops_per_image"] > 0
        assert 0 < step["of_fp32_peak"] < 2  # a step cannot beat the matmul peak by much
    # Same FLOPs per image on both sides (same architectures); the ceiling is the best peak over
    # the published step's FLOP/s, by hand.
    ts, c = res["train_step"], res["step_ceiling"]
    best = max(v for v in peak.values() if v)
    assert c["best_peak_flop_per_s"] == best
    for k in ("teacher", "student_kd"):
        assert ts[k]["flops_per_image"] == ts[f"published_{k}"]["flops_per_image"]
        assert c[k]["ceiling_ratio"] == pytest.approx(best / ts[f"published_{k}"]["flop_per_s"])
        assert c[k]["achieved_ratio"] == pytest.approx(ts[k]["flop_per_s"] / ts[f"published_{k}"]["flop_per_s"])
    md = (tmp_path / "pipeline_speed.md").read_text()
    assert "| published teacher |" in md and "ceiling" in md
    # ptd's epochs one by one, from its run directory: one per scheduled epoch, inside their stage.
    sch = res["schedule"]
    assert [len(p["epoch_s"][s]) for s in ("teacher", "prune", "distill")] == [
        sch["teacher"]["epochs"], sch["retrain"]["epochs"], sch["distill"]["epochs"]]
    for s in ("teacher", "prune", "distill"):
        assert all(e > 0 for e in p["epoch_s"][s]) and sum(p["epoch_s"][s]) <= p["stages"][s]
    assert res["compile_gain"] is None and "ptd_eager" not in res["runs"]


def test_compile_runs_ptd_eager_too_and_reports_the_gain(ps, tmp_path: Path, monkeypatch):
    """With --compile, each pair runs ptd compiled, the published way and ptd eager; the gain is
    eager / compiled per stage and per steady epoch (a fit's first epoch pays the compile). The
    expensive sides are stood in for: this checks the driver's bookkeeping and arithmetic."""
    seen = []

    def fake_ptd(data_root, work, sch, seed, device, threads):
        c = sch["compile"] != "off"
        seen.append(("ptd" if c else "ptd_eager", seed))
        ep = {"teacher": [30.0, 1.0, 1.0] if c else [3.0, 2.0, 2.0], "prune": [1.0, 1.0] if c else [2.0, 2.0],
              "distill": [40.0, 1.5, 1.5] if c else [4.0, 3.0, 3.0]}
        stages = {"startup": 1.0, "teacher": sum(ep["teacher"]), "prune": sum(ep["prune"]), "student": 1.0,
                  "distill": sum(ep["distill"]), "report": 0.0}
        return {"total_s": sum(stages.values()), "stages": stages, "test_acc": 0.5, "epoch_s": ep}

    class FakePub:
        def __init__(self, data_root, work, sch, seed, device):
            self.seed = seed

        def run(self):
            seen.append(("published", self.seed))
            st = {"startup": 0.0, "teacher": 30.0, "prune": 20.0, "student": 0.0, "distill": 30.0, "report": 0.0}
            return {"total_s": 80.0, "stages": st, "test_acc": 0.5}

    step = {"flops_per_image": 1e9, "images_per_s": 10.0, "flop_per_s": 1e10}
    monkeypatch.setattr(ps, "run_ptd", fake_ptd)
    monkeypatch.setattr(ps, "PublishedPipeline", FakePub)
    monkeypatch.setattr(ps, "step_flops", lambda *a: {"uses_bf16_autocast": False, **{k: dict(step) for k in (
        "teacher", "student_kd", "published_teacher", "published_student_kd")}})
    monkeypatch.setattr(ps, "matmul_peak", lambda *a, **k: 1e11)
    res = ps.main(["--n-train", "64", "--n-test", "16", "--seeds", "0", "1", "--teacher-epochs", "3", "--retrain-epochs", "2", "--distill-epochs", "3",
                   "--compile", "reduce-overhead", "--out", str(tmp_path)], log=lambda *_: None)
    # ABBA over three sides: the second pair runs them in reverse
    assert seen == [("ptd", 0), ("published", 0), ("ptd_eager", 0), ("ptd_eager", 1), ("published", 1), ("ptd", 1)]
    g = res["compile_gain"]
    assert g["teacher"]["median"] == pytest.approx(7.0 / 32.0) and g["teacher_steady_epoch"]["median"] == pytest.approx(2.0)
    assert g["prune_steady_epoch"]["median"] == pytest.approx(2.0) and g["distill_steady_epoch"]["median"] == pytest.approx(2.0)
    assert g["end_to_end"]["median"] == pytest.approx((1 + 7 + 4 + 1 + 10) / (1 + 32 + 2 + 1 + 43))
    assert res["epoch_detail"]["ptd"]["distill"] == {"first": ps.spread([40.0, 40.0]), "steady": ps.spread([1.5, 1.5])}
    # the headline ratio stays published / ptd as configured (compiled)
    assert res["end_to_end_ratio"]["median"] == pytest.approx(80.0 / 79.0)
    md = (tmp_path / "pipeline_speed.md").read_text()
    assert "- teacher steady epoch: 2.00x [2.00, 2.00]" in md and "distill 40.00 / 1.50" in md


class _Sleepy(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_latency_rounds_stop_at_max_seconds_but_keep_the_minimum():
    from ptd.measure import MIN_REPEATS, compare_latency, latency

    capped = latency(_Sleepy(0.01), (1, 2, 2), 1, repeats=50, warmup=0, max_seconds=0.02)
    assert capped["repeats"] == MIN_REPEATS  # 0.02 s spent after 2 rounds, but the minimum is kept
    both = compare_latency({"a": _Sleepy(0.01), "b": _Sleepy(0.01)}, (1, 2, 2), 1, repeats=50, warmup=0, max_seconds=0.3)
    # A round of two 10 ms sleeps takes >= 20 ms (sleep never undershoots): at most 15 rounds fit in 0.3 s.
    assert MIN_REPEATS < both["a"]["repeats"] == both["b"]["repeats"] <= 15
    uncapped = latency(_Sleepy(0.0), (1, 2, 2), 1, repeats=7, warmup=0, max_seconds=None)
    assert uncapped["repeats"] == 7
    with pytest.raises(ValueError, match="max_seconds"):
        latency(_Sleepy(0.0), (1, 2, 2), 1, max_seconds=0)
