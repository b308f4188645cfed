"""`ptd`: a thin command line over the library. Each subcommand parses, calls one function, prints.

Every subcommand takes the same YAML config and run directory, and runs the pipeline up to its
stage: stages already done are skipped, an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path

from ptd import paths as P
from ptd.errors import PreflightError, PtdError, counted, on_every_rank, one_line

def _rank() -> int:
    """This process's rank under torchrun (0 alone). Every rank parses the same argv, runs the same
    checks and refuses together (the pipeline makes each refusal collective), so only rank 0 says
    it: N copies of one line are noise, and interleaved they are worse."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other user error (argparse prints the usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "ptd: error: ptd run: ..." names the subcommand; the top-level parser's prog is just "ptd"
        where = f"{self.prog}: " if self.prog != "ptd" else ""
        if self.prog == "ptd" and "required: COMMAND" in message:
            cmds = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction)).choices
            message = f"no command given: ptd COMMAND ..., with COMMAND one of {', '.join(cmds)} (ptd run CONFIG --out DIR runs the whole pipeline)"
        self.exit(2, f"ptd: error: {where}{message}; see {self.prog} --help\n" if _rank() == 0 else None)


PLUGIN_HELP = ("a .py file to import first, which registers your own model, pruning strategy, distillation loss or dataset "
               "(MODELS.register, register_strategy, register_loss; repeatable); env.json records its sha256 and a re-run "
               "with another version of it is refused")


def _plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py", help=PLUGIN_HELP)


def _plugins(args: argparse.Namespace) -> None:
    """Import the --plugin files before anything reads a name from the config (the ptd command
    registered none of a user's own before: a config naming one was refused, its files not evaluable)."""
    from ptd.registry import load_plugins

    load_plugins(list(getattr(args, "plugins", [])))


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/); its keys override the defaults")
    else:
        p.add_argument("config", metavar="CONFIG", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("--out", help="run directory, created with any missing parent folders (default: runs/<config name>); "
                                 "the same command with the same --out again resumes a killed run, reusing every finished stage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set distill.alpha=0.9 or --set threads=1 (repeatable; a key given "
                        "twice takes the last value; a key and a key inside it, e.g. teacher=... and teacher.optim.lr=..., "
                        "conflict; every key and its default: README.md, \"Configuration\"; a run's whole config: its config.yaml)")
    p.add_argument("--teacher", metavar="CHECKPOINT", help="start from this trained teacher (.safetensors or .pt) instead of training one")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's device, auto: cuda where there is one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")
    _plugin_arg(p)


def _check_config_file(path: str | None) -> None:
    """A config that exists but is not text (a binary, a checkpoint passed by mistake), or is larger than
    any config (ptd.config.MAX_CONFIG_BYTES), is a user error."""
    from ptd.config import read_config_text

    if path is None or not Path(path).is_file():
        return  # load_config names a missing file
    read_config_text(Path(path))  # what load_config reads it by: the same refusals (too large, not text, unreadable)


def _run_config_of(model_file: Path) -> str | None:
    """The config.yaml of the run directory ``model_file`` lies in (``ptd.paths.run_dir_of``), or
    None: `ptd eval` of a run's model needs no config named."""
    try:
        run = P.run_dir_of(model_file)
    except (OSError, RuntimeError):  # a symbolic-link loop (RuntimeError from Path.resolve before 3.13): the
        return None  # model file's own check names it in one line; it was an internal error (bad-input audit, F6's class)
    return str(run / P.CONFIG) if run is not None else None


def _flag(value: str | None, flag: str, fix: str) -> str | None:
    """A flag's value; "" (or blanks) would silently mean the flag was not given."""
    from ptd.config import ConfigError

    if value is not None and not value.strip():
        raise ConfigError(f"{flag}: an empty value; {fix}")
    return value


def _opens(path: str, flag: str, fix: str) -> None:
    """A path given to ``flag`` that is there but cannot be opened (a symbolic-link loop, a file where
    a folder belongs): one line. ``--from LOOP`` was an internal error (Path.resolve's RuntimeError).
    One that is not there at all is left to the command, which names it in its own words."""
    from ptd.config import ConfigError

    try:
        os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be opened ({e.strerror or type(e).__name__}); {fix}") from None


def _load(args: argparse.Namespace):
    from ptd.config import load_config

    _plugins(args)
    _check_config_file(args.config)

    over = list(args.overrides)
    teacher = _flag(args.teacher, "--teacher", "give the trained teacher's file (.safetensors or .pt), or leave --teacher out to train one")
    device = _flag(args.device, "--device", "give auto, cpu, cuda or cuda:N, or leave --device out for the config's device")
    if teacher is not None:
        over.append(f"teacher.checkpoint={teacher}")
    if device is not None:
        over.append(f"device={device}")
    if args.quiet:
        over.append("quiet=true")
    cfg = load_config(args.config, over)
    if args.out is not None and not args.out.strip():  # "" would silently mean the default, runs/<name>
        raise PreflightError("--out: an empty path; give the run directory (e.g. --out runs/mine), or leave --out out for runs/<config name>")
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    return cfg, out


def cmd_stage(args: argparse.Namespace) -> int:
    from ptd.pipeline import run_pipeline

    with on_every_rank():
        cfg, out = _load(args)  # run_pipeline runs preflight before anything is written
    until = {"train": "teacher", "prune": "prune", "student": "student", "distill": "distill", "run": "report"}[args.cmd]
    arms = getattr(args, "arm", None)
    src = _flag(args.from_run, "--from", "give the earlier run directory whose teacher and pruning to reuse, or leave --from out")
    if src is not None:
        _opens(src, "--from", "give the earlier run directory whose teacher and pruning to reuse, or leave --from out")
    res = run_pipeline(cfg, out, until=until, arms=[arms] if arms else None, reuse_from=src)
    if _rank() != 0:  # rank 0 wrote the files and prints them, once
        return 0
    if until == "report":
        print((out / P.REPORT_MD).read_text())
        # Last, where the report above has not scrolled it away (new-user audit).
        print(f"written: {out / P.REPORT_MD}, {out / P.REPORT_HTML} (the figures: open it in a browser), {out / P.RESULTS}")
    elif until == "student":
        print((out / P.STUDENT / P.STUDENT_REPORT).read_text())
    elif until == "prune":
        from ptd.pruning.report import layer_table
        from ptd.pruning.masks import load_masks

        from ptd.train.checkpoint import load_model

        if res["final_level"]:
            level = P.level_dir(out / P.PRUNE, res["final_level"])
            # In the network's order (safetensors keeps keys sorted as text: features.10 before features.3).
            if "replicates" in res:  # the table is replicate 0's (the one the student is derived from)
                print("teacher replicate 0, per layer:")
            print(layer_table(load_masks(level / P.MASKS, load_model(level / P.MODEL))))
        for k, x in enumerate(res.get("replicates") or [res]):
            which = f"teacher replicate {k}: " if "replicates" in res else ""
            print(f"{which}sparsity {x['sparsity']:.4f}; test acc {x['levels'][-1]['test_acc']:.4f} (dense {x['levels'][0]['test_acc']:.4f})")
    elif until == "teacher":
        from ptd.pruning.base import format_acc

        for k, x in enumerate(res.get("replicates") or [res]):
            root = P.replicate_root(out, k)
            which = f"teacher replicate {k}" if "replicates" in res else "teacher"
            print(f"{which} test acc {x['test_acc']:.4f} (val {format_acc(x.get('val_acc'))}); {root / P.TEACHER / P.MODEL}")
    else:
        for s in res["students"]:
            print(f"{s['arm']:>17} seed {s['seed']}: test acc {s['test_acc']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ptd.config import load_config
    from ptd.evaluate import evaluate_model_file

    _plugins(args)
    config = args.config if args.config is not None else _run_config_of(Path(args.checkpoint))
    _check_config_file(config)
    flag_device = _flag(args.device, "--device", "give auto, cpu, cuda or cuda:N, or leave --device out for the config's device")
    cfg = load_config(config, args.overrides)
    # What feeds the model, as a refusal names it: with --set, the flags too (a size set by --set was
    # blamed on the config file: new-user audit).
    label = (str(config) if config else "the default config") + (f" with --set {' '.join(args.overrides)}" if args.overrides else "")
    r = evaluate_model_file(cfg, args.checkpoint, flag_device, label)
    h, w = r["input_size"]
    print(f"{args.checkpoint}: test acc {r['acc']:.4f} on {counted(r['n'], 'image')} of {cfg.data.name} at {h}x{w}; "
          f"params {r['params']:,} ({r['nonzero']:,} nonzero)"
          + (f"; config {config}" if args.config is None and config is not None else ""))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ptd.report.sweep import render_sweep_markdown
    from ptd.sweep import run_sweep

    with on_every_rank():
        cfg, out = _load(args)  # run_sweep runs preflight before anything is written
    results = run_sweep(cfg, out)
    if _rank() != 0:  # rank 0 wrote the files and prints them, once
        return 0
    print(render_sweep_markdown(results, plots=False))
    from ptd.report.sweep import PLOTS

    print(f"written: {out / P.SWEEP_MD}, {out / P.REPORT_HTML} (the figures and every interval: open it in a browser), "
          f"{out / P.SWEEP_JSON}, " + ", ".join(str(out / f) for f in PLOTS))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render a finished run's (or sweep's) reports from its files; trains nothing."""
    from ptd.report import rerender, rerender_sweep

    _opens(args.run_dir, "ptd report", "give the finished run or sweep directory itself")  # a loop read "results.json not found"
    run_dir = Path(args.run_dir)
    if (run_dir / P.SWEEP_JSON).is_file() and not (run_dir / P.RESULTS).is_file():
        rerender_sweep(run_dir)
        print(f"written: {run_dir / P.SWEEP_MD}, {run_dir / P.REPORT_HTML}")
    else:
        print(rerender(run_dir))
        print(f"written: {run_dir / P.RESULTS}, {run_dir / P.REPORT_MD}, {run_dir / P.REPORT_HTML}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Two finished runs' students, paired by arm, loss and seed; reads only."""
    from ptd.report.compare import compare_runs, config_line, format_comparison, load_finished

    for run in (args.run_a, args.run_b):  # a loop read "results.json not found", and resolve() below raised
        _opens(run, "ptd compare", "give two finished run directories")
    a, b = load_finished(args.run_a), load_finished(args.run_b)
    if Path(args.run_a).resolve() == Path(args.run_b).resolve():  # every difference +0.00 [+0.00, +0.00] (new-user audit)
        from ptd.report import ReportError

        raise ReportError(f"{args.run_a} and {args.run_b} are the same run directory: every difference would be zero; "
                          f"give two different runs (e.g. one made with --from)")
    print(format_comparison(compare_runs(a, b, args.run_a, args.run_b), a, b, args.run_a, args.run_b,
                            config_line(args.run_a, args.run_b)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ptd.export import export, format_record

    _plugins(args)
    _flag(args.out, "--out", "give the ONNX file to write (e.g. --out student.onnx), or leave --out out for the model file with .onnx")
    if args.threads is not None:  # the timing's threads (onnxruntime takes PyTorch's count), as a run's threads key sets them
        from ptd.config import ConfigError
        from ptd.preflight import check_threads

        try:
            check_threads(args.threads)
        except ConfigError as e:
            raise ConfigError(str(e).replace("threads:", "--threads", 1).replace("set threads to", "give --threads")
                              .replace("or null for torch's default", "or leave --threads out for torch's default")) from None
        import torch

        torch.set_num_threads(args.threads)
    rec = export(args.source, args.out, args.format, latency=not args.no_latency, arm=args.arm)
    print(format_record(rec))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ptd", description="Prune, then distill: a pruned teacher, a smaller student, and an honest comparison.",
                epilog="A run writes report.md, report.html and results.json into its run directory (--out, default "
                       "runs/<config name>); the same command again resumes it after a kill (docs/resume.md). Start with: "
                       "ptd run configs/fashion_mnist_demo.yaml")
    from ptd import __version__

    p.add_argument("--version", action="version", version=f"ptd {__version__}")
    # metavar: argparse names a missing subcommand by it ("required: COMMAND", not the dest "cmd")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    helps = {
        "run": "the whole pipeline (teacher, prune, student, distill, report) into one run directory",
        "train": "train the teacher (stage 1)",
        "prune": "prune the teacher (stages 1-2), printing the per-layer sparsity",
        "student": "derive the student from the pruned teacher (stages 1-3), printing widths, params, FLOPs, latency",
        "distill": "train the students: alone, from the unpruned and from the pruned teacher (stages 1-4)",
        # (the retrained_teacher control arm, when listed in distill.arms, runs here too)
    }
    from ptd.config import reuse_free_text

    for name, h in helps.items():
        sp = sub.add_parser(name, help=h, description=h)
        _common(sp)
        sp.add_argument("--from", dest="from_run", metavar="RUN_DIR",
                        help="copy this earlier run's finished teacher, pruning and control into --out (a new directory) "
                             "instead of training them: for another student or distillation from the same pruned teacher; "
                             f"every config key outside {reuse_free_text()} must be that run's")
        if name == "distill":
            from ptd.config import ARMS

            sp.add_argument("--arm", choices=ARMS, help="only this arm")
        sp.set_defaults(func=cmd_stage)
    ev = sub.add_parser("eval", help="test accuracy of a saved model (.safetensors written by ptd)",
                        description="test accuracy of a saved model (.safetensors written by ptd)")
    ev.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors model file ptd wrote (a stage's model.safetensors: "
                    "a run's teacher, a pruning level, a student; or ptd.train.checkpoint.save_model's), which carries its architecture")
    ev.add_argument("config", metavar="CONFIG", nargs="?",
                    help="YAML config naming the data (default: the config.yaml of the run directory the model file is in, "
                         "else the built-in defaults: Fashion-MNIST)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set data.root=/data/fm or --set threads=1 (repeatable)")
    ev.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's device)")
    _plugin_arg(ev)
    ev.set_defaults(func=cmd_eval)
    sw_help = "teachers pruned to several sparsities (and by several strategies), each distilled into one student; sweep.json, sweep.md, plots"
    sw = sub.add_parser("sweep", help=sw_help, description=sw_help)
    _common(sw)
    sw.set_defaults(func=cmd_sweep)
    rp_help = "re-render report.md and report.html (sweep.md and report.html for a sweep) from a finished run directory"
    rp = sub.add_parser("report", help=rp_help, description=rp_help)
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the run (or sweep) directory: what --out named")
    rp.set_defaults(func=cmd_report)
    cp_help = ("the students of two finished runs (e.g. made with --from: the same pruned teacher, another student), "
               "paired by arm and seed: each arm's B minus A with its 95% interval; reads only")
    # argparse %-formats a subcommand's help (the ptd --help list), not its description (ptd compare --help)
    cp = sub.add_parser("compare", help=cp_help.replace("%", "%%"), description=cp_help)
    cp.add_argument("run_a", metavar="RUN_A", help="a finished run directory")
    cp.add_argument("run_b", metavar="RUN_B", help="another finished run directory (the difference is B minus A)")
    cp.set_defaults(func=cmd_compare)
    ex_help = ("write a run's best student (of any arm) or a saved model as ONNX with a dynamic batch axis, check it "
               "against PyTorch on test images, and time teacher vs student in onnxruntime at batch 1 and 64")
    ex = sub.add_parser("export", help=ex_help, description=ex_help)
    ex.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a run directory or a model.safetensors written by ptd")
    ex.add_argument("--format", default="onnx", help="onnx (the only format)")
    ex.add_argument("--out", help="output .onnx file (default: the model file with .onnx); never overwritten")
    ex.add_argument("--no-latency", action="store_true", help="skip the onnxruntime timing")
    ex.add_argument("--threads", type=int, metavar="N", help="threads to time on (default: PyTorch's, every core; a run's "
                                                            "report timed on its config's threads key)")
    from ptd.config import ARMS

    ex.add_argument("--arm", choices=ARMS, help="a run directory's best student of this arm only (default: the best of "
                                                "any arm by validation accuracy, the student trained alone included)")
    _plugin_arg(ex)
    ex.set_defaults(func=cmd_export)
    return p


# errno -> the fix, for file-system refusals that reach the CLI unnamed by a check: the path the
# user gave (or its disk) is the problem, so they are user errors like any PtdError.
_OS_FIXES = {
    errno.EACCES: "give this user permission on it, or choose another path",
    errno.EPERM: "give this user permission on it, or choose another path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "free disk space there, or choose another path",
    errno.EDQUOT: "free disk space (quota) there, or choose another path",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.EISDIR: "a folder is where a file belongs: move it away or choose another path",
    errno.ENOTDIR: "a file is where a folder belongs: move it away or choose another path",
    errno.EEXIST: "something is already there (perhaps a dangling link): move it away or choose another path",
    errno.ENOENT: "check the path",
    errno.ELOOP: "a symbolic-link loop: fix the links or choose another path",
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what the system said, the path(s), and the fix."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file ptd uses"
    fix = _OS_FIXES.get(e.errno, "check the path, its permissions and free space")
    return one_line(f"{where}: {e.strerror or type(e).__name__}; {fix}")


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def _peer_gone(e: BaseException) -> bool:
    """A collective failed because another rank of this torchrun run died (killed, out of memory,
    its own error): not a bug in ptd, and that rank's output says why."""
    torch = sys.modules.get("torch")
    backend_error = getattr(getattr(torch, "distributed", None), "DistBackendError", ()) if torch else ()
    return _rank_count() > 1 and (isinstance(e, backend_error) or any(s in str(e) for s in _PEER_GONE))


def _rank_count() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _traceback_file(e: BaseException) -> str:
    """Write ``e``'s traceback to a new temporary file; its path."""
    fd, path = tempfile.mkstemp(prefix="ptd-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(e, file=f)
    return path


def _in_plugin(e: BaseException) -> tuple[str, int] | None:
    """(plugin file, line) of the innermost traceback frame in a --plugin file, or None: an error
    raised in a user's own strategy or model was called "a bug in ptd, not your input" (new-user trial)."""
    from ptd.registry import LOADED

    files = {p["path"] for p in LOADED}
    hits = [fr for fr in traceback.extract_tb(e.__traceback__) if os.path.abspath(fr.filename) in files]
    return (hits[-1].filename, hits[-1].lineno or 0) if hits else None


def _internal(e: BaseException) -> int:
    """A bug in ptd, not the user's input: one line, the traceback kept in a file (or shown with
    PTD_TRACEBACK=1) so it can be reported without flooding a user's terminal. One raised inside a
    --plugin file is the plugin's: exit 2, naming the file and line."""
    path = _traceback_file(e)
    where = _in_plugin(e)
    if where is not None:
        print(f"ptd: error: --plugin {where[0]} raised {type(e).__name__} at line {where[1]}: {one_line(e)[:240]}; fix the "
              f"plugin, then run into a new directory (--out): a run's finished stages are tied to the version of the plugin "
              f"that made them (the traceback is in {path})", file=sys.stderr)
        return 2
    print(f"ptd: internal error: {type(e).__name__}: {one_line(e)}; this is a bug in ptd, not your input; "
          f"the traceback is in {path} (PTD_TRACEBACK=1 prints it)", file=sys.stderr)
    return 1


def _cuda_oom() -> type[BaseException]:
    """torch.OutOfMemoryError (a RuntimeError, not a MemoryError) when torch is already imported;
    never imported here just for this, since `ptd --help` must stay fast."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """argv as the command's own parser reads it: a usage error names the command's --help (argparse
    reports unknown arguments from the top-level parser, "see ptd --help"), and an empty positional
    path is refused (argparse takes '' as given, and Path('') is the current folder)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.cmd]
    if extra:
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    for a in sub._actions:
        v = getattr(args, a.dest, None)
        if not a.option_strings and isinstance(v, str) and not v.strip():
            sub.error(f"{a.metavar or a.dest.upper()} is empty; give a path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return args.func(args)
    except PtdError as e:  # a user's mistake: one line, no traceback
        if _rank() == 0:
            print(f"ptd: error: {one_line(e)}", file=sys.stderr)
        elif not e.every_rank:  # its own (a damaged image in its shard): rank 0 cannot say it
            print(f"ptd: error: rank {_rank()}: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _rank() == 0:
            print("ptd: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130
    except OSError as e:  # permission, disk full, a folder in the way: the environment the user gave
        print(f"ptd: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, _cuda_oom()) as e:  # the batch or model does not fit this machine: the user's setting
        print(f"ptd: error: out of memory ({one_line(e)[:200]}); lower the batch sizes or the model's size, or free memory", file=sys.stderr)
        return 2
    except RecursionError:
        print("ptd: error: an input is nested too deeply to read (a config or JSON file?); flatten it", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("PTD_TRACEBACK"):
            raise
        if _peer_gone(e):
            path = _traceback_file(e)  # in case it was not a peer after all
            print(f"ptd: error: rank {_rank()}: another process of this torchrun run stopped ({one_line(e)[:160]}); "
                  f"its output above says why; run the same command again to resume where it stopped (traceback: {path})",
                  file=sys.stderr)
            return 1
        return _internal(e)


if __name__ == "__main__":
    sys.exit(main())
