"""qlora_lab.stats against scipy.stats: the Wilson interval and the exact McNemar test to float precision,
the paired bootstrap within bootstrap noise; and the verdict flips where the interval crosses zero."""

import numpy as np
import pytest
import scipy.stats

from qlora_lab import stats


@pytest.mark.parametrize("k,n", [(0, 20), (1, 20), (161, 200), (200, 200), (37, 50), (3, 7)])
def test_wilson_matches_scipy(k, n):
    ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert stats.wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)


@pytest.mark.parametrize("only_a,only_b,both,neither", [(2, 0, 1, 1), (12, 4, 150, 34), (7, 7, 100, 10), (0, 0, 5, 5),
                                                         (30, 11, 120, 39)])
def test_mcnemar_matches_the_exact_binomial_test(only_a, only_b, both, neither):
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    got = stats.mcnemar(a, b)
    assert (got["only_a"], got["only_b"]) == (only_a, only_b)
    expected = scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    assert got["p"] == pytest.approx(expected, rel=1e-12)


def test_paired_bootstrap_matches_scipy_and_pairing_narrows_it():
    rng = np.random.default_rng(1)
    hard = rng.random(200) < 0.2  # items both models tend to fail
    a = (~hard & (rng.random(200) < 0.95)).astype(int)
    b = (~hard & (rng.random(200) < 0.85)).astype(int)
    diff, low, high = stats.paired_difference_ci(a.tolist(), b.tolist())
    ref = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                                method="percentile", n_resamples=10_000, random_state=0).confidence_interval
    assert diff == pytest.approx(a.mean() - b.mean())
    assert low == pytest.approx(ref.low, abs=0.01) and high == pytest.approx(ref.high, abs=0.01)
    se_unpaired = (a.mean() * (1 - a.mean()) / 200 + b.mean() * (1 - b.mean()) / 200) ** 0.5
    assert high - low < 2 * 1.96 * se_unpaired  # the shared hard items cancel
    assert stats.paired_difference_ci(a.tolist(), b.tolist()) == (diff, low, high)  # seeded: repeats exactly


def test_call_flips_where_the_interval_crosses_zero():
    assert stats.call(-0.01, 0.06) == "tie"
    assert stats.call(0.01, 0.06) == "higher"
    assert stats.call(-0.06, -0.01) == "lower"
    same = [1] * 150 + [0] * 50
    assert stats.call(*stats.paired_difference_ci(same, same)[1:]) == "tie"
    better = [1] * 190 + [0] * 10
    assert stats.call(*stats.paired_difference_ci(better, same)[1:]) == "higher"


@pytest.mark.parametrize("n", [100, 200, 7])
def test_wilson_ends_are_exact_at_zero_and_all(n):
    assert stats.wilson(0, n)[0] == 0.0 and stats.wilson(n, n)[1] == 1.0  # no 3e-18 below a 0 % point in a plot
