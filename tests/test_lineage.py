"""Lineage: a finished stage is reused only while the files it was made from are the ones there now.

A stage redone after its folder was deleted, or a file replaced (a teacher's weights, a user's
--teacher checkpoint at the same path), must not leave later stages made from the old one, or the
report compares students of two different teachers. Each stage's ``done`` records the digests of
its inputs; a changed or missing input is one line naming the stage, the file and the fix."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import finished_two_arm_run, tiny_config
from ptd import paths as P
from ptd.cli import main
from ptd.errors import StaleStageError
from ptd.io import file_digest
from ptd.pipeline import check_inputs, check_lineage, is_done, recorded_inputs, run_stage
from ptd.train import checkpoint as ckpt


def fake_ctx(run_dir: Path):
    """The parts of a Context run_stage uses, with the real done/is_done logic."""
    from ptd.pipeline import Context

    ctx = SimpleNamespace(main=True, in_worker=False, run_dir=run_dir, write_json=lambda p, o: ckpt.write_json(p, o), log=lambda s: None)
    ctx.done = lambda d, inputs=(): Context.done(ctx, d, inputs)
    ctx.is_done = lambda d: Context.is_done(ctx, d)
    return ctx


def test_done_records_the_digests_of_the_stage_inputs(tmp_path: Path):
    run = tmp_path / "run"
    (run / "up").mkdir(parents=True)
    up = run / "up" / "weights.bin"  # not parsed: any change is a change
    up.write_bytes(b"weights A")
    user = tmp_path / "mine.pt"  # outside the run: recorded by its absolute path
    user.write_bytes(b"user file")
    ctx = fake_ctx(run)
    d = run / "down"
    assert run_stage(ctx, d, lambda: {"acc": 0.5}, inputs=[up, user]) == ({"acc": 0.5}, True)
    rec = recorded_inputs(d)
    import hashlib

    assert rec == {"up/weights.bin": "sha256:" + hashlib.sha256(b"weights A").hexdigest(),
                   str(user.absolute()): "sha256:" + hashlib.sha256(b"user file").hexdigest()}
    # Unchanged inputs: reused, not recomputed.
    assert run_stage(ctx, d, lambda: pytest.fail("must not recompute"), inputs=[up, user]) == ({"acc": 0.5}, False)


@pytest.mark.parametrize("change, words", [
    (lambda f: f.write_bytes(b"weights B"), "has changed since"),
    (lambda f: f.unlink(), "is missing now"),
])
def test_a_changed_or_missing_input_makes_the_finished_stage_stale(tmp_path: Path, change, words):
    run = tmp_path / "run"
    (run / "up").mkdir(parents=True)
    up = run / "up" / "weights.bin"  # not parsed: any change is a change
    up.write_bytes(b"weights A")
    ctx = fake_ctx(run)
    d = run / "down"
    run_stage(ctx, d, lambda: {"acc": 0.5}, inputs=[up])
    result_before = (d / P.RESULT).read_bytes()
    change(up)
    with pytest.raises(StaleStageError) as e:
        run_stage(ctx, d, lambda: pytest.fail("a stale stage must not be recomputed over"), inputs=[up])
    msg = str(e.value)
    assert str(d) in msg and str(up) in msg and words in msg and "delete" in msg and "\n" not in msg
    assert (d / P.RESULT).read_bytes() == result_before and is_done(d)  # nothing of it was touched
    up.write_bytes(b"weights A")  # restoring the file makes the stage valid again
    check_inputs(run, d)


def test_check_lineage_names_every_stage_to_redo_and_defers_missing_files(tmp_path: Path):
    run = tmp_path / "run"
    ctx = fake_ctx(run)
    (run / "a").mkdir(parents=True)
    a = run / "a" / "weights.bin"
    a.write_bytes(b"A")
    run_stage(ctx, run / "b", lambda: (ckpt.write_json(run / "b" / "out.json", {"x": 1}), {"ok": 1})[1], inputs=[a])
    run_stage(ctx, run / "c", lambda: {"ok": 1}, inputs=[run / "b" / "out.json"])  # made from b's file only
    run_stage(ctx, run / "b" / "level_1", lambda: {"ok": 1}, inputs=[a])
    run_stage(ctx, run / "e", lambda: {"ok": 1})  # made from nothing recorded: never stale
    check_lineage(run)
    a.unlink()  # gone: the stage that writes it may redo it identically, so not refused up front...
    check_lineage(run)
    with pytest.raises(StaleStageError, match="is missing now"):  # ...but when b's turn comes, it is
        check_inputs(run, run / "b")
    a.write_bytes(b"A2")
    with pytest.raises(StaleStageError) as e:
        check_lineage(run)
    # c is stale through b (its own input is unchanged); b/level_1 is named through b.
    assert f"{run}: the finished stages b, c were made from {a}, which has changed since" in str(e.value)
    assert "delete those folders" in str(e.value)


def test_safetensors_are_hashed_by_content_not_header_order(tmp_path: Path):
    t = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    meta = {"format": "ptd-model-1", "ptd_spec": "{}", "more": "x"}
    files = []
    for i in range(6):  # the writer's metadata order varies from call to call
        f = tmp_path / f"m{i}.safetensors"
        ckpt.save_tensors(f, t, meta)
        files.append(f)
    assert len({file_digest(f) for f in files}) == 1
    ckpt.save_tensors(tmp_path / "other.safetensors", {**t, "b": torch.ones(3) * 2}, meta)
    assert file_digest(tmp_path / "other.safetensors") != file_digest(files[0])
    ckpt.save_tensors(tmp_path / "meta.safetensors", t, {**meta, "more": "y"})
    assert file_digest(tmp_path / "meta.safetensors") != file_digest(files[0])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_input_is_left_to_its_reader(tmp_path: Path, damage: str):
    """A file that no longer parses was damaged, not replaced: the damaged-file reader's line (which
    names the file and what to delete) is the precise one, so lineage stays out of its way."""
    run = tmp_path / "run"
    (run / "up").mkdir(parents=True)
    f = run / "up" / "model.safetensors"
    ckpt.save_tensors(f, {"w": torch.ones(64)})
    run_stage(fake_ctx(run), run / "down", lambda: {"ok": 1}, inputs=[f])
    data = f.read_bytes()
    f.write_bytes({"garbage": b"not safetensors at all", "truncated": data[:-16], "empty": b""}[damage])
    check_lineage(run)
    ckpt.save_tensors(f, {"w": torch.zeros(64)})  # whole, and other weights: a replacement
    with pytest.raises(StaleStageError):
        check_lineage(run)


def test_markers_of_older_versions_are_reused_unchecked(tmp_path: Path):
    d = tmp_path / "run" / "stage"
    d.mkdir(parents=True)
    ckpt.write_json(d / P.RESULT, {"acc": 0.25})
    (d / P.DONE).write_text("2026-11-20T10:00:00+00:00\n")  # what ptd wrote before lineage
    assert recorded_inputs(d) == {}
    ctx = fake_ctx(tmp_path / "run")
    assert run_stage(ctx, d, lambda: pytest.fail("must not recompute"), inputs=[tmp_path / "gone"]) == ({"acc": 0.25}, False)


def test_file_digest_sees_a_rewrite(tmp_path: Path):
    f = tmp_path / "a"
    f.write_bytes(b"one")
    first = file_digest(f)
    assert file_digest(f) == first
    f.write_bytes(b"two")  # same size, new mtime: not the remembered digest
    assert file_digest(f) != first


# ----------------------------------------------------------------------------- a whole pipeline


def one_line(capsys) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("ptd: error:") and "Traceback" not in err[0], err
    return err[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != P.DONE}


@pytest.fixture
def finished(tmp_path, tiny_fashion):
    return finished_two_arm_run(tmp_path, tiny_fashion)


def test_redoing_a_stage_identically_keeps_the_stages_after_it(finished, capsys):
    p, out = finished
    before = {d: (out / d / P.DONE).read_text() for d in ("prune", "student", "distill/pruned_teacher_seed0")}
    digest = file_digest(out / "teacher" / P.MODEL)
    import shutil

    shutil.rmtree(out / "teacher")  # e.g. after the damaged-file message: the teacher is redone
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    assert file_digest(out / "teacher" / P.MODEL) == digest  # same seed, same machine: the same teacher
    # ...so every later stage still matches its inputs and was reused, not redone.
    assert {d: (out / d / P.DONE).read_text() for d in before} == before


def test_a_replaced_teacher_refuses_the_stages_made_from_the_old_one(finished, capsys):
    p, out = finished
    state = ckpt.read_state_dict(out / "teacher" / P.MODEL)
    ckpt.save_tensors(out / "teacher" / P.MODEL, {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
                      metadata=ckpt.read_metadata(out / "teacher" / P.MODEL))
    files = snapshot(out)
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 2
    line = one_line(capsys)
    # Refused before anything is written (env.json included), naming every stage to redo: those
    # made from the teacher, and transitively those made from them.
    assert ("the finished stages distill/pruned_teacher_seed0, distill/scratch_seed0, prune, student were made from "
            f"{out / 'teacher' / P.MODEL}, which has changed since") in line and "delete those folders" in line
    assert snapshot(out) == files  # nothing rewritten, nothing lost
    # The fix the line gives: delete those folders; they are redone from the new teacher.
    import shutil

    for d in ("prune", "student", "distill"):
        shutil.rmtree(out / d)
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    # The prune stage records the teacher and the final level it hands on.
    res = json.loads((out / "prune" / P.RESULT).read_text())
    lvl = f"prune/level_{res['final_level']}"
    assert recorded_inputs(out / "prune") == {"teacher/model.safetensors": file_digest(out / "teacher" / P.MODEL),
                                              f"{lvl}/model.safetensors": file_digest(out / lvl / P.MODEL),
                                              f"{lvl}/masks.safetensors": file_digest(out / lvl / P.MASKS)}
    # The distilled students record the pruned teacher's final level and the student they trained.
    assert set(recorded_inputs(out / "distill" / "pruned_teacher_seed0")) == {
        f"{lvl}/model.safetensors", f"{lvl}/masks.safetensors", "student/architecture.json"}
    assert set(recorded_inputs(out / "distill" / "scratch_seed0")) == {"student/architecture.json"}


def test_a_level_redone_differently_refuses_the_levels_made_from_it(finished, capsys):
    """IMP's level 2 is made from level 1. A kill before the prune stage finished, then level 1
    redone differently (its folder deleted and retrained at another thread count), must not leave
    level 2 -- and everything made from it -- standing on the old level 1."""
    p, out = finished
    assert json.loads((out / "prune" / P.RESULT).read_text())["final_level"] == 2  # 0.36 = two 20% rounds
    assert set(recorded_inputs(out / "prune" / "level_2")) == {
        "teacher/model.safetensors", "prune/level_1/model.safetensors", "prune/level_1/masks.safetensors"}
    assert set(recorded_inputs(out / "prune" / "level_1")) == {"teacher/model.safetensors"}
    (out / "prune" / P.DONE).unlink()  # the stage had not finished
    lv1 = out / "prune" / "level_1" / P.MODEL
    state = ckpt.read_state_dict(lv1)
    ckpt.save_tensors(lv1, {k: v * 1.001 if v.is_floating_point() else v for k, v in state.items()}, metadata=ckpt.read_metadata(lv1))
    files = snapshot(out)
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 2
    line = one_line(capsys)
    # level 2 from it, the student derived from level 2, and every student trained with that student
    assert (f"the finished stages distill/pruned_teacher_seed0, distill/scratch_seed0, prune/level_2, student were made from {lv1}, which has changed since"
            in line), line
    assert snapshot(out) == files


def test_a_control_round_redone_differently_refuses_the_rounds_after_it(tmp_path, tiny_fashion, capsys):
    cfg = tiny_config(tiny_fashion, distill={"seeds": [0], "arms": ["retrained_teacher"], "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["threads"] = 1
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 0
    assert set(recorded_inputs(out / "control" / "round_2")) == {"teacher/model.safetensors", "prune/result.json", "control/round_1/model.safetensors"}
    assert "control/round_2/model.safetensors" in recorded_inputs(out / "control")
    r1 = out / "control" / "round_1" / P.MODEL
    state = ckpt.read_state_dict(r1)
    ckpt.save_tensors(r1, {k: v * 1.001 if v.is_floating_point() else v for k, v in state.items()}, metadata=ckpt.read_metadata(r1))
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--quiet"]) == 2
    # round 2 and so the control stage (its input is round 2's weights) and the student made from it
    assert f"the finished stages control, distill/retrained_teacher_seed0 were made from {r1}, which has changed since" in one_line(capsys)


def _user_teacher(tmp_path: Path, tiny_fashion: Path, path: Path, seed: int) -> Path:
    """The tiny config (an untrained stand-in teacher, so check_learned off) and a VGG state dict
    of ``seed`` saved at ``path`` as a user's checkpoint; returns the config file."""
    from ptd.models import build_model

    cfg = tiny_config(tiny_fashion, threads=1)
    cfg["teacher"]["check_learned"] = False
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(seed)
    torch.save(build_model("vgg", num_classes=10, in_channels=1, plan=[16, "M", 32, "M", 32]).state_dict(), path)
    return p


def test_a_user_checkpoint_replaced_at_the_same_path_is_refused(tmp_path, tiny_fashion, capsys):
    mine = tmp_path / "mine.pt"
    p = _user_teacher(tmp_path, tiny_fashion, mine, 0)
    out = tmp_path / "run"
    assert main(["train", str(p), "--out", str(out), "--teacher", str(mine), "--quiet"]) == 0
    assert recorded_inputs(out / "teacher") == {str(mine.absolute()): file_digest(mine)}
    _user_teacher(tmp_path, tiny_fashion, mine, 1)  # the user retrains and saves over the same path
    capsys.readouterr()
    files = snapshot(out)
    assert main(["train", str(p), "--out", str(out), "--teacher", str(mine), "--quiet"]) == 2
    line = one_line(capsys)
    assert f"the finished stage teacher was made from {mine.absolute()}, which has changed since" in line and "new --out" in line
    assert snapshot(out) == files


def test_a_user_checkpoint_moved_away_still_resumes_and_grows_the_run(tmp_path, tiny_fashion, capsys):
    """The run keeps its own copy of a loaded teacher (teacher/model.safetensors). A user who moved
    their checkpoint folder after the teacher stage took it could neither resume nor grow the run
    ("checkpoint not found", or, given the new path, "a different config (teacher.checkpoint)").
    Gone, or the same bytes at a new path, the run goes on from its copy; other bytes at the new
    path are still another teacher, refused."""
    mine = tmp_path / "mine.pt"
    p = _user_teacher(tmp_path, tiny_fashion, mine, 0)
    out = tmp_path / "run"
    assert main(["prune", str(p), "--out", str(out), "--teacher", str(mine), "--quiet"]) == 0
    teacher = file_digest(out / "teacher" / P.MODEL)
    moved = tmp_path / "elsewhere" / "mine.pt"
    moved.parent.mkdir()
    mine.rename(moved)
    capsys.readouterr()
    # The old path, gone: the finished stages are reused, and the run grows to its student.
    assert main(["student", str(p), "--out", str(out), "--teacher", str(mine), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "student" / P.DONE).is_file()
    # The new path, the same bytes: the same run.
    assert main(["student", str(p), "--out", str(out), "--teacher", str(moved), "--quiet"]) == 0, capsys.readouterr().err
    assert file_digest(out / "teacher" / P.MODEL) == teacher  # not reloaded from anywhere
    _user_teacher(tmp_path, tiny_fashion, moved, 1)  # other bytes at the new path: another teacher
    capsys.readouterr()
    files = snapshot(out)
    assert main(["student", str(p), "--out", str(out), "--teacher", str(moved), "--quiet"]) == 2
    assert "a different config (teacher.checkpoint:" in one_line(capsys)
    assert snapshot(out) == files


def test_a_done_cut_short_is_damaged_not_an_old_marker(tmp_path):
    """A `done` that starts as ptd's JSON object but does not parse was truncated by something
    else (the kill audit's F3): read as an old-style marker it would silently switch the lineage
    check off for its stage, so it is a one-line DamagedFileError. Old markers still read as {}."""
    from ptd.errors import DamagedFileError
    from ptd.pipeline import mark_done, recorded_inputs

    mark_done(tmp_path, {"teacher/model.safetensors": "abc"})
    assert recorded_inputs(tmp_path) == {"teacher/model.safetensors": "abc"}
    whole = (tmp_path / "done").read_text()
    (tmp_path / "done").write_text(whole[: len(whole) // 2])
    with pytest.raises(DamagedFileError, match=r"done: damaged \(not JSON"):
        recorded_inputs(tmp_path)
    for old in ("2026-11-20T10:00:00+00:00", ""):
        (tmp_path / "done").write_text(old)
        assert recorded_inputs(tmp_path) == {}


def test_an_emptied_done_is_damaged_in_a_run_that_never_had_old_markers(tmp_path):
    """An emptied `done` reads like the bare marker older ptd wrote, which switched the lineage
    check off for its stage. A run started by this ptd records done_format 2 in env.json: there
    every `done` must be mark_done's JSON, so an emptied one is damaged. Runs started by older ptd
    (no done_format) still take bare markers."""
    from ptd.errors import DamagedFileError
    from ptd.pipeline import DONE_FORMAT, check_lineage, mark_done, strict_done

    stage = tmp_path / "teacher"
    stage.mkdir()
    mark_done(stage, {})
    (stage / "done").write_text("")
    check_lineage(tmp_path)  # no env.json: an older run, the empty marker is an old one
    (tmp_path / "env.json").write_text(json.dumps({"started": "x"}))
    assert not strict_done(tmp_path)
    check_lineage(tmp_path)
    (tmp_path / "env.json").write_text(json.dumps({"started": "x", "done_format": DONE_FORMAT, "resumed": []}))
    assert strict_done(tmp_path)
    with pytest.raises(DamagedFileError, match=r"teacher/done: damaged \(empty\)"):
        check_lineage(tmp_path)
    for text, why in (("2026-11-20T10:00:00+00:00", "not JSON"), ("[]", "no inputs"), ('{"finished": 1}', "no inputs")):
        (stage / "done").write_text(text)
        with pytest.raises(DamagedFileError, match=why):
            recorded_inputs(stage, strict=True)
    mark_done(stage, {})
    check_lineage(tmp_path)


@pytest.mark.slow
def test_a_new_run_records_its_done_format_and_refuses_an_emptied_done(tmp_path, tiny_fashion, capsys):
    cfg = tiny_config(tiny_fashion, distill={"seeds": [0], "arms": ["scratch"], "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["teacher"]["optim"]["epochs"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    assert json.loads((out / "env.json").read_text())["done_format"] == 2
    (out / "teacher" / "done").write_text("")
    capsys.readouterr()
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ptd: error: {out / 'teacher' / 'done'}: damaged (empty)") and f"delete {out / 'teacher'}" in err
