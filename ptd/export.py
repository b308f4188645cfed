"""Deployment: a saved model (or a run's student) as ONNX, checked and timed in onnxruntime.

``export_onnx(model, out, input_shape)`` writes the model with a dynamic batch axis (input
``images`` N x C x H x W, output ``logits`` N x classes) through torch's TorchScript-based ONNX
exporter (seconds; the dynamo exporter takes ten times longer on a CPU for the same graph).
``check_onnx(model, path, images)`` runs both on the same (real test) images and returns the max absolute
logit difference; ``onnx_latency(teacher, student, input_shape)`` exports both and times them in
onnxruntime, interleaved, at batch 1 and 64 -- what ``ptd export`` prints and the student stage
records. ``resolve(source)`` says which model file a run directory stands for.

Every problem a user can cause raises :class:`ExportError` with a one-line message naming the
problem and the fix; nothing is written over an existing file.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import io
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ptd import paths as P
from ptd.errors import PtdError, counted, one_line
from ptd.io import damaged, default_fix
from ptd.train.checkpoint import CheckpointError, clip_words, sniff_file, stat_regular, is_writer_temp

ONNX_OPSET = 17  # onnxruntime >= 1.14 runs it; every op of ptd's families and the tv: CNNs exists in it
TOLERANCE = 1e-4  # max abs logit difference, fp32, onnxruntime vs PyTorch (for logits up to LOGIT_SCALE)
# Past this |logit| the tolerance grows with the image's largest logit (1e-6 of it): fp32 holds a
# logit of 259,885 to 0.03 at best. Up to it the check is the absolute 1e-4 it always was: the
# demo's 19 model files (teacher, levels, control rounds, students) reach 13.0-16.5 on its test set.
LOGIT_SCALE = 100.0


class ExportError(PtdError, ValueError):
    """A model or file that cannot be exported; one-line message with the fix."""


# What ``ptd run`` says of a finished stage's file that is gone (pipeline.check_finished_stages).
MISSING = "missing, though its stage is finished"


def _missing(path: Path, fix: str | None = None) -> ExportError:
    """A file of a finished stage (its ``done`` is there) that is not: the run is damaged. The line
    ``ptd run`` gives for the same damage (ptd.io.damaged), as an ExportError."""
    return ExportError(str(damaged(path, MISSING, fix)))


def _no_file(path: Path, give: str) -> ExportError | None:
    """Why a path that is there is no regular file (a symbolic-link loop, a dangling link, a pipe, a
    folder), in ptd.train.checkpoint's line; None where nothing is there at all. A stage's model file
    in a link loop was "damaged (missing, ...)" in ptd export, "Too many levels of symbolic links" in
    ptd eval (bad-input audit, F6's class)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError:
        pass  # a loop or a file on the way: stat_regular names it
    try:
        stat_regular(path, give)
    except CheckpointError as e:
        return ExportError(str(e))
    return None


def _student_fix(d: Path, run_dir: Path) -> str:
    # A re-run alone does not redo it: ptd run refuses a finished stage whose files are damaged.
    return f"restore it, or delete {d} and re-run `ptd run CONFIG --out {run_dir}` to redo that student"


@dataclass(frozen=True)
class Source:
    model_path: Path  # the .safetensors to export
    teacher_path: Path | None  # the run's teacher, for the latency comparison (missing where the run is damaged: _teacher)
    run_dir: Path | None
    what: str  # one line: which model this is and why it was chosen


def _arm_result(path: Path, run_dir: Path) -> dict[str, Any]:
    """A finished student's result.json, checked before it ranks anything: a JSON list there was an
    AttributeError, a string accuracy a ValueError, and a NaN one ranked the students on nan. The
    accuracies are held to what ptd.report holds results.json to (a finite number in [0, 1], or null)."""
    from ptd.report import Invalid, num, obj

    fix = _student_fix(path.parent, run_dir)
    try:
        r = json.loads(path.read_text())  # another OSError (permission denied) is resolve()'s one line
    except FileNotFoundError:
        raise ExportError(f"{path}: missing, though {path.parent.name} is finished (ptd export ranks the students by it); {fix}") from None
    except (ValueError, RecursionError) as e:  # not JSON, not text (UnicodeDecodeError), nested past any use
        raise ExportError(f"{path}: not JSON ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); {fix}") from None
    try:
        obj({"val_acc?": num(0, 1, null=True), "test_acc?": num(0, 1, null=True)})(r, "")
    except Invalid as e:
        raise ExportError(f"{path}: not the record ptd writes ({e.kind}: {e}); ptd export ranks the students by it -- {fix}") from None
    return r


def _best_arm(run_dir: Path, arm: str | None = None) -> tuple[Path, str]:
    """The run's student with the best validation accuracy (test accuracy where a run kept no
    validation set), whichever arm trained it: the one trained alone too, when it is the best
    model the run made (what a deployment wants); the line names the arm. ``arm``: among that arm's
    students only (``ptd export --arm``: e.g. the pruned teacher's, the paper's). A student still training
    (no ``done``) is passed over; a finished one without its model file is damage, refused: passing
    it over exported another student as "the best" while the best one was missing."""
    cands = []
    for d in sorted((run_dir / P.DISTILL).glob("*/")):  # replicate 0's students (teachers/r<k>/ are not scanned)
        if not (d / P.DONE).exists() or (arm is not None and not d.name.startswith((f"{arm}_seed", f"{arm}-"))):
            continue
        f = d / P.MODEL
        if not f.is_file():
            raise _no_file(f, _student_fix(d, run_dir)) or _missing(f, _student_fix(d, run_dir))
        r = _arm_result(d / P.RESULT, run_dir)
        score = r.get("val_acc") if r.get("val_acc") is not None else r.get("test_acc")
        cands.append((-1.0 if score is None else float(score), d.name, f, r))
    if not cands:
        if arm is not None:
            raise ExportError(f"{run_dir}: has no finished student of the arm {arm} (--arm); run `ptd distill --arm {arm}` on it "
                              f"first, or leave --arm out for the best student of any arm")
        raise ExportError(
            f"{run_dir}: has no finished distill/<arm>_seed<s>/model.safetensors; run `ptd distill` on it first, or give a model file"
        )
    # highest score; ties go to the pruned-teacher arm (the paper's student), then by name
    cands.sort(key=lambda c: (-c[0], not c[1].startswith("pruned_teacher"), c[1]))
    score, name, f, r = cands[0]
    among = f"the run's {counted(len(cands), f'{arm} student')} (--arm)" if arm is not None else f"the run's {counted(len(cands), 'student')}"
    # The best so far, which the user could not tell from the best (crash audit); a sweep's record
    # is sweep.json (a finished sweep was called unfinished: new-user audit).
    if not (run_dir / P.RESULTS).is_file() and not (run_dir / P.SWEEP_JSON).is_file():
        among += " finished so far: the run is not finished (no results.json yet), and a better student may come"
    tied = [c[1] for c in cands[1:] if c[0] == score]
    if tied:  # the rule that broke the tie, which the line did not say (real-data audit)
        among += (f"; tied with {', '.join(tied)}: a tie goes to the pruned teacher's student, then by name")
    if r.get("val_acc") is not None:
        return f, f"student {name} (best val accuracy {score:.4f} of {among})"
    # Picked on the test set itself (no validation set): the highest of several test scores is
    # biased upward, so its figure is no estimate of what the student gives on new data.
    return f, (f"student {name} (best test accuracy {score:.4f} of {among}; picked on the test set, "
               f"so that figure overstates what it gives on new images)" if len(cands) > 1 else
               f"student {name} (test accuracy {score:.4f}, the run's only student)")


def resolve(source: str | Path, arm: str | None = None) -> Source:
    """A model file, or a run directory (its best student, of any arm or of ``arm``, with the run's
    teacher for comparison)."""
    try:
        return _resolve(Path(source), arm)
    except OSError as e:  # a folder on the way this user cannot search: Path.exists/is_dir raise, not answer False
        where = e.filename if e.filename is not None else source
        raise ExportError(f"{where}: cannot be read ({e.strerror or type(e).__name__}); give this user access to it, "
                          "or give a run directory or model .safetensors it can read") from None


_GIVE_SOURCE = "give a run directory or a model .safetensors written by ptd"


def _resolve(p: Path, arm: str | None = None) -> Source:
    try:
        os.lstat(p)
    except FileNotFoundError:  # nothing there at all (a dangling link is there to lstat: sniff_file names it)
        raise ExportError(f"{p}: no such file or directory; {_GIVE_SOURCE}") from None
    except OSError:
        pass  # a link loop or a file on the way to it: sniff_file names it, as for ptd eval
    if p.is_dir():
        if not (p / P.CONFIG).is_file() and not (p / P.DISTILL).is_dir():
            raise ExportError(f"{p}: not a ptd run directory (no config.yaml, no distill/); give a run directory or a model .safetensors")
        f, what = _best_arm(p, arm)
        return Source(f, _teacher(p), p, what)
    # The checks ptd eval and --teacher make (ptd.train.checkpoint): a link loop, a dangling link, a
    # pipe, an empty or cut-short file, each named; the first bytes decide what the file is, not its
    # name (a ptd model file named x.pt exports, as ptd eval takes it; load() refuses a torch pickle).
    try:
        sniff_file(p, _GIVE_SOURCE)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if arm is not None:
        raise ExportError(f"--arm {arm}: picks among a run directory's students, but {p} is a model file; give the run "
                          f"directory, or leave --arm out to export this file")
    # The run it lies in (its config names the test images; ptd eval finds it the same way), and the
    # teacher of its own replicate: teachers/r1/distill/<arm>/ is timed against teachers/r1/teacher/.
    run_dir = P.run_dir_of(p)
    root = p.parent.parent.parent if p.parent.parent.name == P.DISTILL else run_dir
    teacher = _teacher(root) if root is not None else None
    if teacher is not None and teacher.is_file() and teacher.resolve() == p.resolve():
        teacher = None  # the teacher itself is not timed against itself
    return Source(p, teacher, run_dir, f"model file {p.name}")


def _teacher(root: Path) -> Path | None:
    """The teacher of the run (or replicate) in ``root``: its model file, or None where the run has no
    teacher (no model file, no finished teacher stage). A finished teacher stage whose model file is
    missing is named too, though the file is not there: the run is damaged, and the export refuses
    it when it comes to time the student against the teacher (_load_teacher), not with "no teacher
    in this run to compare"; with --no-latency the teacher is never read, and the student exports."""
    teacher = root / P.TEACHER / P.MODEL
    return teacher if teacher.is_file() or (teacher.parent / P.DONE).exists() else None


def load(path: Path) -> nn.Module:
    """``ptd.train.checkpoint.load_model``, with a foreign or broken file reported as an ExportError."""
    from ptd.train.checkpoint import CheckpointError, load_model

    try:
        return load_model(path).eval()
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- a safetensors file of someone else's format: say which file and what to do
        raise ExportError(f"{path}: not a model file written by ptd ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          "export a model.safetensors from a ptd run") from None


def _load_teacher(path: Path) -> nn.Module:
    """The run's teacher, timed against the student: checked before anything is written."""
    if not path.is_file():  # resolve() names a missing one only where its stage is finished: damage
        fix = f"{default_fix(path)}; or pass --no-latency to export the student without timing it against the teacher"
        raise _no_file(path, fix) or _missing(path, fix)
    try:
        return load(path)
    except ExportError as e:
        raise ExportError(f"{e}; the run's teacher is loaded only to time the student against it: "
                          "pass --no-latency to export without that comparison") from None


def input_channels(model: nn.Module) -> int:
    from ptd.students.graph import first_conv

    try:
        return first_conv(model).in_channels
    except ValueError:
        raise ExportError(f"{type(model).__name__} has no Conv2d layer to read its input channels from; ptd exports image classifiers") from None


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2: the exporter's C++ side dumps whole graphs there on failure."""
    import sys

    saved = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
    except (OSError, ValueError, AttributeError):  # no real fds (an embedded interpreter): nothing to silence
        for _, dup in saved:
            os.close(dup)
        yield
        return
    with open(os.devnull, "w") as null:
        for fd, _ in saved:
            os.dup2(null.fileno(), fd)
        try:
            yield
        finally:
            for fd, dup in saved:
                os.dup2(dup, fd)
                os.close(dup)


def _link_end(link: Path) -> str:
    """Where a symbolic link that leads to no file ends: nowhere, or in a loop (it said "which does not exist" of a loop)."""
    try:
        os.stat(link)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of symbolic links"
    return "which does not exist"


def _check_out(out: Path, *, overwrite: bool = False) -> None:
    """Everything about ``out`` that can be known before a byte is written; one-line ExportError otherwise."""
    try:
        try:
            os.lstat(out)  # lstat, not exists(): a dangling symbolic link is taken too (writing would replace it)
            taken = True
        except FileNotFoundError:
            taken = False
        if taken and not overwrite:
            # A file ptd exported is whole (written to a temporary, then linked in): one left by an
            # export killed before it printed is complete, which the user cannot otherwise tell (crash audit).
            what = f" (a symbolic link to {os.readlink(out)}, {_link_end(out)})" if out.is_symlink() and not out.exists() else \
                " (a folder)" if out.is_dir() else " (if ptd exported it, it is complete: exports are written whole)"
            raise ExportError(f"{out}: already exists{what}; nothing was overwritten -- choose another --out or delete the file")
        if overwrite and out.is_dir():
            raise ExportError(f"{out}: is a folder; choose a file name for --out")
        parent = out.parent
        if not parent.is_dir():
            raise ExportError(f"{parent}: no such directory for --out; create it or choose another path")
        if out.suffix.lower() != ".onnx":
            # ONNX bytes under a model name (model.safetensors, x.pt) are a file ptd's own tools, and
            # everyone's, then read as that format and refuse (bad-input audit).
            named = f"a {out.suffix} name" if out.suffix else "no .onnx suffix"
            fixed = out.with_name(out.stem + ".onnx") if out.suffix else out.with_name(out.name + ".onnx")
            raise ExportError(f"{out}: --out has {named}, but ptd export writes ONNX; nothing was written -- "
                              f"give a name ending in .onnx (e.g. {fixed})")
    except OSError as e:  # a folder on the way that cannot be searched, a name too long
        raise ExportError(f"{out}: cannot be checked ({e.strerror or type(e).__name__}); choose another --out") from None


def _remove_dead_temps(out: Path) -> None:
    """Remove the temporaries of earlier exports to ``out`` that were killed (SIGKILL skips every
    finally: the crash audit found one left per kill, next to the user's file). An export holds
    an flock on its temporary while it lives (``_temp_for``), so one that can be locked here has
    no writer left; one still locked is a live export's, and stays."""
    prefix = f".{out.name[:100]}."
    try:
        names = [n for n in os.listdir(out.parent) if n.startswith(prefix) and is_writer_temp(n)]
    except OSError:
        return  # _temp_for names the folder's problem
    for n in names:
        p = out.parent / n
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(p)
        except OSError:  # held by a live export (BlockingIOError), or gone already
            pass
        finally:
            os.close(fd)


def _temp_for(out: Path) -> tuple[Path, int]:
    """An empty temporary next to ``out`` (same file system: the final rename is atomic): proves
    the folder is writable before any work, and holds the file until every check passed. Returns
    it and an open descriptor holding an flock on it, to close once the export is over: the mark
    by which a later export tells a live temporary from a killed one's (``_remove_dead_temps``)."""
    _remove_dead_temps(out)
    try:
        # The name as ptd's writers name theirs (checkpoint.is_writer_temp), so a killed export
        # inside a run directory is swept up when the run next opens; kept short for long names.
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name[:100]}.", suffix=".tmp")
    except OSError as e:
        raise ExportError(f"{out.parent}: cannot write the exported model there ({e.strerror or type(e).__name__}); "
                          "choose another --out, or give this user write permission on the folder") from None
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600; an exported model is for sharing, as open() would make it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return Path(tmp), fd


def _place(tmp: Path, out: Path, *, overwrite: bool = False) -> None:
    """Move the finished ``tmp`` to ``out``; never over a file that appeared meanwhile (unless ``overwrite``)."""
    try:
        if overwrite:
            os.replace(tmp, out)
            return
        try:
            os.link(tmp, out)  # fails if ``out`` exists, even as a dangling link: no check-then-write race
        except FileExistsError:
            raise ExportError(f"{out}: already exists (it appeared while exporting); nothing was overwritten -- "
                              "choose another --out or delete the file") from None
        except OSError:  # a file system without hard links: check, then rename
            if os.path.lexists(out):
                raise ExportError(f"{out}: already exists; nothing was overwritten -- choose another --out or delete the file") from None
            os.replace(tmp, out)
    except OSError as e:
        raise ExportError(f"{out}: cannot be written ({e.strerror or type(e).__name__}); choose another --out") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_onnx(model: nn.Module, path: Path, input_shape: Sequence[int]) -> None:
    """Write ``model`` (a copy: eval, fp32, CPU) as ONNX to ``path``, which already exists (a temporary)."""
    model = copy.deepcopy(model).eval().float().cpu()  # a copy: the caller's model keeps its device, dtype and mode
    model = model.to(memory_format=torch.contiguous_format)
    x = torch.zeros((2,) + tuple(int(s) for s in input_shape)[-3:])  # batch 2: a batch of 1 could be specialised away
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), _quiet_fds():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET, input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
        _label(path, model)
    except Exception as e:  # noqa: BLE001 -- any exporter failure means the same to the user
        os_err = e if isinstance(e, OSError) else e.__cause__ if isinstance(e.__cause__, OSError) else None
        if os_err is not None:  # the disk, not the model: a full disk, a quota
            raise ExportError(f"{path.parent}: cannot write the exported model there ({os_err.strerror or type(os_err).__name__}); "
                              "free space there or choose another --out") from None
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ExportError(f"{type(model).__name__} cannot be exported to ONNX ({type(e).__name__}: {msg}); "
                          "export a model built by ptd (ptd.models) or make its forward traceable") from None


def _label(path: Path, model: nn.Module) -> None:
    """Carry what the model file records into the ONNX file's metadata: the class of each logit
    (``ptd_classes``, JSON) and the (height, width) it was trained at (``ptd_input_size``). A
    deployment otherwise gets logits numbered by nothing it can read."""
    import onnx

    meta = {}
    if getattr(model, "ptd_classes", None) is not None:
        meta["ptd_classes"] = json.dumps([str(c) for c in model.ptd_classes])
    if getattr(model, "ptd_input_size", None) is not None:
        meta["ptd_input_size"] = json.dumps([int(v) for v in model.ptd_input_size])
    if getattr(model, "ptd_normalize", None) is not None:  # images / 255, minus mean, over std, per channel
        meta["ptd_normalize"] = json.dumps(model.ptd_normalize, sort_keys=True)
    if not meta:
        return
    # Not its weights: over 2 GB torch writes them to files beside it, which one proto cannot hold.
    m = onnx.load(str(path), load_external_data=False)
    for k, v in sorted(meta.items()):
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(m, str(path))


def export_onnx(model: nn.Module, out: str | Path, input_shape: Sequence[int], *, overwrite: bool = False) -> Path:
    """Write ``model`` (eval mode, fp32, CPU) as ONNX with a dynamic batch axis; returns the path.

    Refuses (ExportError) an existing ``out`` (a dangling link included) unless ``overwrite``, a
    folder it cannot write, and a model the exporter cannot trace. The file appears whole or not
    at all (written next to ``out``, then renamed).
    """
    out = Path(out)
    _check_out(out, overwrite=overwrite)
    tmp, held = _temp_for(out)
    try:
        _write_onnx(model, tmp, input_shape)
        _place(tmp, out, overwrite=overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(held)
    return out


def _session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # the caller's choice; 1 by default (fewest threads to share a busy CPU with)
    so.inter_op_num_threads = 1
    # No spin-waiting: teacher and student sessions are timed in turn, and an idle session's
    # threads spinning for work steal the cores of the one being timed. At 2 threads on this
    # 2-core VM, with spinning (onnxruntime's default) the demo-sized teacher and student read
    # 7.9-10.3 ms and 7.0-9.3 ms at batch 64, speedup 0.91-1.14 over 3 tries; without it
    # 3.8-5.2 and 2.8-3.7 ms, speedup 1.35-1.40. At 1 thread it makes no difference.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Max absolute difference between PyTorch's and onnxruntime's logits on ``images`` (fp32)."""
    return onnx_difference(model, path, images)[0]


def onnx_difference(model: nn.Module, path: str | Path, images: torch.Tensor) -> tuple[float, float]:
    """(max absolute difference between PyTorch's and onnxruntime's logits on ``images``, the same
    per image in units of that image's largest |logit| / LOGIT_SCALE where that exceeds 1, the
    worst image's), fp32.

    The second is what ``export`` holds to ``TOLERANCE``: fp32 rounds larger values coarser. A
    tv:resnet18 student trained 1 epoch, whose logits reached 259,885 on the test images, differed
    from its ONNX file by 4.7e-2 (1.8e-7 of that) and its export was refused as a mismatch, "report
    the model" (new-user trial). Per image, so one image's large logits do not loosen another's."""
    model = copy.deepcopy(model).eval().float().cpu()
    images = images.float().cpu().contiguous()
    with torch.no_grad():
        ref = model(images)
    got = _session(path).run(["logits"], {"images": images.numpy()})[0]
    diff = (ref - torch.from_numpy(got)).abs().flatten(1).amax(1)
    scale = (ref.abs().flatten(1).amax(1) / LOGIT_SCALE).clamp_min(1.0)
    return float(diff.max()), float((diff / scale).max())


def onnx_latency(
    teacher: nn.Module | None,
    student: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 10,
    warmup: int = 1,
    threads: int = 1,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """onnxruntime latency (ms) of teacher and student at each batch size, their runs interleaved.

    Both are exported to a temporary directory. Returns ``{"batch_<b>": ptd.measure.paired_row(...),
    "threads": ..., "repeats": ...}``: per batch the medians, the speedup (median of the rounds'
    teacher / student ratios) with its 95% interval, and every run's ms; without a teacher,
    ``{"student_ms", "student_times_ms"}``. ``repeats`` is raised to ptd.measure.MIN_REPEATS (6),
    the fewest rounds whose interval reaches 95% (the student stage asked for 5). The teacher and
    the student swap places every round, as in ptd.measure.compare_latency: timed always in the
    same order, a load that rises or falls during the timing favours one of them every round,
    and the interval, which pairs rounds, cannot see that. ``max_seconds`` (None: no cap) stops
    the rounds of one batch size once its timed runs add up to that, after MIN_REPEATS rounds, as
    compare_latency's cap does: many rounds cost little on a small net and are capped on a large
    one ("repeats" records the rounds asked; each batch's times lists, the rounds timed). This is the call the student stage makes to record deployment latency.
    """
    import numpy as np

    from ptd.measure import MIN_REPEATS, paired_row

    repeats = max(int(repeats), MIN_REPEATS) if teacher is not None else int(repeats)
    shape = tuple(int(s) for s in input_shape)[-3:]
    models = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    out: dict[str, Any] = {"runtime": "onnxruntime CPU", "threads": threads, "repeats": repeats, "input": list(shape)}
    with tempfile.TemporaryDirectory() as d:
        sessions = {}
        for name, m in models.items():
            f = export_onnx(m, Path(d) / f"{name}.onnx", shape)
            sessions[name] = _session(f, threads)
        names = list(sessions)
        for b in batch_sizes:
            x = np.random.default_rng(0).standard_normal((int(b),) + shape).astype(np.float32)
            times: dict[str, list[float]] = {n: [] for n in sessions}
            for i in range(warmup + repeats):
                if max_seconds is not None and i - warmup >= MIN_REPEATS and sum(map(sum, times.values())) >= max_seconds * 1000.0:
                    break
                for name in names[i % len(names):] + names[: i % len(names)]:  # interleaved, alternating who goes first
                    t0 = time.perf_counter()
                    sessions[name].run(["logits"], {"images": x})
                    if i >= warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)
            if "teacher" in times:
                out[f"batch_{b}"] = paired_row(times["teacher"], times["student"])
            else:
                out[f"batch_{b}"] = {"student_ms": statistics.median(times["student"]),
                                     "student_times_ms": [round(t, 6) for t in times["student"]]}  # ns, as paired_row keeps them
    return out


def run_config(run_dir: Path | None):
    """The run's config (its config.yaml, read as ``ptd eval`` reads it), or None where there is no
    run directory or it has no config.yaml. A damaged one (not YAML, not a config, too large) is
    refused in ``ptd eval``'s line: it used to fall into test_images' fallback, and the export went
    on, exit 0, checked on random inputs, with the ConfigError cut mid-word (bad-input audit)."""
    if run_dir is None or not os.path.lexists(run_dir / P.CONFIG):
        return None
    from ptd.config import ConfigError, load_config

    try:
        return load_config(run_dir / P.CONFIG)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def test_images(run_dir: Path | None, input_shape: Sequence[int], n: int = 64, cfg=None) -> tuple[torch.Tensor, str]:
    """Up to ``n`` normalised test images of the run's dataset, and where they came from.

    Without a run directory there are no real images to use: random normal inputs of
    ``input_shape`` (C, H, W) stand in, and the description says so. A run whose data cannot be
    read here gets random inputs of the size its student stage recorded (student/stats.json);
    where it recorded none, ExportError: the ONNX graph is traced at one H x W, and a guess
    (32 x 32) made a 28 x 28 student's file that refuses its own images. A damaged config.yaml is
    an ExportError (run_config; ``cfg``: the run's config, read already).
    """
    if cfg is None:
        cfg = run_config(run_dir)
    if cfg is not None and run_dir is not None:
        try:
            from ptd.data import DataError, load_configured, make_loader

            dc = cfg.data
            try:
                # headers only: the run checked its images as it was told; a full decode of the training
                # set for 64 test images is minutes of work (data.check_images: full)
                splits = load_configured(dc, cfg.seed, test_subset=n, check_images="headers")
            except DataError:  # a test set of fewer than n images (a tiny run's): read it as the run did, and use all of it
                splits = load_configured(dc, cfg.seed, check_images="headers")
            loader = make_loader(splits.test, batch_size=n, train=False, mean=splits.mean, std=splits.std, augment=False, workers=0,
                                 image_size=dc.image_size)  # the size the run trained at, not the folder loader's default
            x, _ = next(iter(loader))
            return x[:n].float().cpu().contiguous(), f"{len(x[:n])} test images of {dc.name}"
        except Exception as e:  # noqa: BLE001 -- the check still runs, on stand-in inputs of the run's size, and says why
            # ptd's own line whole (its fix is at the end); another library's cut at a word, marked, never mid-word
            why = f"{type(e).__name__}: {one_line(e) if isinstance(e, PtdError) else clip_words(one_line(e), 200)}"
            shape = _recorded_input(run_dir, int(input_shape[0]), why)
            if shape is None:
                raise ExportError(f"{run_dir / 'config.yaml'}: the run's test images cannot be read here ({why}), and its "
                                  "student/stats.json records no input size, so the model's input size is unknown; make the "
                                  "run's data (data.root in that file) readable here, then export again") from None
            return torch.randn((n,) + shape), f"{n} random inputs of the run's input size (its test images could not be read: {why})"
    return torch.randn((n,) + tuple(input_shape)), f"{n} random inputs (no run directory, so no test images)"


def _recorded_input(run_dir: Path, channels: int, why: str = "") -> tuple[int, int, int] | None:
    """The (C, H, W) the student stage timed the run's models at (student/stats.json), or None.
    A finished student stage (its ``done`` is there) whose stats.json is missing or not JSON is
    damage, named as such (``why``: why the run's test images, the first choice, cannot be read)."""
    stats = run_dir / P.STUDENT / P.STATS
    try:
        rec = json.loads(stats.read_text())
    except (FileNotFoundError, ValueError, RecursionError) as e:  # missing, not JSON
        if not (stats.parent / P.DONE).exists():
            return None  # no student stage, or one that never finished: no size recorded
        fix = (f"restore it (ptd export reads the run's input size from it, as the run's test images cannot be read here: {why}), "
               f"or make the run's data (data.root in {run_dir / P.CONFIG}) readable here, then export again")
        if isinstance(e, FileNotFoundError):
            raise _missing(stats, fix) from None
        raise ExportError(str(damaged(stats, f"not JSON: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}", fix))) from None
    except OSError:  # unreadable here (permission): no size, as before
        return None
    try:
        shape = rec["onnx_latency"]["input"]
    except (KeyError, TypeError):  # a run that timed nothing
        return None
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == channels
            and all(type(s) is int and 0 < s <= 4096 for s in shape)):  # a damaged record, not a 64-image batch of it
        return None
    return tuple(shape)


def export(source: str | Path, out: str | Path | None = None, fmt: str = "onnx", *, latency: bool = True, repeats: int = 10,
           arm: str | None = None) -> dict[str, Any]:
    """What ``ptd export`` does: resolve, export, check against PyTorch, time against the teacher. Returns the record.

    Everything that can be checked before writing is checked first: the model, the run's teacher
    (when timing), the output path and that its folder takes a file. The ONNX file is written to
    a temporary next to ``out`` and moved into place only after the check and the timing passed,
    so a failure at any step leaves no file behind and a corrected re-run is not refused.
    """
    if fmt != "onnx":
        raise ExportError(f"--format {fmt}: unknown export format; the one supported is onnx")
    src = resolve(source, arm)
    cfg = run_config(src.run_dir)  # a damaged config.yaml: refused before anything is loaded
    model = load(src.model_path)
    teacher = _load_teacher(src.teacher_path) if latency and src.teacher_path is not None else None
    out = Path(out) if out is not None else src.model_path.with_suffix(".onnx")
    _check_out(out)
    # A bare model file: the size it records it was trained at, else 32x32 (CIFAR's).
    images, where = test_images(src.run_dir, (input_channels(model), *(getattr(model, "ptd_input_size", None) or (32, 32))), cfg=cfg)
    shape = tuple(images.shape[1:])
    tmp, held = _temp_for(out)
    try:
        _write_onnx(model, tmp, shape)
        diff, rel = onnx_difference(model, tmp, images)
        if not rel < TOLERANCE:
            raise ExportError(f"{out}: onnxruntime's logits differ from PyTorch's by {diff:.2e}, {rel:.2e} in units of an image's "
                              f"largest logit / {LOGIT_SCALE:g} (> {TOLERANCE:g}) on {where}; nothing was written -- report the model and "
                              f"torch/onnx versions")
        rec: dict[str, Any] = {"source": str(src.model_path), "what": src.what, "onnx": str(out), "input": list(shape),
                               "check": {"images": where, "max_abs_logit_diff": diff, "max_rel_logit_diff": rel,
                                         "tolerance": TOLERANCE, "ok": True}}
        if latency:
            # As many threads as PyTorch uses here, as the student stage times it: the two records compare.
            rec["latency"] = onnx_latency(teacher, model, shape, repeats=repeats, threads=torch.get_num_threads())
        _place(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(held)
    return rec


def format_record(rec: dict[str, Any]) -> str:
    c = rec["check"]
    lines = [f"exported {rec['what']} -> {rec['onnx']} (dynamic batch, input N x {' x '.join(map(str, rec['input']))})",
             f"check: max |logit difference| onnxruntime vs PyTorch = {c['max_abs_logit_diff']:.2e} on {c['images']}, "
             f"{c.get('max_rel_logit_diff', c['max_abs_logit_diff']):.2e} in units of an image's largest logit / {LOGIT_SCALE:g} where above 1 "
             f"(tolerance {c['tolerance']:g})"]
    if rec.get("latency"):
        lines += format_latency(rec["latency"])
    return "\n".join(lines)


def format_latency(lat: dict[str, Any]) -> list[str]:
    """:func:`onnx_latency`'s record as text lines (for ``ptd export`` and the student stage's report).
    A speedup is called faster or slower only where its 95% interval excludes 1 (ptd.measure.speed_call)."""
    from ptd.measure import speed_call

    lines = [f"latency in onnxruntime ({counted(lat['threads'], 'thread')}, median of {lat['repeats']} interleaved runs):"]
    for k, v in lat.items():
        if k.startswith("batch_"):
            if "teacher_ms" in v:
                line = f"  batch {k[6:]}: teacher {v['teacher_ms']:.2f} ms, student {v['student_ms']:.2f} ms, speedup {v['speedup']:.2f}x"
                if v.get("speedup_low") is not None:
                    call = speed_call({"low": v["speedup_low"], "high": v["speedup_high"]})
                    # the interval's coverage is at least 95% (97% at 6 runs): named by the rule, not the decimal
                    line += (f" [{v['speedup_low']:.2f}, {v['speedup_high']:.2f}] (95% interval: "
                             + ("the student is faster)" if call == "faster" else "the student is slower)" if call == "slower"
                                else "holds 1, so these runs cannot tell which is faster)"))
                lines.append(line)
            else:
                lines.append(f"  batch {k[6:]}: {v['student_ms']:.2f} ms (no teacher in this run to compare)")
    return lines
