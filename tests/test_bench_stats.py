"""kvmpy.bench.stats: percentiles, run medians, bootstrap CI of a ratio, verdicts.

Synthetic data with a known answer: run medians drawn as m * lognormal(0, 0.1), whose
median is exactly m, so the true ratio of two configurations is m_a / m_b.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.bench.stats import (
    ConfigSummary,
    RatioCI,
    bootstrap_ratio,
    median,
    percentile,
    run_medians,
    spread,
    verdict,
)


def draw(rng: random.Random, m: float, runs: int, sigma: float = 0.1) -> list[float]:
    return [m * rng.lognormvariate(0, sigma) for _ in range(runs)]


# ---------------------------------------------------------------- percentiles, medians


def test_percentile_known_values() -> None:
    v = [4.0, 1.0, 3.0, 2.0]
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 4.0
    assert percentile(v, 50) == 2.5
    assert percentile(v, 25) == pytest.approx(1.75)
    assert percentile(v, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0


@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=50), st.integers(1, 99))
def test_percentile_matches_statistics_inclusive_quantiles(values: list[float], k: int) -> None:
    expected = statistics.quantiles(values, n=100, method="inclusive")[k - 1]
    assert percentile(values, k) == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_percentile_and_median_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        spread([])


def test_median_odd_and_even() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5


def test_run_medians_one_per_run_in_order_skipping_empty_runs() -> None:
    assert run_medians([[1, 2, 30], [], [10, 20], [5]]) == [2, 15, 5]


def test_spread_and_config_summary() -> None:
    assert spread([2.0, 4.0, 3.0]) == 2.0
    assert spread([5.0]) == 1.0
    assert spread([0.0, 1.0]) == math.inf
    s = ConfigSummary.of([300.0, 100.0, 200.0, 150.0])
    assert (s.runs, s.median, s.min, s.max, s.spread) == (4, 175.0, 100.0, 300.0, 3.0)


# ---------------------------------------------------------------- bootstrap


def test_clearly_different_distributions_are_significant_with_the_right_sign() -> None:
    rng = random.Random(1)
    fast, slow = draw(rng, 80, 12), draw(rng, 100, 12)
    ci = bootstrap_ratio(fast, slow)
    assert ci.significant and ci.high < 1
    assert ci.low <= ci.ratio <= ci.high
    assert verdict(ci).startswith("fastpath faster by ")
    back = bootstrap_ratio(slow, fast)
    assert back.significant and back.low > 1
    assert verdict(back, "kvmpy").startswith("kvmpy slower by ")


def test_identical_distributions_show_no_difference_in_most_seeds() -> None:
    quiet = 0
    for seed in range(50):
        rng = random.Random(seed)
        ci = bootstrap_ratio(draw(rng, 100, 12), draw(rng, 100, 12), resamples=2000,
                             seed=seed)
        quiet += not ci.significant
        if not ci.significant:
            assert verdict(ci).startswith("no significant difference (95% CI [")
    assert quiet >= 45  # nominal 95%; 48 of 50 with these seeds


def test_interval_contains_the_true_ratio_in_most_seeds() -> None:
    covered = 0
    for seed in range(50):
        rng = random.Random(1000 + seed)
        ci = bootstrap_ratio(draw(rng, 70, 10), draw(rng, 100, 10), resamples=2000,
                             seed=seed)
        covered += ci.low <= 0.7 <= ci.high
    assert covered >= 45  # 48 of 50 with these seeds


def test_more_runs_give_a_narrower_interval() -> None:
    rng = random.Random(7)
    few = bootstrap_ratio(draw(rng, 90, 5), draw(rng, 100, 5))
    many = bootstrap_ratio(draw(rng, 90, 60), draw(rng, 100, 60))
    assert many.high - many.low < few.high - few.low


def test_determinism_given_a_seed() -> None:
    rng = random.Random(3)
    a, b = draw(rng, 95, 10), draw(rng, 100, 10)
    one = bootstrap_ratio(a, b, seed=42, resamples=3000)
    assert bootstrap_ratio(a, b, seed=42, resamples=3000) == one
    other = bootstrap_ratio(a, b, seed=43, resamples=3000)
    assert other.ratio == one.ratio and (other.low, other.high) != (one.low, one.high)
    assert (one.resamples, one.seed, one.runs_a, one.runs_b) == (3000, 42, 10, 10)


def test_constant_runs_give_a_degenerate_exact_interval() -> None:
    ci = bootstrap_ratio([50.0] * 6, [100.0] * 4, resamples=100)
    assert (ci.ratio, ci.low, ci.high) == (0.5, 0.5, 0.5)


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        bootstrap_ratio([], [1.0])
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [0.0])
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0], resamples=0)
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0], confidence=1.0)


# ---------------------------------------------------------------- verdict text


def ci_of(ratio: float, low: float, high: float) -> RatioCI:
    return RatioCI(ratio, low, high, 0.95, 10_000, 0, 10, 10)


def test_verdict_strings() -> None:
    assert verdict(ci_of(0.777, 0.70, 0.85)) == "fastpath faster by 22.3%, 95% CI [15.0%, 30.0%]"
    assert (verdict(ci_of(2.5, 2.0, 3.25), "kvmpy fastpath")
            == "kvmpy fastpath slower by 150.0%, 95% CI [100.0%, 225.0%]")
    assert (verdict(ci_of(0.98, 0.9, 1.05))
            == "no significant difference (95% CI [-10.0%, +5.0%] includes 0)")
