"""Pruning: selection exactness, mask enforcement, every strategy's target, resume, scores, GMP, report."""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ptd.config import ConfigError, OptimConfig, PruneConfig
from ptd.pruning import strategy_options
from ptd.models import build_model
from ptd.pruning import STRATEGIES, Level, MaskHook, PruneContext
from ptd.pruning.masks import apply_masks, count, full_masks, prunable_weights, same_or_subset, sparsity
from ptd.pruning.report import layer_json, layer_table
from ptd.pruning.scores import magnitude, random_scores, snip, synflow
from ptd.pruning.select import global_topk, keep_for_target, layerwise_topk, rounds_for_target, survivors_after_round
from ptd.pruning.strategies.gmp import GMPHook, cubic_sparsity
from ptd.registry import UnknownNameError
from ptd.train.checkpoint import save_model
from ptd.train.loop import Runtime, fit

RT = Runtime(device=torch.device("cpu"), channels_last=False, quiet=True)
OPT = OptimConfig(epochs=1, batch_size=8, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
SPE = 3  # batches per epoch in the fake training set


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vgg", 10, 1, plan=[8, "M", 16])


def batches(n: int = SPE, bs: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 8, 8, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


class FakeRun:
    """A PruneContext's environment: real SGD through fit, levels kept in memory, calls counted."""

    def __init__(self, tmp: Path, store: dict | None = None, fail_at_call: int | None = None):
        self.tmp = tmp
        self.store = {} if store is None else store
        self.calls: list[str] = []
        self.fail_at_call = fail_at_call
        self.start_states: list[dict] = []
        self.data = batches()

    def train(self, model, masks, name, optim, hooks):
        self.calls.append(name)
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise KeyboardInterrupt("killed")
        self.start_states.append({k: v.clone() for k, v in model.state_dict().items()})
        r = fit(model, self.data, None, optim, RT, out_dir=self.tmp / name, hooks=[MaskHook(masks), *hooks])
        return {"val_acc": r["best_val_acc"], "test_acc": 0.1, "epochs": r["epochs"], "steps": r["steps"], "wall_s": r["wall_s"]}

    def save_level(self, level: Level) -> None:
        self.store[level.index] = (copy.deepcopy(self.model.state_dict()), {n: m.clone() for n, m in level.masks.items()}, dict(level.metrics))

    def load_level(self, k: int) -> Level:
        state, masks, metrics = self.store[k]
        self.model.load_state_dict(state)
        return Level(k, {n: m.clone() for n, m in masks.items()}, dict(metrics))

    def ctx(self, model: nn.Module, strategy: str = "imp", target: float = 0.59, options: dict | None = None,
            exclude_first: bool = False, exclude_last: bool = False, teacher_dir: Path | None = None, extra: dict | None = None,
            retrain: OptimConfig = OPT) -> PruneContext:
        self.model = model
        cfg = PruneConfig(strategy=strategy, target_sparsity=target, exclude_first=exclude_first, exclude_last=exclude_last,
                          retrain=retrain, options=options or {})
        masks = full_masks(prunable_weights(model, exclude_first, exclude_last))
        return PruneContext(model=model, masks=masks, cfg=cfg, train=self.train, evaluate=lambda m: {"val_acc": 0.0, "test_acc": 0.0},
                            batches=lambda n: batches(n, seed=1), level_done=lambda k: k in self.store, load_level=self.load_level,
                            save_level=self.save_level, example_input=torch.zeros(1, 1, 8, 8), teacher_dir=teacher_dir,
                            log=lambda s: None, extra=extra or {})


def masked_weights_zero(model: nn.Module, masks) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[n].detach()[~m] == 0).all()) for n, m in masks.items())


def imp_alive_counts(total: int, target: float, rate: float = 0.2) -> list[int]:
    out, alive = [], total
    for _ in range(rounds_for_target(target, rate)):
        alive = survivors_after_round(alive, rate)
        out.append(alive)
    return out


# ---------------------------------------------------------------- selection


def test_rounds_for_target():
    assert rounds_for_target(0.36) == 2
    assert rounds_for_target(0.59) == 4
    assert rounds_for_target(0.79) == 7
    assert rounds_for_target(0.8) == 7
    assert rounds_for_target(0.0) == 0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            rounds_for_target(bad)
    with pytest.raises(ValueError):
        rounds_for_target(0.5, rate=0.0)


def test_global_topk_exact_and_dead_never_revive():
    g = torch.Generator().manual_seed(0)
    cur = {"a": torch.rand(10, 7, generator=g) > 0.3, "b": torch.rand(33, generator=g) > 0.5}
    scores = {"a": torch.rand(10, 7, generator=g), "b": torch.rand(33, generator=g)}
    # Dead weights get the highest scores: they still must not come back.
    scores = {n: torch.where(cur[n], s, s + 100.0) for n, s in scores.items()}
    alive = count(cur)[0]
    for keep in (0, 1, alive // 2, alive):
        new = global_topk(scores, cur, keep)
        assert count(new)[0] == keep
        assert same_or_subset(cur, new)
    # The kept ones are the best-scoring alive ones.
    new = global_topk(scores, cur, 10)
    kept = torch.cat([scores[n][new[n]] for n in cur])
    dropped = torch.cat([scores[n][cur[n] & ~new[n]] for n in cur])
    assert kept.min() >= dropped.max()
    with pytest.raises(ValueError):
        global_topk(scores, cur, alive + 1)
    # NaN scores neither crash nor revive anything.
    nan_scores = {n: torch.full_like(s, float("nan")) for n, s in scores.items()}
    assert count(global_topk(nan_scores, cur, 5))[0] == 5


def test_global_topk_ties_deterministic():
    cur = {"a": torch.ones(4, 5, dtype=torch.bool), "b": torch.ones(6, dtype=torch.bool)}
    cur["a"][0, 0] = False
    scores = {"a": torch.ones(4, 5), "b": torch.ones(6)}
    m1 = global_topk(scores, cur, 7)
    m2 = global_topk(scores, cur, 7)
    assert all(torch.equal(m1[n], m2[n]) for n in cur)
    # Ties go to position: the first 7 alive entries of "a" in flat order.
    assert m1["a"].flatten().nonzero().squeeze(1).tolist() == list(range(1, 8))
    assert not m1["b"].any()
    # All alive (the path without the gather): ties by position too, and the same survivors as the
    # general path gives when one dead weight is added far outside the chosen ones.
    full = {"a": torch.ones(4, 5, dtype=torch.bool), "b": torch.ones(6, dtype=torch.bool)}
    m3 = global_topk(scores, full, 7)
    assert m3["a"].flatten().nonzero().squeeze(1).tolist() == list(range(7)) and not m3["b"].any()
    g = torch.Generator().manual_seed(1)
    rnd = {"a": torch.rand(4, 5, generator=g), "b": torch.rand(6, generator=g)}
    part = {"a": full["a"].clone(), "b": full["b"].clone()}
    low = "a" if rnd["a"].min() < rnd["b"].min() else "b"
    part[low].view(-1)[rnd[low].argmin()] = False  # the lowest score of all is never among the 9 best
    m4, m5 = global_topk(rnd, full, 9), global_topk(rnd, part, 9)
    assert all(torch.equal(m4[n], m5[n]) for n in full)


def test_layerwise_topk_exact_per_layer():
    model = tiny_net()
    masks = full_masks(prunable_weights(model))
    for frac in (0.5, 0.2, 0.37):
        new = layerwise_topk(magnitude(model, masks), masks, frac)
        for n, m in new.items():
            assert abs(int(m.sum()) - frac * m.numel()) <= 0.5 + 1e-9
        assert same_or_subset(masks, new)


def test_keep_for_target():
    masks = {"a": torch.ones(1000, dtype=torch.bool)}
    assert keep_for_target(masks, 0.59) == 410
    masks["a"][:700] = False
    assert keep_for_target(masks, 0.59) == 300  # already sparser: nothing more to cut


# ---------------------------------------------------------------- mask enforcement


def _half_masks(model: nn.Module):
    masks = full_masks(prunable_weights(model))
    return global_topk(magnitude(model, masks), masks, count(masks)[0] // 2)


@pytest.mark.parametrize("with_hook", [True, False])
def test_masked_weights_stay_exactly_zero_through_fit(with_hook):
    model = tiny_net()
    masks = _half_masks(model)
    apply_masks(model, masks)
    hooks = [MaskHook(masks)] if with_hook else []
    fit(model, batches(6), None, replace(OPT, epochs=3), RT, hooks=hooks)
    assert masked_weights_zero(model, masks) == with_hook


@pytest.mark.parametrize("with_hook", [True, False])
def test_masked_weights_stay_exactly_zero_manual_loop(with_hook):
    model = tiny_net(1)
    masks = _half_masks(model)
    hook = MaskHook(masks)
    hook.on_start(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for x, y in batches(20, seed=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if with_hook:
            hook.before_step(model)
        opt.step()
        if with_hook:
            hook.after_step(model)
    assert masked_weights_zero(model, masks) == with_hook
    if with_hook:  # momentum buffers of pruned weights stay clean too
        params = dict(model.named_parameters())
        assert all(bool((opt.state[params[n]]["momentum_buffer"][~m] == 0).all()) for n, m in masks.items())


# ---------------------------------------------------------------- IMP


def test_imp_levels_exact_and_shrinking(tmp_path):
    run = FakeRun(tmp_path)
    model = tiny_net()
    ctx = run.ctx(model, "imp", 0.59)
    total = count(ctx.masks)[1]
    levels = STRATEGIES.get("imp")(ctx)
    assert [lv.index for lv in levels] == [1, 2, 3, 4]
    assert [count(lv.masks)[0] for lv in levels] == imp_alive_counts(total, 0.59)
    for k, lv in enumerate(levels, 1):
        assert lv.sparsity == pytest.approx(1 - 0.8**k, abs=1.0 / total)
        for key in ("val_acc", "test_acc", "epochs", "steps", "wall_s"):
            assert key in lv.metrics
    prev = ctx.masks
    for lv in levels:
        assert same_or_subset(prev, lv.masks)
        prev = lv.masks
    assert masked_weights_zero(model, levels[-1].masks)
    assert run.calls == ["level_1", "level_2", "level_3", "level_4"]


def test_imp_resume_loads_finished_levels(tmp_path):
    store: dict = {}
    first = FakeRun(tmp_path, store, fail_at_call=3)
    with pytest.raises(KeyboardInterrupt):
        STRATEGIES.get("imp")(first.ctx(tiny_net(), "imp", 0.59))
    assert sorted(store) == [1, 2]
    saved = {k: {n: m.clone() for n, m in store[k][1].items()} for k in store}

    again = FakeRun(tmp_path, store)
    levels = STRATEGIES.get("imp")(again.ctx(tiny_net(), "imp", 0.59))
    assert again.calls == ["level_3", "level_4"]  # 1 and 2 loaded, not retrained
    for k in (1, 2):
        assert all(torch.equal(levels[k - 1].masks[n], saved[k][n]) for n in saved[k])
    assert [count(lv.masks)[0] for lv in levels] == imp_alive_counts(count(levels[0].masks)[1], 0.59)
    assert same_or_subset(levels[1].masks, levels[2].masks)


def test_imp_weight_rewind(tmp_path):
    early = tiny_net(seed=7)
    tdir = tmp_path / "teacher"
    save_model(tdir / "epoch_2.safetensors", early)
    run = FakeRun(tmp_path)
    levels = STRATEGIES.get("imp_weight_rewind")(run.ctx(tiny_net(), "imp_weight_rewind", 0.36, {"rewind_epoch": 2}, teacher_dir=tdir))
    assert len(levels) == 2
    for state, lv in zip(run.start_states, levels):
        for n, m in lv.masks.items():  # survivors start each retraining at the epoch-2 weights
            assert torch.equal(state[n][m], early.state_dict()[n][m])
            assert bool((state[n][~m] == 0).all())


def test_imp_weight_rewind_errors(tmp_path):
    run = FakeRun(tmp_path)
    with pytest.raises(ConfigError, match="rewind_epoch: required"):
        STRATEGIES.get("imp_weight_rewind")(run.ctx(tiny_net(), "imp_weight_rewind", 0.36, teacher_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"epoch_3\.safetensors not found") as e:
        STRATEGIES.get("imp")(run.ctx(tiny_net(), "imp", 0.36, {"rewind": "weight", "rewind_epoch": 3}, teacher_dir=tmp_path))
    assert "\n" not in str(e.value)
    save_model(tmp_path / "epoch_1.safetensors", build_model("vgg", 10, 1, plan=[4]))
    with pytest.raises(ConfigError, match="does not fit"):
        STRATEGIES.get("imp_weight_rewind")(run.ctx(tiny_net(), "imp_weight_rewind", 0.36, {"rewind_epoch": 1}, teacher_dir=tmp_path))
    with pytest.raises(ConfigError, match="rewind"):
        STRATEGIES.get("imp")(run.ctx(tiny_net(), "imp", 0.36, {"rewind": "sometimes"}))


def test_imp_finetune_uses_constant_small_lr(tmp_path):
    seen = []
    run = FakeRun(tmp_path)
    orig = run.train
    run.train = lambda m, mk, name, optim, hooks: (seen.append(optim), orig(m, mk, name, optim, hooks))[1]
    STRATEGIES.get("imp_finetune")(run.ctx(tiny_net(), "imp_finetune", 0.2, {"finetune_lr": 0.003}))
    assert seen and all(o.lr == 0.003 and o.milestones == () for o in seen)


# ---------------------------------------------------------------- every strategy

STRATEGY_OPTIONS = {"imp_weight_rewind": {"rewind_epoch": 0}, "gmp": {"frequency_steps": 1}, "synflow": {"iterations": 20}, "snip": {"batches": 2}}
LAYERWISE = {"oneshot_layerwise"}


@pytest.mark.parametrize("target", [0.5, 0.8])
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_hits_target(tmp_path, name, target):
    tdir = tmp_path / "teacher"
    save_model(tdir / "epoch_0.safetensors", tiny_net(seed=5))
    run = FakeRun(tmp_path)
    model = tiny_net()
    retrain = replace(OPT, epochs=2 if name == "gmp" else 1)
    ctx = run.ctx(model, name, target, dict(STRATEGY_OPTIONS.get(name, {})), teacher_dir=tdir, extra={"steps_per_epoch": SPE},
                  retrain=retrain)
    start = {n: m.clone() for n, m in ctx.masks.items()}
    alive0, total = count(start)
    levels = STRATEGIES.get(name)(ctx)
    assert levels and run.calls  # trained at least once
    final = levels[-1].masks
    if name.startswith("imp"):
        assert [count(lv.masks)[0] for lv in levels] == imp_alive_counts(total, target)
    elif name in LAYERWISE:
        for n, m in final.items():
            assert abs(int(m.sum()) - (1 - target) * m.numel()) <= 0.5 + 1e-9
    else:
        assert count(final)[0] == round(total * (1 - target))  # global count exact
    prev = start
    for lv in levels:
        assert same_or_subset(prev, lv.masks)
        prev = lv.masks
        for key in ("val_acc", "test_acc", "epochs", "steps", "wall_s"):
            assert key in lv.metrics, (name, key)
    assert masked_weights_zero(model, final)
    assert sorted(run.store) == [lv.index for lv in levels]
    # A re-run loads every finished level and trains nothing.
    again = FakeRun(tmp_path, run.store)
    relevels = STRATEGIES.get(name)(again.ctx(tiny_net(), name, target, dict(STRATEGY_OPTIONS.get(name, {})), teacher_dir=tdir,
                                              extra={"steps_per_epoch": SPE}, retrain=retrain))
    assert again.calls == []
    assert all(torch.equal(relevels[-1].masks[n], final[n]) for n in final)


def test_random_layerwise_and_seeded(tmp_path):
    run = FakeRun(tmp_path)
    lv = STRATEGIES.get("random")(run.ctx(tiny_net(), "random", 0.7, {"layerwise": True, "seed": 3}))[-1]
    for n, m in lv.masks.items():
        assert abs(int(m.sum()) - 0.3 * m.numel()) <= 0.5 + 1e-9
    masks = full_masks(prunable_weights(tiny_net()))
    a = random_scores(masks, torch.Generator().manual_seed(1))
    b = random_scores(masks, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[n], b[n]) for n in masks)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_unknown_option_is_a_config_error(tmp_path, name):
    ctx = FakeRun(tmp_path).ctx(tiny_net(), name, 0.5, {"nonsense": 1})
    with pytest.raises(ConfigError, match=r"prune\.options\.nonsense: unknown option .* valid: ") as e:
        STRATEGIES.get(name)(ctx)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_empty_prunable_set_is_a_config_error(tmp_path, name):
    run = FakeRun(tmp_path)
    ctx = run.ctx(nn.Sequential(nn.Flatten(), nn.ReLU()), name, 0.5, dict(STRATEGY_OPTIONS.get(name, {})), teacher_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"prune: no prunable weights .*valid: "):
        STRATEGIES.get(name)(ctx)
    assert run.calls == []


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        STRATEGIES.get("magic")
    for name in ("imp", "oneshot", "gmp", "synflow", "snip", "random", "imp_weight_rewind", "imp_finetune", "oneshot_layerwise"):
        assert name in str(e.value)


def test_exclude_first_last_respected(tmp_path):
    run = FakeRun(tmp_path)
    model = tiny_net()
    ctx = run.ctx(model, "oneshot", 0.5, exclude_first=True, exclude_last=True)
    lv = STRATEGIES.get("oneshot")(ctx)[-1]
    assert list(lv.masks) == ["features.4.weight"]
    assert int((model.features[0].weight != 0).sum()) == model.features[0].weight.numel()


# ---------------------------------------------------------------- scores against hand computation


def test_snip_equals_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3, bias=False))
    W = net[0].weight.detach().clone()
    masks = {"0.weight": torch.ones(3, 5, dtype=torch.bool)}
    masks["0.weight"][1, 2] = False
    with torch.no_grad():
        net[0].weight[1, 2] = 0.0
        W[1, 2] = 0.0
    bs = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    # d CE(XW^T, y) / dW = (softmax(XW^T) - onehot(y))^T X / B, averaged over the two batches.
    g = sum((F.softmax(x @ W.T, 1) - F.one_hot(y, 3).float()).T @ x / len(y) for x, y in bs) / 2
    got = snip(net, masks, bs)["0.weight"]
    assert torch.allclose(got, (g * W).abs(), atol=1e-6)
    assert got[1, 2] == 0
    assert net[0].weight.grad is None


def test_synflow_equals_analytic_two_layer_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    W1, W2 = net[0].weight.detach().double().abs(), net[2].weight.detach().double().abs()
    masks = full_masks(prunable_weights(net))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = synflow(net, masks, (4,))
    # R = 1^T |W2| |W1| 1, so dR/d|W1|_ij = (1^T |W2|)_i and dR/d|W2|_ki = (|W1| 1)_i.
    assert torch.allclose(s["0.weight"], W2.sum(0)[:, None] * W1, rtol=1e-12)
    assert torch.allclose(s["2.weight"], W2 * W1.sum(1)[None, :], rtol=1e-12)
    assert s["0.weight"].dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # weights untouched
    # Conservation: every layer's scores sum to R.
    R = (W2 @ W1).sum()
    assert torch.allclose(s["0.weight"].sum(), R) and torch.allclose(s["2.weight"].sum(), R)
    # A masked weight scores 0 and its removal shows in the others' scores.
    masks["0.weight"][0, 0] = False
    s2 = synflow(net, masks, (4,))
    assert s2["0.weight"][0, 0] == 0


def test_synflow_equals_direct_autograd_on_conv_bn():
    net = tiny_net(2)
    net.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        net(torch.randn(8, 1, 8, 8))
    masks = full_masks(prunable_weights(net))
    masks["features.4.weight"][0] = False
    apply_masks(net, masks)
    s = synflow(net, masks, (1, 8, 8))
    assert net.training  # mode restored
    ref = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    params = dict(ref.named_parameters())
    ref(torch.ones(1, 1, 8, 8, dtype=torch.float64)).sum().backward()
    for n in masks:
        assert torch.allclose(s[n], (params[n].grad * params[n]).abs(), rtol=1e-10, atol=0)
    assert bool((s["features.4.weight"][0] == 0).all())


# ---------------------------------------------------------------- GMP


def test_gmp_cubic_schedule_matches_formula():
    s_i, s_f, t0, n, dt = 0.0, 0.8, 10, 5, 4
    for t in (10, 14, 18, 22, 26, 30):
        want = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic_sparsity(t, s_i, s_f, t0, t0 + n * dt) == pytest.approx(want, abs=1e-15)
    assert cubic_sparsity(5, s_i, s_f, t0, 30) == s_i
    assert cubic_sparsity(99, s_i, s_f, t0, 30) == s_f
    assert cubic_sparsity(20, 0.2, 0.9, t0, 30) == pytest.approx(0.9 + (0.2 - 0.9) * 0.5**3)


def _drive(hook: GMPHook, model: nn.Module, steps: int, spe: int, start_step: int = 0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    data = batches(spe)
    mh = MaskHook(hook.masks)
    alive = []
    for t in range(start_step, steps):
        x, y = data[t % spe]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mh.before_step(model)
        opt.step()
        mh.after_step(model)
        hook.after_step(model)
        alive.append(count(hook.masks)[0])
        if (t + 1) % spe == 0 and hasattr(hook, "end_epoch"):  # optional, as fit calls hooks
            hook.end_epoch((t + 1) // spe - 1, {})
    return alive


def test_gmp_hook_follows_schedule_in_place_and_round_trips():
    model = tiny_net()
    masks = full_masks(prunable_weights(model))
    total = count(masks)[1]
    hook = GMPHook(masks, 0.8, start_epoch=1, end_epoch=3, frequency_steps=2, steps_per_epoch=SPE)
    hook.on_start(model)
    alive = _drive(hook, model, 4 * SPE, SPE)
    # Events at t0 = 3, 5, 7 and the window end 9; counts follow round(total * (1 - s_t)).
    for t in range(1, 4 * SPE + 1):
        if t < 3:
            assert alive[t - 1] == total
        elif t in (3, 5, 7):
            assert alive[t - 1] == round(total * (1 - cubic_sparsity(t, 0.0, 0.8, 3, 9)))
        elif t >= 9:
            assert alive[t - 1] == round(total * 0.2)  # exact final count
    assert all(a >= b for a, b in zip(alive, alive[1:]))  # only shrinks
    assert masked_weights_zero(model, masks)
    assert hook.masks is masks  # the dict MaskHook holds was updated in place

    # state round trip: a fresh hook over fresh dense masks takes the state back exactly
    state = hook.state_dict()
    fresh = full_masks(prunable_weights(model))
    other = GMPHook(fresh, 0.8, 1, 3, 2, None)
    other.load_state_dict(state)
    assert other.step == hook.step and other.spe == SPE
    assert all(torch.equal(fresh[n], masks[n]) for n in masks)


def test_gmp_resume_mid_ramp_restores_masks_and_clock():
    def make():
        model = tiny_net()
        m = full_masks(prunable_weights(model))
        return model, m, GMPHook(m, 0.7, 0, 3, 1, SPE)

    model, masks, hook = make()
    hook.on_start(model)
    _drive(hook, model, SPE, SPE)  # one epoch, then "killed"
    state = hook.state_dict()
    assert count(masks)[0] < count(masks)[1]  # the ramp had started
    _, masks2, hook2 = make()  # restarted process: weights come from the checkpoint, masks from the hook
    hook2.load_state_dict(state)
    hook2.on_start(model)
    assert hook2.step == SPE and all(torch.equal(masks2[n], masks[n]) for n in masks)
    alive = _drive(hook2, model, 4 * SPE, SPE, start_step=SPE)
    assert alive[0] <= count(masks)[0]
    assert alive[-1] == round(count(masks2)[1] * 0.3)
    assert masked_weights_zero(model, masks2)


def test_gmp_flags_best_epoch_before_final_masks(tmp_path):
    run = FakeRun(tmp_path)
    orig = run.train
    run.train = lambda *a: {**orig(*a), "best_epoch": 1, "val_acc": 0.9}  # best-val epoch inside the ramp
    ctx = run.ctx(tiny_net(), "gmp", 0.5, {"frequency_steps": 1, "end_epoch": 2}, extra={"steps_per_epoch": SPE}, retrain=replace(OPT, epochs=3))
    ctx.evaluate = lambda m: {"val_acc": 0.25, "test_acc": 0.125}
    lv = STRATEGIES.get("gmp")(ctx)[-1]
    assert lv.metrics["best_epoch_before_final_mask"] is True
    assert lv.metrics["val_acc"] == 0.25 and lv.metrics["test_acc"] == 0.125  # re-measured on the final masks


def test_gmp_option_checks(tmp_path):
    run = FakeRun(tmp_path)
    with pytest.raises(ConfigError, match="end_epoch"):
        STRATEGIES.get("gmp")(run.ctx(tiny_net(), "gmp", 0.5, {"end_epoch": 5}))
    with pytest.raises(ConfigError, match="frequency_steps"):
        STRATEGIES.get("gmp")(run.ctx(tiny_net(), "gmp", 0.5, {"frequency_steps": 0}))
    with pytest.raises(ConfigError, match="integer"):
        STRATEGIES.get("gmp")(run.ctx(tiny_net(), "gmp", 0.5, {"start_epoch": "soon"}))


# ---------------------------------------------------------------- report


def test_layer_table_and_json():
    model = tiny_net()
    masks = full_masks(prunable_weights(model))
    masks = global_topk(magnitude(model, masks), masks, 500)
    table = layer_table(masks)
    lines = table.splitlines()
    for n, m in masks.items():
        row = next(l for l in lines if l.startswith(n))
        assert str(m.numel()) in row and str(int(m.sum())) in row
    last = lines[-1].split()
    assert last[0] == "total" and last[1] == "1384" and last[2] == "500"
    assert float(last[3]) == pytest.approx(100 * (1 - 500 / 1384), abs=0.005)
    assert len({len(l) for l in lines if l.startswith("-")}) == 1
    js = layer_json(masks)
    assert [r["layer"] for r in js] == list(masks)
    assert sum(r["alive"] for r in js) == 500 and js[1]["shape"] == [16, 8, 3, 3]
    assert math.isclose(sum(r["total"] for r in js), 1384)


def test_strategies_declare_what_the_sweep_needs():
    from ptd.pruning import SPECS

    assert {n for n in SPECS.names() if SPECS.get(n).nested_levels} == {"imp", "imp_weight_rewind", "imp_finetune"}
    weight = {"imp": {"rewind": "weight", "rewind_epoch": 2}, "imp_weight_rewind": {"rewind_epoch": 2}}
    snap = {n: SPECS.get(n).snapshot_epoch(strategy_options(n, weight.get(n, {}))) for n in SPECS.names()}
    assert snap == {n: (2 if n in ("imp", "imp_weight_rewind") else None) for n in SPECS.names()}
    assert {n for n in SPECS.names() if SPECS.get(n).rounds} == {"imp", "imp_weight_rewind", "imp_finetune"}
    # imp's rewind_epoch under learning-rate rewinding is unused: no snapshot is asked for (a sweep
    # once saved that epoch in place of the one another strategy needed).
    assert SPECS.get("imp").snapshot_epoch(strategy_options("imp", {"rewind_epoch": 2})) is None


def test_a_sweep_keeps_every_rewind_epoch_its_strategies_need(tmp_path, tiny_fashion):
    """Two weight-rewinding strategies at epochs 1 and 2: the teacher keeps both (it kept only the
    first declared, and the second strategy failed after the teacher had trained)."""
    import yaml

    from conftest import tiny_config
    from ptd.config import load_config
    from ptd.pipeline import make_context, snapshot_epochs, stage_teacher

    cfg = tiny_config(tiny_fashion, prune={"options": {"imp_weight_rewind": {"rewind_epoch": 2},
                                                       "imp": {"rewind": "weight", "rewind_epoch": 1}}})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    cfg = load_config(str(p))
    assert snapshot_epochs(cfg, ["imp_weight_rewind", "imp", "oneshot"]) == (1, 2)
    assert snapshot_epochs(cfg, ["oneshot"]) == ()
    ctx = make_context(cfg, tmp_path / "run")
    stage_teacher(ctx, snapshot=snapshot_epochs(cfg, ["imp_weight_rewind", "imp"]))
    assert sorted(f.name for f in (tmp_path / "run" / "teacher").glob("epoch_*")) == ["epoch_1.safetensors", "epoch_2.safetensors"]


def test_strategy_options_are_typed_frozen_and_validated():
    import dataclasses

    o = strategy_options("gmp", {"end_epoch": 3})
    assert (o.start_epoch, o.end_epoch, o.frequency_steps) == (0, 3, 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.end_epoch = 4
    assert strategy_options("imp", {"finetune_lr": 1}).finetune_lr == 1.0  # ints are numbers
    with pytest.raises(ConfigError, match=r"^prune\.options\.batches: 0 must be >= 1$"):
        strategy_options("snip", {"batches": 0})
    with pytest.raises(ConfigError, match=r"^prune\.options\.rewind: 'sometimes' is not one of lr, weight, finetune$"):
        strategy_options("imp", {"rewind": "sometimes"})
    with pytest.raises(ConfigError, match=r"prune\.options\.rewind: unknown option for strategy 'imp_weight_rewind'; valid: rewind_epoch"):
        strategy_options("imp_weight_rewind", {"rewind": "lr"})
    with pytest.raises(ConfigError, match=r"prune\.options\.layerwise .*expected true or false"):
        strategy_options("random", {"layerwise": 1})


def test_masks_loaded_for_a_model_come_back_in_its_parameter_order(tmp_path: Path):
    """safetensors sorts keys by name ('classifier.weight' before 'features.0.weight'); a level
    resumed from disk must give the next level the fresh run's order, or a killed and resumed run
    writes another sparsity table (and orders the global scores differently) than one never killed."""
    from ptd.pruning.masks import full_masks, load_masks, prunable_weights, save_masks

    model = build_model("vgg11", num_classes=10, in_channels=1, width=0.25)
    masks = full_masks(prunable_weights(model))
    save_masks(tmp_path / "m.safetensors", masks)
    fresh_order = list(masks)
    assert fresh_order[0].startswith("features.") and fresh_order[-1].startswith("classifier")
    assert list(load_masks(tmp_path / "m.safetensors")) == sorted(fresh_order)  # what the file alone gives
    back = load_masks(tmp_path / "m.safetensors", model)
    assert list(back) == fresh_order
    assert all(torch.equal(back[n], masks[n]) for n in masks)


def test_preflight_runs_what_a_strategy_declares_and_knows_none_by_name(monkeypatch):
    """preflight held a list of round-based strategies and checked imp's rewind epoch and GMP's ramp
    by name, so a new strategy got none of it. Now each declares rounds and its own check when it
    registers (StrategySpec), and preflight runs them for the run and for every strategy of a sweep."""
    from ptd.config import ConfigError, load_config
    from ptd.preflight import check_pruning
    from ptd.pruning import SPECS, STRATEGIES, StrategySpec

    seen = []

    def check(name, options, cfg):
        seen.append((name, dict(options)))
        if options.get("bad"):
            raise ConfigError(f"prune.options.bad: {name} says no")

    monkeypatch.setitem(SPECS._items, "roundabout", StrategySpec(rounds=True, check=check))
    monkeypatch.setitem(STRATEGIES._items, "roundabout", lambda ctx: [])
    cfg = load_config(None, ["prune.strategy=roundabout", "prune.target_sparsity=0.05", "prune.rate=0.2"])
    with pytest.raises(ConfigError, match="prune.target_sparsity: 0.05 is less than one pruning round: roundabout"):
        check_pruning(cfg)
    check_pruning(load_config(None, ["prune.strategy=roundabout", "prune.options={x: 1}"]))
    assert seen[-1] == ("roundabout", {"x": 1})
    with pytest.raises(ConfigError, match="roundabout says no"):
        check_pruning(load_config(None, ["prune.strategy=roundabout", "prune.options={bad: 1}"]))
    # A sweep: each strategy's own section.
    sweep = load_config(None, ["sweep.strategies=[oneshot, roundabout]", "sweep.sparsities=[0.5]",
                               "prune.options={roundabout: {bad: 1}}"])
    with pytest.raises(ConfigError, match="roundabout says no"):
        check_pruning(sweep, sweep=True)
    # The registered ones: imp's rewind epoch and GMP's ramp, with the messages they had.
    with pytest.raises(ConfigError, match=r"rewind_epoch: required for weight rewinding \(imp_weight_rewind\)"):
        check_pruning(load_config(None, ["prune.strategy=imp_weight_rewind"]))
    # A loaded teacher has no early weights: said first, with the strategy that works. Asking for a
    # rewind_epoch led the user from that refusal straight into this one (new-user audit).
    for sets, words in ((["prune.strategy=imp_weight_rewind"], "prune.strategy: imp_weight_rewind rewinds"),
                        (["prune.strategy=imp_weight_rewind", "prune.options={rewind_epoch: 1}"], "use prune.strategy: imp"),
                        (["prune.options={rewind: weight}"], "prune.options.rewind: 'weight' rewinds")):
        with pytest.raises(ConfigError, match=r"is loaded, not trained here, so it has none") as e:
            check_pruning(load_config(None, sets + ["teacher.checkpoint=/nowhere/t.safetensors"]))
        assert str(e.value).startswith(words) or words in str(e.value), str(e.value)
    # A sweep's per-strategy section in a run was read as one plain option: "rewind_epoch: required".
    with pytest.raises(ConfigError, match=r"^prune\.options\.imp_weight_rewind: per-strategy sections are for ptd sweep"):
        check_pruning(load_config(None, ["prune.strategy=imp_weight_rewind", "prune.options={imp_weight_rewind: {rewind_epoch: 1}}"]))
    with pytest.raises(ConfigError, match=r"prune\.options\.end_epoch: 9 must be > start_epoch"):
        check_pruning(load_config(None, ["prune.strategy=gmp", "prune.options={end_epoch: 9}", "prune.retrain.epochs=4"]))


def test_a_rewind_to_init_added_mid_teacher_gets_the_initialization(tmp_path, tiny_fashion, monkeypatch):
    """A sweep grown while its teacher was mid-training by a strategy that rewinds to epoch 0: the
    hook it adds has no saved state, and it saved the resumed (trained) weights as epoch 0, so
    rewinding silently went elsewhere. The teacher stage now saves the seeded initialization."""
    import yaml

    from conftest import Kill, KillAfter, tiny_config
    from ptd.config import load_config
    from ptd.pipeline import Context, make_context, seed_everything, stage_teacher
    from ptd.seeding import stream_seed
    from ptd.train.checkpoint import load_tensors

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tiny_fashion)))
    cfg = load_config(str(p))
    ctx = make_context(cfg, tmp_path / "run")
    real = Context.fit

    def killed(self, *a, hooks=(), **k):
        return real(self, *a, hooks=[*hooks, KillAfter(2)], **k)

    monkeypatch.setattr(Context, "fit", killed)
    with pytest.raises(Kill):
        stage_teacher(ctx, snapshot=())  # the sweep as it was: no rewinding strategy
    monkeypatch.setattr(Context, "fit", real)
    stage_teacher(ctx, snapshot=(0,))  # grown by one that rewinds to the initialization
    seed_everything(stream_seed(cfg.seed, "teacher_init", 0))
    init = ctx.new_model(cfg.teacher.model).state_dict()
    saved = load_tensors(tmp_path / "run" / "teacher" / "epoch_0.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in init.items() if k in saved) and len(saved) > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy,options", [("imp_finetune", {"finetune_lr": 0.003}), ("imp", {"rewind": "finetune"}),
                                              ("imp", {})])
def test_the_control_teacher_retrains_as_the_strategy_does(tmp_path, tiny_fashion, monkeypatch, strategy, options):
    """The control (retrained_teacher) is the same training without the pruning, but it always took
    prune.retrain: with imp_finetune (rounds at a constant 1e-3) it trained at lr 0.1 with decay,
    and measured the schedule, not the pruning (review). Each control round now trains with the
    optimizer the pruning rounds trained with, as the strategy declares it."""
    import dataclasses

    import yaml

    from conftest import tiny_config
    from ptd.config import load_config
    from ptd.pipeline import Context, run_pipeline
    from ptd.pruning import retrain_optim

    seen: dict[str, list] = {"prune": [], "control": []}
    real = Context.fit

    def spy(self, model, optim, out_dir, seed, desc, **kw):
        kind = desc.split(" ")[0]
        if kind in seen:
            seen[kind].append(optim)
        return real(self, model, optim, out_dir, seed, desc, **kw)

    monkeypatch.setattr(Context, "fit", spy)
    cfg = tiny_config(tiny_fashion, threads=1, distill={"seeds": [0], "arms": ["retrained_teacher"],
                                                        "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
    cfg["teacher"]["optim"]["epochs"] = 1
    cfg["teacher"]["optim"]["milestones"] = []
    cfg["prune"].update(strategy=strategy, options=options, target_sparsity=0.36,
                        retrain={"epochs": 2, "batch_size": 64, "lr": 0.02, "milestones": [1]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "c.yaml")
    run_pipeline(c, tmp_path / "run")
    assert len(seen["prune"]) == len(seen["control"]) == 2  # two rounds each
    assert seen["control"] == seen["prune"]
    finetune = strategy == "imp_finetune" or options.get("rewind") == "finetune"
    want = (dataclasses.replace(c.prune.retrain, lr=options.get("finetune_lr", 1e-3), milestones=()) if finetune
            else c.prune.retrain)
    assert retrain_optim(c.prune) == want and seen["control"][0] == want


def test_every_strategy_declares_the_optimizer_its_rounds_retrain_with():
    """One source for each round's optimizer: the strategy trains with it and the control replays it."""
    import dataclasses

    from ptd.config import OptimConfig, PruneConfig
    from ptd.pruning import SPECS, retrain_optim

    base = OptimConfig(epochs=3, lr=0.1, milestones=(2,))
    for name in SPECS.names():
        opts = {"rewind_epoch": 1} if name == "imp_weight_rewind" else {}
        got = retrain_optim(PruneConfig(strategy=name, options=opts, retrain=base))
        fine = name == "imp_finetune"
        assert got == (dataclasses.replace(base, lr=1e-3, milestones=()) if fine else base), name


def test_the_mask_hook_follows_a_mask_replaced_twice_between_steps():
    """The hook's cache was keyed on id() of the mask tensors: a mask replaced twice between two
    steps got the freed tensor's id back, the stale factors were applied and the newly pruned
    weights stayed (review). Every replacement now zeroes what it prunes."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 2, bias=False))
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    hook = MaskHook(masks)
    hook.on_start(model)
    hook.after_step(model)
    for trial in range(50):
        for k in range(2):  # the first replacement is freed by the second: its id is free again
            m = masks["0.weight"].clone()
            m.view(-1)[(trial * 2 + k) % 36] = False
            masks["0.weight"] = m
            gc.collect()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # every weight non-zero before the step's re-masking
        hook.after_step(model)
        assert torch.equal(model[0].weight == 0, ~masks["0.weight"]), trial


def test_gmp_needs_the_steps_per_epoch_before_its_first_step():
    """Without it the hook measured it at the first epoch's end and caught up on the missed events
    there, after validation: that epoch's saved weights were not the ones it scored (review). The
    pipeline always passes it; a library caller that does not is told to."""
    model = tiny_net()
    hook = GMPHook(full_masks(prunable_weights(model)), 0.5, 0, 1, 1, None)
    with pytest.raises(ValueError, match="steps_per_epoch is required"):
        hook.on_start(model)


@pytest.mark.slow
def test_a_control_an_older_ptd_started_with_another_optimizer_is_refused_not_mixed(tmp_path, tiny_fashion, capsys):
    """ptd before the control replayed the strategy's optimizer trained every control with
    prune.retrain's. An imp_finetune control it left unfinished, resumed, mixed the two: finished
    rounds at lr 0.02, the rest at finetune_lr, a half-trained round restoring the old optimizer
    state (review). control/optim.json now records the optimizer before round 1; an unrecorded,
    started control is refused where the strategy's optimizer differs, and adopted where it is
    prune.retrain's (the same training: the same model byte for byte)."""
    import yaml

    from conftest import tiny_config
    from ptd.cli import main

    def run(strategy, out):
        cfg = tiny_config(tiny_fashion, threads=1, distill={"seeds": [0], "arms": ["retrained_teacher"],
                                                            "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05}})
        cfg["teacher"]["optim"].update(epochs=1, milestones=[])
        cfg["prune"].update(strategy=strategy, target_sparsity=0.36, retrain={"epochs": 1, "batch_size": 64, "lr": 0.02})
        (tmp_path / f"{strategy}.yaml").write_text(yaml.safe_dump(cfg))
        return main(["run", str(tmp_path / f"{strategy}.yaml"), "--out", str(out), "--quiet"])

    def as_if_an_older_ptd_left_it_unfinished(out):
        c = out / "control"
        for f in ("done", "result.json", "model.safetensors", "optim.json"):
            (c / f).unlink()
        for f in (out / "distill").iterdir():
            shutil.rmtree(f)
        for f in ("results.json", "report.md", "report.html"):
            (out / f).unlink()

    import json
    import shutil

    for strategy, refused in (("imp_finetune", True), ("imp", False)):
        out = tmp_path / strategy
        assert run(strategy, out) == 0
        rec = json.loads((out / "control" / "optim.json").read_text())
        assert rec["lr"] == (0.001 if strategy == "imp_finetune" else 0.02) and rec["milestones"] == []
        model = (out / "control" / "model.safetensors").read_bytes()
        as_if_an_older_ptd_left_it_unfinished(out)
        if refused:
            capsys.readouterr()
            assert run(strategy, out) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"ptd: error: {out / 'control'}: an unfinished control teacher started by an older ptd, which "
                           f"retrained it with prune.retrain's optimizer, where imp_finetune's rounds train with another (lr "
                           f"0.02 there, 0.001 here); delete {out / 'control'} to retrain it, or pass --out a new directory"), err
            assert not (out / "control" / "done").exists()
        else:
            assert run(strategy, out) == 0
            assert (out / "control" / "model.safetensors").read_bytes() == model
            assert json.loads((out / "control" / "optim.json").read_text()) == rec
