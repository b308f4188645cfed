"""Counts in messages and reports take the noun in their number ("1 student", "3 students"), by
ptd.errors.counted: they said "student(s)", "seed(s)", "arm(s)", "round(s)", "epoch(s)",
"model(s)", "thread(s)", "GPU(s)", "layer(s)", "argument(s)" whatever the count. Each message that
hedged is rendered here at a count of 1 and of 3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptd.errors import counted

ROOT = Path(__file__).resolve().parents[1]


def test_counted_says_exactly_one_in_the_singular():
    assert [counted(1, "student"), counted(3, "student"), counted(0, "seed"), counted(1.0, "epoch")] == [
        "1 student", "3 students", "0 seeds", "1 epoch"]
    # the count as the text shows it: thousands separated, several thread counts, a given plural
    assert counted(1234, "epoch") == "1,234 epochs" and counted("1,234", "step") == "1,234 steps"
    assert counted("1/2", "thread") == "1/2 threads" and counted("1", "thread") == "1 thread"
    assert counted(1, "strategy", "strategies") == "1 strategy" and counted(2, "strategy", "strategies") == "2 strategies"


@pytest.mark.parametrize("n", [1, 3])
def test_the_plan_lines_say_each_count_in_its_number(n):
    """[plan] said "pruning 1 round(s) of 2 epochs; 1 student(s) ... (1 arm(s), 1 seed(s))"."""
    from ptd.config import load_config
    from ptd.pipeline import plan_line
    from ptd.sweep import sweep_plan_line

    s = "" if n == 1 else "s"
    seeds = "[" + ",".join(map(str, range(n))) + "]"
    # target 0.2 at rate 0.2 is one IMP round; 0.488 (1 - 0.8^3) is three
    c = load_config(ROOT / "configs" / "fashion_mnist_demo.yaml", [f"distill.seeds={seeds}", f"prune.target_sparsity={1 - 0.8 ** n:.3f}",
                                                                    f"prune.retrain.epochs={n}", f"distill.optim.epochs={n}"])
    line = plan_line(c, "report", ["pruned_teacher"])
    assert f"pruning {n} round{s} of {n} epoch{s};" in line and f"{n} student{s} of {n} epoch{s} (1 arm, {n} seed{s})" in line, line
    assert "(s)" not in line
    c = load_config(ROOT / "configs" / "fashion_mnist_sweep.yaml", [f"distill.seeds={seeds}", "sweep.strategies=[gmp]", "sweep.sparsities=[0.5]"])
    line = sweep_plan_line(c)
    assert "(1 strategy, 1 sparsity)" in line and f"({n} seed{s}; a pruned teacher" in line and "(s)" not in line, line


@pytest.mark.parametrize("n", [1, 3])
def test_report_sentences_say_each_count_in_its_number(n):
    """report.md, report.html, sweep.md and the sweep's figures said "mean of 1 student(s)", "1
    model(s) did not learn", "PyTorch on 1 thread(s)", "over 1 seed(s)", "1 arm(s)"."""
    from ptd.report import chance_warning, latency_conditions, latency_pairs, student_line
    from ptd.report.plots import _title
    from ptd.report.sweep import render_sweep_markdown

    s = "" if n == 1 else "s"
    bad = [{"model": f"m{i}", "test_acc": 0.1, "p_value": 0.5} for i in range(n)]
    assert chance_warning(bad, {"chance": 0.1, "n": 10000})[0] == f"Warning: {n} model{s} did not learn."
    r = json.loads((ROOT / "tests" / "data" / "demo_run" / "results.json").read_text())
    r["summary"]["pruned_teacher"] = {**r["summary"]["pruned_teacher"], "n": n}
    assert f"(mean of {n} student{s})" in student_line(r)
    lat = {"64": {"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.1, "threads": n}}
    assert latency_conditions({"latency": lat}, {"latency": lat}).startswith(f"; PyTorch on {n} thread{s}, at batch 64")
    ort = {"threads": n, "batch_64": {"teacher_ms": 2.0, "student_ms": 1.0}}
    assert {p["runtime"] for p in latency_pairs({}, {"latency": {}, "onnx_latency": ort})} == {f"onnxruntime ({n} thread{s})"}
    sweep = json.loads((ROOT / "benchmarks" / "results" / "fashion_mnist_sweep" / "sweep.json").read_text())
    sweep["seeds"] = list(range(n))
    assert _title(sweep).endswith(f"mean ± std over {n} seed{s}")
    assert f" ± is the std over {n} student seed{s} (" in render_sweep_markdown(sweep, plots=False)


@pytest.mark.parametrize("n", [1, 3])
def test_html_subtitles_say_each_count_in_its_number(tmp_path, n):
    from ptd.report import summarize
    from ptd.report.html import render_run_html, render_sweep_html

    s = "" if n == 1 else "s"
    r = json.loads((ROOT / "tests" / "data" / "demo_run" / "results.json").read_text())
    arms = ["scratch", "pruned_teacher", "unpruned_teacher"][:n]
    students = [{"arm": a, "seed": k, "test_acc": 0.8 + 0.01 * k, "epochs": 1} for a in arms for k in range(n)]
    page = render_run_html(tmp_path, {**r, "students": students, **summarize(students)})
    assert f" {n} arm{s}, up to {n} student seed{s}. Rendered by ptd" in page
    sweep = json.loads((ROOT / "benchmarks" / "results" / "fashion_mnist_sweep" / "sweep.json").read_text())
    sweep["seeds"] = list(range(n))
    assert f"; {n} seed{s}. Rendered by ptd from sweep.json." in render_sweep_html(tmp_path, sweep)


@pytest.mark.parametrize("n", [1, 3])
def test_refusals_say_each_count_in_its_number(monkeypatch, n):
    """The refusals that hedged: a GPU index past this machine's GPUs, a prune.rate that needs more
    rounds than the retraining allows, a model family given an unknown argument."""
    import torch

    from ptd.config import ConfigError
    from ptd.models import build_model
    from ptd.preflight import check_device, check_rounds

    s = "" if n == 1 else "s"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    with pytest.raises(ConfigError, match=rf"this machine has {n} GPU{s} \(cuda:0\.\.cuda:{n - 1}\)"):
        check_device("cuda:7")
    with pytest.raises(ConfigError, match=rf"rounds of {n} retraining epoch{s} to reach"):
        check_rounds(0.59, 1e-9, "imp", "prune.target_sparsity", retrain_epochs=n)
    unknown = {f"x{i}": 1 for i in range(n)}
    with pytest.raises(TypeError, match=rf"wrn16_4: {n} unknown argument{s} \["):
        build_model("wrn16_4", num_classes=10, **unknown)


@pytest.mark.parametrize("n", [1, 3])
def test_the_student_report_says_how_many_layers_took_their_groups_width(n):
    """ptd student's table ended "1 layer(s) took their coupled group's width instead of their own estimate"."""
    from ptd.students.report import format_report

    model = {"params": 100, "nonzero": 100, "flops": 10 ** 9}
    layer = {"layer": "features.0", "teacher": 16, "pruned_density": 0.5, "estimate": 11, "student": 16, "group": "g0", "note": ""}
    rep = {"input_shape": [1, 28, 28], "models": {"teacher": model, "student": model}, "layers": [layer],
           "ratios": {"flops_ratio": 1.0, "student_params_over_surviving_weights": 1.0}}
    rep["overrides"] = [f"l{i}" for i in range(n)]
    text = format_report(rep)
    assert (f"1 layer took the coupled group's width instead of its own estimate" if n == 1 else
            f"{n} layers took the coupled group's width instead of their own estimate") in text


def test_no_message_in_ptd_hedges_a_count_with_s_in_parentheses():
    """The class, not the cases above: no string ptd can print ("student(s)") in any module.
    Docstrings are prose about the code and are left out."""
    import ast
    import re
    from pathlib import Path

    import ptd

    hedged = re.compile(r"[A-Za-z]\((?:s|es)\)")
    found = []
    for f in sorted(Path(ptd.__file__).parent.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and hedged.search(node.value):
                found.append(f"{f.relative_to(Path(ptd.__file__).parent)}:{node.lineno}: {node.value[:60]!r}")
    assert not found, found
