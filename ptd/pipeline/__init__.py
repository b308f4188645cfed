"""The prune-then-distill pipeline, as resumable stages over one run directory.

    runs/<name>/
      config.yaml  env.json  data.json
      teacher/                model.safetensors  metrics.jsonl  result.json  done
      prune/level_<k>/        model.safetensors  masks.safetensors  sparsity.json  metrics.jsonl  done
      prune/                  result.json  done
      student/                architecture.json  architecture.txt  stats.json  done
      control/round_<k>/      (only with the retrained_teacher arm) the unpruned teacher retrained as long
      distill/<arm>_seed<s>/  model.safetensors  metrics.jsonl  result.json  done
      distill/<arm>-<loss>_seed<s>/   the same for each distill.loss after the first (scratch: once)
      teachers/r<k>/          teacher replicate k >= 1 (teacher.seeds): its own teacher/ prune/ control/ distill/
      tensorboard/<stage path>/  TensorBoard event files of every training stage (tensorboard installed)
      results.json  report.md  report.html

Each stage is a plain function of (context, earlier artifacts) that writes its own directory and a
``done`` marker last. Re-running skips stages that are done and resumes the unfinished one from its
last finished epoch.

One concept per module; each imports only the modules before it in this list (tests/test_layers.py
checks the order), so none of them can form a cycle:

    lineage   a finished stage's ``done`` record and the digests of the files it was made from
    rundir    the run directory: does it take this run (same, grown), checks before the first write
    reuse     ``--from``: another run's finished teacher, pruning and control copied in
    context   the Context the stages share, made by opening the run directory
    plugins   the config's plugin names and options checked against the registries
    stages    the stages themselves (teacher, prune, student, distill, control) and ``run_stage``
    parallel  students side by side in worker processes (``jobs > 1``)
    run       ``run_pipeline``: preflight, every stage up to ``until``, the report

The names other modules and the tests use are re-exported here. A test that patches a name a
module looks up (``fit`` in Context.fit, ``stage_distill`` in distill_all) patches it in that
module (``ptd.pipeline.context``, ``ptd.pipeline.stages``): the package's copy of a name is not
what the code reads.
"""
from __future__ import annotations

from ptd.pipeline.lineage import (DONE_FORMAT, check_inputs, check_lineage, is_done, mark_done, recorded_inputs, sources,
                                  strict_done)
from ptd.pipeline.rundir import (RunDirError, _record_file, _stage_runs, check_data, check_finished_stages, check_run_config,
                                 data_change, environment, make_dir, open_run_dir, read_json)
from ptd.pipeline.reuse import REUSED_STAGES, check_reuse, copy_reused
from ptd.pipeline.context import Context, finish_growth, make_context
from ptd.pipeline.plugins import check_layers, check_plugins
from ptd.pipeline.stages import (_SaveAtEpoch, clone_model, distill_all, make_distiller, pending_students, run_stage,
                                 seed_everything, snapshot_epochs, stage_control, stage_distill, stage_prune, stage_student,
                                 stage_teacher, student_seed, student_tasks, teacher_seed)
from ptd.pipeline.parallel import _WORKER, distill_in_parallel, worker_threads
from ptd.pipeline.run import STAGES, main_writes, plan_line, run_pipeline

__all__ = [
    "DONE_FORMAT", "check_inputs", "check_lineage", "is_done", "mark_done", "recorded_inputs", "sources",
    "strict_done", "RunDirError", "_record_file", "_stage_runs", "check_data", "check_finished_stages",
    "check_run_config", "data_change", "environment", "make_dir", "open_run_dir", "read_json",
    "REUSED_STAGES", "check_reuse", "copy_reused", "Context", "finish_growth", "make_context", "check_layers",
    "check_plugins", "_SaveAtEpoch", "clone_model", "distill_all", "make_distiller",
    "pending_students", "run_stage", "seed_everything", "snapshot_epochs", "stage_control", "stage_distill",
    "stage_prune", "stage_student", "stage_teacher", "student_seed", "student_tasks", "teacher_seed",
    "_WORKER", "distill_in_parallel", "worker_threads", "STAGES", "main_writes", "plan_line", "run_pipeline",
]
