"""`ptd`: a thin command line over the library. Each subcommand parses, calls one function, prints.

Every subcommand takes the same YAML config and run directory, and runs the pipeline up to its
stage: stages already done are skipped, an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

def _errors() -> tuple[type[BaseException], ...]:
    from ptd.config import ConfigError
    from ptd.pipeline import RunDirError
    from ptd.registry import UnknownNameError
    from ptd.train.checkpoint import CheckpointError

    errs: list[type[BaseException]] = [ConfigError, RunDirError, UnknownNameError, CheckpointError]
    try:
        from ptd.data import DataError

        errs.append(DataError)
    except ImportError:
        pass
    try:
        from ptd.students import DerivationError

        errs.append(DerivationError)
    except ImportError:
        pass
    return tuple(errs)


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", help="YAML config (see configs/); its keys override the defaults")
    else:
        p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set distill.alpha=0.9 (repeatable)")
    p.add_argument("--teacher", metavar="CHECKPOINT", help="start from this trained teacher (.safetensors or .pt) instead of training one")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars (for CI logs)")


def _load(args: argparse.Namespace):
    from ptd.config import load_config

    over = list(args.overrides)
    if args.teacher:
        over.append(f"teacher.checkpoint={args.teacher}")
    if args.device:
        over.append(f"device={args.device}")
    if args.quiet:
        over.append("quiet=true")
    cfg = load_config(args.config, over)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    return cfg, out


def cmd_stage(args: argparse.Namespace) -> int:
    from ptd.pipeline import run_pipeline

    cfg, out = _load(args)
    until = {"train": "teacher", "prune": "prune", "student": "student", "distill": "distill", "run": "report"}[args.cmd]
    arms = getattr(args, "arm", None)
    res = run_pipeline(cfg, out, until=until, arms=[arms] if arms else None)
    if until == "report":
        print((out / "report.md").read_text())
    elif until == "student":
        print((out / "student" / "report.txt").read_text())
    elif until == "prune":
        from ptd.pruning.report import layer_table
        from ptd.pruning.masks import load_masks

        if res["final_level"]:
            print(layer_table(load_masks(out / "prune" / f"level_{res['final_level']}" / "masks.safetensors")))
        print(f"sparsity {res['sparsity']:.4f}; test acc {res['levels'][-1]['test_acc']:.4f} (dense {res['levels'][0]['test_acc']:.4f})")
    elif until == "teacher":
        print(f"teacher test acc {res['test_acc']:.4f} (val {res.get('val_acc')}); {out / 'teacher' / 'model.safetensors'}")
    else:
        for s in res["students"]:
            print(f"{s['arm']:>17} seed {s['seed']}: test acc {s['test_acc']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ptd.config import load_config
    from ptd.data import load_dataset, make_loader
    from ptd.measure import count_nonzero, count_params
    from ptd.train.checkpoint import load_model
    from ptd.train.loop import Runtime, evaluate

    cfg = load_config(args.config, args.overrides)
    model = load_model(args.checkpoint)
    dc = cfg.data
    splits = load_dataset(dc.name, dc.root, val_fraction=dc.val_fraction, seed=cfg.seed, train_subset=dc.train_subset, test_subset=dc.test_subset)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rt = Runtime(device=device, amp=cfg.amp, channels_last=cfg.channels_last, quiet=True)
    model = rt.prepare(model)
    loader = make_loader(splits.test, batch_size=cfg.eval_batch_size, train=False, mean=splits.mean, std=splits.std, device=device,
                         augment=False, channels_last=rt.channels_last)
    r = evaluate(model, loader, rt)
    print(f"{args.checkpoint}: test acc {r['acc']:.4f} on {r['n']} images of {dc.name}; "
          f"params {count_params(model):,} ({count_nonzero(model):,} nonzero)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ptd.report.sweep import render_sweep_markdown
    from ptd.sweep import run_sweep

    cfg, out = _load(args)
    print(render_sweep_markdown(run_sweep(cfg, out), plots=False))
    print(f"written: {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'student_acc_vs_sparsity.png'}, {out / 'student_acc_vs_compute.png'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ptd.export import ExportError, export, format_record

    try:
        rec = export(args.source, args.out, args.format, latency=not args.no_latency)
    except ExportError as e:  # raised before anything is written over; one line, exit 2 like every user error
        print(f"ptd: error: {e}", file=sys.stderr)
        return 2
    print(format_record(rec))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptd", description="Prune, then distill: a pruned teacher, a smaller student, and an honest comparison.")
    sub = p.add_subparsers(dest="cmd", required=True)
    helps = {
        "run": "the whole pipeline (teacher, prune, student, distill, report) into one run directory",
        "train": "train the teacher (stage 1)",
        "prune": "prune the teacher (stages 1-2), printing the per-layer sparsity",
        "student": "derive the student from the pruned teacher (stages 1-3), printing widths, params, FLOPs, latency",
        "distill": "train the students: alone, from the unpruned and from the pruned teacher (stages 1-4)",
        # (the retrained_teacher control arm, when listed in distill.arms, runs here too)
    }
    for name, h in helps.items():
        sp = sub.add_parser(name, help=h, description=h)
        _common(sp)
        if name == "distill":
            from ptd.config import ARMS

            sp.add_argument("--arm", choices=ARMS, help="only this arm")
        sp.set_defaults(func=cmd_stage)
    ev = sub.add_parser("eval", help="test accuracy of a saved model (.safetensors written by ptd)",
                        description="test accuracy of a saved model (.safetensors written by ptd)")
    ev.add_argument("checkpoint")
    ev.add_argument("config", nargs="?", help="YAML config naming the data (default: Fashion-MNIST)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--device")
    ev.set_defaults(func=cmd_eval)
    sw_help = "teachers pruned to several sparsities (and by several strategies), each distilled into one student; sweep.json, sweep.md, plots"
    sw = sub.add_parser("sweep", help=sw_help, description=sw_help)
    _common(sw)
    sw.set_defaults(func=cmd_sweep)
    ex_help = ("write a run's student (its best distilled arm) or a saved model as ONNX with a dynamic batch axis, check it "
               "against PyTorch on test images, and time teacher vs student in onnxruntime at batch 1 and 64")
    ex = sub.add_parser("export", help=ex_help, description=ex_help)
    ex.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a run directory or a model.safetensors written by ptd")
    ex.add_argument("--format", default="onnx", help="onnx (the only format)")
    ex.add_argument("--out", help="output file (default: the model file with .onnx); never overwritten")
    ex.add_argument("--no-latency", action="store_true", help="skip the onnxruntime timing")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = _errors()
    try:
        return args.func(args)
    except errors as e:
        print(f"ptd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptd: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
