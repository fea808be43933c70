"""The statistics module (evaluation.stats) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steerloop.evaluation.stats import (bootstrap_ci, correlation_ci, kendall, pearson, ranking_inversions, ranks,
                                        spearman)


def test_ranks_average_ties():
    np.testing.assert_array_equal(ranks([3.0, 1.0, 3.0, 2.0]), [2.5, 0.0, 2.5, 1.0])


def test_pearson_spearman_kendall_by_hand():
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    # Pearson: centred x = (-1.5,-0.5,0.5,1.5), y = (-1.5,0.5,-0.5,1.5): sum xy = 4, |x|^2 = |y|^2 = 5
    assert pearson(x, y) == pytest.approx(0.8)
    assert spearman(x, y) == pytest.approx(0.8)  # already ranks
    # Kendall: 6 pairs, one discordant (2,3): (5 - 1) / 6
    assert kendall(x, y) == pytest.approx(4 / 6)
    assert kendall(x, x) == 1.0 and kendall(x, x[::-1]) == -1.0


def test_kendall_tau_b_with_ties():
    x, y = [1, 1, 2, 3], [1, 2, 2, 3]
    # pairs (i<j): (0,1) x tie; (0,2) +,+; (0,3) +,+; (1,2) +,0 y tie; (1,3) +,+; (2,3) +,+
    # concordant 4, discordant 0; n1 = 5 non-tied in x, n2 = 5 non-tied in y: 4 / sqrt(25)
    assert kendall(x, y) == pytest.approx(4 / 5)


def test_constant_variables_give_nan():
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(kendall([1, 2, 3], [2, 2, 2]))


def test_ranking_inversions_count_pairs_ordered_the_opposite_way():
    offline_error = [0.1, 0.2, 0.3, 0.4]  # lower is better
    success = [0.9, 0.8, 0.95, 0.1]  # higher is better: policy 2 beats 0 and 1 despite a larger error
    assert ranking_inversions(offline_error, success) == 2
    assert ranking_inversions(offline_error, [1.0, 0.9, 0.8, 0.7]) == 0
    assert ranking_inversions(offline_error, [0.1, 0.2, 0.3, 0.4]) == 6
    assert ranking_inversions([0.1, 0.1, 0.3], [0.5, 0.9, 0.1]) == 0  # the tied pair is not counted


def test_bootstrap_and_correlation_intervals_are_seeded_and_contain_the_point():
    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = x + rng.normal(scale=0.5, size=20)
    for fn in (pearson, spearman, kendall):
        point, lo, hi = correlation_ci(x, y, fn)
        assert lo <= point <= hi and (point, lo, hi) == correlation_ci(x, y, fn)
    point, lo, hi = bootstrap_ci(x)
    assert lo <= point <= hi and point == pytest.approx(float(np.mean(x)))
