"""Intervals and paired tests for accuracy measured on a few hundred items (labs 05 and 07).

An exact-match rate on 200 items is a sample: 80 % could be 74 % or 85 % on another 200.
These are the three tools the labs use to say so:

- `wilson`: the 95 % Wilson score interval of one rate (better than p +/- 2 SE near 0 % or 100 %);
- `mcnemar`: do two models, scored on the same items, differ? Only the items where exactly one
  of them is right count; the exact two-sided binomial test on those;
- `paired_difference_ci`: a 95 % interval for the difference of two rates on the same items,
  by a paired percentile bootstrap (items resampled together, so their shared difficulty cancels).

`call` turns an interval into words: a difference whose interval holds 0 is a tie.
tests/test_stats.py checks `wilson` and `mcnemar` against scipy.stats.binomtest and the bootstrap
against scipy.stats.bootstrap.

Shortcut: 95 % only (z = 1.96); the bootstrap is seeded, so a run repeats exactly.
"""

import math

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k/n.

    Example: wilson(161, 200) -> (0.7446, 0.8539)   # 80.5 % measured on 200 items
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))  # exact ends


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """Exact McNemar test of two models scored on the same items.

    only_a / only_b: items only model a / only model b got right; p: the two-sided probability of a split
    at least this uneven if both models were equally good (binomial, n = only_a + only_b, p = 1/2).
    Example: mcnemar([1, 1, 1, 0], [1, 0, 0, 0]) -> {"only_a": 2, "only_b": 0, "p": 0.5}
    """
    assert len(a_correct) == len(b_correct), "score both models on the same items"
    only_a = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    only_b = sum(1 for a, b in zip(a_correct, b_correct) if b and not a)
    n, k = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}


def paired_difference_ci(a: list[float], b: list[float], resamples: int = 10_000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): mean of a minus mean of b over the same items, with a 95 % paired bootstrap interval.

    a, b: one score per item (1/0 for right/wrong, or any number, e.g. a loss).
    Example: paired_difference_ci([1] * 160 + [0] * 40, [1] * 170 + [0] * 30) -> (-0.05, -0.08, -0.02)
    """
    assert len(a) == len(b), "score both models on the same items"
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # (items,)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diff), (resamples, len(diff)), generator=g)  # (resamples, items)
    means = diff[picks].mean(dim=1)  # (resamples,)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return diff.mean().item(), low, high


def call(low: float, high: float) -> str:
    """"tie" when the interval of a difference holds 0, else "higher" or "lower". Example: call(-0.01, 0.06) -> "tie" """
    return "tie" if low <= 0 <= high else ("higher" if low > 0 else "lower")
