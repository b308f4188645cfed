"""Comparisons as estimates: hand-computed intervals, and simulations of the false-positive rate
and the power of the call (vectorized numpy, seeded; well under a second each)."""
import math
import subprocess
import sys

import numpy as np
import pytest

from ptd.report.stats import (METHOD_T, METHOD_TEACHERS, format_estimate, hierarchical_estimate, paired_estimate, sign_flip_p,
                              t_interval, t_quantile)

SIMS = 20_000
ALPHA = 0.05
# Three binomial standard errors above 5% at 20,000 simulations: 0.05 + 3 * sqrt(0.05 * 0.95 / 20000) = 0.0546.
FPR_LIMIT = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / SIMS)


def called(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo > 0) | (hi < 0)


def test_t_quantiles_match_tables():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(9) == pytest.approx(2.2622, abs=1e-4)


def test_interval_by_hand():
    # d = 1, 2, 3 points: mean 2, sd 1, se 1/sqrt(3) = 0.57735, t(0.975, 2) = 4.30265
    # -> half-width 2.48413: the interval [-0.484, 4.484] includes zero, so no call. (The old rule,
    # "all seeds agree and the mean is over 2 SE", called this one.)
    e = paired_estimate([0.01, 0.02, 0.03])
    assert e["mean"] == pytest.approx(0.02) and e["n"] == 3 and e["df"] == 2 and e["method"] == METHOD_T
    assert e["sd"] == pytest.approx(0.01) and e["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert e["ci_low"] == pytest.approx(0.02 - 0.0248413, abs=1e-7) and e["ci_high"] == pytest.approx(0.02 + 0.0248413, abs=1e-7)
    assert not e["called"] and e["direction"] == 0 and e["level"] == 0.95
    assert e["sign_flip_p"] == pytest.approx(2 / 8)  # only all-plus and all-minus reach |mean| 2
    assert format_estimate(e) == "+2.00 points, 95% CI [-0.48, +4.48] (paired t, n=3)"


def test_tight_differences_are_called_with_their_sign():
    # mean -2, sd 0.1581, n 5: half-width 2.7764 * 0.1581 / sqrt(5) = 0.1963 points
    e = paired_estimate([-0.020, -0.021, -0.019, -0.022, -0.018])
    assert e["called"] and e["direction"] == -1
    assert e["ci_high"] == pytest.approx(-0.02 + 0.001963, abs=1e-6)
    assert e["sign_flip_p"] == pytest.approx(2 / 32)


def test_one_seed_gives_no_interval():
    e = paired_estimate([0.05])
    assert e["ci_low"] is None and e["ci_high"] is None and not e["called"] and e["n"] == 1
    assert e["sign_flip_p"] == 1.0
    with pytest.raises(ValueError):
        paired_estimate([])


def test_sign_flip_p_by_enumeration():
    # d = (3, -1, 2): |sum| 4. Patterns (+-1) of (3, 1, 2) with |sum| >= 4: sums 6, 4 (3-1+2),
    # 2 ... of the 8 sign patterns, |±3 ±1 ±2| is 6, 4, 2, 0, 0, 2, 4, 6 -> 4 reach 4.
    assert sign_flip_p([0.03, -0.01, 0.02]) == pytest.approx(4 / 8)
    assert sign_flip_p([0.0, 0.0]) == 1.0
    assert sign_flip_p(list(range(1, 18))) is None  # 2^17 patterns: not enumerated


def test_vectorized_interval_agrees_with_the_scalar_one():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(50, 6))
    m, lo, hi = t_interval(d)
    for i in range(50):
        e = paired_estimate(d[i])
        assert (e["mean"], e["ci_low"], e["ci_high"]) == pytest.approx((m[i], lo[i], hi[i]), abs=1e-12)
        assert e["called"] == bool(called(lo[i], hi[i]))


@pytest.mark.parametrize("n", range(2, 11))  # 2: the demo's two seeds (t with 1 df is exact too)
def test_false_positive_rate_under_the_null(n):
    """Pure noise (paired differences from one Gaussian, mean 0): called at most 5% of the time."""
    rng = np.random.default_rng(1000 + n)
    _, lo, hi = t_interval(rng.normal(0.0, 0.01, size=(SIMS, n)))
    rate = called(lo, hi).mean()
    assert rate <= FPR_LIMIT
    assert rate >= ALPHA - (FPR_LIMIT - ALPHA)  # and it is an honest 5%, not a timid 0%


def test_old_rule_was_not_honest():
    """The rule this replaces fired 18% of the time under pure noise at 3 seeds (issue 11)."""
    rng = np.random.default_rng(3)
    d = rng.normal(size=(SIMS, 3))
    se = d.std(axis=1, ddof=1) / math.sqrt(3)
    old = ((d > 0).all(1) | (d < 0).all(1)) & (np.abs(d.mean(1)) > 2 * se)
    assert old.mean() > 0.15


@pytest.mark.parametrize("n", range(5, 11))
def test_two_sd_difference_is_found(n):
    """A true difference of two noise SDs is called, in the right direction, most of the time."""
    rng = np.random.default_rng(2000 + n)
    _, lo, hi = t_interval(rng.normal(2.0, 1.0, size=(SIMS, n)))
    assert (lo > 0).mean() >= 0.8  # measured at 100,000 simulations: 0.91 at n = 5, above 0.99 from n = 7


def _nested(rng, sims, teachers, students, mu, sd_teacher, sd_student):
    u = rng.normal(0.0, sd_teacher, size=(sims, teachers, 1))
    return mu + u + rng.normal(0.0, sd_student, size=(sims, teachers, students))


@pytest.mark.parametrize("teachers,students", [(2, 3), (2, 5), (3, 5), (5, 3)])
def test_teacher_replicates_false_positive_rate(teachers, students):
    """Students nested in teachers, with a teacher effect twice the student noise: the interval over
    teacher means keeps 5%; pooling all students as if independent does not."""
    rng = np.random.default_rng(teachers * 100 + students)
    d = _nested(rng, SIMS, teachers, students, 0.0, 2.0, 1.0)
    _, lo, hi = t_interval(d.mean(axis=2))  # what hierarchical_estimate computes, vectorized
    assert called(lo, hi).mean() <= FPR_LIMIT
    _, lo_p, hi_p = t_interval(d.reshape(SIMS, teachers * students))
    assert called(lo_p, hi_p).mean() > 0.2  # the naive pooled interval calls noise a difference


def test_hierarchical_estimate_matches_the_vectorized_rule():
    rng = np.random.default_rng(7)
    d = _nested(rng, 30, 3, 4, 0.0, 2.0, 1.0)
    m, lo, hi = t_interval(d.mean(axis=2))
    for i in range(30):
        e = hierarchical_estimate({t: d[i, t] for t in range(3)})
        assert (e["mean"], e["ci_low"], e["ci_high"]) == pytest.approx((m[i], lo[i], hi[i]), abs=1e-12)
        assert e["n"] == 3 and e["teachers"] == 3 and e["students"] == 12 and e["method"] == METHOD_TEACHERS


def test_hierarchical_estimate_by_hand():
    # Teacher A: 1, 3 (mean 2); teacher B: 5, 7 (mean 6). Over teacher means: mean 4, sd 2.8284,
    # se 2, t(0.975, 1) = 12.7062 -> [4 - 25.41, 4 + 25.41]. Within variance: (1+1+1+1)/(4-2) = 2;
    # between mean square 2 * ((2-4)^2 + (6-4)^2) / 1 = 16, n0 = 2 -> teacher variance (16-2)/2 = 7.
    e = hierarchical_estimate({"A": [1.0, 3.0], "B": [5.0, 7.0]})
    assert e["mean"] == pytest.approx(4.0) and e["df"] == 1
    assert e["ci_low"] == pytest.approx(4 - 2 * 12.7062, abs=1e-3) and not e["called"]
    assert e["var_student"] == pytest.approx(2.0) and e["var_teacher"] == pytest.approx(7.0)
    assert e["per_teacher_mean"] == {"A": 2.0, "B": 6.0}


def test_one_teacher_falls_back_to_seeds_and_says_so():
    e = hierarchical_estimate({0: [0.01, 0.02, 0.03]})
    assert e["n"] == 3 and e["teachers"] == 1 and e["ci_low"] == pytest.approx(paired_estimate([0.01, 0.02, 0.03])["ci_low"])
    assert e["method"] == "paired t, one teacher"


def test_zero_spread_is_decided_by_the_sign_flip_test():
    """Identical differences give a zero-width t interval, which estimates no spread and cannot
    decide; the exact sign-flip test can (p = 2 / 2^n), so from 6 equal non-zero differences on it
    is a call. Ten seeds all 0.3 points apart read "no evidence either way" while 0.30 and 0.31
    were called (statistics audit, 2026-11-29)."""
    e = paired_estimate([0.001, 0.001, 0.001])
    assert e["ci_low"] == e["ci_high"] and not e["called"] and e["direction"] == 0
    h = hierarchical_estimate({0: [0.002, 0.0], 1: [0.0, 0.002]})
    assert h["ci_low"] == h["ci_high"] and not h["called"]
    assert not paired_estimate([0.001] * 5)["called"]  # p = 2/32 = 0.0625
    six = paired_estimate([-0.001] * 6)
    assert six["called"] and six["direction"] == -1 and six["sign_flip_p"] == pytest.approx(2 / 64)
    assert not paired_estimate([0.0] * 10)["called"]  # exactly no difference
    many = paired_estimate([0.003] * 17)  # past the enumeration's 16 values: 2 / 2^n all the same
    assert many["called"] and many["sign_flip_p"] == pytest.approx(2 / 2 ** 17)
    assert paired_estimate([0.003] * 1100)["called"]  # 2.0 ** 1100 overflowed a float
    h = hierarchical_estimate({t: [0.002, 0.004] for t in range(6)})  # six teachers, equal means
    assert h["called"] and h["n"] == 6
    with pytest.raises(ValueError, match="finite"):  # NaN read "+nan points", sign-flip p 0
        paired_estimate([float("nan"), 0.01, 0.02])


def _rule(d: np.ndarray) -> np.ndarray:
    """ptd's call on each row of d, vectorized: the t interval, or where it has no width the exact
    sign-flip test (all n values equal: p = 2 / 2^n)."""
    n = d.shape[-1]
    _, lo, hi = t_interval(d)
    flat = (hi - lo) <= 1e-12
    return np.where(flat, (d[..., 0] != 0) & (2.0 / 2 ** n < ALPHA), called(lo, hi))


def test_the_vectorized_rule_is_paired_estimates():
    rng = np.random.default_rng(11)
    for n in (2, 3, 6, 8):
        d = rng.integers(-1, 2, size=(400, n)) / 10000  # whole test images: ties and equal rows are common
        assert [paired_estimate(row)["called"] for row in d] == _rule(d).tolist()


@pytest.mark.parametrize("n", [2, 3, 5, 6, 8, 10])
def test_the_rule_keeps_its_level_on_whole_test_images(n):
    """Accuracies count whole test images, so differences are discrete and can tie. Under a null
    whose differences spread 2 test images (rounded Gaussian) the rule calls at most 5%, and the
    sign-flip fallback for rows of equal differences adds under 0.1% even at 1 image of spread. At
    a spread of 1 image the t interval itself reaches 5.1-6.3% at 6-8 seeds (measured at 100,000;
    differences that small are a handful of test images): README, "How sure is the answer"."""
    rng = np.random.default_rng(300 + n)
    d = np.round(rng.normal(0, 2.0, size=(SIMS, n))) / 10000
    assert _rule(d).mean() <= FPR_LIMIT
    d1 = np.round(rng.normal(0, 1.0, size=(SIMS, n))) / 10000
    _, lo, hi = t_interval(d1)
    assert (_rule(d1) & ((hi - lo) <= 1e-12)).mean() < 0.001
    assert _rule(d1).mean() <= 0.07


# What the 5% is of, measured: the rate per comparison under symmetric seed noise. The cases
# below are where a user's reading can go past it; the report and README state each.

def test_five_comparisons_at_95_percent_each_call_some_row_about_one_time_in_five():
    """With every arm the run report shows 5 paired comparisons among its 4 arms, each at 95%
    (control minus unpruned joined the 4 of before): under pure seed noise some row is called
    19-22% of the time (measured at 100,000: 22.2% at 2 seeds, 20.1% at 5, 19.3% at 10; the 4 of
    before, 16-19%), within the Bonferroni bound of 5 x 5% the report states. The Answer's three
    pruned-teacher rows are unchanged by the fifth: some one of them 13-14%."""
    from ptd.report import COMPARISONS, summarize

    arms = ["pruned_teacher", "unpruned_teacher", "retrained_teacher", "scratch"]
    assert len(COMPARISONS) == 5 and ("retrained_teacher", "unpruned_teacher") in COMPARISONS.values()
    for n, low, high in ((2, 0.205, 0.24), (5, 0.185, 0.22), (10, 0.175, 0.21)):
        rng = np.random.default_rng(400 + n)
        acc = 0.9 + rng.normal(0, 0.01, size=(SIMS, 1, n)) + rng.normal(0, 0.005, size=(SIMS, 4, n))  # seed effect + arm noise
        diffs = np.stack([acc[:, arms.index(a)] - acc[:, arms.index(b)] for a, b in COMPARISONS.values()], axis=1)
        any_call = _rule(diffs).any(axis=1)
        assert low <= any_call.mean() <= high < 0.05 * len(COMPARISONS), (n, any_call.mean())
        # The report's Answer gives the 3 pruned-teacher rows: some one of them 13-14% (100,000: 14.1% at 2, 12.8% at 10).
        answer = [i for i, (a, _) in enumerate(COMPARISONS.values()) if a == "pruned_teacher"]
        assert len(answer) == 3 and 0.115 <= _rule(diffs[:, answer]).any(axis=1).mean() <= 0.155
        for i in range(50):  # the same draws through ptd's own summarize
            rows = [{"arm": a, "seed": s, "test_acc": float(acc[i, j, s])} for j, a in enumerate(arms) for s in range(n)]
            assert any(c["called"] for c in summarize(rows)["comparison"].values()) == bool(any_call[i])


@pytest.mark.parametrize("n,low,high", [(2, 0.07, 0.10), (5, 0.28, 0.36), (10, 0.47, 0.56)])
def test_one_teacher_calls_what_another_training_of_it_may_not_repeat(n, low, high):
    """With one teacher (teacher.seeds 1) the interval covers student seeds only. When the
    difference a pruned teacher makes varies between trainings of the teacher as much as between
    student seeds, and is zero on average over trainings, the one-teacher rule calls it 8.6% of
    the time at 2 seeds and 51% at 10 (more seeds, a tighter interval around this teacher's own
    difference): a call is about this teacher, which the report says."""
    rng = np.random.default_rng(500 + n)
    d = rng.normal(0, 1, size=(SIMS, 1)) + rng.normal(0, 1, size=(SIMS, n))
    assert low <= _rule(d).mean() <= high


@pytest.mark.parametrize("n,low,high", [(3, 0.095, 0.14), (5, 0.095, 0.14), (10, 0.08, 0.12)])
def test_skewed_differences_push_the_rule_past_five_percent(n, low, high):
    """The t interval assumes roughly symmetric differences. Exponential (skew 2) differences with
    mean 0 are called 10-12% of the time at 3-10 seeds, nearly all in the direction of the short
    tail; a seed that collapses now and then is worse (the test below). README, "How sure is the answer"."""
    rng = np.random.default_rng(600 + n)
    rate = _rule(rng.exponential(1.0, size=(SIMS, n)) - 1.0).mean()
    assert low <= rate <= high, rate


# ----------------------------------------------------------------------------- the chance check


def test_above_chance_by_hand():
    from ptd.report.stats import above_chance

    # P[X >= 3] for Binomial(10, 0.1) = 1 - (0.9^10 + 10 * 0.1 * 0.9^9 + 45 * 0.01 * 0.9^8)
    p3 = 1 - (0.9**10 + 10 * 0.1 * 0.9**9 + 45 * 0.01 * 0.9**8)
    r = above_chance(0.3, 10, 0.1)
    assert r["p_value"] == pytest.approx(p3, rel=1e-9) and p3 == pytest.approx(0.0702, abs=1e-4) and not r["learned"]
    # 5 of 10 right against 0.1: p = 0.00163, learned at the 1% level
    assert above_chance(0.5, 10, 0.1)["p_value"] == pytest.approx(0.0016349374, rel=1e-6)
    assert above_chance(0.5, 10, 0.1)["learned"]
    assert not above_chance(0.1, 10_000, 0.1)["learned"] and above_chance(0.9, 10_000, 0.1)["learned"]


@pytest.mark.parametrize("n, chance", [(10, 0.1), (40, 0.15), (200, 0.1), (1000, 0.5), (10_000, 0.01)])
def test_a_guessing_model_is_called_learned_at_most_one_time_in_a_hundred(n, chance):
    """The exact false-positive rate of the rule: the probability, under guessing (X ~ Bin(n, chance)),
    of every count k the rule calls learned."""
    from scipy.stats import binom

    from ptd.report.stats import CHANCE_ALPHA, above_chance

    rate = sum(binom.pmf(k, n, chance) for k in range(n + 1) if above_chance(k / n, n, chance)["learned"])
    assert rate <= CHANCE_ALPHA
    assert rate > CHANCE_ALPHA / 10 or n < 50  # and not needlessly conservative where counts are fine-grained


def _results(accs, test_set):
    return {"teacher": {"test_acc": 0.9}, "pruned_teacher": {"test_acc": 0.9}, "retrained_teacher": None,
            "students": [{"arm": "pruned_teacher", "seed": s, "loss": "kd", "test_acc": a} for s, a in enumerate(accs)],
            "distill_losses": ["kd"], **({"test_set": test_set} if test_set else {})}


def test_report_names_exactly_the_models_that_did_not_learn():
    from ptd.report import chance_lines, not_learned

    ts = {"n": 1000, "num_classes": 10, "chance": 0.1}
    r = _results([0.85, 0.11, 0.09], ts)
    assert [b["model"] for b in not_learned(r)] == ["distilled from pruned teacher, seed 1", "distilled from pruned teacher, seed 2"]
    text = "\n".join(chance_lines(r))
    assert "2 models did not learn" in text and "seed 1: 11.00%" in text and "seed 0" not in text
    assert not_learned(_results([0.85, 0.8], ts)) == [] and chance_lines(_results([0.85], ts)) == []
    assert not_learned(_results([0.1], None)) == []  # a results.json from before the check: nothing is claimed


def test_equal_differences_are_a_tie_whatever_their_last_bits():
    """Both seeds 30 test images better (of 10,000): as floats 0.0030000000000000027 and
    0.0029999999999998916. Before rounding, that spread of 1e-16 gave a two-seed interval
    [0.002999999999999242, 0.0030000000000006523] and a call; it is a tie, not a finding."""
    from ptd.report.stats import hierarchical_estimate, paired_estimate

    n = 10000
    d = [8901 / n - 8871 / n, 7001 / n - 6971 / n]
    assert d[0] != d[1]
    e = paired_estimate(d)
    assert e["ci_low"] == e["ci_high"] == pytest.approx(0.003) and not e["called"] and e["direction"] == 0
    # Teacher means too: each teacher's seeds tie, and so do the teachers.
    h = hierarchical_estimate({0: d, 1: [5030 / n - 5000 / n, 4030 / n - 4000 / n]})
    assert not h["called"]


@pytest.mark.parametrize("n, j, a1, a2", [(5743, 32, 4594, 4598), (5123, 199, 4098, 4099), (5619, 100, 4495, 4498)])
def test_equal_differences_near_a_rounding_boundary_are_a_tie(n, j, a1, a2):
    """Rounding to 12 decimals did not merge every pair of equal differences: j/n near a rounding
    boundary rounded to two values 1e-12 apart, an interval 1.3e-11 wide, and two seeds each 32 of
    5,743 test images apart were "better ... +0.56, 95% CI [+0.56, +0.56]" (statistics audit: a test
    split of an imagefolder or data.test_subset). Every path that takes an interval snaps them."""
    from ptd.report import paired
    from ptd.report.stats import hierarchical_estimate, snap
    from ptd.report.sweep import family_intervals

    d = [a1 / n - (a1 - j) / n, a2 / n - (a2 - j) / n]
    assert [round(x, 12) for x in d][0] != [round(x, 12) for x in d][1]  # the case: rounding alone splits them
    assert snap(d)[0] == snap(d)[1] and snap([0.0, 2e-7, 1e-10]) == [0.0, 2e-7, 0.0]
    rows = [{"arm": arm, "seed": s, "test_acc": acc / n} for s, a in enumerate((a1, a2))
            for arm, acc in (("pruned_teacher", a), ("unpruned_teacher", a - j))]
    e = paired(rows, "pruned_teacher", "unpruned_teacher")
    assert e["ci_low"] == e["ci_high"] and not e["called"] and "better" not in e["verdict"], e["verdict"]
    # Teacher means: two teachers whose means are these differences tie as well.
    assert not hierarchical_estimate({0: [d[0]] * 3, 1: [d[1]] * 3})["called"]
    row = {"cmp": {**e, "per_seed": {0: d[0], 1: d[1]}}}
    family_intervals([row], "cmp")
    assert not row["cmp"]["family"]["called"]


def test_the_statistics_do_not_import_scipy_stats():
    """Every ``ptd run`` and ``ptd report`` renders these; scipy.stats took 0.6 s to import (about a
    third of a tiny run), for two functions scipy.special has. A fresh interpreter, so modules the
    test session imported do not hide an import."""
    code = ("import sys; from ptd.report.stats import above_chance, t_quantile; "
            "t_quantile(4); above_chance(0.3, 10, 0.1); print('scipy.stats' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ----------------------------------------------------------------------------- what "not called" rules out


@pytest.mark.parametrize("n, sds", [(2, 11.55), (3, 3.26), (5, 1.68), (10, 1.00)])
def test_detectable_is_the_difference_called_four_times_in_five(n, sds):
    """``detectable(n)``, in sds of the per-seed differences, by scipy.stats' noncentral t and by
    simulating ptd's own rule: a real difference that size is called (its way) 80% of the time.
    Statistics audit: at 5 seeds a 0.5-point difference with sd 0.5 is called 40% of the time, with
    sd 1 13%; 80% takes 10 seeds at sd 0.5."""
    from scipy.stats import nct, t

    from ptd.report.stats import detectable

    k = detectable(n)
    assert k == pytest.approx(sds, abs=0.01)
    assert nct.sf(t.ppf(0.975, n - 1), n - 1, k * math.sqrt(n)) == pytest.approx(0.8, abs=1e-6)
    rng = np.random.default_rng(700 + n)
    d = rng.normal(k, 1.0, size=(SIMS, n))
    _, lo, _ = t_interval(d)
    assert (lo > 0).mean() == pytest.approx(0.8, abs=0.015)
    for mu, sd, want in ((0.5, 0.5, 0.40), (0.5, 1.0, 0.13), (1.0, 1.0, 0.40)):  # README, "How sure is the answer"
        if n == 5:
            _, lo, _ = t_interval(rng.normal(mu, sd, size=(SIMS, n)))
            assert (lo > 0).mean() == pytest.approx(want, abs=0.02)


def test_a_verdict_not_called_says_what_it_could_have_found():
    """A verdict said "too few seeds for a tight interval: 5 or more give one", whatever the spread:
    at 5 seeds and an sd of 1 point a real 1-point gain is missed 6 times in 10. It now gives the
    difference its seeds find 4 times in 5, from their own spread."""
    from scipy.stats import nct, t

    from ptd.report import paired

    diffs = [0.004, -0.002, 0.001]
    rows = [{"arm": a, "seed": s, "test_acc": x} for s, d in enumerate(diffs)
            for a, x in (("pruned_teacher", 0.9 + d), ("unpruned_teacher", 0.9))]
    v = paired(rows, "pruned_teacher", "unpruned_teacher")["verdict"]
    sd = float(np.std(diffs, ddof=1))
    lo, hi = 0.0, 10.0  # bisection on the noncentral t, independent of stats.detectable
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if nct.sf(t.ppf(0.975, 2), 2, mid * math.sqrt(3)) > 0.8 else (mid, hi)
    assert v.endswith(f"the interval includes zero; at 3 seeds and this spread, a real difference is called 4 times in 5 "
                      f"only from about {100 * lo * sd:.2f} points (not called is not no difference)"), v
    assert "too few seeds" not in v


@pytest.mark.parametrize("n,low,high", [(3, 0.11, 0.155), (5, 0.21, 0.265), (10, 0.255, 0.31)])
def test_a_seed_that_collapses_now_and_then_is_called_for_the_arm_that_collapses(n, low, high):
    """One arm's student collapses with probability 0.1 by 10 ordinary sds, and is otherwise ahead
    by 1 sd (mean difference 0). Samples that miss the collapse show a steady edge: the rule calls
    13% at 3 seeds, 24% at 5, 28% at 10 (100,000 simulations), 99% of the calls for the arm that
    collapses. README, "How sure is the answer", said "should do as skewed noise (10-12%)"."""
    rng = np.random.default_rng(800 + n)
    d = rng.normal(0, 1, (SIMS, n)) + 1.0 - 10.0 * (rng.random((SIMS, n)) < 0.1)
    calls = _rule(d)
    assert low <= calls.mean() <= high, calls.mean()
    assert (calls & (d.mean(1) > 0)).sum() >= 0.97 * calls.sum()
