"""Several distillation losses in one run, runs that grow, and teacher replicates: tiny runs end
to end, and the one-line answers to bad input."""
import json

import pytest
import yaml

from conftest import tiny_config
from test_pipeline import one_line_error, run_cli
from ptd.config import load_config
from ptd.pipeline import RunDirError, run_pipeline

AT = {"teacher_layers": ["features.2", "features.6"]}  # the ReLUs after the tiny VGG's first two convs


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def rows_of(r, **keys):
    return [s for s in r["students"] if all(s.get(k) == v for k, v in keys.items())]


@pytest.mark.slow
def test_two_losses_distill_every_teacher_arm_with_each(tmp_path, tiny_fashion):
    cfg = tiny_config(tiny_fashion, distill={"loss": ["kd", "at"], "options": {"at": AT}, "seeds": [0, 1],
                                             "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    out = tmp_path / "run"
    r = run_pipeline(load_config(write(tmp_path, cfg)), out)
    names = sorted(p.name for p in (out / "distill").iterdir())
    # The first loss keeps today's names (so a run grown from one loss keeps its students);
    # the scratch arm has no teacher, so it is trained once, not once per loss.
    assert names == sorted([f"{a}_seed{s}" for a in ("scratch", "unpruned_teacher", "pruned_teacher") for s in (0, 1)]
                           + [f"{a}-at_seed{s}" for a in ("unpruned_teacher", "pruned_teacher") for s in (0, 1)])
    assert sorted((s["arm"], s["loss"], s["seed"]) for s in r["students"]) == sorted(
        [("scratch", None, s) for s in (0, 1)] + [(a, l, s) for a in ("unpruned_teacher", "pruned_teacher") for l in ("kd", "at") for s in (0, 1)])
    assert list(r["losses"]) == ["kd", "at"] and r["distill_losses"] == ["kd", "at"]
    assert r["comparison"] == r["losses"]["kd"]["comparison"]  # the top level is the first loss's
    for loss in ("kd", "at"):
        c = r["losses"][loss]["comparison"]
        acc = {(s["arm"], s["seed"]): s["test_acc"] for s in r["students"] if s["loss"] in (loss, None)}
        want = [acc[("pruned_teacher", sd)] - acc[("unpruned_teacher", sd)] for sd in (0, 1)]
        assert c["pruned_minus_unpruned"]["per_seed"] == {0: pytest.approx(want[0]), 1: pytest.approx(want[1])}
        assert c["pruned_minus_unpruned"]["mean"] == pytest.approx(sum(want) / 2) and c["pruned_minus_unpruned"]["n"] == 2
        # Each loss is compared with the same scratch students.
        sc = [acc[("pruned_teacher", sd)] - acc[("scratch", sd)] for sd in (0, 1)]
        assert c["pruned_minus_scratch"]["mean"] == pytest.approx(sum(sc) / 2)
        assert r["losses"][loss]["summary"]["pruned_teacher"]["n"] == 2
    # The at students really were trained with the at loss: its term is in their metrics.
    terms = lambda d: set(json.loads((out / "distill" / d / "metrics.jsonl").read_text().splitlines()[0])["terms"])
    assert terms("pruned_teacher-at_seed0") == {"ce", "at"} and terms("pruned_teacher_seed0") == {"ce", "kd_soft"}
    assert terms("scratch_seed1") == {"ce"}
    from ptd.train.tensorboard import available

    if available():  # TensorBoard scalars mirror the run's layout
        assert any((out / "tensorboard" / "distill" / "pruned_teacher-at_seed0").iterdir())
    md = (out / "report.md").read_text()
    assert "## Per distillation loss" in md and "| at | pruned minus unpruned |" in md and "| kd | pruned minus unpruned |" in md
    assert "Per distillation loss" in (out / "report.html").read_text()


@pytest.mark.parametrize("over, words", [
    (["--set", "distill.loss=[kd, nope]"], ["distill.loss", "'nope'", "valid"]),
    (["--set", "distill.loss=[kd, at]", "--set", "distill.options={at: {bogus: 1}}"], ["distill.options.at", "bogus"]),
    (["--set", "distill.loss=[kd, at]", "--set", "distill.options={at: {teacher_layers: [features.22]}}"],
     ["distill.options.at", "'features.22'", "teacher", "nearest: features.2"]),
])
def test_bad_loss_input_is_one_line_before_the_run_dir(tmp_path, tiny_yaml, over, words):
    out = tmp_path / "run"
    line = one_line_error(run_cli("run", tiny_yaml, "--out", out, *over))
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()
