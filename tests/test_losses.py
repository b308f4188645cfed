"""Every registered distillation loss against its paper's formula, written out independently.

The losses are built and called through the contract of ptd.distill.base only (LossSetup,
DistillBatch): no Distiller, no training loop. References below use numpy and plain loops and
none of the losses' helpers; teacher and student widths differ everywhere.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import DEVICES
import ptd.distill  # noqa: F401  (registers every loss)
from ptd.distill.base import LOSSES, PENULTIMATE, DistillBatch, LossSetup
from ptd.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

B, CLASSES, N = 6, 5, 20  # batch, classes, training-set size (CRD bank rows)
T_WIDTH, S_WIDTH = 6, 4  # channels of the teacher's / student's feature maps
T_DIM, S_DIM = 8, 5  # widths of the penultimate features
HW = 4

# Option overrides for tiny tensors: CRD draws 7 negatives from 20 samples instead of 16384 of 50000.
SMALL = {"crd": {"nce_k": 7}}


def shape(name: str, side: str) -> tuple[int, ...]:
    if name == PENULTIMATE:
        return (T_DIM,) if side == "t" else (S_DIM,)
    return (T_WIDTH if side == "t" else S_WIDTH, HW, HW)


def build(name: str, **over):
    cls = LOSSES.get(name)
    options = cls.Options(**{**SMALL.get(name, {}), **over})
    t_layers, s_layers = cls.feature_layers(options)
    setup = LossSetup(num_classes=CLASSES, num_samples=N, teacher_shapes={n: shape(n, "t") for n in t_layers},
                      student_shapes={n: shape(n, "s") for n in s_layers}, epochs=30)
    return cls(options, setup)


def make_batch(loss, seed: int = 0, epoch: int = 25, grad: bool = False) -> DistillBatch:
    g = torch.Generator().manual_seed(seed)
    t_layers, s_layers = type(loss).feature_layers(loss.options)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    return DistillBatch(
        y=torch.randint(0, CLASSES, (B,), generator=g),
        index=torch.randperm(N, generator=g)[:B],
        epoch=epoch,
        s_logits=rnd(B, CLASSES),
        t_logits=rnd(B, CLASSES),
        s_feats={n: rnd(B, *shape(n, "s")) for n in s_layers},
        t_feats={n: rnd(B, *shape(n, "t")) for n in t_layers},
    )


def on_device(b: DistillBatch, device: str) -> DistillBatch:
    return dataclasses.replace(b, y=b.y.to(device), index=b.index.to(device), s_logits=b.s_logits.to(device),
                               t_logits=b.t_logits.to(device), s_feats={k: v.to(device) for k, v in b.s_feats.items()},
                               t_feats={k: v.to(device) for k, v in b.t_feats.items()})


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())


# ---------------------------------------------------------------- independent references (numpy)

def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))


def ce(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([-math.log(softmax(s[i])[y[i]]) for i in range(len(y))]))


def ref_dkd(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options
    T = o.temperature
    s, t, y = np_(b.s_logits), np_(b.t_logits), b.y.cpu().numpy()
    tckd = nckd = 0.0
    for i in range(len(y)):
        ps, pt = softmax(s[i] / T), softmax(t[i] / T)
        g = y[i]
        tckd += kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        others = [c for c in range(s.shape[1]) if c != g]
        nckd += kl(softmax(t[i, others] / T), softmax(s[i, others] / T))
    w = min((b.epoch + 1) / o.warmup_epochs, 1.0)
    n = len(y)
    return {"ce": o.ce_weight * ce(s, y), "dkd_tckd": w * o.alpha * T * T * tckd / n, "dkd_nckd": w * o.beta * T * T * nckd / n}


def ref_dist(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options
    T = o.temperature
    s, t, y = np_(b.s_logits), np_(b.t_logits), b.y.cpu().numpy()
    ys = np.stack([softmax(r / T) for r in s])
    yt = np.stack([softmax(r / T) for r in t])
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(len(ys))])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(ys.shape[1])])
    return {"ce": o.ce_weight * ce(s, y), "dist_inter": o.beta * T * T * inter, "dist_intra": o.gamma * T * T * intra}


def ref_fitnet(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options
    conv, bn = loss.regressor[0], loss.regressor[1]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)  # equal spatial sizes: a 1x1 conv
    fs, ft = np_(b.s_feats[o.teacher_layer]), np_(b.t_feats[o.teacher_layer])
    w, bias = np_(conv.weight)[:, :, 0, 0], np_(conv.bias)
    r = np.einsum("oc,bchw->bohw", w, fs) + bias[None, :, None, None]
    mean = r.mean(axis=(0, 2, 3), keepdims=True)
    var = r.var(axis=(0, 2, 3), keepdims=True)  # training-mode BN normalizes by the biased batch variance
    r = (r - mean) / np.sqrt(var + bn.eps) * np_(bn.weight)[None, :, None, None] + np_(bn.bias)[None, :, None, None]
    r = np.maximum(r, 0)
    return {"ce": o.ce_weight * ce(np_(b.s_logits), b.y.cpu().numpy()), "fitnet": o.weight * float(((r - ft) ** 2).mean())}


def attention_np(f: np.ndarray) -> np.ndarray:
    a = (f ** 2).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_at(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options
    at = sum(float(((attention_np(np_(b.s_feats[n])) - attention_np(np_(b.t_feats[n]))) ** 2).mean()) for n in o.teacher_layers)
    return {"ce": o.ce_weight * ce(np_(b.s_logits), b.y.cpu().numpy()), "at": o.beta * at}


def gram_np(f: np.ndarray) -> np.ndarray:
    q = f.reshape(len(f), -1)
    g = q @ q.T
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def ref_sp(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options
    sp = sum(float(((gram_np(np_(b.t_feats[n])) - gram_np(np_(b.s_feats[n]))) ** 2).sum()) / B ** 2 for n in o.teacher_layers)
    return {"ce": o.ce_weight * ce(np_(b.s_logits), b.y.cpu().numpy()), "sp": o.gamma * sp}


def ref_pkt(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options
    eps = 1e-7

    def cond(f):
        x = [v / (np.linalg.norm(v) + eps) for v in f.reshape(len(f), -1)]
        k = np.array([[(1 + float(xi @ xj)) / 2 for xj in x] for xi in x])
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(np_(b.s_feats[PENULTIMATE])), cond(np_(b.t_feats[PENULTIMATE]))
    val = np.mean([[pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps)) for j in range(B)] for i in range(B)])
    return {"ce": o.ce_weight * ce(np_(b.s_logits), b.y.cpu().numpy()), "pkt": o.weight * float(val)}


def huber(a: list[float], b: list[float]) -> float:
    d = [abs(x - y) for x, y in zip(a, b)]
    return float(np.mean([0.5 * x * x if x < 1 else x - 0.5 for x in d]))


def ref_rkd(loss, b: DistillBatch) -> dict[str, float]:
    o = loss.options

    def psi_d(e):
        d = [[float(np.linalg.norm(e[i] - e[j])) for j in range(B)] for i in range(B)]
        mu = np.mean([d[i][j] for i in range(B) for j in range(B) if i != j])
        return [d[i][j] / mu for i in range(B) for j in range(B)]

    def psi_a(e):
        out = []
        for j in range(B):
            for i in range(B):
                for k in range(B):
                    if i == j or k == j:
                        out.append(0.0)
                        continue
                    u, v = e[i] - e[j], e[k] - e[j]
                    out.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))))
        return out

    es, et = np_(b.s_feats[PENULTIMATE]), np_(b.t_feats[PENULTIMATE])
    return {"ce": o.ce_weight * ce(np_(b.s_logits), b.y.cpu().numpy()),
            "rkd_distance": o.distance_weight * huber(psi_d(es), psi_d(et)),
            "rkd_angle": o.angle_weight * huber(psi_a(es), psi_a(et))}


def ref_crd(loss, b: DistillBatch) -> dict[str, float]:
    """Call before the step (it reads the banks as they were); the negatives are the loss's draw."""
    o = loss.options
    idx = loss.negatives(b.index, b.y).cpu().numpy()  # random sampling, not the formula: the same draw as the step's

    def embed(lin, f):
        v = f.reshape(len(f), -1) @ np_(lin.weight).T + np_(lin.bias)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    vs = embed(loss.embed_s.linear, np_(b.s_feats[PENULTIMATE]))
    vt = embed(loss.embed_t.linear, np_(b.t_feats[PENULTIMATE]))
    ms, mt = np_(loss.memory_s), np_(loss.memory_t)
    K = idx.shape[1] - 1

    def nce(v, bank):
        h = np.array([[math.exp(float(v[i] @ bank[idx[i, k]]) / o.temperature) for k in range(K + 1)] for i in range(B)])
        h = h / (h.mean() * N)  # Z from this (first) batch
        c = K / N
        return -sum(math.log(h[i, 0] / (h[i, 0] + c + 1e-7)) + sum(math.log(c / (h[i, k] + c + 1e-7)) for k in range(1, K + 1))
                    for i in range(B)) / B

    return {"ce": o.ce_weight * ce(np_(b.s_logits), b.y.cpu().numpy()), "crd": o.weight * (nce(vs, mt) + nce(vt, ms))}


REFERENCES = {"dkd": ref_dkd, "dist": ref_dist, "fitnet": ref_fitnet, "at": ref_at, "sp": ref_sp, "pkt": ref_pkt,
              "rkd": ref_rkd, "crd": ref_crd}
ALL = [n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("ptd.")]  # not losses other test files register


# ---------------------------------------------------------------- value = paper's formula

@pytest.mark.parametrize("name,over", [(n, {}) for n in sorted(REFERENCES)] + [
    ("dkd", {"temperature": 2.0, "alpha": 0.5, "beta": 6.0, "ce_weight": 0.3}),
    ("dist", {"temperature": 4.0, "beta": 2.0, "gamma": 0.5}),  # DIST's CIFAR recipe uses tau = 4
    ("crd", {"temperature": 0.5, "nce_k": 12, "weight": 2.0}),
])
@pytest.mark.parametrize("device", DEVICES)
def test_value_equals_paper_formula(name, over, device):
    torch.manual_seed(0)
    loss = build(name, **over).to(device)
    batch = on_device(make_batch(loss), device)
    want = REFERENCES[name](loss, batch)
    got = {k: v.item() for k, v in loss(batch).items()}
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=2e-4, abs=1e-5), k
    assert all(v > 0 for v in want.values())  # every term is live on random inputs


def test_every_loss_of_this_branch_is_registered():
    assert set(REFERENCES) <= set(ALL)


def test_dkd_warmup_ramps_linearly_over_20_epochs():
    loss = build("dkd")
    assert loss.options.warmup_epochs == 20
    full = {k: v.item() for k, v in loss(make_batch(loss, epoch=19)).items()}
    for epoch, w in [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)]:
        got = loss(make_batch(loss, epoch=epoch))
        assert got["ce"].item() == pytest.approx(full["ce"], rel=1e-6)  # CE never ramps
        assert got["dkd_nckd"].item() == pytest.approx(w * full["dkd_nckd"], rel=1e-5)
        assert got["dkd_tckd"].item() == pytest.approx(w * full["dkd_tckd"], rel=1e-5)


def test_crd_memory_bank_moves_towards_the_batch_embeddings():
    loss = build("crd")
    batch = make_batch(loss)
    before_s, before_t = loss.memory_s.clone(), loss.memory_t.clone()
    with torch.no_grad():
        vs = nn.functional.normalize(loss.embed_s.linear(batch.s_feats[PENULTIMATE]), dim=1)
    loss(batch)
    i = batch.index
    m = loss.options.momentum
    want = (before_s[i] * m + vs * (1 - m))
    want = want / want.norm(dim=1, keepdim=True)
    torch.testing.assert_close(loss.memory_s[i], want)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[i] = False
    assert torch.equal(loss.memory_s[untouched], before_s[untouched])
    assert torch.equal(loss.memory_t[untouched], before_t[untouched])
    assert not torch.equal(loss.memory_t[i], before_t[i])
    assert loss.memory_s.shape == (N, 128) and int(loss.steps) == 1
    loss.eval()
    frozen = loss.memory_s.clone()
    loss(make_batch(loss, seed=1))
    assert torch.equal(loss.memory_s, frozen)  # evaluation never writes the banks


@pytest.mark.parametrize("mode", ["exact", "uniform"])
def test_crd_negatives_exact_mode_skips_the_anchors_class_once_labels_are_seen(mode):
    cls = LOSSES.get("crd")
    n, classes = 400, 40
    loss = cls(cls.Options(nce_k=50, negatives=mode), LossSetup(classes, n, {PENULTIMATE: (4,)}, {PENULTIMATE: (3,)}))
    labels = torch.arange(n) % classes
    for start in range(0, n, 100):  # one epoch: the loss learns every sample's class
        i = torch.arange(start, start + 100)
        loss(DistillBatch(labels[i], i, 0, torch.randn(100, classes), torch.randn(100, classes),
                          {PENULTIMATE: torch.randn(100, 3)}, {PENULTIMATE: torch.randn(100, 4)}))
    assert torch.equal(loss.labels, labels)
    index = torch.arange(0, 64)
    idx = loss.negatives(index, labels[index])
    assert idx.shape == (64, 51) and torch.equal(idx[:, 0], index)
    same = (labels[idx[:, 1:]] == labels[index][:, None]).sum().item()
    if mode == "exact":
        assert same == 0
    else:  # uniform: about 1/40 of 3200 draws share the anchor's class
        assert 40 <= same <= 130


def test_at_pools_the_larger_map_to_the_smaller():
    cls = LOSSES.get("at")
    o = cls.Options(teacher_layers=("a",))
    setup = LossSetup(CLASSES, N, teacher_shapes={"a": (3, 8, 8)}, student_shapes={"a": (2, 4, 4)})
    loss = cls(o, setup)
    g = torch.Generator().manual_seed(3)
    ft, fs = torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 2, 4, 4, generator=g)
    batch = DistillBatch(torch.zeros(B, dtype=torch.long), torch.arange(B), 0, torch.zeros(B, CLASSES), torch.zeros(B, CLASSES),
                         {"a": fs}, {"a": ft})
    pooled = np_(ft).reshape(B, 3, 4, 2, 4, 2).mean(axis=(3, 5))  # 2x2 average pooling, by hand
    want = 1000 * float(((attention_np(np_(fs)) - attention_np(pooled)) ** 2).mean())
    assert loss(batch)["at"].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("s,t,kind,out", [
    ((4, 8, 8), (6, 4, 4), nn.Conv2d, (6, 4, 4)),  # student twice as large: 3x3 stride 2
    ((4, 4, 4), (6, 8, 8), nn.ConvTranspose2d, (6, 8, 8)),  # half as large: 4x4 transposed, stride 2
    ((4, 6, 6), (6, 4, 4), nn.Conv2d, (6, 4, 4)),  # larger: a 3x3 valid conv
    ((5,), (8,), nn.Linear, (8,)),
])
def test_fitnet_regressor_bridges_shapes(s, t, kind, out):
    cls = LOSSES.get("fitnet")
    loss = cls(cls.Options(teacher_layer="h"), LossSetup(CLASSES, N, {"h": t}, {"h": s}))
    first = loss.regressor if kind is nn.Linear else loss.regressor[0]
    assert type(first) is kind
    assert loss.regressor(torch.randn(2, *s)).shape == (2, *out)


@pytest.mark.parametrize("name,t,s,words", [
    ("fitnet", (6, 8, 8), (4, 3, 3), ["'layer2'", "(6, 8, 8)", "(4, 3, 3)", "smaller"]),
    ("fitnet", (6, 4, 4), (5,), ["(6, 4, 4)", "(5,)"]),
    ("at", (6,), (4,), ["'layer1'", "[C, H, W]"]),
])
def test_unbridgeable_shapes_are_one_line_errors(name, t, s, words):
    cls = LOSSES.get(name)
    o = cls.Options()
    t_layers, s_layers = cls.feature_layers(o)
    setup = LossSetup(CLASSES, N, {n: t for n in t_layers}, {n: s for n in s_layers})
    with pytest.raises(ValueError) as e:
        cls(o, setup)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("name,field,value", [
    ("dkd", "temperature", 0.0), ("dkd", "warmup_epochs", -1), ("dist", "beta", -1.0), ("fitnet", "weight", -1.0),
    ("at", "student_layers", ("a",)), ("sp", "gamma", -3.0), ("pkt", "weight", -1.0), ("rkd", "angle_weight", -1.0),
    ("crd", "momentum", 1.0), ("crd", "nce_k", 0),
])
def test_bad_options_are_one_line_errors(name, field, value):
    with pytest.raises(ValueError) as e:
        LOSSES.get(name).Options(**{field: value})
    msg = str(e.value)
    shown = repr(list(value)) if isinstance(value, tuple) else repr(value)  # lists as a config writes them
    assert "\n" not in msg and f"distill.options.{name}.{field}" in msg and shown in msg


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_temperatures_past_float32s_resolution_are_refused(name):
    from ptd.distill.base import MAX_TEMPERATURE

    LOSSES.get(name).Options(temperature=MAX_TEMPERATURE)
    with pytest.raises(ValueError, match="at most 1000"):
        LOSSES.get(name).Options(temperature=MAX_TEMPERATURE * 1.5)


def test_kd_at_the_temperature_bound_is_at_its_logit_matching_limit_and_past_it_is_not():
    """Why the bound is 1000: as T grows, T^2 KL(softmax(t/T) || softmax(s/T)) tends to the mean
    over the batch of sum_c (z_s - z_t - mean)^2 / (2 C) (Hinton's logit matching). ptd's KD is
    within 0.2% of that limit at T = 100 and 1000 on these logits, so nothing is lost by refusing
    larger T, and float32 rounding puts it far off at 1e5 (where it even comes out negative)."""
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(64, 10, generator=g), 3 * torch.randn(64, 10, generator=g)
    d = (s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))
    limit = float(d.pow(2).sum(1).mean() / (2 * 10))

    def soft(T: float) -> float:  # ptd's KD soft term, alpha 1
        batch = DistillBatch(y=torch.zeros(64, dtype=torch.long), index=torch.arange(64), epoch=0, s_logits=s, t_logits=t)
        return float(build("kd", alpha=1.0, temperature=T)(batch)["kd_soft"])

    assert abs(soft(100.0) / limit - 1) < 2e-3 and abs(soft(1000.0) / limit - 1) < 2e-3
    # past the bound (the option refuses it), the same formula in float32 is far off
    import torch.nn.functional as F
    T = 1e5
    past = float(F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True) * T * T)
    assert abs(past / limit - 1) > 0.5


def test_a_layer_the_probe_did_not_see_is_named():
    cls = LOSSES.get("sp")
    with pytest.raises(ValueError, match=r"student layer 'layer3' \(probed: other\)"):
        cls(cls.Options(), LossSetup(CLASSES, N, {"layer3": (4, 2, 2)}, {"other": (4, 2, 2)}))


# ---------------------------------------------------------------- properties of every registered loss

@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_student_and_loss_modules_never_teacher(name):
    loss = build(name)
    loss.train()
    batch = make_batch(loss, grad=True)
    total(loss(batch)).backward()
    assert batch.s_logits.grad is not None and batch.s_logits.grad.abs().sum() > 0
    for n, f in batch.s_feats.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, n
    for n, p in loss.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert batch.t_logits.grad is None
    assert all(f.grad is None for f in batch.t_feats.values())


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_resumes_exactly(name):
    torch.manual_seed(0)
    loss = build(name)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1) if list(loss.parameters()) else None
    first = total(loss(make_batch(loss, seed=1)))
    if opt is not None:
        first.backward()
        opt.step()
    saved = copy.deepcopy(loss.state_dict())
    torch.manual_seed(123)  # a fresh loss starts from other weights (and banks)
    fresh = build(name)
    fresh.load_state_dict(saved)
    nxt = make_batch(loss, seed=2)
    a, b = loss(nxt), fresh(nxt)
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}
    for (k, x), (_, y) in zip(loss.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("name", ALL)
def test_bf16_autocast_is_finite_and_close_to_fp32(name):
    torch.manual_seed(0)
    loss = build(name)
    batch = make_batch(loss)
    batch.s_logits = batch.s_logits.bfloat16()  # as a student under autocast emits them
    ref = copy.deepcopy(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(batch)
    fp32 = ref(DistillBatch(batch.y, batch.index, batch.epoch, batch.s_logits.float(), batch.t_logits, batch.s_feats, batch.t_feats))
    for k in fp32:
        assert got[k].dtype == torch.float32 and torch.isfinite(got[k]), k
        assert got[k].item() == pytest.approx(fp32[k].item(), rel=3e-2, abs=1e-3), k


def capture(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward with hooks on the named modules (PENULTIMATE: the input of the last Linear)."""
    feats: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    handles = []
    for n in names:
        if n == PENULTIMATE:
            handles.append(last_linear.register_forward_pre_hook(lambda m, a: feats.__setitem__(PENULTIMATE, a[0])))
        else:
            handles.append(modules[n].register_forward_hook(lambda m, a, out, n=n: feats.__setitem__(n, out)))
    logits = model(x)
    for h in handles:
        h.remove()
    return logits, feats


@pytest.mark.parametrize("name", ALL)
def test_works_between_a_resnet_teacher_and_a_narrower_student_by_module_name(name):
    torch.manual_seed(0)
    teacher = build_model("resnet20", CLASSES, width=0.5).eval()
    student = build_model("resnet20", CLASSES, width=0.25)
    cls = LOSSES.get(name)
    options = cls.Options(**SMALL.get(name, {}))
    t_layers, s_layers = cls.feature_layers(options)
    x = torch.randn(B, 3, 16, 16)
    with torch.no_grad():
        t_logits, t_feats = capture(teacher, t_layers, x)
    s_logits, s_feats = capture(student, s_layers, x)
    setup = LossSetup(CLASSES, N, {k: tuple(v.shape[1:]) for k, v in t_feats.items()},
                      {k: tuple(v.shape[1:]) for k, v in s_feats.items()}, epochs=30)
    assert t_layers == [] or setup.teacher_shapes != setup.student_shapes  # widths really differ
    loss = cls(options, setup)
    y = torch.randint(0, CLASSES, (B,))
    terms = loss(DistillBatch(y, torch.arange(B), 5, s_logits, t_logits, s_feats, t_feats))
    value = total(terms)
    assert torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_crd_knows_the_labels_up_front_when_the_setup_gives_them():
    cls = LOSSES.get("crd")
    n, classes = 400, 40
    labels = torch.arange(n) % classes
    loss = cls(cls.Options(nce_k=50, negatives="exact"), LossSetup(classes, n, {PENULTIMATE: (4,)}, {PENULTIMATE: (3,)}, labels=labels))
    assert torch.equal(loss.labels, labels)  # before any batch
    index = torch.arange(0, 64)
    idx = loss.negatives(index, labels[index])
    assert (labels[idx[:, 1:]] == labels[index][:, None]).sum().item() == 0  # exact from the first step
    fresh = cls(cls.Options(nce_k=50, negatives="exact"), LossSetup(classes, n, {PENULTIMATE: (4,)}, {PENULTIMATE: (3,)}))
    assert (fresh.labels == -1).all()  # without them, learned from the batches as before
