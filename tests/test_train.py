import json
import pickle
from pathlib import Path

import pytest
import torch

from ptd.config import OptimConfig
from ptd.data import Split, make_loader
from ptd.models import build_model
from ptd.train import checkpoint as ckpt
from ptd.train.loop import Runtime, evaluate, fit

RT = Runtime(quiet=True, channels_last=False)


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 40, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y):
        x[i, 0, 2 * c : 2 * c + 2, :] = 220  # class = which band is bright
    return Split(x, y)


def loaders(seed=0):
    tr, va = data(256, 0), data(64, 1)
    kw = dict(mean=(0.3,), std=(0.3,), augment=False)
    return make_loader(tr, batch_size=32, train=True, seed=seed, **kw), make_loader(va, batch_size=64, train=False, **kw)


def model():
    torch.manual_seed(0)
    return build_model("vgg", 4, 1, plan=[8, "M", 16, "M", 16, "M"])


OPT = OptimConfig(epochs=4, batch_size=32, lr=0.05, milestones=(2,), weight_decay=5e-4)


def test_fit_learns_and_logs(tmp_path):
    m = model()
    tr, va = loaders()
    r = fit(m, tr, va, OPT, RT, out_dir=tmp_path, test_loader=va)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[-1]["lr"] == pytest.approx(0.005)  # x0.1 at epoch 2
    assert r["steps"] == 4 * len(tr) and r["epochs"] == 4
    assert r["test_acc"] > 0.9  # 4 classes: chance is 0.25
    best = max(rows, key=lambda row: (row["val_acc"], -row["epoch"]))  # ties to the earlier epoch, as the published code
    assert r["best_epoch"] == best["epoch"] and r["best_val_acc"] == best["val_acc"]
    # This easy task validates at its best on more than one epoch: the tie goes to the first of them
    # (training/Tester.py of the published code saves only on accuracy > best; ptd took the last).
    assert sum(row["val_acc"] == best["val_acc"] for row in rows) > 1 and r["best_epoch"] < 4
    # the model ends at the best-validation weights
    assert evaluate(m, va, RT)["acc"] == pytest.approx(best["val_acc"])


from conftest import Kill, KillAfter  # noqa: E402  (re-exported: test_tensorboard imports them from here)


class Snapshots:
    """Each epoch's validation accuracy and weights, as fit's end_epoch sees them (after the
    epoch's last step)."""

    def __init__(self, m):
        self.m, self.epochs = m, []

    def end_epoch(self, epoch, metrics):
        self.epochs.append((metrics["val_acc"], {k: v.clone() for k, v in self.m.state_dict().items()}))


def noise_val_loader():
    """Validation images of pure noise with random labels: the accuracy wanders from epoch to
    epoch, so its best epoch (2 of 5 here, asserted) is not the last."""
    g = torch.Generator().manual_seed(1)
    va = Split(torch.randint(0, 255, (64, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return make_loader(va, batch_size=64, train=False, mean=(0.3,), std=(0.3,), augment=False)


@pytest.mark.parametrize("keep, saved", [("best", True), ("last", True), ("last", False)], ids=["best", "last", "last-in-memory"])
def test_fit_ends_with_the_weights_keep_names(tmp_path, keep, saved):
    """keep="last" (pruning's retraining rounds, as the published code) ends on the last epoch's
    weights even where an earlier epoch validated better; keep="best" on that epoch's."""
    m = model()
    snaps = Snapshots(m)
    opt = OptimConfig(epochs=5, batch_size=32, lr=0.2, weight_decay=5e-4)
    r = fit(m, loaders()[0], noise_val_loader(), opt, RT, out_dir=tmp_path if saved else None, hooks=[snaps], keep=keep)
    accs = [a for a, _ in snaps.epochs]
    best = max(range(5), key=lambda e: (accs[e], -e))  # ties to the earlier epoch
    assert best == 1, accs  # the premise: the best epoch is not the last
    want = best if keep == "best" else 4
    assert r["best_epoch"] == want + 1 and r["best_val_acc"] == accs[want]
    for k, v in m.state_dict().items():
        assert torch.equal(v, snaps.epochs[want][1][k]), k
    if saved:
        rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        # "best" flags each epoch that became the stage's checkpoint when it ended
        flags = [e == 4 for e in range(5)] if keep == "last" else [e == 0 or accs[e] > max(accs[:e]) for e in range(5)]
        assert [row["best"] for row in rows] == flags


def test_fit_refuses_an_unknown_keep():
    with pytest.raises(ValueError, match="keep must be one of last, best"):
        fit(model(), *loaders(), OPT, RT, keep="final")


class CountEpochs:
    def __init__(self):
        self.seen = []

    def end_epoch(self, epoch, metrics):
        self.seen.append(epoch + 1)


def test_resume_continues_and_matches_uninterrupted(tmp_path, capsys):
    tr, va = loaders()
    ref = model()
    r_ref = fit(ref, tr, va, OPT, RT, out_dir=tmp_path / "ref")

    m = model()
    with pytest.raises(Kill):  # end_epoch runs before the commit: epoch 3 is lost, 1-2 are committed
        fit(m, *loaders(), OPT, RT, out_dir=tmp_path / "run", hooks=[KillAfter(3)])
    m2 = model()  # a fresh process would start from fresh weights
    counter = CountEpochs()
    import ptd.train.loop as loop

    descs = []
    real_tqdm = loop.tqdm
    fake = lambda *a, **k: descs.append(k["desc"]) or real_tqdm(*a, **k)  # noqa: E731
    fake.write = real_tqdm.write
    loop.tqdm = fake
    try:
        r = fit(m2, *loaders(), OPT, RT, out_dir=tmp_path / "run", hooks=[counter], desc="teacher")
    finally:
        loop.tqdm = real_tqdm
    assert counter.seen == [3, 4]  # epochs 1-2 were not redone
    assert descs == ["teacher (resumed after epoch 2)"]  # the bar says so (a resume was silent: new-user audit)
    # ...and a line, which --quiet (no bars) keeps: a resume under --quiet was invisible.
    assert "[resumed] teacher: after epoch 2 of 4, its last commit" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert r["steps"] == r_ref["steps"]
    for a, b in zip(m2.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)  # bitwise on CPU



class Tally:
    """A stateful hook: counts its epochs, and says which state a resume gave it."""

    def __init__(self, key):
        self.resume_key, self.n, self.loaded = key, 0, None

    def end_epoch(self, epoch, metrics):
        self.n += 1

    def state_dict(self):
        return {"key": self.resume_key, "n": self.n}

    def load_state_dict(self, state):
        self.loaded, self.n = state["key"], state["n"]


def test_a_resumed_hook_gets_its_own_state_wherever_a_grown_run_puts_it(tmp_path):
    # By position, the hook a grown run put first took the old hook's state, and the old one none.
    old = Tally("old")
    with pytest.raises(Kill):
        fit(model(), *loaders(), OPT, RT, out_dir=tmp_path, hooks=[old, KillAfter(3)])
    new, again = Tally("new"), Tally("old")
    fit(model(), *loaders(), OPT, RT, out_dir=tmp_path, hooks=[new, again])
    assert (again.loaded, again.n) == ("old", 4)  # 2 committed epochs + 2 resumed
    assert (new.loaded, new.n) == (None, 2)  # no state of its own in the commit: starts fresh
    with pytest.raises(ValueError, match="share the resume_key old"):
        fit(model(), *loaders(), OPT, RT, hooks=[Tally("old"), Tally("old")])

def test_checkpoint_roundtrip_carries_architecture(tmp_path):
    m = build_model("vgg", 10, 3, plan=[8, "M", 16])
    ckpt.save_model(tmp_path / "m.safetensors", m)
    m2 = ckpt.load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 16, 16)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_checkpoint_for_other_arch_is_one_clear_line(tmp_path):
    ckpt.save_model(tmp_path / "m.safetensors", build_model("vgg", 10, 3, plan=[8, "M", 16]))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_into(build_model("vgg11", 10, 3), tmp_path / "m.safetensors", "teacher")
    msg = str(e.value)
    assert "\n" not in msg and "vgg11" in msg and "teacher" in msg and "shape" in msg


def test_a_checkpoint_of_another_class_count_says_the_data_sets_it(tmp_path):
    """An ImageNet-pretrained torchvision state dict for a 5-class dataset: the message said to set
    the model's arch/width/kwargs, none of which can change the class count (ptd takes it from the data)."""
    from ptd.models import build_model as build

    torch.save(build("tv:resnet18", 1000, 3).state_dict(), tmp_path / "imagenet.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_into(build("tv:resnet18", 5, 3), tmp_path / "imagenet.pt", "teacher")
    assert str(e.value) == (f"{tmp_path / 'imagenet.pt'}: its classifier (fc) has 1000 outputs, but the data has 5 classes (ptd "
                            f"takes the class count from the data; the rest of the teacher fits tv:resnet18); give a checkpoint "
                            f"trained on this data's 5 classes (a pretrained model fine-tuned with a new 5-class head first), or "
                            f"train the teacher here")
    torch.save(build("tv:googlenet", 1000, 3).state_dict(), tmp_path / "g.pt")  # its auxiliary heads mismatch too
    with pytest.raises(ckpt.CheckpointError, match=r"its classifier \(fc\) has 1000 outputs, but the data has 5 classes"):
        ckpt.load_into(build("tv:googlenet", 5, 3), tmp_path / "g.pt", "teacher")
    torch.save(build("tv:resnet34", 5, 3).state_dict(), tmp_path / "r34.pt")  # another architecture: the old line
    with pytest.raises(ckpt.CheckpointError, match="does not fit the teacher architecture tv:resnet18"):
        ckpt.load_into(build("tv:resnet18", 5, 3), tmp_path / "r34.pt", "teacher")


def test_a_torchvision_state_dict_given_for_ptds_model_of_the_same_name_names_the_one_it_fits(tmp_path):
    """torchvision's resnet18 weights with `arch: resnet18` (ptd's CIFAR-stem ResNet) read "1 shape
    mismatches; 18 missing keys; 18 unexpected keys; set the teacher's model to the one the checkpoint
    was trained with" (new-user trial): the file fits tv:resnet18 exactly, and now the line says so;
    the other way round too. A file of neither keeps the old line."""
    from ptd.models import build_model as build

    torch.save(build("tv:resnet18", 10, 3).state_dict(), tmp_path / "tv.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_into(build("resnet18", 10, 3), tmp_path / "tv.pt", "teacher")
    assert str(e.value).startswith(f"{tmp_path / 'tv.pt'}: does not fit the teacher architecture resnet18 (1 shape mismatches")
    assert str(e.value).endswith("but fits tv:resnet18, torchvision's model of that name, exactly; set teacher.model.arch=tv:resnet18")
    ckpt.save_model(tmp_path / "ptd.safetensors", build("resnet18", 10, 3))
    with pytest.raises(ckpt.CheckpointError, match=r"but fits resnet18, ptd's own model of that name, exactly; set "
                                                   r"teacher.model.arch=resnet18$"):
        ckpt.load_into(build("tv:resnet18", 10, 3), tmp_path / "ptd.safetensors", "teacher")
    with pytest.raises(ckpt.CheckpointError, match=r"; set the teacher's model \(arch/width/kwargs\) to the one"):
        ckpt.load_into(build("resnet34", 10, 3), tmp_path / "tv.pt", "teacher")


def test_a_state_dict_with_extra_tensors_asks_for_the_models_own_weights_not_another_arch(tmp_path):
    """Every weight of the model plus an auxiliary head's: the line asked to change the architecture."""
    m = build_model("vgg", 10, 3, plan=[8, "M", 16])
    torch.save({**m.state_dict(), "aux.weight": torch.zeros(3), "aux.bias": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_into(build_model("vgg", 10, 3, plan=[8, "M", 16]), tmp_path / "x.pt", "teacher")
    assert str(e.value) == (f"{tmp_path / 'x.pt'}: holds every weight of the teacher architecture vgg, and tensors it does "
                            f"not have (2, first: aux.weight); save only the model's own weights (torch.save(model.state_dict()) "
                            f"of the model without them), or set the teacher's model to one that has them")


def test_torch_checkpoint_loaded_weights_only(tmp_path):
    m = build_model("vgg", 10, 3, plan=[8])
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "ok.pt")
    m2 = build_model("vgg", 10, 3, plan=[8])
    ckpt.load_into(m2, tmp_path / "ok.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran from a checkpoint')",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ckpt.CheckpointError, match="weights-only"):
        ckpt.read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.read_state_dict(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- divergence


class PoisonAt:
    """Before the optimizer step of global step ``step`` (1-based), set one weight to ``value``:
    a step whose update blows the weights up, after its loss was computed finite."""

    def __init__(self, step: int, value: float = float("nan")):
        self.step, self.value, self.n = step, value, 0

    def before_step(self, model):
        self.n += 1
        if self.n == self.step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = self.value


class PoisonBufferAt(PoisonAt):
    """The same, for the first BatchNorm's running variance: what lr 1,000 did on the tiny config
    while every weight stayed finite (training normalizes by the batch's own statistics, so the
    loss stays finite too)."""

    def before_step(self, model):
        self.n += 1
        if self.n == self.step:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(self.value)


@pytest.mark.parametrize("how", ["loss", "last-step weights", "last-step BatchNorm statistics"])
def test_a_diverged_epoch_stops_the_run_before_its_commit(tmp_path, how):
    from ptd.errors import DivergedError

    tr, va = loaders()
    steps = len(tr)
    if how == "loss":  # a weight at inf from epoch 2's first update: the later steps' losses are nan
        hooks, opt, what = [PoisonAt(steps + 1, float("inf"))], OPT, "the training loss became nan"
    elif how == "last-step weights":  # only epoch 2's very last update goes bad: the loss of every step was finite
        hooks, opt, what = [PoisonAt(2 * steps)], OPT, "the weights became nan or inf (first: model.features.0.weight)"
    else:  # the weights and every loss finite; committed, the epoch's model.safetensors was refused by ptd's own loader
        hooks, opt, what = [PoisonBufferAt(2 * steps, float("inf"))], OPT, "the weights became nan or inf (first: model.features.1.running_var)"
    with pytest.raises(DivergedError) as e:
        fit(model(), tr, va, opt, RT, out_dir=tmp_path, hooks=hooks, desc="teacher", optim_key="teacher.optim")
    msg = str(e.value)
    assert msg.startswith(f"teacher: {what} in epoch 2 of 4") and "epoch 2 of 4" in msg and "teacher.optim.lr" in msg and "\n" not in msg
    assert ckpt.load_resume(tmp_path)["epoch"] == 0  # epoch 1 committed, epoch 2 not
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    # The best weights on disk are epoch 1's, all finite.
    m = model()
    ckpt.load_into(m, tmp_path / "model.safetensors")
    # Re-running the same config resumes at epoch 2 and stops there again, as deterministic as the run.
    with pytest.raises(DivergedError, match="epoch 2 of 4"):
        fit(model(), *loaders(), opt, RT, out_dir=tmp_path, hooks=[PoisonAt(steps)] if how != "loss" else
            [PoisonAt(1, float("inf"))], desc="teacher")


def test_a_buffer_that_holds_inf_by_design_is_not_divergence(tmp_path):
    """Only parameters and BatchNorm statistics are checked (as checkpoint.load_into checks them):
    a model may keep -inf in a float buffer (an attention mask) from the start."""
    m = model()
    m.register_buffer("attn_mask", torch.tensor([0.0, float("-inf")]))
    r = fit(m, *loaders(), OptimConfig(epochs=1, batch_size=32, lr=0.05), RT, out_dir=tmp_path)
    assert r["epochs"] == 1 and torch.isinf(m.attn_mask[1])


def test_a_huge_learning_rate_is_stopped_in_its_first_epoch(tmp_path):
    from ptd.errors import DivergedError

    opt = OptimConfig(epochs=3, batch_size=32, lr=1e9, weight_decay=5e-4)
    with pytest.raises(DivergedError, match=r"epoch 1 of 3 \(lr 1e\+09\)"):
        fit(model(), *loaders(), opt, RT, out_dir=tmp_path)
    assert ckpt.load_resume(tmp_path) is None and not (tmp_path / "model.safetensors").exists()


def test_cli_says_which_key_to_lower_in_one_line(tmp_path, tiny_yaml, capsys):
    from ptd.cli import main

    assert main(["train", str(tiny_yaml), "--set", "teacher.optim.lr=1e9", "--out", str(tmp_path / "run")]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("ptd: error: teacher: ") and "lower teacher.optim.lr" in lines[0], lines


def test_a_diverged_student_points_at_the_trained_and_pruned_teachers(tmp_path, tiny_yaml, capsys):
    """Distillation diverging after hours of teacher training: the line says how the new --out it
    asks for can reuse that teacher."""
    from ptd.cli import main

    run = tmp_path / "run"
    assert main(["distill", str(tiny_yaml), "--set", "distill.optim.lr=1e12", "--set", "distill.arms=[pruned_teacher]",
                 "--out", str(run)]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and "lower distill.optim.lr" in lines[0] and "loss weights of distill.options" in lines[0], lines
    assert lines[0].endswith(f"to reuse this run's trained and pruned teachers there, add --from {run}")
    # ...and the command it asks for runs: the teacher and pruning are copied, the students train.
    assert main(["distill", str(tiny_yaml), "--set", "distill.arms=[pruned_teacher]", "--out", str(tmp_path / "again"),
                 "--from", str(run)]) == 0
    assert (tmp_path / "again" / "teacher" / "model.safetensors").read_bytes() == (run / "teacher" / "model.safetensors").read_bytes()


def test_the_same_model_saved_twice_is_the_same_bytes(tmp_path):
    """safetensors orders the metadata through a hash map with a fresh random seed per call: before
    the header was made canonical, the same tensors and metadata saved twice differed in bytes (a
    teacher retrained bit for bit gave another file). Six saves of six keys: 720 orders each."""
    import hashlib

    torch.manual_seed(0)
    m = build_model("vgg", 10, plan=[8, "M", 16], in_channels=1)
    extra = {"epoch": 3, "val_acc": 0.5, "note": 'é\\n"', "zeta": [1, 2], "alpha": None}
    files = [tmp_path / f"m{i}.safetensors" for i in range(6)]
    for f in files:
        ckpt.save_model(f, m, extra=extra)
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 1
    raw = files[0].read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]  # as stored, in its order
    assert list(meta) == sorted(meta) and json.loads(meta["note"]) == extra["note"] and json.loads(meta["epoch"]) == 3
    back = ckpt.load_model(files[0])
    assert back.ptd_spec == m.ptd_spec and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))


def test_a_header_that_changes_length_is_rewritten_whole(tmp_path):
    """The rare path: a header whose canonical encoding is not its length (here: hand-written with
    spaces) is rewritten with the data after it, and reads back the same."""
    from safetensors.torch import load_file, save

    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    raw = save(t, metadata={"b": "2", "a": "1"})
    n = int.from_bytes(raw[:8], "little")
    loose = json.dumps(json.loads(raw[8:8 + n]), indent=1).encode()
    loose += b" " * (-len(loose) % 8)
    f = tmp_path / "loose.safetensors"
    f.write_bytes(len(loose).to_bytes(8, "little") + loose + raw[8 + n:])
    f.write_bytes(ckpt.canonical_safetensors(f.read_bytes()))
    data = f.read_bytes()
    m = int.from_bytes(data[:8], "little")
    assert m < len(loose) and data[8:8 + m].startswith(b'{"__metadata__":{"a":"1","b":"2"},"w":')
    assert torch.equal(load_file(str(f))["w"], t["w"])


def test_every_run_directory_writer_says_a_failed_write_as_an_oserror(tmp_path):
    """A full disk must reach the CLI as an OSError, which it says in one line with the path and
    exit 2. safetensors' file writer raised SafetensorError ("I/O error: No space left on device")
    and torch.save a RuntimeError ("unexpected pos"), both reported as a bug in ptd (crash audit:
    3 of 3 disk-full runs). A write that fails part-way is made here with a file-size limit
    (RLIMIT_FSIZE: such writes fail with EFBIG, as they fail with ENOSPC on a full disk; /dev/full
    does not fail writes in every sandbox), for every writer of the one write path."""
    import errno
    import resource

    m = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.ones(2, 64)).sum().backward()
    opt.step()
    writers = {
        "save_tensors": (tmp_path / "t.safetensors", lambda p: ckpt.save_tensors(p, {"w": torch.ones(64, 64)}, {"k": "v"})),
        "save_model": (tmp_path / "m.safetensors", lambda p: ckpt.save_model(p, m)),
        "write_json": (tmp_path / "r.json", lambda p: ckpt.write_json(p, {"a": [1.0] * 4000})),
        "write_text": (tmp_path / "r.txt", lambda p: ckpt.write_text(p, "x" * 100_000)),
        "write_bytes": (tmp_path / "r.bin", lambda p: ckpt.write_bytes(p, b"x" * 100_000)),
        "save_resume": (tmp_path / ckpt.RESUME_FILE, lambda p: ckpt.save_resume(p.parent, {
            "epoch": 0, "model": m.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state()})),
    }
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    caught = {}
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # bytes; Python ignores SIGXFSZ, so writes raise
    try:
        for name, (path, write) in writers.items():
            try:
                write(path)
            except Exception as e:  # noqa: BLE001 -- what each raises is the finding
                caught[name] = e
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    from ptd.cli import os_error_line
    for name, (path, _) in writers.items():
        e = caught.get(name)
        assert isinstance(e, OSError) and e.errno == errno.EFBIG, (name, repr(e))
        assert e.filename == str(path), (name, e.filename)  # a failed write() names no file: the one it was for
        assert os_error_line(e).startswith(f"{path}: File too large; "), name
    assert not list(tmp_path.iterdir())  # no temporary left, no target written


def test_evaluation_does_not_depend_on_how_the_split_is_batched():
    """eval_batch_size may change on resume as a key that "changes nothing computed", but a running
    float32 sum of the batch losses rounded by the batch cut: val_loss moved in its last bits in
    every stage of a run at eval_batch_size 33 (crash audit). The losses are now summed exactly."""
    torch.manual_seed(0)
    m = build_model("vgg", 10, 1, plan=[8, "M", 16, "M"])
    split = Split(torch.randint(0, 255, (500, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (500,)))
    rt = Runtime(device=torch.device("cpu"))
    got = [evaluate(m, make_loader(split, batch_size=b, train=False, mean=(0.3,), std=(0.3,), augment=False), rt)
           for b in (33, 64, 256, 500)]
    assert all(g == got[0] for g in got), got


def test_the_progress_bar_shows_the_epochs_mean_loss_as_metrics_ends_it(tmp_path, monkeypatch):
    """The bar showed one batch's loss, refreshed every 50 steps: an epoch of 8 steps showed its
    first step's loss throughout (new-user audit). It now shows the epoch's mean so far, and at
    the epoch's last step exactly the train_loss metrics.jsonl records."""
    import dataclasses

    import ptd.train.loop as loop

    shown: list[dict] = []

    class Bar:
        def __init__(self, *a, **k):
            pass

        def update(self, n=1):
            pass

        def set_postfix(self, **k):
            shown.append(k)

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(loop, "tqdm", Bar)
    tr, va = loaders()
    fit(model(), tr, va, dataclasses.replace(OPT, epochs=2), Runtime(quiet=False, channels_last=False), out_dir=tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # per epoch: its step 0, its last step, then with the validation accuracy
    assert len(tr) == 8 and [s["epoch"] for s in shown] == ["1/2"] * 3 + ["2/2"] * 3
    assert [float(s["loss"]) for s in shown[1::3]] == [round(r["train_loss"], 3) for r in rows]
    assert [s["loss"] for s in shown[2::3]] == [s["loss"] for s in shown[1::3]]
    assert [float(s["val_acc"]) for s in shown[2::3]] == [round(r["val_acc"], 4) for r in rows]


def test_the_kept_weights_are_saved_after_their_commit(tmp_path, monkeypatch):
    """fit saved the best epoch's model.safetensors before that epoch's commit: killed in between,
    the resume re-ran the epoch, and where the re-run differed (CUDA, other threads; here: no
    training steps at all) and did not improve, the stage ended on weights of an epoch its record
    never kept (crash audit). Saved after the commit, and mended on resume when a kill came between."""
    import ptd.train.loop as loop

    opt = OptimConfig(epochs=5, batch_size=32, lr=0.2, weight_decay=5e-4)
    ref = model()
    snaps = Snapshots(ref)
    fit(ref, loaders()[0], noise_val_loader(), opt, RT, hooks=[snaps])
    accs = [a for a, _ in snaps.epochs]
    assert max(range(5), key=lambda e: (accs[e], -e)) == 1 and accs[1] > accs[0]  # epoch 2 improves on epoch 1

    real = loop.ckpt.save_resume

    def killed_at_epoch_2(out, state):
        if state["epoch"] == 1:
            raise Kill
        real(out, state)

    monkeypatch.setattr(loop.ckpt, "save_resume", killed_at_epoch_2)
    with pytest.raises(Kill):
        fit(model(), loaders()[0], noise_val_loader(), opt, RT, out_dir=tmp_path)
    monkeypatch.setattr(loop.ckpt, "save_resume", real)
    # The re-run differs: no training step, so epochs 2-5 keep epoch 1's weights and none improves.
    m = model()
    r = fit(m, [], noise_val_loader(), opt, RT, out_dir=tmp_path)
    assert r["best_epoch"] == 1 and r["best_val_acc"] == accs[0]
    for k, v in m.state_dict().items():
        assert torch.equal(v, snaps.epochs[0][1][k]), k  # epoch 1's weights, not the killed epoch 2's
    assert loop.evaluate(m, noise_val_loader(), RT)["acc"] == accs[0]


def test_a_kill_between_the_commit_and_the_kept_weights_is_mended_on_resume(tmp_path, monkeypatch):
    """The other side of the order: killed after the commit of an improving epoch and before its
    model.safetensors, the resume does not re-run that epoch, so it saves its weights from the
    commit; the stage ends as an uninterrupted one does."""
    import ptd.train.loop as loop

    opt = OptimConfig(epochs=5, batch_size=32, lr=0.2, weight_decay=5e-4)
    ref = model()
    r_ref = fit(ref, loaders()[0], noise_val_loader(), opt, RT, out_dir=tmp_path / "ref")
    real, saves = loop.ckpt.save_model, []

    def killed_saving_epoch_2(path, mdl, *a, **k):
        saves.append(path)
        if len(saves) == 2:  # epoch 1's kept weights, then epoch 2's: killed after epoch 2's commit
            assert loop.ckpt.load_resume(path.parent)["epoch"] == 1
            raise Kill
        real(path, mdl, *a, **k)

    monkeypatch.setattr(loop.ckpt, "save_model", killed_saving_epoch_2)
    with pytest.raises(Kill):
        fit(model(), loaders()[0], noise_val_loader(), opt, RT, out_dir=tmp_path / "run")
    monkeypatch.setattr(loop.ckpt, "save_model", real)
    m = model()
    r = fit(m, loaders()[0], noise_val_loader(), opt, RT, out_dir=tmp_path / "run")
    assert (r["best_epoch"], r["best_val_acc"]) == (r_ref["best_epoch"], r_ref["best_val_acc"]) == (2, r_ref["best_val_acc"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
