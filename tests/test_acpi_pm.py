"""ACPI PM1 registers and the PM timer (kvmpy/acpi/pm.py) on a fake clock."""

from __future__ import annotations

import random

from kvmpy.acpi.pm import (
    PM_TIMER_HZ,
    RTC_EN,
    RTC_STS,
    SCI_EN,
    SLP_EN,
    TMR_EN,
    TMR_STS,
    WAK_STS,
    AcpiPm,
)

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 5 * S

    def __call__(self) -> int:
        return self.now


def make() -> tuple[AcpiPm, Clock, list[bool], list[int], list[int]]:
    clock = Clock()
    sci: list[bool] = []
    sleeps: list[int] = []
    armed: list[int] = []
    pm = AcpiPm(clock, on_sleep=sleeps.append, arm=armed.append)
    pm.sci = sci.append
    return pm, clock, sci, sleeps, armed


def test_pm_timer_counts_at_3_579545_mhz_in_24_bits() -> None:
    pm, clock, *_ = make()
    timer = pm.timer_block
    assert timer.read(0, 4) == 0
    clock.now += S
    assert timer.read(0, 4) == PM_TIMER_HZ
    clock.now += 3 * S  # 4 s: 14318180 ticks, still below 2^24 (4.69 s)
    assert timer.read(0, 4) == 4 * PM_TIMER_HZ
    clock.now += S  # 5 s: past 2^24
    assert timer.read(0, 4) == (5 * PM_TIMER_HZ) & 0xFFFFFF
    value = timer.read(0, 4)
    assert timer.read(0, 2) == value & 0xFFFF and timer.read(2, 1) == (value >> 16) & 0xFF
    assert timer.read(3, 1) == 0  # bits 31:24 read 0
    timer.write(0, 4, 0)
    assert timer.read(0, 4) == value and timer.ignored_writes == 1


def test_pm_timer_from_the_host_monotonic_clock() -> None:
    import time

    pm = AcpiPm(time.monotonic_ns)
    t0, a = time.monotonic(), pm.timer_value()
    time.sleep(0.05)
    t1, b = time.monotonic(), pm.timer_value()
    assert abs((b - a) - (t1 - t0) * PM_TIMER_HZ) < 0.005 * PM_TIMER_HZ


def test_tmr_sts_is_set_when_bit_23_toggles_and_cleared_by_writing_1() -> None:
    pm, clock, sci, _, armed = make()
    evt = pm.event_block
    half = (1 << 23) * S // PM_TIMER_HZ + 1  # 2.34 s
    assert evt.read(0, 2) & TMR_STS == 0
    clock.now += half
    assert evt.read(0, 2) & TMR_STS
    evt.write(0, 2, TMR_STS)
    assert evt.read(0, 2) & TMR_STS == 0
    # With TMR_EN, the SCI follows TMR_STS and the VMM is asked to tick at the toggle.
    evt.write(2, 2, TMR_EN)
    assert armed and armed[-1] > clock.now and sci == []
    clock.now = armed[-1]
    pm.tick()
    assert sci == [True]
    evt.write(0, 2, TMR_STS)
    assert sci == [True, False]


def test_pm1_status_is_write_one_to_clear_and_enable_reads_back() -> None:
    pm, clock, sci, *_ = make()
    evt = pm.event_block
    pm.sts = WAK_STS | RTC_STS
    assert evt.read(0, 2) == WAK_STS | RTC_STS
    evt.write(1, 1, (RTC_STS >> 8))  # the high byte alone: clears RTC_STS only
    assert evt.read(0, 2) == WAK_STS
    evt.write(0, 4, (RTC_EN << 16) | WAK_STS)  # one 32-bit write: STS and EN
    assert evt.read(0, 2) == 0 and evt.read(2, 2) == RTC_EN
    evt.write(2, 2, 0xFFFF)  # reserved enable bits do not stick
    assert evt.read(2, 2) == 0x4721


def test_sci_follows_rtc_sts_and_rtc_en() -> None:
    pm, clock, sci, *_ = make()
    pm.event_block.write(2, 2, RTC_EN)
    assert sci == []
    pm.sts |= RTC_STS
    pm.event_block.write(0, 2, 0)  # any access re-evaluates
    assert sci == [True]
    pm.event_block.write(0, 2, RTC_STS)
    assert sci == [True, False]


def test_sleep_enable_reports_the_sleep_type() -> None:
    pm, clock, _, sleeps, _ = make()
    cnt = pm.control_block
    assert cnt.read(0, 2) == SCI_EN  # always in ACPI mode
    cnt.write(0, 2, 1 << 10)  # SLP_TYP 1 without SLP_EN: stored, nothing happens
    assert sleeps == [] and cnt.read(0, 2) == SCI_EN | (1 << 10)
    cnt.write(0, 2, (1 << 10) | SLP_EN)
    assert sleeps == [1]
    assert cnt.read(0, 2) & SLP_EN == 0  # write-only
    cnt.write(1, 1, (SLP_EN | (5 << 10)) >> 8)  # a byte write of the high half
    assert sleeps == [1, 5]
    cnt.write(0, 2, 0)
    assert cnt.read(0, 2) == SCI_EN  # SCI_EN cannot be cleared


def test_wake_sets_wak_and_rtc_status_and_resets_enables() -> None:
    pm, clock, sci, *_ = make()
    pm.event_block.write(2, 2, RTC_EN)
    pm.control_block.write(0, 2, 1 << 10)
    pm.wake(rtc=True)
    assert pm.status() == WAK_STS | RTC_STS
    assert pm.en == 0 and pm.control_block.read(0, 2) == SCI_EN
    assert sci == []  # RTC_EN was reset with the machine: no SCI


def test_hostile_accesses_never_raise() -> None:
    pm, clock, *_ = make()
    rng = random.Random(3)
    for _ in range(3000):
        clock.now += rng.choice([0, 1, 10**6, 3 * S])
        dev = rng.choice([pm.event_block, pm.control_block, pm.timer_block])
        if rng.random() < 0.5:
            dev.write(rng.randrange(8), rng.choice([1, 2, 4, 8]), rng.getrandbits(64))
        else:
            assert dev.read(rng.randrange(8), rng.choice([1, 2, 4, 8])) >= 0
        pm.tick()
