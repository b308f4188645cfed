"""The distillation seam, proved by a loss that ptd does not ship: a FitNet-style hint with a
trainable 1x1-conv regressor, defined in this file only. It must train, resume exactly and stay
in sync across DDP ranks through the public API (build_distiller + fit), with no edit to ptd."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptd.config import OptimConfig
from ptd.data import Split, make_loader
from ptd.distill import LOSSES, DistillBatch, DistillLoss, LossSetup, build_distiller, register_loss
from ptd.models import build_model
from ptd.train.loop import Runtime, fit

LAYER = "features.6"  # the ReLU after the second conv (before its pool), named alike in teacher and student


if "test_hint" not in LOSSES:  # the DDP workers import this file as a script too

    @register_loss("test_hint")
    class Hint(DistillLoss):
        @dataclass(frozen=True)
        class Options:
            weight: float = 2.0  # multiplies the mean squared error (dimensionless)
            layer: str = LAYER

        @classmethod
        def feature_layers(cls, options):
            return [options.layer], [options.layer]

        def __init__(self, options, setup: LossSetup):
            super().__init__(options, setup)
            c_s = setup.student_shapes[options.layer][0]
            c_t = setup.teacher_shapes[options.layer][0]
            self.regressor = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)  # student width -> teacher width

        def forward(self, batch: DistillBatch):
            s = self.regressor(batch.s_feats[self.options.layer])
            hint = F.mse_loss(s, batch.t_feats[self.options.layer])
            return {"hint": self.options.weight * hint, "ce": F.cross_entropy(batch.s_logits.float(), batch.y)}


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 40, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y):
        x[i, 0, 2 * c : 2 * c + 2, :] = 220
    return Split(x, y)


OPT = OptimConfig(epochs=3, batch_size=16, lr=0.05, milestones=(2,), weight_decay=5e-4)
RT = Runtime(quiet=True, channels_last=False)


def nets(seed=0):
    torch.manual_seed(100)  # the same trained teacher every time
    teacher = build_model("vgg", 4, 1, plan=[8, "M", 16, "M"])
    torch.manual_seed(seed)
    student = build_model("vgg", 4, 1, plan=[4, "M", 6, "M"])
    return teacher, student


def unit_for(teacher, student, loader, weight=2.0):
    return build_distiller(student, teacher, "test_hint", options={"test_hint": {"weight": weight}}, num_classes=4,
                           num_samples=loader.dataset_size, epochs=OPT.epochs,
                           example_input=lambda: next(iter(loader))[0][:2])


def loader(rank=0, world=1):
    return make_loader(data(128, 0), batch_size=16, train=True, seed=0, mean=(0.3,), std=(0.3,), augment=False,
                       rank=rank, world_size=world, with_index=True)


from conftest import Kill, KillAfter  # noqa: E402


def test_probe_sizes_regressor_and_features_are_float32():
    teacher, student = nets()
    unit = unit_for(teacher, student, loader())
    (hint,) = unit.losses
    assert hint.setup.student_shapes == {LAYER: (6, 4, 4)} and hint.setup.teacher_shapes == {LAYER: (16, 4, 4)}
    assert tuple(hint.regressor.weight.shape) == (16, 6, 1, 1)
    assert hint.setup.num_samples == 128 and hint.setup.num_classes == 4 and hint.setup.epochs == 3
    # The regressor is the unit's, the teacher is not.
    names = [n for n, _ in unit.named_parameters()]
    assert "losses.0.regressor.weight" in names and not any("teacher" in n for n in names)
    x, y, idx = next(iter(loader()))
    loss, logits, terms = unit(x, y, idx, 0)
    assert sorted(terms) == ["ce", "hint"] and torch.equal(loss, terms["hint"] + terms["ce"])


def test_regressor_trains_and_terms_are_logged(tmp_path):
    teacher, student = nets()
    tr = loader()
    unit = unit_for(teacher, student, tr)
    w0 = unit.losses[0].regressor.weight.detach().clone()
    t0 = [p.detach().clone() for p in teacher.parameters()]
    fit(student, tr, None, OPT, RT, out_dir=tmp_path, unit=unit)
    assert not torch.equal(unit.losses[0].regressor.weight, w0)  # it was optimized with the student
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), t0))  # the teacher was not
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["terms"]) for r in rows] == [["ce", "hint"]] * 3
    for r in rows:  # every term averaged over the epoch like train_loss: they add up to it
        assert r["terms"]["hint"] + r["terms"]["ce"] == pytest.approx(r["train_loss"], rel=1e-5)
    assert rows[-1]["terms"]["hint"] < rows[0]["terms"]["hint"]
    # model.safetensors is the student's alone (ptd eval/export load it)
    from ptd.train.checkpoint import load_tensors

    assert set(load_tensors(tmp_path / "model.safetensors")) == set(student.state_dict())


def test_resume_restores_regressor_exactly(tmp_path):
    teacher, student = nets()
    unit = unit_for(teacher, student, loader())
    fit(student, loader(), None, OPT, RT, out_dir=tmp_path / "ref", unit=unit)
    ref = {k: v.clone() for k, v in unit.state_dict().items()}

    teacher, student = nets()
    with pytest.raises(Kill):
        fit(student, loader(), None, OPT, RT, out_dir=tmp_path / "run", unit=unit_for(teacher, student, loader()),
            hooks=[KillAfter(2)])
    teacher, student = nets(seed=7)  # a fresh process: different fresh weights, including the regressor
    unit2 = unit_for(teacher, student, loader())
    fit(student, loader(), None, OPT, RT, out_dir=tmp_path / "run", unit=unit2)
    got = unit2.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k  # bit-identical to the uninterrupted run


def _ddp_worker(out: Path) -> None:
    from ptd.train.distributed import init_distributed

    torch.set_num_threads(1)
    d = init_distributed("cpu")
    teacher, student = nets(seed=d.rank)  # ranks start apart: DDP's broadcast must align them
    tr = loader(d.rank, d.world_size)
    unit = unit_for(teacher, student, tr)
    w0 = unit.losses[0].regressor.weight.detach().clone()
    fit(student, tr, None, OPT, Runtime(quiet=True, channels_last=False, dist=d), unit=unit)
    torch.save({"w0": w0, "w": unit.losses[0].regressor.weight.detach().clone(),
                # parameters only: BatchNorm running stats are per rank after the last step (DDP
                # broadcasts buffers before each forward, as ptd's plain student training does)
                "student": {k: v.detach().clone() for k, v in student.named_parameters()}}, out / f"rank{d.rank}.pt")


@pytest.mark.slow
def test_regressor_synced_under_ddp(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert not torch.equal(a["w0"], b["w0"])  # different inits per rank...
    assert torch.equal(a["w"], b["w"])  # ...one regressor after training: DDP synced it
    assert not torch.equal(a["w"], a["w0"])
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
