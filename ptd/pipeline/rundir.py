"""The run directory: whether a directory takes this run (new, the same run, or one this run
only adds work to), every check before the first write, and what a session records there
(config.yaml, env.json, data.json)."""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ptd import paths as P
from ptd.config import ARM_TABLE, with_added_keys, RunConfig, dump_yaml, to_dict
from ptd.train import checkpoint as ckpt
from ptd.train.distributed import all_sum, barrier
from ptd.train.loop import Runtime
from ptd.errors import PreflightError, PtdError
from ptd.io import damaged, file_digest, parses, read_json_object, read_yaml_mapping, seal
from ptd.pipeline.lineage import DONE_FORMAT, _input_key, check_lineage, is_done, recorded_inputs


# Keys that change how a run is shown, scheduled or checked, not what it computes: may differ on
# resume (and may be missing from a config.yaml written before they were added).
_VOLATILE_KEYS = {"quiet", "threads", "jobs", "device", "eval_batch_size", "data.check_images", "data.workers",
                  "teacher.check_learned"}


class RunDirError(PtdError, ValueError):
    """The run directory holds a different run; one-line message with the fix."""


# A JSON object ptd wrote in a run directory; a damaged one is a one-line DamagedFileError.
read_json = read_json_object


def environment(cfg: RunConfig, rt: Runtime, kind: str = "run") -> dict[str, Any]:
    import importlib.metadata

    import ptd
    from ptd.measure import cpu_name

    env = {
        "started": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "ptd": getattr(ptd, "__version__", "?"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"),  # the version without importing it (seconds)
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(rt.device),
        "amp_bf16": rt.uses_amp,
        "fast_wgrad": rt.uses_fast_wgrad,
        "compile": rt.compile,
        "world_size": rt.dist.world_size,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "seeds": {"run": cfg.seed, "students": list(cfg.distill.seeds), "teacher_replicates": cfg.teacher.seeds},
        "done_format": DONE_FORMAT,
        "made_by": kind,  # "run" (ptd run and its stage commands) or "sweep": preflight.run_kind reads it
    }
    from ptd.registry import LOADED

    if LOADED:  # which --plugin files (and which version of each) made this session's models and losses
        env["plugins"] = [dict(p) for p in LOADED]
    for mod in ("safetensors", "torch_pruning", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def _as_list(x: Any) -> list:
    return [x] if isinstance(x, str) else list(x or [])


def _superset(a: Any, b: Any) -> bool:
    return all(x in _as_list(b) for x in _as_list(a))


def _prefix(a: Any, b: Any) -> bool:
    # The first entry names the first loss's directories (and the sweep's student): it must stay first.
    return _as_list(b)[: len(_as_list(a))] == _as_list(a)


def _growth_rules(old: dict, new: dict) -> dict[str, Callable[[Any, Any], bool]]:
    """{dotted key: (old value, new value) -> True when the new value only adds work}: a finished
    run directory takes such a change and reuses every finished stage (see open_run_dir)."""
    old_losses = _as_list(old.get("distill", {}).get("loss"))
    old_strategies = _as_list(old.get("sweep", {}).get("strategies"))

    def new_sections(a: Any, b: Any, known: list) -> bool:
        # Options may gain a section only for a loss / strategy the run did not have.
        a, b = a or {}, b or {}
        return all(k in b and b[k] == v for k, v in a.items()) and all(k in a or k not in known for k in b)

    return {
        "distill.seeds": _superset,
        "distill.arms": _superset,
        "distill.loss": _prefix,
        "distill.options": lambda a, b: new_sections(a, b, old_losses),
        "teacher.seeds": lambda a, b: (b or 1) >= (a or 1),
        "sweep.strategies": _prefix,
        # More sweep points below the highest one: the IMP run to the highest sparsity (and the
        # student derived from it by default) stay what they were.
        "sweep.sparsities": lambda a, b: _superset(a, b) and max(_as_list(b)) <= max(_as_list(a)),
        "prune.options": lambda a, b: a == b or new_sections(a, b, old_strategies + [old.get("prune", {}).get("strategy")]),
    }


def _same_file(a: Any, b: Any) -> bool:
    """Two spellings of one file: 't.safetensors' given in /x and '/x/t.safetensors' (a relative
    path recorded by an older run resolves against the current folder; a wrong guess only refuses).
    Its content is checked apart: the stage's recorded input hash (run_stage, _changed_inputs)."""
    if a == b:
        return True
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def _same_teacher(run_dir: Path, was: Any, now: Any) -> bool:
    """``now`` holds the bytes the finished teacher stage recorded for its checkpoint ``was``: the
    user moved or copied their checkpoint, and the run is the same run (a finished run could not
    grow after its --teacher file moved). A teacher stage not finished recorded nothing: False."""
    if not (isinstance(was, str) and isinstance(now, str) and Path(now).is_file()):
        return False
    try:
        digest = recorded_inputs(run_dir / P.TEACHER).get(_input_key(run_dir, Path(was)))
    except PtdError:  # a damaged done: its own check names it
        return False
    return digest is not None and file_digest(Path(now)) == digest


def _recorded_paths(run_dir: Path, old: dict) -> dict:
    """An earlier run's config as it ran: keys added since filled in (``with_added_keys``), and a
    relative teacher.checkpoint (ptd before paths were made absolute on load) replaced by the
    absolute path its teacher stage recorded as its input."""
    old = with_added_keys(old)
    c = (old.get("teacher") or {}).get("checkpoint") if isinstance(old.get("teacher"), dict) else None
    if not isinstance(c, str) or os.path.isabs(c):
        return old
    try:
        inputs = list(json.loads((run_dir / P.TEACHER / P.DONE).read_text()).get("inputs") or {})
    except (OSError, ValueError, AttributeError):
        return old
    if len(inputs) != 1 or Path(inputs[0]).name != Path(c).name:
        return old
    return {**old, "teacher": {**old["teacher"], "checkpoint": inputs[0]}}


# Keys whose values may be spelled differently for one thing; merged into every _diff's rules.
# (config.yaml written before paths were made absolute on load holds them as given: a resume from
# the same folder must still match.)
_EQUIVALENT: dict[str, Callable[[Any, Any], bool]] = {"teacher.checkpoint": _same_file, "data.root": _same_file,
                                                      "data.cache_dir": _same_file}


def _diff(a: Any, b: Any, prefix: str = "", grows: dict[str, Callable[[Any, Any], bool]] | None = None) -> str | None:
    """The first key whose values differ (``grows``: keys whose change is accepted when its rule
    says the new value only adds work), as "key: old there, new now"; None when none."""
    if grows and prefix in grows:
        return None if grows[prefix](a, b) else f"{prefix}: {a!r} there, {b!r} now"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else k
            if key in _VOLATILE_KEYS:
                continue
            d = _diff(a.get(k), b.get(k), key, grows)
            if d:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} there, {b!r} now"


def make_dir(d: Path, what: str) -> None:
    """``mkdir -p d``; a refusal of the file system is one line naming the path. (preflight's
    check_out_dir and check_run_tree make this unreachable for what they can see up front.)"""
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = e.filename if e.filename is not None else d
        raise PreflightError(f"{what} cannot be created ({e.strerror or type(e).__name__}: {where}); make the path a "
                             f"folder this user can write, or pass --out a new directory") from None


def check_run_config(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` takes this run: new or empty (False), the same run (False), or one
    this run only adds work to (True: it grows); RunDirError otherwise. Reads only."""
    cfg_path = run_dir / P.CONFIG
    if cfg_path.is_file():
        old = read_yaml_mapping(cfg_path, fix=f"restore it, or run into a new --out (or delete {run_dir} to start over)")
        old = _recorded_paths(run_dir, old)
        new = to_dict(cfg)
        foreign = sorted(str(k) for k in old if k not in new)
        if foreign or "teacher" not in old:  # another tool's config.yaml: "a different config (amp: ...)" would mislead
            why = f"unknown top-level key {foreign[0]!r}" if foreign else "no teacher section"
            raise RunDirError(f"{run_dir} holds a {P.CONFIG} that is not a ptd run's ({why}), so it is not a ptd run "
                              f"directory; pass --out a new or empty directory")
        same = {**_EQUIVALENT, "teacher.checkpoint": lambda a, b: _same_file(a, b) or _same_teacher(run_dir, a, b)}
        d = _diff(old, new, grows={**_growth_rules(old, new), **same})
        if d:
            raise RunDirError(f"{run_dir} holds a run with a different config ({d}); only more distill.seeds, distill.arms, "
                              f"distill.loss, sweep points or teacher.seeds can grow a finished run; pass --out to a new "
                              f"directory, or delete {run_dir} to start over")
        return _diff(old, new, grows=same) is not None
    if run_dir.exists() and any(not ckpt.is_writer_temp(p) for p in run_dir.iterdir()):
        # (Only a writer temporary in it: a kill in the middle of writing config.yaml, this run's.)
        raise RunDirError(f"{run_dir} exists and is not a ptd run directory (no config.yaml); pass --out to a new or empty directory")
    return False


# The file each finished stage returns when it is skipped (run_stage's result_file; a prune
# level's record is its sparsity.json).
def _record_file(d: Path) -> str:
    return P.STATS if d.name == P.STUDENT else P.SPARSITY if d.name.startswith("level_") else P.RESULT


def _record_check(d: Path) -> tuple[Any, tuple[str, ...]]:
    """What a finished stage in ``d`` must hold: a check of its record's keys and types (those the
    pipeline and the report read back from it) and the files besides it that a re-run loads; by
    the folder's place in the layout (ptd.paths). (None, ()) for a folder of no known kind."""
    from ptd.report import ACC, AMOUNT, COUNT, obj, items, num, text

    cost = {"epochs": AMOUNT, "steps": AMOUNT, "wall_s": AMOUNT}
    acc = num(0, 1, null=True)
    trained = obj({"test_acc": ACC, "val_acc?": acc, **cost})
    counts = obj({"params": COUNT, "flops": COUNT})
    if d.name == P.TEACHER or d.name.startswith("round_"):
        return trained, (P.MODEL,)
    if d.name.startswith("level_"):
        return obj({"level": COUNT, "sparsity": ACC, "test_acc?": acc, "val_acc?": acc}), (P.MODEL, P.MASKS)
    if d.name == P.STUDENT:
        return obj({"spec": obj({"arch": text()}), "student": counts, "teacher": counts}), (P.ARCHITECTURE,)
    if d.name == P.CONTROL:
        return obj({"rounds": COUNT, "test_acc": ACC, "val_acc?": acc, **cost}), ()
    if d.parent.name == P.DISTILL:
        return obj({"arm": text(), "seed": num(integer=True), "loss?": text(null=True), "test_acc": ACC, "val_acc?": acc,
                    **cost}), (P.MODEL,)
    if d.name == P.PRUNE or d.parent.name == P.PRUNE:  # a run's pruning, or one strategy's of a sweep
        level = obj({"level": COUNT, "sparsity": ACC, "test_acc": acc, "params_nonzero?": COUNT})
        run = obj({"strategy": text(), "final_level": COUNT, "sparsity": ACC, "levels": items(level), **cost})

        def pruning(v: Any, key: str) -> None:
            run(v, key)
            obj({"params_nonzero": COUNT})(v["levels"][-1], f"levels[{len(v['levels']) - 1}]")  # the report's figure

        return pruning, ()
    return None, ()


def check_finished_stages(run_dir: Path, under: Sequence[Path] | None = None) -> None:
    """Before a re-run writes anything (env.json included): every file of a finished stage that a
    re-run reads back (its record, its weights and masks) still parses, and every writer temporary
    left by a kill can be removed. Otherwise the stage refuses only when its turn comes, after this
    session was recorded and perhaps after other stages trained. ``under``: only the stages in
    these folders (``--from``: the ones copied)."""
    run_dir = Path(run_dir)
    markers = sorted(run_dir.rglob(P.DONE)) if under is None else sorted(m for u in under for m in Path(u).rglob(P.DONE))
    for marker in markers:
        d = marker.parent
        if d == run_dir or not marker.is_file():
            continue
        record = d / _record_file(d)
        data = read_json(record)  # DamagedFileError, the same line the stage would give (a missing record too)
        check, needs = _record_check(d)
        if check is not None:  # readable, but not the record ptd wrote: a re-run would fail on a key mid-way
            from ptd.report import Invalid

            try:
                check(data, "")
            except Invalid as e:
                raise damaged(record, f"not the record ptd writes: {e.kind}: {e}") from None
        for name in needs:
            if not (d / name).is_file():
                raise damaged(d / name, "missing, though its stage is finished")
        if d.name == P.STUDENT and read_json(d / P.ARCHITECTURE) != data["spec"]:
            # The distillations record architecture.json as what they were made from and build
            # stats.json's spec: the two must be one student, or an edit of one goes unnoticed.
            raise damaged(record, f"its student spec is not the one in {P.ARCHITECTURE} beside it (one of them was edited)")
        for f in sorted(d.glob("*.json")):  # every other JSON ptd wrote there (architecture.json: `ptd eval`, export)
            if f != record and f.is_file():
                read_json(f)
        for f in sorted(d.glob("*.safetensors")):
            if f.is_file() and not parses(f):
                raise damaged(f, "not the safetensors file ptd wrote: its header or size is wrong")
    for tmp in sorted(run_dir.rglob(".*.tmp")) if under is None else ():  # (a copy leaves them behind)
        if ckpt.is_writer_temp(tmp) and not os.access(tmp.parent, os.W_OK | os.X_OK):
            raise PreflightError(f"{tmp}: a temporary left by a killed ptd, in a folder this user cannot write, so it cannot "
                                 f"be removed; give this user permission on {tmp.parent}, or delete the file")


def _stage_runs(cfg: RunConfig, rel: Path, until: str | None, arms: Sequence[str] | None) -> bool:
    """Whether a command that stops after ``until`` for ``arms`` (default: the config's) trains in
    the stage folder ``rel`` (relative to the run directory). ``until`` None (a sweep, whose
    students are named by sweep point) or a folder ptd does not know: True."""
    if until is None:
        return True
    parts = rel.parts[2:] if rel.parts[:1] == (P.REPLICATES,) else rel.parts  # teachers/r<k>/...
    last = {P.TEACHER: "teacher", P.PRUNE: "prune", P.CONTROL: "distill", P.DISTILL: "distill"}.get(parts[0] if parts else "")
    if last is None:
        return True
    if P.STAGES.index(until) < P.STAGES.index(last):
        return False
    arms = tuple(arms or cfg.distill.arms)
    if parts[0] == P.CONTROL:
        return any(ARM_TABLE[a].teacher == "retrained" for a in arms)
    if parts[0] == P.DISTILL and len(parts) > 1:  # <arm>_seed<s> or <arm>-<loss>_seed<s>
        return any(parts[1].startswith((f"{a}_seed", f"{a}-")) for a in arms)
    return True


def data_change(run_dir: Path, fp: dict[str, Any], what: str = "this run started") -> str | None:
    """Why the data a run directory recorded (data.json) is not the data loaded now, as one line, or
    None (the same, or a directory from before the record)."""
    rec = Path(run_dir) / P.DATA
    if not rec.is_file():
        return None
    have = read_json(rec)
    if "file_sizes" not in have:  # recorded by a ptd from before file sizes were: compare the rest
        fp = {k: v for k, v in fp.items() if k != "file_sizes"}
    if have == fp:
        return None
    counts = [f"{k} {have.get('images', {}).get(k)} then, {v} now" for k, v in fp["images"].items()
              if have.get("images", {}).get(k) != v]
    how = ("; ".join(counts) if counts else "the same image counts, other images or labels" if have.get("sha256") != fp.get("sha256")
           else "the same image paths and labels, other file sizes: images rewritten in place")
    return (f"{run_dir}: the data changed since {what} ({how}): its finished stages were trained on the data then; "
            f"restore that data, or pass --out a new directory")


def check_data(run_dir: Path, fp: dict[str, Any], what: str, device: torch.device) -> None:
    """data_change, agreed by every process: under torchrun each machine may read its own copy, and a
    refusal one rank alone raised left the others waiting at the next barrier (review)."""
    why = data_change(run_dir, fp, what)
    if all_sum([0.0 if why is None else 1.0], device)[0] > 0:
        raise RunDirError(why or f"{run_dir}: the data another process of this torchrun run reads changed since {what}; "
                                 f"its own line says how")


def check_plugins_unchanged(run_dir: Path, where: str | None = None,
                            fix: str = "run into a new directory (--out) with this version") -> None:
    """A re-run imports the --plugin files the run was started with, byte for byte (env.json's first
    session's ``plugins``, by sha256): finished stages made by one version of a model, strategy or
    loss were resumed and grown by another without a word (new-user trial). A run started without
    plugins is not checked: it names none of them. A damaged env.json is left to its own reader."""
    from ptd.registry import LOADED

    try:
        env = json.loads((run_dir / P.ENV).read_text())
    except (OSError, ValueError):
        return
    recorded = env.get("plugins") if isinstance(env, dict) else None
    if not isinstance(recorded, list) or not recorded:
        return
    now = {p["sha256"]: p["path"] for p in LOADED}
    for rec in recorded:
        if not isinstance(rec, dict):
            continue
        path, digest = str(rec.get("path")), str(rec.get("sha256"))
        if digest in now:
            continue
        same = [p for p in LOADED if Path(p["path"]).name == Path(path).name]
        why = (f"--plugin {same[0]['path']} is not the {path} this run was started with (sha256 {same[0]['sha256'][:12]} "
               f"against {digest[:12]}, env.json)" if same else
               f"this run was started with --plugin {path} (sha256 {digest[:12]}, env.json) and this command does not import it")
        raise RunDirError(f"{where or run_dir}: {why}; pass that file as it was, or {fix}; its finished stages were made "
                          f"by the other one")


def open_run_dir(cfg: RunConfig, run_dir: Path, rt: Runtime, until: str | None = None, arms: Sequence[str] | None = None,
                 kind: str = "run", data: dict[str, Any] | None = None) -> bool:
    """Create the run directory, or check that an existing one holds this same run (resume) or
    one this run only adds work to (more seeds, arms, losses, sweep points, teacher replicates:
    the run grows, every finished stage is reused). Returns whether it grows.

    Every check comes before the first write: config.yaml and env.json are written only once the
    directory's config, its finished stages' files and env.json itself have passed, so a refused
    re-run or growth leaves the directory as it was (and the original command still works on it).
    A growth's config.yaml is written by :func:`finish_growth`, after every stage succeeded: a
    growth that fails in training (divergence, collapse, out of memory, a kill) leaves the old
    config, so both the original command and the grown one still take the directory.
    preflight.check_out_dir / check_run_tree have checked its folders."""
    cfg_path = run_dir / P.CONFIG
    grown = check_run_config(cfg, run_dir)
    # Every rank has checked before any rank writes: otherwise a slow rank could find the
    # directory rank 0 just made, without its config.yaml yet, and refuse it.
    barrier()
    held, refused = True, None
    if rt.dist.is_main:
        try:
            make_dir(run_dir, f"run directory {run_dir}")  # with any missing parents, like mkdir -p (docs/resume.md)
            held = ckpt.lock_dir(run_dir)
        except OSError as e:
            refused = PreflightError(f"run directory {run_dir} cannot be locked ({e.strerror}); give this user permission "
                                     f"to read it, or pass --out another folder")
        except PtdError as e:
            refused = e
        held = held and refused is None
    if all_sum([0.0 if held else 1.0], rt.device)[0] > 0:  # every rank refuses together (no hung barrier)
        if refused is not None:
            raise refused
        raise RunDirError(f"{run_dir} is in use by another ptd process (it holds the directory's lock); wait for it to "
                          f"finish or stop it, or pass --out to another directory")
    env_path = run_dir / P.ENV
    old_env = None
    try:
        if cfg_path.is_file():  # under the lock: no other ptd is redoing a stage meanwhile; every rank reads alike
            check_lineage(run_dir)
            check_finished_stages(run_dir)
            check_plugins_unchanged(run_dir)
            # An unfinished stage's commit: refused now, not when its turn comes. Only the stages this
            # command trains: `ptd train` beside a distill stage a 2-process run left was refused for it.
            for r in sorted(run_dir.rglob(P.RESUME)):
                if r.is_file() and not is_done(r.parent) and _stage_runs(cfg, r.parent.relative_to(run_dir), until, arms):
                    ckpt.check_resume(r.parent)
        if rt.dist.is_main and env_path.is_file():  # read before config.yaml is rewritten: a damaged one refuses first
            old_env = read_json_object(env_path, fix=f"delete it (it records the machines of earlier sessions) and run again")
    except BaseException:
        if rt.dist.is_main:
            ckpt.unlock_dir(run_dir)
        raise
    if rt.dist.is_main:
        try:
            # Nothing else writes here now: a writer temporary left by a kill is garbage.
            ckpt.remove_stale_temps(run_dir)
            if not cfg_path.is_file():  # atomic: a crash leaves no config or the whole one
                ckpt.write_text(cfg_path, seal(dump_yaml(cfg)))
            if data is not None and (not (run_dir / P.DATA).is_file()  # the first session's (or, before the record, this one's)
                                     or ("file_sizes" in data and "file_sizes" not in read_json(run_dir / P.DATA))):
                # A record from before file sizes, which check_data found equal on the rest: given them
                # now, or the directory never gained that protection (review).
                ckpt.write_json(run_dir / P.DATA, data)
            env = environment(cfg, rt, kind)
            if old_env is not None:  # keep the first session's record, add this one's
                env = {**old_env, "resumed": old_env.get("resumed", []) + [env]}
            ckpt.write_json(env_path, env)
        except BaseException:
            ckpt.unlock_dir(run_dir)
            raise
    barrier()
    return grown
