"""Smoke tests of the benchmark scripts: they run and report sane results (never timing assertions)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import DEVICES

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_speed_smoke(tmp_path: Path):
    ts = _load("train_speed")
    args = ["--quick", "--synthetic", "--steps", "2", "--block", "1", "--out", str(tmp_path)]
    if not ts.cpu_has_native_bf16():  # still exercise the bf16 code path (emulated) on CPUs without it
        args.append("--force-bf16")
    res = ts.main(args, log=lambda *_: None)

    assert set(res["timing"]) == {f"{s}_{p}" for s in ("teacher", "distill") for p in ("ptd", "ptd_fp32", "published")}
    for name, t in res["timing"].items():
        assert t["img_per_s_median"] > 0, name
        assert t["steps"] == 2
    for key in ("speedup", "speedup_fp32", "bf16_gain"):
        assert res[key]["teacher"] > 0 and res[key]["distill"] > 0, key
    assert res["data_only"]["ptd"] > 0 and res["data_only"]["published"] > 0

    # The "ptd" variants ran ptd's default runtime with bf16 autocast; "ptd_fp32" did not.
    amp = res["amp"]
    assert amp["ptd_uses_amp"] and not amp["ptd_fp32_uses_amp"]
    assert amp["ptd_logits_dtype"] == "torch.bfloat16" and amp["ptd_fp32_logits_dtype"] == "torch.float32"

    # Pruned weights exactly zero in every pipeline, with the same zero pattern, after timing and after training.
    m = res["masks"]
    assert m["ptd_pruned_exactly_zero"] and m["published_pruned_exactly_zero"] and m["identical_zero_pattern"]
    assert m["after_timing"]["published_stored_weights_zero"]
    assert abs(m["after_timing"]["sparsity"] - ts.SPARSITY) < 1e-3
    (run,) = res["accuracy"]["runs"]
    assert run["masks"]["identical_zero_pattern"] and run["masks_fp32"]["identical_zero_pattern"]
    assert run["ptd"]["uses_amp"] and not run["ptd_fp32"]["uses_amp"]
    for pipe in ("ptd", "ptd_fp32", "published"):
        assert 0.0 <= run[pipe]["test_acc"] <= 1.0, pipe

    saved = json.loads((tmp_path / "train_speed.json").read_text())
    assert saved["timing"].keys() == res["timing"].keys()
    md = (tmp_path / "train_speed.md").read_text()
    assert "published" in md and "bf16" in md and "--quick" in md


def test_student_speed_and_layers_smoke(tmp_path: Path):
    ss = _load("student_speed")
    assert ss.main(["--cases", "demo", "--round-to", "1", "8", "8n", "auto", "--precisions", "fp32", "--repeats", "1", "--warmup", "0",
                    "--out", str(tmp_path / "ss")]) == 0
    res = json.loads((tmp_path / "ss.json").read_text())
    rows = {r["round_to"]: r for r in res["rows"]}
    assert set(rows) == {"1", "8", "8n", "auto"} and res["recommended_round_to"] in rows
    # The demo student's exact 12/29 (teacher 16/32) stay under 8 and drop to 8/24 under 8n.
    assert rows["8"]["widths"][:2] == [12, 29] and rows["8n"]["widths"][:2] == [8, 24]
    # auto is ptd's default student: on a CPU 16n would hold 0.79x the surviving weights, so 8n,
    # timed once as the same student.
    assert rows["auto"]["auto_took"] == "8n" and rows["auto"]["same_student_as"].endswith("/r8n")
    assert "| demo | 0.59 | fp32 | auto: 8n (= 8n) |" in (tmp_path / "ss.md").read_text()
    assert all(r["train_ratio"] > 0 and r["speedup_b64"] > 0 and abs(r["weights_vs_surviving"] - 1) < 0.1 for r in rows.values())

    sl = _load("student_layers")
    assert sl.main(["--batch", "8", "--repeats", "2", "--out", str(tmp_path / "layers.md")]) == 0
    text = (tmp_path / "layers.md").read_text()
    assert "| Conv2d | 1, 28 |" in text and "FLOPs ratio of 2.2" in text and "- batch 8: training" in text
    assert "- default student: batch 1: " in text and "- round_narrower off [12, 29, " in text


def test_student_speed_recommends_eligible_then_most_targets_then_the_default_on_a_tie():
    ss = _load("student_speed")

    def row(rt, ratio, met, cost=0.01):
        return {"round_to": rt, "weights_vs_surviving": ratio, "rounding_cost": cost,
                "targets": {"a": met >= 1, "b": met >= 2, "c": met >= 3}}

    rows = [row("8n", 1.02, 2), row("16n", 0.79, 3), row("auto", 1.02, 2), row("1", 1.0, 1, 0.0)]
    score, best = ss.recommend(rows, ["1", "8n", "16n", "auto"])
    assert best == "auto" and score["16n"][0] is False  # 16n meets more targets but holds 0.79x: not eligible
    assert ss.recommend(rows[:2], ["8n", "16n"])[1] == "8n"
    assert ss.recommend([row("8", 1.0, 2, 0.03), row("8n", 1.0, 2, 0.01)], ["8", "8n"])[1] == "8n"  # less rounding cost


def test_student_speed_times_the_students_of_a_finished_run(tmp_path: Path, capsys):
    """--run: the run's trained teacher and final pruned level, not a fresh init (whose magnitudes
    can size another student: the demo's IMP-pruned teacher holds 0.99x at 16n, a fresh one 0.79x)."""
    from ptd.models import build_model
    from ptd.pruning.masks import save_masks
    from ptd.train.checkpoint import save_model

    ss = _load("student_speed")
    torch.manual_seed(1)
    teacher = build_model("vgg", 10, 1, plan=[16, "M", 32, "M", 32])
    pruned = build_model("vgg", 10, 1, plan=[16, "M", 32, "M", 32])
    pruned.load_state_dict(teacher.state_dict())
    masks = ss.magnitude_prune(pruned, 0.59)
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    (run / "prune" / "level_2").mkdir(parents=True)
    save_model(run / "teacher" / "model.safetensors", teacher)
    save_model(run / "prune" / "level_2" / "model.safetensors", pruned)
    save_masks(run / "prune" / "level_2" / "masks.safetensors", masks)
    (run / "prune" / "result.json").write_text(json.dumps({"final_level": 2, "sparsity": 0.5904}))
    assert ss.main(["--cases", "--run", str(run), "--input", "1", "28", "28", "--round-to", "1", "8n", "--precisions", "fp32",
                    "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "ss")]) == 0
    res = json.loads((tmp_path / "ss.json").read_text())
    assert {r["case"] for r in res["rows"]} == {"run"} and {r["sparsity"] for r in res["rows"]} == {0.59}
    alive = sum(int(m.sum()) for m in masks.values())
    assert all(r["surviving"] == alive for r in res["rows"])  # the run's own masks, as saved
    assert f"run = the trained teacher and final pruned level of the ptd run `{run}` (input 1x28x28)" in (tmp_path / "ss.md").read_text()
    for args, why in ((["--run", str(run)], "--run and --input go together"),
                      (["--run", str(tmp_path), "--input", "1", "28", "28"], "no pruned level there"),
                      ([], "nothing to time")):
        with pytest.raises(SystemExit) as e:
            ss.main(["--cases", *args, "--out", str(tmp_path / "x")])
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_student_speed_times_fp32_only_where_bf16_is_emulated(tmp_path: Path, monkeypatch, capsys):
    ss = _load("student_speed")
    monkeypatch.setattr(ss, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU (AMD EPYC Milan here)
    assert ss.main(["--cases", "demo", "--round-to", "1", "--precisions", "fp32", "bf16", "--repeats", "1", "--warmup", "0",
                    "--out", str(tmp_path / "ss")]) == 0
    assert {r["precision"] for r in json.loads((tmp_path / "ss.json").read_text())["rows"]} == {"fp32"}
    assert "no native bf16" in capsys.readouterr().err


def test_student_speed_without_the_exact_rule_among_candidates(tmp_path: Path):
    """Rounding cost is measured against the round_to=1 student; without it the cost is unknown
    (shown as -), not a crash (the first H200 run's --round-to 8n alone hit a KeyError)."""
    ss = _load("student_speed")
    assert ss.main(["--cases", "demo", "--round-to", "8n", "--precisions", "fp32", "--repeats", "1", "--warmup", "0",
                    "--out", str(tmp_path / "ss")]) == 0
    (r,) = json.loads((tmp_path / "ss.json").read_text())["rows"]
    assert r["rounding_cost"] is None and abs(r["weights_vs_surviving"] - 1.020) < 0.01
    assert "| demo | 0.59 | fp32 | 8n | 1.020 | - |" in (tmp_path / "ss.md").read_text()


def test_student_speed_cuda_graphs_need_cuda(capsys):
    ss = _load("student_speed")
    with pytest.raises(SystemExit) as e:
        ss.main(["--cuda-graphs", "--device", "cpu"])
    assert e.value.code == 2 and "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_student_speed_cuda_graphs_on_cuda(tmp_path: Path):
    """A replayed graph computes what the eager forward computes, and the table gets its columns."""
    ss = _load("student_speed")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    m.eval()(x)  # materializes the lazy layer
    g, out = ss.graphed_forward(m, x, "fp32")
    x.copy_(torch.randn_like(x))  # the graph reads x's memory: a new input, a new output
    with torch.no_grad():
        want = m(x).clone()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, want, atol=1e-5)
    assert ss.main(["--cases", "demo", "--round-to", "8n", "--precisions", "fp32", "bf16", "--repeats", "2", "--warmup", "1",
                    "--large-batch", "256", "--device", "cuda", "--cuda-graphs", "--out", str(tmp_path / "ss")]) == 0
    res = json.loads((tmp_path / "ss.json").read_text())
    assert all(set(r["cuda_graphs"]) == {"b64", "b1", "b256"} and r["cuda_graphs"]["b64"]["speedup"] > 0 for r in res["rows"])
    assert "Inference replayed from CUDA graphs" in (tmp_path / "ss.md").read_text() and "b64 cuda graphs | b64 eager" in (tmp_path / "ss.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_student_speed_compiled_inference_on(device, tmp_path: Path):
    """The compiled forward (frozen weights, BN folded) computes the eager forward's logits, and
    the table gets its compiled columns. ~15 s on a CPU: two inductor compiles."""
    ss = _load("student_speed")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).to(device)
    m.train()(torch.randn(16, 3, 8, 8, device=device))  # BN statistics away from their init: folding has work to do
    x = torch.randn(4, 3, 8, 8, device=device)
    with torch.no_grad():
        want = m.eval()(x).clone()
        got = ss.compiled_forward(m, torch.device(device))(x).clone()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert ss.main(["--cases", "demo", "--round-to", "8n", "--precisions", "fp32", "--repeats", "1", "--warmup", "0",
                    "--device", device, "--compiled-infer", "--out", str(tmp_path / "ss")]) == 0
    (r,) = json.loads((tmp_path / "ss.json").read_text())["rows"]
    assert set(r["compiled"]) == {"b64"} and r["compiled"]["b64"]["speedup"] > 0 and r["compiled"]["b64"]["teacher_ms"] > 0
    assert "| b64 compiled | b64 eager |" in (tmp_path / "ss.md").read_text()


def test_gpu_kernels_smoke(tmp_path: Path):
    """Runs on a CPU too (aten ops instead of CUDA kernels): every op lands in one kind, the kinds
    add up to the total, and the table has one row per kind."""
    gk = _load("gpu_kernels")
    assert gk.kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_relu") == "conv/gemm"
    assert gk.kind("cudnn::bn_fw_inf_1C11_kernel_NCHW") == "batchnorm"
    assert gk.kind("void at::native::vectorized_elementwise_kernel<4, add>") == "elementwise"
    assert gk.kind("nchwToNhwcKernel") == "layout/cast"
    assert gk.main(["--case", "demo", "--batch", "4", "--calls", "2", "--precisions", "fp32", "--out", str(tmp_path / "k")]) == 0
    r = json.loads((tmp_path / "k.json").read_text())
    for side in ("teacher", "student"):
        v = r["precisions"]["fp32"][side]
        assert v["total_ms"] > 0 and abs(sum(v["by_kind_ms"].values()) - v["total_ms"]) < 1e-6 * max(1.0, v["total_ms"])
    assert "| conv/gemm |" in (tmp_path / "k.md").read_text() and r["flops_ratio"] > 2


def test_conv_width_smoke(tmp_path: Path):
    cw = _load("conv_width")
    assert cw.main(["--device", "cpu", "--precision", "fp32", "--batch", "2", "--side", "8", "--repeats", "1", "--out", str(tmp_path / "cw")]) == 0
    r = json.loads((tmp_path / "cw.json").read_text())
    assert len(r["rows"]) == len(cw.PAIRS) + len(cw.AUTOTUNED) and all(x["ms"] > 0 for x in r["rows"])
    # TFLOP/s is 2 x MACs over the time: 2 * 2 * 8 * 8 * 9 * cin * cout / ms / 1e9
    x = r["rows"][0]
    assert x["tflop_per_s"] == pytest.approx(2 * 2 * 64 * 9 * x["cin"] * x["cout"] / x["ms"] / 1e9)
    assert "| 64 | 64 | off |" in (tmp_path / "cw.md").read_text()


def test_onnx_rounding_smoke(tmp_path: Path):
    """benchmarks/onnx_rounding.py (exact vs rounded widths in onnxruntime) runs end to end."""
    ob = _load("onnx_rounding")
    assert ob.main(["--cases", "cifar100_vgg19_x0.25", "--round-to", "1", "8", "--repeats", "1", "--threads", "1",
                    "--out", str(tmp_path / "ob")]) == 0
    rows = json.loads((tmp_path / "ob.json").read_text())["rows"]
    assert [r["round_to"] for r in rows] == ["1", "8"]
    assert all(r["params_ratio"] > 2 and r["flops_ratio"] > 2 and r["b1"] > 0 and r["b64"] > 0 for r in rows)
    assert "| cifar100_vgg19_x0.25 | 8 |" in (tmp_path / "ob.md").read_text()


def test_kd_split_smoke(tmp_path: Path):
    ks = _load("kd_split")
    assert ks.main(["--batch", "8", "--repeats", "1", "--out", str(tmp_path / "kd.md")]) == 0
    rows = [line for line in (tmp_path / "kd.md").read_text().splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 and float(r.split("|")[3]) > 0 for r in rows)


def test_conv_wgrad_smoke(tmp_path: Path):
    cw = _load("conv_wgrad")
    assert cw.main(["--quick", "--repeats", "1", "--step-repeats", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "conv_wgrad.json").read_text())
    assert {(r["dtype"], r["side"]) for r in res["shapes"]} == {(d, s) for d in ("bfloat16", "float32") for s in (2, 8)}
    for r in res["shapes"]:
        assert r["aten_ms"] > 0 and r["gemm_ms"] > 0
        # The same gradient as fp32's of the same inputs, within that dtype's rounding (bf16 outputs:
        # 2^-8 relative each), and no further from it than oneDNN's own.
        assert r["rel_diff"] < (2e-2 if r["dtype"] == "bfloat16" else 1e-5)
        assert r["rel_diff"] <= max(r["aten_rel_diff"], 2 ** -8 if r["dtype"] == "bfloat16" else 1e-5)
        assert r["used_by_default"] == (r["side"] == 2)  # 2x2: 4 pixels, under both limits; 8x8: over both
    (step,) = res["steps"]
    assert step["stock_ms"] > 0 and step["fast_ms"] > 0 and step["ratio_min"] <= step["ratio_median"] <= step["ratio_max"]
    md = (tmp_path / "conv_wgrad.md").read_text()
    assert "oneDNN" in md and "GEMM" in md and "--quick" in md


FM = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not any((FM / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
                    reason="Fashion-MNIST is not installed (scripts/setup.sh installs dataset-fashion-mnist)")
def test_conv_wgrad_accuracy_smoke(tmp_path: Path):
    cw = _load("conv_wgrad")
    assert cw.main(["--accuracy", "--seeds", "0", "1", "--train-images", "256", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "conv_wgrad_accuracy.json").read_text())["accuracy"]
    assert [r["seed"] for r in res["rows"]] == [0, 1]
    for r in res["rows"]:
        assert 0.0 <= r["off"] <= 1.0 and 0.0 <= r["on"] <= 1.0
    d = [r["on"] - r["off"] for r in res["rows"]]
    assert abs(res["mean_diff"] - sum(d) / 2) < 1e-12 and res["ci95"][0] <= res["mean_diff"] <= res["ci95"][1]
    assert "on - off" in (tmp_path / "conv_wgrad_accuracy.md").read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step(tmp_path: Path):
    """scripts/gpu_check.sh is run on a lent GPU for a few minutes at most, so its Python must not
    break between sessions: --dry-run runs every step on the CPU at tiny sizes, and its budget
    and step selection skip what they should."""
    import os
    import subprocess
    import sys

    # One run checks both: every step but the first, named in GPU_CHECK_STEPS, runs and passes,
    # and the one left out is skipped. The left-out one is cuda_tests (pytest -k cuda): on a CPU
    # it only collects the suite to skip it, which this suite already does (9 s saved).
    steps = ("cuda_tests", "torchrun_nccl", "amp_compile", "compile_fit", "pipeline_speed", "student_speed", "round_accuracy", "demo_run")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "res"), "GPU_CHECK_STEPS": " ".join(steps[1:])}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "res" / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    for s in steps[1:]:
        assert f"{s} rc=0 " in summary, (s, summary)
    assert "cuda_tests rc=skipped (not in GPU_CHECK_STEPS)" in summary
    assert "pipeline_compile" not in summary  # only when GPU_CHECK_STEPS names it
    fit = json.loads((tmp_path / "res" / "compile_fit.json").read_text())
    assert fit["off"]["epoch_s"] and fit["default"]["epoch_s"]
    # round_accuracy: both candidates trained from the one pruned teacher, one comparison per arm
    ra = json.loads((tmp_path / "res" / "round_accuracy_r18" / "round_accuracy.json").read_text())
    assert list(ra["students"]) == ["8", "32"] and list(ra["comparisons"]) == ["32"]
    assert [c["arm"] for c in ra["comparisons"]["32"]] == ["scratch", "pruned_teacher"]
    assert all(sorted(s["accuracy"]["scratch"]) == ["0", "1"] for s in ra["students"].values())
    # the same architecture at two roundings: as many convs, every width a multiple of 8
    w8, w32 = ra["students"]["8"]["conv_widths"], ra["students"]["32"]["conv_widths"]
    assert len(w8) == len(w32) and all(w % 8 == 0 for w in w8 + w32)
    # demo_run: the demo's own run directory and student_speed on its students
    assert (tmp_path / "res" / "fashion_mnist_demo_run" / "results.json").is_file()
    assert (tmp_path / "res" / "student_speed_demo_run.json").is_file()


@pytest.mark.slow
def test_parallel_fits_smoke(tmp_path: Path):
    """benchmarks/parallel_fits.py (the measurement behind jobs: N) runs end to end."""
    pf = _load("parallel_fits")
    assert pf.main(["--steps", "2", "--warmup", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "parallel_fits.json").read_text())
    assert [r["workload"] for r in res["rows"]] == ["kd", "teacher"]
    assert all(len(r["ratios"]) == 1 and r["ratios"][0] > 0 for r in res["rows"])
    assert "| kd |" in (tmp_path / "parallel_fits.md").read_text()
