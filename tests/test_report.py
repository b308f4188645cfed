import pytest

from ptd.report import mean_std, paired, verdict


def rows(arm, accs):
    return [{"arm": arm, "seed": i, "test_acc": a} for i, a in enumerate(accs)]


def test_mean_std():
    r = mean_std([0.90, 0.92, 0.94])
    assert r["mean"] == pytest.approx(0.92) and r["std"] == pytest.approx(0.02) and r["n"] == 3
    assert mean_std([0.5])["std"] == 0.0


def test_paired_differences_by_seed():
    s = rows("pruned_teacher", [0.91, 0.92, 0.93]) + rows("unpruned_teacher", [0.90, 0.90, 0.90])
    c = paired(s, "pruned_teacher", "unpruned_teacher")
    assert c["per_seed"] == {0: pytest.approx(0.01), 1: pytest.approx(0.02), 2: pytest.approx(0.03)}
    assert c["mean"] == pytest.approx(0.02) and c["wins"] == 3
    assert "is better than" in c["verdict"]


def test_verdict_is_cautious():
    assert "too few seeds" in verdict([0.05, 0.04], "pruned_teacher", "unpruned_teacher")
    # mixed signs: no call, however large the mean
    assert "no clear difference" in verdict([0.05, 0.04, -0.01], "pruned_teacher", "unpruned_teacher")
    # same sign but within two standard errors
    assert "no clear difference" in verdict([0.001, 0.03, 0.0005], "pruned_teacher", "unpruned_teacher")
    assert "is worse than" in verdict([-0.01, -0.012, -0.011], "pruned_teacher", "scratch")


def test_paired_needs_common_seeds():
    assert paired(rows("pruned_teacher", [0.9]), "pruned_teacher", "scratch") is None
