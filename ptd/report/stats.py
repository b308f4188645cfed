"""Paired comparisons as estimates: a mean difference with a 95% confidence interval.

ptd compares arms seed by seed: the student of seed s starts from the same initialization and sees
the same data order in every arm, so the per-seed difference ``d_s = acc_a(s) - acc_b(s)`` removes
the noise the arms share. The estimate is the mean of the ``d_s``; a difference is *called* only
when its 95% confidence interval excludes zero.

Why a t interval (``method = "paired t"``)
    The interval is ``mean ± t_{0.975, n-1} · sd / sqrt(n)``. It is exact when the differences are
    Gaussian, which the accuracy of a trained network over seeds is close to (a sum of many small,
    nearly independent effects of initialization and data order), and it keeps its level
    approximately under moderate departures. The alternatives fail at the seed counts people run:
    an exact sign-flip permutation test cannot go below p = 2 / 2^n, so with n <= 5 seeds it can
    never reach 0.05 (it would never find a 2-SD effect at n = 5); a bootstrap interval resamples
    from 3 to 10 values (only 10 distinct resamples at n = 3) and is too narrow there. The exact
    sign-flip p-value is still reported (``sign_flip_p``) as a distribution-free check that does
    not assume Gaussian differences; it does not decide the call.

Teacher replicates (``hierarchical``)
    With several teachers (each trained, pruned and distilled independently), the students of one
    teacher share that teacher's luck, so their differences are not independent: treating all
    T·n differences as one sample ignores the teacher-to-teacher variance and calls noise a
    difference. The experimental unit is the teacher: the differences are averaged within each
    teacher, and the t interval is taken over the T teacher means with T - 1 degrees of freedom
    (``method = "teacher means, t"``). Under the nested model
    ``d_ts = mu + u_t + e_ts`` (u_t ~ N(0, var_T), e_ts ~ N(0, var_S)) with an equal number of
    students per teacher the teacher means are i.i.d. N(mu, var_T + var_S / n), so the interval is
    exact; with unequal counts it is approximately so. Both variance components are reported (a
    one-way ANOVA method-of-moments estimate, floored at 0) so the reader sees which one dominates.
    With one teacher the interval is the student-level paired t, and says it rests on one teacher.

All functions take accuracies as fractions (0.91, not 91) and return them the same way.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

LEVEL = 0.95  # two-sided confidence level of every interval
METHOD_T = "paired t"
METHOD_TEACHERS = "teacher means, t"
SIGN_FLIP_MAX_N = 16  # exact enumeration of 2^n sign patterns up to 65,536; larger n: not computed


def t_quantile(df: int | np.ndarray, level: float = LEVEL) -> np.ndarray:
    """The two-sided critical value t_{(1+level)/2, df} (12.706 at df=1, 4.303 at 2, 2.776 at 4)."""
    # scipy.special, not scipy.stats: the same function (stats' t.ppf calls stdtrit), without the
    # 0.6 s import of scipy.stats that every report render paid (measured on the AMD EPYC here).
    from scipy.special import stdtrit

    return stdtrit(df, 0.5 + level / 2)


def detectable(n: int, power: float = 0.8, level: float = LEVEL) -> float:
    """The smallest true mean difference, in standard deviations of the per-seed differences, that a
    ``level`` t interval over ``n`` Gaussian differences excludes zero for (on its side) with
    probability ``power``: 11.5 at n = 2, 3.26 at 3, 1.68 at 5, 1.00 at 10 (the noncentral t; the
    other tail is left out, under 2.5% there). "Not called" is not "no difference": at 5 seeds a
    real difference of one sd is missed 6 times in 10 (statistics audit, tests/test_stats.py)."""
    from scipy.special import nctdtrinc

    if n < 2:
        raise ValueError(f"detectable needs at least 2 values, got {n}")
    return float(nctdtrinc(n - 1, 1 - power, t_quantile(n - 1, level)) / math.sqrt(n))


def t_interval(d: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t interval over the last axis of ``d`` (vectorized: [..., n] -> three [...] arrays).

    Needs n >= 2. A sample whose values are all equal has a zero-width interval at its mean.
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.shape[-1]
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    m = d.mean(axis=-1)
    half = t_quantile(n - 1, level) * d.std(axis=-1, ddof=1) / math.sqrt(n)
    return m, m - half, m + half


def sign_flip_p(d: Sequence[float]) -> float | None:
    """Exact two-sided sign-flip permutation p-value of the mean of ``d`` (H0: the differences are
    symmetric about zero): the share of the 2^n sign patterns whose |mean| is at least the
    observed one. None for n = 0 or n > SIGN_FLIP_MAX_N."""
    x = np.asarray(d, dtype=np.float64)
    n = x.size
    if n and np.all(x == x[0]):  # every value equal: only all-plus and all-minus reach |mean|, at any n
        return 1.0 if x[0] == 0 else 2.0 ** (1 - n)  # (2 / 2.0**n overflows from n = 1024)
    if n == 0 or n > SIGN_FLIP_MAX_N:
        return None
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # [2^n, n]
    stats = np.abs(signs @ x)
    # A relative tolerance so that patterns tied with the observed one in exact arithmetic count.
    obs = abs(x.sum())
    return float(np.mean(stats >= obs * (1 - 1e-12) - 1e-15))


# Differences are rounded to this many decimals before any statistic (a stable record in
# results.json), and values closer than TIE made equal (``snap``): accuracies are whole test images
# over n (n < 10^7 here), so equal differences can reach the statistics unequal in the last bits
# (30/10000 came out as 0.0030000000000000027 from one pair of accuracies and 0.0029999999999998916
# from another), and a spread of 1e-16 made a two-seed tie "significant". Rounding alone did not
# merge them: a difference near a rounding boundary went either way, and two seeds each 32 of 5,743
# test images apart rounded to ...697 and ...696, an interval 1.3e-11 wide, called (statistics audit).
DECIMALS = 12
TIE = 1e-9  # two distinct differences of accuracies on under 10^7 images are at least 1e-7 apart
# An interval narrower than this (a fraction: accuracy points / 100) has no width.
ZERO_WIDTH = 1e-12


def snap(values: Sequence[float]) -> list[float]:
    """``values`` rounded to DECIMALS, then ``merge_ties``: equal differences that float arithmetic
    left unequal become one value, whichever side of a rounding boundary they fell."""
    return merge_ties([round(float(x), DECIMALS) for x in values])


def merge_ties(values: Sequence[float]) -> list[float]:
    """Each value within TIE of the next smaller one made equal to it (in sorted order, so a run of
    near-equal values takes its smallest); the others unchanged."""
    d = [float(x) for x in values]
    out = list(d)
    order = sorted(range(len(d)), key=d.__getitem__)
    for prev, i in zip(order, order[1:]):
        if d[i] - d[prev] <= TIE:
            out[i] = out[prev]
    return out


def zero_width(lo: float | None, hi: float | None) -> bool:
    return lo is not None and hi is not None and hi - lo <= ZERO_WIDTH


def is_called(m: float, lo: float | None, hi: float | None, values: Sequence[float] = (), level: float = LEVEL) -> bool:
    """The rule every call in ptd's reports follows: a difference of mean ``m`` is called when its
    ``level`` interval [lo, hi] excludes zero. A zero-width interval (every difference equal, e.g.
    two seeds each 30 test images apart) estimates no spread, so the t interval cannot decide. The
    exact sign-flip test still can, and does not need a spread: every one of n equal, non-zero
    differences has p = 2 / 2^n, below 0.05 from 6 values on. Without it, ten seeds all 0.3 points
    apart were "no evidence either way" while 0.30 and 0.31 were called (more agreement, a weaker
    verdict). Its level holds under any symmetric null, and n equal non-zero differences are rare
    under one, so the rule keeps its 5%. The sweep's whole-sweep calls (Holm's steps, intervals at
    1 - 0.05/m) use it too: they once had their own copy without the sign-flip fallback (review)."""
    if lo is None or hi is None:
        return False
    if zero_width(lo, hi):
        p = sign_flip_p(values) if m != 0 else None
        return p is not None and p < 1 - level
    return lo > 0 or hi < 0


def _summary(m: float, lo: float | None, hi: float | None, values: Sequence[float] = ()) -> dict[str, Any]:
    called = is_called(m, lo, hi, values)
    return {"mean": m, "ci_low": lo, "ci_high": hi, "level": LEVEL, "called": bool(called),
            "direction": (1 if m > 0 else -1) if called else 0}


def _finite(values: Sequence[float], what: str) -> list[float]:
    d = snap(values)
    if not all(math.isfinite(x) for x in d):
        raise ValueError(f"{what} needs finite differences, got {values!r}")  # NaN read "+nan points" with p = 0
    return d


def paired_estimate(diffs: Sequence[float]) -> dict[str, Any]:
    """Estimate from per-seed paired differences: mean, 95% t interval, n, method, called."""
    d = _finite(diffs, "paired_estimate")
    n = len(d)
    if n == 0:
        raise ValueError("paired_estimate needs at least one difference")
    m = math.fsum(d) / n
    sd = float(np.std(d, ddof=1)) if n > 1 else None
    if n < 2:
        out = _summary(m, None, None)
    else:
        _, lo, hi = t_interval(np.array(d))
        out = _summary(m, float(lo), float(hi), d)
    return {**out, "n": n, "sd": sd, "se": sd / math.sqrt(n) if sd is not None else None,
            "df": n - 1 if n > 1 else None, "method": METHOD_T if n > 1 else "none (one seed: no spread to estimate)",
            "sign_flip_p": sign_flip_p(d)}


def hierarchical_estimate(by_teacher: Mapping[Any, Sequence[float]]) -> dict[str, Any]:
    """Estimate from paired differences grouped by teacher replicate (see the module docstring).

    ``by_teacher`` maps a teacher id to that teacher's per-seed differences. One teacher: the
    student-level ``paired_estimate`` (noted in ``method``). Several: the t interval over the
    teacher means, n = the number of teachers.
    """
    groups = {k: _finite(v, "hierarchical_estimate") for k, v in by_teacher.items() if len(v)}
    if not groups:
        raise ValueError("hierarchical_estimate needs at least one teacher with a difference")
    if len(groups) == 1:
        (only,) = groups.values()
        out = paired_estimate(only)
        out["method"] = out["method"] + (", one teacher" if out["n"] > 1 else "")
        out.update(teachers=1, students=len(only))
        return out
    means = np.array(merge_ties([np.mean(v) for v in groups.values()]))  # equal teachers' means equal, as a seed's differences
    T = len(means)
    m = float(means.mean())
    _, lo, hi = t_interval(means)
    sd = float(means.std(ddof=1))
    # Variance components, one-way random-effects ANOVA (method of moments), for the reader only.
    sizes = np.array([len(v) for v in groups.values()], dtype=np.float64)
    N = sizes.sum()
    within_df = N - T
    var_s = (sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in groups.values()) / within_df) if within_df > 0 else None
    grand = float(np.sum([np.sum(v) for v in groups.values()]) / N)
    ms_between = float(np.sum(sizes * (means - grand) ** 2) / (T - 1))
    n0 = (N - float(np.sum(sizes ** 2)) / N) / (T - 1)  # the effective students per teacher
    var_t = max(0.0, (ms_between - var_s) / n0) if var_s is not None else None
    return {**_summary(m, float(lo), float(hi), [round(float(x), DECIMALS) for x in means]), "n": T, "sd": sd, "se": sd / math.sqrt(T), "df": T - 1,
            "method": METHOD_TEACHERS, "teachers": T, "students": int(N),
            "per_teacher_mean": {str(k): float(x) for k, x in zip(groups, means)},
            "var_teacher": var_t, "var_student": var_s,
            "sign_flip_p": sign_flip_p(means)}


def shown_difference(e: Mapping[str, Any]) -> tuple[float, float, bool] | None:
    """A difference's interval as reports show it: the t interval (results.json keeps it whole) cut
    to [-1, 1], the range a difference of two accuracies can take, and whether it was cut; None
    without one. At 2 seeds t is 12.7, and [-146.33, +171.33] points read as a range the data
    allowed (real-data audit). The difference lies in [-1, 1], so the cut interval covers it
    whenever the t interval does, and a call (zero excluded) is the same."""
    lo, hi = e.get("ci_low"), e.get("ci_high")
    if lo is None or hi is None:
        return None
    a, b = max(lo, -1.0), min(hi, 1.0)
    return a, b, (a, b) != (lo, hi)


def format_estimate(e: Mapping[str, Any], unit: float = 100.0, digits: int = 2) -> str:
    """'+1.23 points, 95% CI [+0.10, +2.36] (paired t, n=5)' (unit 100: fractions to points)."""
    pts = f"{unit * e['mean']:+.{digits}f} points"
    shown = shown_difference(e)
    if shown is None:
        return f"{pts} ({e['method']}, n={e['n']})"
    lo, hi, cut = shown
    return (f"{pts}, {int(round(100 * e['level']))}% CI [{unit * lo:+.{digits}f}, {unit * hi:+.{digits}f}]"
            + (" (cut to the range a difference can take)" if cut else "") + f" ({e['method']}, n={e['n']})")


# ---------------------------------------------------------------- did a model learn at all?

# A model is said to have learned only when its test accuracy is above chance at this one-sided
# level: a model that only guesses is called learned with probability at most 1%.
CHANCE_ALPHA = 0.01


def above_chance(acc: float, n: int, chance: float, alpha: float = CHANCE_ALPHA) -> dict[str, Any]:
    """One-sided exact binomial test of ``acc`` over ``n`` test images against guessing.

    ``chance`` is the accuracy of always answering the test set's most frequent class (1/C on a
    balanced set): the best a model that learned nothing can expect. Returns ``{"p_value",
    "learned"}``; ``learned`` is False when the accuracy is not above chance at level ``alpha``.
    The test is exact, so a guessing model is called learned with probability at most ``alpha``.
    """
    from scipy.special import bdtrc  # the binomial upper tail, without importing scipy.stats (see t_quantile)

    k = int(round(acc * n))
    p = float(bdtrc(k - 1, n, chance))  # P[X >= k] = P[X > k - 1]; 1.0 for k = 0
    return {"p_value": p, "learned": p < alpha}
