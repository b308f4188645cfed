"""Every run-directory file and folder name, in one place (the layout below; docs/resume.md says how a
run directory is opened, resumed and grown).

    runs/<name>/
      config.yaml  env.json  data.json
      reused.json             --from RUN: the run whose teacher/, prune/ and control/ were copied in
      teacher/                model.safetensors  metrics.jsonl  result.json  done
      prune/level_<k>/        model.safetensors  masks.safetensors  sparsity.json  metrics.jsonl  done
      prune/                  result.json  done
      student/                architecture.json  architecture.txt  report.txt  stats.json  done
      control/round_<k>/      the unpruned teacher retrained as long (retrained_teacher arm)
      distill/<arm>_seed<s>/  model.safetensors  metrics.jsonl  result.json  done
      distill/<arm>-<loss>_seed<s>/   the same for each distill.loss after the first
      teachers/r<k>/          teacher replicate k >= 1 (teacher.seeds > 1): its own teacher/ prune/ control/ distill/
      tensorboard/<stage path>/   TensorBoard event files of every training stage
      results.json  report.md  report.html
"""
from __future__ import annotations

from pathlib import Path

# files
CONFIG = "config.yaml"
ENV = "env.json"
DATA = "data.json"  # the data's fingerprint (ptd.data.base.fingerprint), checked by every later session
DONE = "done"  # written last: the stage is complete
RESULT = "result.json"
MODEL = "model.safetensors"  # the stage's weights (the epoch fit keeps: best validation, or the last with keep="last")
MASKS = "masks.safetensors"
SPARSITY = "sparsity.json"
METRICS = "metrics.jsonl"  # one JSON line per epoch
STATS = "stats.json"
ARCHITECTURE = "architecture.json"
ARCHITECTURE_TXT = "architecture.txt"
STUDENT_REPORT = "report.txt"
STUDENT_INIT = "init.safetensors"  # inherited student weights
RESUME = "resume.pt"  # the last committed epoch of an unfinished stage; removed after its done
LEGACY_RESUME = ("last.safetensors", "last_state.pt")  # the two-file resume of ptd before the one commit
RESULTS = "results.json"
REUSED = "reused.json"  # --from: the run whose teacher, pruning and control were copied in, and when
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"

# folders
# The stages of `ptd run` in order; `ptd train/prune/student/distill` stop after theirs.
STAGES = ("teacher", "prune", "student", "distill", "report")
TEACHER = "teacher"
PRUNE = "prune"
STUDENT = "student"
CONTROL = "control"
CONTROL_OPTIM = "optim.json"  # control/: the optimizer its rounds train with (ptd.pipeline.stage_control)
DISTILL = "distill"
TENSORBOARD = "tensorboard"  # event files, one folder per training stage, mirroring the run's layout


def run_dir_of(path: str | Path, levels: int = 6) -> Path | None:
    """The run directory ``path`` lies in: its nearest folder, at most ``levels`` up, holding both
    config.yaml and env.json (teacher/, prune/level_k/, teachers/r1/distill/<arm>_seed0/ ...), or None.
    ``ptd eval`` takes that run's config by default, and ``ptd export`` its test images."""
    for d in list(Path(path).resolve().parents)[:levels]:
        if (d / CONFIG).is_file() and (d / ENV).is_file():
            return d
    return None


def level_dir(prune_dir: Path, k: int) -> Path:
    return Path(prune_dir) / f"level_{k}"


def round_dir(control_dir: Path, k: int) -> Path:
    return Path(control_dir) / f"round_{k}"


def distill_dir(run_dir: Path, arm: str, seed: int, loss: str | None = None) -> Path:
    """distill/<arm>_seed<s>, or distill/<arm>-<loss>_seed<s> for a loss other than the run's first."""
    return Path(run_dir) / DISTILL / (f"{arm}_seed{seed}" if loss is None else f"{arm}-{loss}_seed{seed}")


REPLICATES = "teachers"


def replicate_root(run_dir: Path, replicate: int) -> Path:
    """Where teacher replicate ``replicate`` keeps its teacher/, prune/, control/ and distill/:
    the run directory itself for replicate 0 (today's layout, so a run grown to more replicates
    keeps its finished stages), teachers/r<k>/ for the others."""
    return Path(run_dir) if replicate == 0 else Path(run_dir) / REPLICATES / f"r{replicate}"


def snapshot_file(teacher_dir: Path, epoch: int) -> Path:
    """The teacher's weights after ``epoch`` (kept for IMP weight rewinding)."""
    return Path(teacher_dir) / f"epoch_{epoch}.safetensors"
