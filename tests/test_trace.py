"""Exit statistics: log-linear histograms, percentiles, merging, bounded tables."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.trace import (
    MAX_MSR_KEYS,
    ExitStats,
    Histogram,
    bucket_floor,
    bucket_of,
    exit_report,
)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_bucket_floor_brackets_the_value(ns: int) -> None:
    b = bucket_of(ns)
    assert bucket_floor(b) <= ns < bucket_floor(b + 1)
    assert ns - bucket_floor(b) <= max(ns // 8, 1)  # within 12.5%


def test_percentiles_of_known_data() -> None:
    h = Histogram()
    values = list(range(1000, 101000, 100))  # 1000 values, 1 us .. 101 us
    random.Random(1).shuffle(values)
    for v in values:
        h.add(v)
    assert h.count == 1000 and h.total == sum(values)
    p50, p99 = h.percentile(50), h.percentile(99)
    assert abs(p50 - 50050) <= 0.07 * 50050
    assert abs(p99 - 99050) <= 0.07 * 99050
    assert Histogram().percentile(50) == 0


def test_merge_and_report() -> None:
    a, b = ExitStats(), ExitStats()
    a.count[30] += 3
    a.fast[30] += 2
    a.fast_time[30].add(1000)
    a.fast_time[30].add(1000)
    a.slow_time[30].add(8000)
    b.count[2] += 1
    b.slow_time[2].add(5000)
    a.merge(b)
    rows = {r.reason: r for r in exit_report(a)}
    assert rows["X86_WRMSR"].count == 3 and rows["X86_WRMSR"].fast == 2
    assert abs(rows["X86_WRMSR"].fast_p50_ns - 1000) <= 70
    assert abs(rows["X86_WRMSR"].slow_p50_ns - 8000) <= 560
    assert rows["IO"].count == 1


def test_guest_chosen_msr_indices_cannot_grow_the_table_without_bound() -> None:
    s = ExitStats()
    for index in range(10 * MAX_MSR_KEYS):
        s.count_msr("wr", index)
    assert len(s.msr_accesses) == MAX_MSR_KEYS + 1
    assert s.msr_accesses["other"] == 9 * MAX_MSR_KEYS
    t = ExitStats()
    t.count_msr("wr", 1 << 31)
    s.merge(t)
    assert len(s.msr_accesses) == MAX_MSR_KEYS + 1
