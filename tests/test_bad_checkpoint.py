"""Files a user hands ptd as a checkpoint (``--teacher``, ``ptd eval FILE``, ``ptd export FILE``)
and the file ``ptd export`` writes.

Whatever the file is -- missing, a folder, a link to nothing, unreadable, empty, cut short, of
another format, a pickle that would run code, metadata that builds no model -- reading it is one
``CheckpointError`` line naming the file and the fix, with nothing else on stderr (no torch
warning) and no code from the file run. ``ptd export`` checks everything it can before writing,
and a failure at any step leaves no .onnx behind, so a corrected re-run is not refused.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import ptd.export as export_mod
from conftest import tiny_config, write_fashion_like
from ptd.cli import main
from ptd.models import build_model
from ptd.train import checkpoint as ckpt
from ptd.train.checkpoint import CheckpointError, load_into, load_model, read_metadata, read_state_dict, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


class _Touch:
    """Unpickled by a loader that runs code, it creates ``marker``: the proof no code ran is its absence."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vgg", 10, 1, plan=[8, "M", 8])


def _with_spec(path: Path, spec: object) -> Path:
    """A ptd model file whose ptd_spec metadata is ``spec`` (JSON text when a str): as a hand edit leaves it."""
    sd = {k: v.contiguous() for k, v in _model().state_dict().items()}
    save_file(sd, str(path), metadata={"format": "ptd-model-1", "ptd_spec": spec if isinstance(spec, str) else json.dumps(spec)})
    return path


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """One file (or path) per way a checkpoint can be wrong, next to a good one of each format."""
    d = tmp_path_factory.mktemp("ck")
    save_model(d / "good.safetensors", _model())
    good = (d / "good.safetensors").read_bytes()
    torch.save(_model().state_dict(), d / "good.pt")
    zipped = (d / "good.pt").read_bytes()
    torch.save(_model().state_dict(), d / "legacy.pt", _use_new_zipfile_serialization=False)
    shutil.copy(d / "good.safetensors", d / "safetensors_named.pt")
    shutil.copy(d / "good.pt", d / "torch_named.safetensors")
    (d / "adir").mkdir()
    os.symlink(d / "gone.safetensors", d / "dangling.safetensors")
    os.symlink(d / "loop_b.safetensors", d / "loop_a.safetensors")
    os.symlink(d / "loop_a.safetensors", d / "loop_b.safetensors")
    os.mkfifo(d / "fifo.safetensors")
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "cut_header.safetensors").write_bytes(good[:40])
    (d / "cut_data.safetensors").write_bytes(good[:-100])
    (d / "cut_zip.pt").write_bytes(zipped[: len(zipped) // 2])
    (d / "cut_pickle.pt").write_bytes((d / "legacy.pt").read_bytes()[:30])
    (d / "text.pt").write_text("hello, I am a text file\n")
    (d / "junk.safetensors").write_bytes(bytes(range(7, 71)))
    with zipfile.ZipFile(d / "notes.pt", "w") as z:
        z.writestr("notes/readme.txt", "a zip archive, but no torch file")
    with open(d / "evil_raw.pt", "wb") as f:
        pickle.dump({"w": _Touch(d / "PWNED")}, f, protocol=4)
    torch.save({"w": _Touch(d / "PWNED")}, d / "evil_zip.pt")
    (d / "c.yaml").write_text(yaml.safe_dump(tiny_config(write_fashion_like(d / "fm", n_train=120, n_test=40))))
    # Tensors torch.save keeps but no model can take; each once reached a torch op that raised.
    sd = _model().state_dict()
    torch.save({1: torch.zeros(1)}, d / "int_keys.pt")
    # a DDP model's weights beside the bare ones: one of the two was silently dropped
    torch.save({**sd, "module.classifier.weight": sd["classifier.weight"] * 2}, d / "prefix_twice.pt")
    torch.save({k: v.to_sparse() if v.is_floating_point() and v.dim() else v for k, v in sd.items()}, d / "sparse.pt")
    torch.save({k: v.to("meta") for k, v in sd.items()}, d / "meta_device.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "in beta", "in prototype stage", "deprecated"
        torch.save({**sd, "classifier.weight": sd["classifier.weight"].to_sparse_csr()}, d / "sparse_csr.pt")
        torch.save({**sd, "features.0.weight": torch.quantize_per_tensor(sd["features.0.weight"], 0.1, 0, torch.qint8)}, d / "quantized.pt")
        torch.save({**sd, "classifier.weight": torch.nested.nested_tensor([sd["classifier.weight"]] * 2)}, d / "nested_tensor.pt")
    torch.save({**sd, "classifier.bias": sd["classifier.bias"].to(torch.uint8).view(torch.bits8)}, d / "bits8.pt")
    packed = {k: v.contiguous().to(torch.uint8).view(torch.float4_e2m1fn_x2) if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    save_file(packed, str(d / "float4.safetensors"), metadata=read_metadata(d / "good.safetensors"))  # eval rebuilds it, then reads it
    return d


# What the one line must say, per file: (words in it, also for load_model/eval).
BAD = {
    "missing.pt": ["not found"],
    "adir": ["not found", "is a folder"],
    "dangling.safetensors": ["not found", "symbolic link", "gone.safetensors"],
    "loop_a.safetensors": ["symbolic links"],
    "fifo.safetensors": ["not a regular file"],
    "empty.pt": ["empty (0 bytes)", "save or copy it again"],
    "empty.safetensors": ["empty (0 bytes)"],
    "cut_header.safetensors": ["truncated"],
    "cut_data.safetensors": ["truncated"],
    "cut_zip.pt": ["truncated"],
    "cut_pickle.pt": ["truncated"],
    "text.pt": ["not a readable safetensors file or weights-only torch checkpoint", "text"],
    "junk.safetensors": ["neither safetensors, a torch zip nor a pickle"],
    "notes.pt": ["zip archive", "not a torch checkpoint"],
    "evil_raw.pt": ["holds pickled Python objects that could run code; ptd loads only tensors: save a state_dict with "
                    "torch.save(model.state_dict()) or use safetensors"],
    "evil_zip.pt": ["holds pickled Python objects that could run code"],
    "int_keys.pt": ["1 of its 1 keys are not names", "first: 1, of type int", "torch.save(model.state_dict(), path)"],
    "prefix_twice.pt": ["holds both 'classifier.weight' and 'module.classifier.weight'", "same weight", "model.module.state_dict()"],
    "sparse.pt": ["tensors are not a dense tensor of values", "first: features.0.weight", "sparse (layout torch.sparse_coo)", "to_dense()"],
    "sparse_csr.pt": ["1 tensor is not a dense tensor of values", "classifier.weight", "sparse (layout torch.sparse_csr)"],
    "meta_device.pt": ["first: features.0.weight", "on the meta device: a shape without values", "trained or loaded"],
    "quantized.pt": ["1 tensor is not a dense tensor of values", "features.0.weight", "quantized (torch.qint8)", "dequantize()"],
    "nested_tensor.pt": ["classifier.weight", "a nested tensor"],
    "bits8.pt": ["classifier.bias", "packed type torch.bits8", "cast each to float32"],
    "float4.safetensors": ["first: classifier.bias", "packed type torch.float4_e2m1fn_x2", "cast each to float32"],
}
TORCH_FILES = {"cut_zip.pt", "cut_pickle.pt", "notes.pt", "evil_raw.pt", "evil_zip.pt",  # eval refuses them by format
               "int_keys.pt", "prefix_twice.pt", "sparse.pt", "sparse_csr.pt", "meta_device.pt", "quantized.pt", "nested_tensor.pt", "bits8.pt"}


def _one_line(fn, path: Path) -> str:
    """``fn(path)`` must raise one CheckpointError naming ``path``, with no warning raised on the way."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as ei:
            fn(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert not seen, [str(w.message) for w in seen]
    return msg


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_checkpoint_is_one_line_naming_the_file(ck: Path, name: str, capfd):
    msg = _one_line(read_state_dict, ck / name)
    for word in BAD[name]:
        assert word in msg, (word, msg)
    assert "Re-running `torch." not in msg and "In PyTorch 2.6" not in msg  # torch's advice to run the code is not ours
    eval_msg = _one_line(load_model, ck / name)
    if name in TORCH_FILES:  # never unpickled: a model file must be safetensors
        assert "not safetensors" in eval_msg
    else:
        assert all(w in eval_msg for w in BAD[name]), eval_msg
    cap = capfd.readouterr()
    assert cap.out == "" and cap.err == ""
    assert not (ck / "PWNED").exists()


def test_the_bytes_decide_the_format_not_the_name(ck: Path):
    want = _model().state_dict()
    for name in ("good.safetensors", "good.pt", "legacy.pt", "safetensors_named.pt", "torch_named.safetensors"):
        got = read_state_dict(ck / name)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    assert json.loads(read_metadata(ck / "safetensors_named.pt")["ptd_spec"])["arch"] == "vgg"


def _saved(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    (save_file if path.suffix == ".safetensors" else lambda t, p: torch.save(t, p))(sd, str(path))
    return path


# A floating weight from a file of another kind of number: the cast made it 0/1, whole numbers or
# the real part, and the run went on with that teacher.
@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.complex64], ids=str)
def test_weights_that_are_not_floats_are_refused_before_any_is_copied(tmp_path: Path, dtype):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _model().state_dict().items()}
    path = _saved(tmp_path / ("w.pt" if dtype.is_complex else "w.safetensors"), sd)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    msg = _one_line(lambda p: load_into(model, p, "teacher"), path)
    assert "14 tensors have a type a teacher cannot hold" in msg, msg  # every floating tensor of the model
    assert f"first: features.0.weight ({dtype}, where the teacher holds torch.float32)" in msg and "floating-point weights" in msg, msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_other_float_widths_and_integer_buffers_still_load(tmp_path: Path):
    """What the checks keep taking: half, bfloat16 and 8-bit float weights (isfinite takes no
    8-bit floats: they are checked as float32), and a BatchNorm counter saved as another
    integer type or bool into the model's int64 one."""
    want = _model().state_dict()
    for dtype, counter in ((torch.float16, torch.int32), (torch.bfloat16, torch.bool), (torch.float8_e4m3fn, torch.uint8)):
        sd = {k: v.to(dtype) if v.is_floating_point() else v.to(counter) for k, v in want.items()}
        path = _saved(tmp_path / f"{dtype}.safetensors".replace("torch.", ""), sd)
        model = build_model("vgg", 10, 1, plan=[8, "M", 8])
        load_into(model, path, "teacher")
        got = model.state_dict()
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], sd[k].to(want[k].dtype)) for k in want), dtype
    sd = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in want.items()}
    sd["features.1.running_var"][0] = float("nan")
    msg = _one_line(lambda p: load_into(_model(), p, "teacher"), _saved(tmp_path / "nan8.safetensors", sd))
    assert "1 tensor holds nan or inf values (first: features.1.running_var)" in msg, msg


SPECS = {
    "unknown-arch": ({"arch": "resnet9000", "num_classes": 10, "in_channels": 1, "width": 1.0}, ["metadata names 'resnet9000', a model this process does not have", "unknown model 'resnet9000'",
                                                                                       "ptd.models.MODELS.register", "load_into"]),
    "negative-classes": ({"arch": "vgg", "num_classes": -10, "in_channels": 1, "width": 1.0, "plan": [8]}, ["num_classes -10"]),
    "zero-classes": ({"arch": "vgg", "num_classes": 0, "in_channels": 1, "width": 1.0, "plan": [8]}, ["num_classes 0"]),
    "bool-channels": ({"arch": "vgg", "num_classes": 10, "in_channels": True, "width": 1.0, "plan": [8]}, ["in_channels True"]),
    "huge-width": ({"arch": "vgg", "num_classes": 10, "in_channels": 1, "width": 1e12, "plan": [8]}, ["width 1000000000000.0", "(0, 1024]"]),
    "huge-plan": ({"arch": "vgg", "num_classes": 10, "in_channels": 1, "width": 1.0, "plan": [10**30]}, ["beyond any layer size"]),
    "bigger-than-the-file": ({"arch": "vgg", "num_classes": 10, "in_channels": 1, "width": 1.0, "plan": [512, "M", 512]},
                             ["values, but the file holds", "another model or was edited"]),
    "negative-plan": ({"arch": "vgg", "num_classes": 10, "in_channels": 1, "width": 1.0, "plan": [-8]}, ["plan entry -8"]),
    "nan-width": ('{"arch": "vgg", "num_classes": 10, "in_channels": 1, "width": NaN, "plan": [8]}', ["width nan"]),
    "a-list": ([1, 2], ["JSON list, not an object"]),
    "not-json": ("{arch: vgg", ["not JSON"]),
}


# The first meta-device build in a process imports torch's symbolic shapes (sympy): seconds, once.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "bigger-than-the-file" else c for c in sorted(SPECS)])
def test_metadata_that_builds_no_model_is_one_line_naming_the_file(ck: Path, tmp_path: Path, case: str, capfd, monkeypatch):
    spec, words = SPECS[case]
    path = _with_spec(tmp_path / f"{case}.safetensors", spec)
    if case not in ("unknown-arch", "negative-plan"):
        # Refused from the numbers alone: no builder is handed a size torch's allocator would choke on.
        import ptd.models

        def no_real_build(s):
            if torch.empty(0).device.type != "meta":
                raise AssertionError(f"built from a spec that should have been refused: {s}")
            return real(s)

        real = ptd.models.build_from_spec
        monkeypatch.setattr(ptd.models, "build_from_spec", no_real_build)
    msg = _one_line(load_model, path)
    assert "architecture metadata" in msg and all(w in msg for w in words), msg
    cap = capfd.readouterr()
    assert cap.out == "" and cap.err == ""


@pytest.mark.parametrize("size", ['[0, 28]', '[28]', '"28x28"', '[28.0, 28]', '{"h": 28}', 'nope', '[99999999, 1]'])
def test_a_recorded_input_size_that_is_not_one_is_one_line(tmp_path: Path, size: str):
    """A model file records the (height, width) it was trained at (eval refuses another): an edited
    record is refused naming the file, and a good one comes back as a tuple."""
    m = _model()
    spec = json.dumps(m.ptd_spec)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "ok.safetensors"), metadata={"format": "ptd-model-1", "ptd_spec": spec, "input_size": "[28, 30]"})
    assert load_model(tmp_path / "ok.safetensors").ptd_input_size == (28, 30)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"format": "ptd-model-1", "ptd_spec": spec, "input_size": size})
    msg = _one_line(load_model, tmp_path / "bad.safetensors")
    assert msg.startswith(f"{tmp_path / 'bad.safetensors'}: its recorded input size ") and "is not [height, width] in pixels" in msg, msg


def _cli(argv: list[str], capsys) -> str:
    """main(argv): exit 2, exactly one stderr line, no traceback; returns the line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = [l for l in cap.err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("ptd: error: ") and "Traceback" not in cap.err, (rc, cap.err)
    return lines[0]


_TEACHER_AS = {
    "sparse": ("sparse.pt", lambda v: v.to_sparse()),
    "meta": ("meta.pt", lambda v: v.to("meta")),
    "quantized": ("quantized.pt", lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8)),
    "bool": ("bool.safetensors", lambda v: v.to(torch.bool)),
}


@pytest.mark.parametrize("cmd, name, words", [
    ("teacher", "empty.pt", ["empty.pt", "empty (0 bytes)"]),
    ("teacher", "evil_raw.pt", ["evil_raw.pt", "could run code"]),
    ("teacher", "int_keys.pt", ["int_keys.pt", "keys are not names"]),
    ("teacher", "sparse", ["sparse.pt", "not a dense tensor of values", "features.0.weight", "to_dense()"]),
    ("teacher", "meta", ["meta.pt", "on the meta device"]),
    ("teacher", "quantized", ["quantized.pt", "quantized (torch.qint8)"]),
    ("teacher", "bool", ["bool.safetensors", "a type a teacher cannot hold", "torch.bool, where the teacher holds torch.float32"]),
    ("eval", "spec", ["spec.safetensors", "num_classes -10"]),
    ("eval", "arch", ["arch.safetensors", "unknown model 'resnet9000'"]),
    ("export", "spec", ["spec.safetensors", "num_classes -10"]),
])
def test_cli_bad_checkpoint_is_one_line_and_nothing_written(ck: Path, tmp_path: Path, capsys, cmd, name, words):
    if name == "spec":
        src = _with_spec(tmp_path / "spec.safetensors", {"arch": "vgg", "num_classes": -10, "in_channels": 1, "width": 1.0, "plan": [8]})
    elif name == "arch":
        src = _with_spec(tmp_path / "arch.safetensors", {"arch": "resnet9000", "num_classes": 10, "in_channels": 1, "width": 1.0})
    elif name in _TEACHER_AS:  # the config's own teacher, each weight made odd: it passes every check but the one meant
        sd = build_model("vgg", 10, 1, plan=[16, "M", 32, "M", 32]).state_dict()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = _saved(tmp_path / _TEACHER_AS[name][0], {k: _TEACHER_AS[name][1](v) if v.is_floating_point() else v for k, v in sd.items()})
    else:
        src = ck / name
    argv = {"teacher": ["train", ck / "c.yaml", "--teacher", src, "--out", tmp_path / "run"],
            "eval": ["eval", src, ck / "c.yaml"],
            "export": ["export", src, "--no-latency", "--out", tmp_path / "m.onnx"]}[cmd]
    line = _cli(argv, capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.onnx").exists()
    assert not (ck / "PWNED").exists()


# ---------------------------------------------------------------- ptd export: check first, write last, leave nothing behind


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with one finished distilled student and a teacher (no config: random inputs)."""
    d = tmp_path / "run"
    a = d / "distill" / "pruned_teacher_seed0"
    save_model(a / "model.safetensors", _model())
    (a / "result.json").write_text(json.dumps({"val_acc": 0.5}))
    (a / "done").write_text("")
    save_model(d / "teacher" / "model.safetensors", build_model("vgg", 10, 1, plan=[16, "M", 16]))
    return d


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_export_refuses_a_dangling_link_as_out_and_keeps_it(ck: Path, tmp_path: Path, capsys):
    link = tmp_path / "m.onnx"
    os.symlink(tmp_path / "elsewhere.onnx", link)
    line = _cli(["export", ck / "good.safetensors", "--no-latency", "--out", link], capsys)
    assert str(link) in line and "already exists" in line and "symbolic link" in line
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "elsewhere.onnx") and not link.exists()
    assert _files(tmp_path) == ["m.onnx"]


def test_export_checks_the_runs_teacher_before_writing(run_dir: Path, tmp_path: Path, capsys):
    teacher = run_dir / "teacher" / "model.safetensors"
    teacher.write_bytes(b"garbage")
    out = tmp_path / "s.onnx"
    line = _cli(["export", run_dir, "--out", out], capsys)
    assert str(teacher) in line and "--no-latency" in line
    assert not out.exists() and "s.onnx" not in " ".join(_files(tmp_path))  # no file, no temporary
    assert main(["export", str(run_dir), "--no-latency", "--out", str(out)]) == 0 and out.is_file()  # the corrected re-run


def test_export_into_a_folder_it_cannot_write_is_one_line_before_any_work(ck: Path, tmp_path: Path, capsys, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(export_mod.tempfile, "mkstemp", denied)
    monkeypatch.setattr(export_mod, "_write_onnx", lambda *a: pytest.fail("exported before the folder was known to be writable"))
    line = _cli(["export", ck / "good.safetensors", "--no-latency", "--out", tmp_path / "m.onnx"], capsys)
    assert f"{tmp_path}: cannot write" in line and "Permission denied" in line and "--out" in line
    assert _files(tmp_path) == []


def test_a_full_disk_while_writing_is_one_line_naming_the_folder(ck: Path, tmp_path: Path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full)
    line = _cli(["export", ck / "good.safetensors", "--no-latency", "--out", tmp_path / "m.onnx"], capsys)
    assert str(tmp_path) in line and "No space left on device" in line and "cannot be exported" not in line
    assert _files(tmp_path) == []


@pytest.mark.parametrize("step", ["check", "latency"])
def test_a_failure_after_writing_leaves_no_onnx(run_dir: Path, tmp_path: Path, capsys, monkeypatch, step):
    if step == "check":
        monkeypatch.setattr(export_mod, "onnx_difference", lambda *a: (1.0, 1.0))  # export checks through it
    else:
        def broken(*a, **k):
            raise export_mod.ExportError("VGG cannot be exported to ONNX (timing failed)")

        monkeypatch.setattr(export_mod, "onnx_latency", broken)
    out = tmp_path / "s.onnx"
    _cli(["export", run_dir, "--out", out], capsys)
    assert _files(tmp_path) == ["run"]  # neither the file nor its temporary
    monkeypatch.undo()
    assert main(["export", str(run_dir), "--no-latency", "--out", str(out)]) == 0 and out.is_file()


# ---------------------------------------------------------------- real permissions


_AS_USER = """
import json, sys
from ptd.cli import main
from ptd.train.checkpoint import CheckpointError, load_model, read_state_dict
out = {}
for name, fn, path in json.loads(sys.argv[1]):
    if fn == "export":
        out[name] = main(["export", path, "--no-latency"])
        continue
    try:
        (read_state_dict if fn == "read" else load_model)(path)
        out[name] = "loaded"
    except CheckpointError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_unreadable_files_and_folders_say_permission_denied(ck: Path, tmp_path: Path):
    """Permission bits, for real: in-process for a normal user; as root (which reads everything),
    in a process whose capabilities to bypass them are dropped (setpriv), as a real user would be."""
    noread = tmp_path / "noread.safetensors"
    shutil.copy(ck / "good.safetensors", noread)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.copy(ck / "good.safetensors", hidden / "m.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(ck / "good.safetensors", ro / "m.safetensors")
    cases = [("noread", "read", str(noread)), ("noread_eval", "load", str(noread)),
             ("hidden", "read", str(hidden / "m.safetensors")), ("ro_export", "export", str(ro / "m.safetensors"))]
    noread.chmod(0o000)
    hidden.chmod(0o000)
    ro.chmod(0o555)
    try:
        if os.geteuid() != 0:
            cmd = [sys.executable, "-c", _AS_USER, json.dumps(cases)]
        elif shutil.which("setpriv"):
            cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c", _AS_USER, json.dumps(cases)]
        else:
            pytest.skip("root without setpriv: permission bits cannot be tested")
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        for p, mode in ((noread, 0o644), (hidden, 0o755), (ro, 0o755)):
            p.chmod(mode)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("noread", "noread_eval"):
        assert got[name].startswith(f"{noread}: permission denied") and "No such file" not in got[name], got[name]
    assert "permission denied" in got["hidden"] and str(hidden / "m.safetensors") in got["hidden"], got["hidden"]
    assert got["ro_export"] == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and f"{ro}: cannot write" in err[0] and "Permission denied" in err[0], r.stderr
    assert _files(ro) == ["m.safetensors"]
