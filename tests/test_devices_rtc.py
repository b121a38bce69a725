"""The MC146818 RTC model (kvmpy/devices/rtc.py) on a fake clock, checked against
Python's datetime and the data sheet's rules."""

from __future__ import annotations

import datetime as dt
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.rtc import (
    ALARM_DONT_CARE,
    CENTURY,
    DAY_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    HOURS_ALARM,
    MIN_PERIOD_NS,
    MINUTES,
    MINUTES_ALARM,
    MONTH,
    REG_A,
    REG_A_UIP,
    REG_B,
    REG_B_24H,
    REG_B_AIE,
    REG_B_DM,
    REG_B_PIE,
    REG_B_SET,
    REG_B_UIE,
    REG_C,
    REG_C_AF,
    REG_C_IRQF,
    REG_C_PF,
    REG_C_UF,
    REG_D,
    SECONDS,
    SECONDS_ALARM,
    YEAR,
    Rtc,
    civil_from_days,
    days_from_civil,
    pc_cmos_init,
)

S = 1_000_000_000
MS = 1_000_000
US = 1_000
START = dt.datetime(2024, 2, 28, 23, 59, 58, tzinfo=dt.UTC)  # leap year, before midnight


class Clock:
    def __init__(self) -> None:
        self.now = 10 * S

    def __call__(self) -> int:
        return self.now


def make(start: dt.datetime = START, phase_ns: int = 0, *, periodic: bool = False
         ) -> tuple[Rtc, Clock, list[bool], list[int], list[str]]:
    """An RTC at `start`; without `periodic`, RS = 0 so that PF (which the data sheet
    sets at the periodic rate even with PIE clear) stays out of register C."""
    clock = Clock()
    wall = int(start.timestamp()) * S + phase_ns
    irq: list[bool] = []
    armed: list[int] = []
    wakes: list[str] = []
    rtc = Rtc(clock, lambda: wall, arm=armed.append)
    rtc.irq = irq.append
    rtc.on_alarm = lambda: wakes.append("alarm")
    if not periodic:
        rtc.write_register(REG_A, 0x20)
    return rtc, clock, irq, armed, wakes


def bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def read_time(rtc: Rtc) -> dict[str, int]:
    return {name: rtc.read_register(reg) for name, reg in (
        ("sec", SECONDS), ("min", MINUTES), ("hour", HOURS), ("wday", DAY_OF_WEEK),
        ("mday", DAY_OF_MONTH), ("mon", MONTH), ("year", YEAR), ("century", CENTURY))}


def expected(t: dt.datetime, enc=bcd) -> dict[str, int]:
    return {"sec": enc(t.second), "min": enc(t.minute), "hour": enc(t.hour),
            "wday": enc(t.isoweekday() % 7 + 1), "mday": enc(t.day), "mon": enc(t.month),
            "year": enc(t.year % 100), "century": enc(t.year // 100)}


def test_time_of_day_from_the_host_clock_in_bcd_then_across_a_leap_day() -> None:
    rtc, clock, *_ = make()
    assert read_time(rtc) == expected(START)
    assert rtc.read_register(REG_D) == 0x80  # VRT
    clock.now += 2 * S
    assert read_time(rtc) == expected(dt.datetime(2024, 2, 29, 0, 0, 0))
    clock.now += 86_400 * S
    assert read_time(rtc) == expected(dt.datetime(2024, 3, 1, 0, 0, 0))


def test_binary_mode_and_12_hour_mode() -> None:
    rtc, clock, *_ = make()
    rtc.write_register(REG_B, REG_B_24H | REG_B_DM)
    assert read_time(rtc) == expected(START, enc=lambda v: v)
    rtc.write_register(REG_B, 0)  # BCD, 12 hours: 23:59 is 11 PM
    assert rtc.read_register(HOURS) == 0x80 | 0x11
    clock.now += 2 * S  # midnight: 12 AM
    assert rtc.read_register(HOURS) == 0x12
    clock.now += 12 * 3600 * S  # noon: 12 PM
    assert rtc.read_register(HOURS) == 0x80 | 0x12
    rtc.write_register(REG_B, REG_B_DM)  # binary 12 hours
    assert rtc.read_register(HOURS) == 0x80 | 12


def test_uip_rises_244us_before_the_update_and_falls_after_the_update_cycle() -> None:
    rtc, clock, *_ = make(phase_ns=S // 2, periodic=True)  # half way through a second
    uip = lambda: bool(rtc.read_register(REG_A) & REG_A_UIP)  # noqa: E731
    assert not uip()
    clock.now += S // 2 - 250 * US
    assert not uip()
    clock.now += 10 * US  # 240 us before the second changes
    assert uip()
    seconds_before = rtc.read_register(SECONDS)
    clock.now += 1 * MS  # in the update cycle: the new second is there, UIP still set
    assert uip() and rtc.read_register(SECONDS) == bcd((START.second + 1) % 60)
    assert seconds_before == bcd(START.second)
    clock.now += 1300 * US  # 2060 us after the second changed: the 1984 us cycle is over
    assert not uip()
    assert rtc.read_register(REG_A) & 0x7F == 0x26  # DV and RS as at power-up


def test_register_c_flags_are_set_by_updates_and_cleared_on_read() -> None:
    rtc, clock, irq, _, wakes = make()
    assert rtc.read_register(REG_C) == 0
    clock.now += S
    assert rtc.read_register(REG_C) == REG_C_UF  # no IRQF: UIE is clear
    assert rtc.read_register(REG_C) == 0
    assert irq == [] and wakes == []


def test_update_interrupt_raises_irq8_until_register_c_is_read() -> None:
    rtc, clock, irq, armed, _ = make()
    rtc.write_register(REG_B, REG_B_24H | REG_B_UIE)
    assert armed == [clock.now + S]  # the next update
    rtc.tick()  # too early: a stale firing does nothing
    assert irq == [] and rtc.stale_ticks == 1
    clock.now = armed[-1]
    rtc.tick()
    assert irq == [True] and armed[-1] == clock.now + S
    assert rtc.read_register(REG_C) == REG_C_IRQF | REG_C_UF
    assert irq == [True, False]


def test_alarm_sets_af_raises_the_interrupt_and_asks_for_a_wake_up() -> None:
    rtc, clock, irq, armed, wakes = make()  # 23:59:58
    rtc.write_register(SECONDS_ALARM, bcd(5))
    rtc.write_register(MINUTES_ALARM, ALARM_DONT_CARE)
    rtc.write_register(HOURS_ALARM, ALARM_DONT_CARE)
    rtc.write_register(REG_B, REG_B_24H | REG_B_AIE)
    for _ in range(6):  # 23:59:59, 00:00:00 ... 00:00:04: no match
        clock.now = armed[-1]
        rtc.tick()
        assert irq == [] and wakes == []
    clock.now = armed[-1]  # 00:00:05
    rtc.tick()
    assert irq == [True] and wakes == ["alarm"]
    assert rtc.read_register(REG_C) == REG_C_IRQF | REG_C_AF | REG_C_UF


def test_alarm_without_aie_sets_af_only() -> None:
    rtc, clock, irq, _, wakes = make()
    for reg in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM):
        rtc.write_register(reg, 0xFF)  # don't care
    clock.now += S
    assert rtc.read_register(REG_C) == REG_C_AF | REG_C_UF
    assert irq == [] and wakes == []


def test_enabling_an_interrupt_whose_flag_is_set_raises_it_at_once() -> None:
    rtc, clock, irq, *_ = make()
    clock.now += S  # UF set, not read
    rtc.write_register(REG_B, REG_B_24H | REG_B_UIE)
    assert irq == [True]
    rtc.write_register(REG_B, REG_B_24H)  # disabling it drops IRQF and the line
    assert irq == [True, False]
    assert rtc.read_register(REG_C) == REG_C_UF


def test_set_freezes_the_clock_lets_the_guest_load_a_time_and_clears_uie() -> None:
    rtc, clock, *_ = make()
    rtc.write_register(REG_B, REG_B_24H | REG_B_UIE | REG_B_SET)
    assert not rtc.read_register(REG_B) & REG_B_UIE
    clock.now += 5 * S
    assert rtc.read_register(SECONDS) == bcd(58)  # frozen
    assert not rtc.read_register(REG_A) & REG_A_UIP
    new = dt.datetime(1999, 12, 31, 23, 59, 59)
    for name, reg in (("sec", SECONDS), ("min", MINUTES), ("hour", HOURS), ("mday", DAY_OF_MONTH),
                      ("mon", MONTH), ("year", YEAR), ("century", CENTURY)):
        rtc.write_register(reg, expected(new)[name])
    clock.now += 3 * S
    assert rtc.read_register(SECONDS) == bcd(59)
    rtc.write_register(REG_B, REG_B_24H)
    clock.now += S
    assert read_time(rtc) == expected(dt.datetime(2000, 1, 1, 0, 0, 0))


def test_writing_a_time_register_while_running_moves_the_clock() -> None:
    rtc, clock, *_ = make()
    rtc.write_register(MINUTES, bcd(30))
    assert rtc.read_register(MINUTES) == bcd(30) and rtc.read_register(HOURS) == bcd(23)
    clock.now += S
    assert rtc.read_register(MINUTES) == bcd(30) and rtc.read_register(SECONDS) == bcd(59)


def test_divider_reset_stops_the_clock_and_the_first_update_comes_500ms_after() -> None:
    rtc, clock, *_ = make()
    rtc.write_register(REG_A, 0x66)  # DV = 110: reset
    clock.now += 10 * S
    assert rtc.read_register(SECONDS) == bcd(58)
    rtc.write_register(REG_A, 0x26)
    clock.now += 499 * MS
    assert rtc.read_register(SECONDS) == bcd(58)
    clock.now += 2 * MS
    assert rtc.read_register(SECONDS) == bcd(59)


def test_periodic_flag_and_interrupt() -> None:
    rtc, clock, irq, armed, _ = make(periodic=True)
    assert rtc.read_register(REG_A) & 0x7F == 0x26  # power-up: 32.768 kHz, RS 6
    rtc.read_register(REG_C)
    clock.now += 2 * MS  # RS 6: 1024 Hz, an edge every 976.5625 us
    assert rtc.read_register(REG_C) & REG_C_PF  # PF is set whether or not PIE is
    assert irq == []
    rtc.write_register(REG_A, 0x23)  # RS 3: 8192 Hz, faster than MIN_PERIOD_NS
    rtc.write_register(REG_B, REG_B_24H | REG_B_PIE)
    first = armed[-1]
    assert clock.now < first <= clock.now + 123 * US
    clock.now = first
    rtc.tick()
    assert irq == [True]
    assert armed[-1] >= clock.now + MIN_PERIOD_NS  # coalesced to at most 1 kHz
    assert rtc.read_register(REG_C) == REG_C_IRQF | REG_C_PF
    rtc.write_register(REG_A, 0x20)  # RS 0: no periodic interrupt
    deadline = rtc.deadline
    assert deadline is None


def test_ports_index_data_nmi_bit_ram_and_read_only_registers() -> None:
    rtc, *_ = make()
    rtc.write(0, 1, 0x80 | 0x40)  # NMI disabled, index 0x40
    assert rtc.nmi_disabled and rtc.index == 0x40
    rtc.write(1, 1, 0xA5)
    assert rtc.read(1, 1) == 0xA5 and rtc.read(0, 1) == 0xFF
    rtc.write(0, 2, 0x5A41)  # outw 0x70: index 0x41, then data 0x5a
    assert rtc.read_register(0x41) == 0x5A
    rtc.write_register(REG_D, 0)
    rtc.write_register(REG_C, 0xFF)
    assert rtc.read_register(REG_D) == 0x80 and rtc.read_register(REG_C) == 0
    assert rtc.unexpected_accesses == 2


def test_hostile_guest_gets_no_exception() -> None:
    rtc, clock, *_ = make()
    rng = random.Random(7)
    for _ in range(5000):
        clock.now += rng.choice([0, 1, US, MS, S, 3600 * S, 40 * 86400 * S])
        op = rng.randrange(4)
        if op == 0:
            rtc.write(rng.randrange(4), rng.choice([1, 2, 4, 8]), rng.getrandbits(64))
        elif op == 1:
            value = rtc.read(rng.randrange(4), rng.choice([1, 2, 4, 8]))
            assert value >= 0
        elif op == 2:
            rtc.tick()
        else:
            rtc.write_register(rng.randrange(256), rng.randrange(256))
        assert all(0 <= b <= 255 for b in rtc.cmos)


def test_civil_date_conversion_matches_datetime() -> None:
    epoch = dt.date(1970, 1, 1)
    for days in list(range(-800, 800)) + [11016, 10957, 2932896, -719162]:
        d = epoch + dt.timedelta(days=days)
        assert civil_from_days(days) == (d.year, d.month, d.day)
        assert days_from_civil(d.year, d.month, d.day) == days
    assert isinstance(days_from_civil(2024, 99, 165), int)  # garbage in, a number out


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0xC0, 0xFF, 0x00, 0x30, 0x59, 0x5A, 0x99]),
       st.sampled_from([0xC0, 0x00, 0x07, 0x59]),
       st.sampled_from([0xC0, 0x00, 0x13, 0x23, 0x81, 0x92]),
       st.integers(0, 3 * 86400), st.integers(1, 4000), st.booleans(), st.booleans())
def test_alarm_search_matches_trying_every_second(sec: int, minute: int, hour: int,
                                                  start: int, span: int, binary: bool,
                                                  h24: bool) -> None:
    rtc, *_ = make()
    rtc.cmos[REG_B] = (REG_B_DM if binary else 0) | (REG_B_24H if h24 else 0)
    rtc.cmos[SECONDS_ALARM], rtc.cmos[MINUTES_ALARM], rtc.cmos[HOURS_ALARM] = sec, minute, hour
    first = 1_700_000_000 + start
    last = first + span
    brute = any(rtc._alarm_matches(s) for s in range(first, last + 1))
    assert rtc._alarm_matches_between(first, last) == brute


def test_pc_cmos_init_fills_memory_sizes_cpus_and_checksum() -> None:
    rtc, *_ = make()
    pc_cmos_init(rtc, ram_below_4g=3 << 30, ram_above_4g=5 << 30, cpus=4)
    cmos = rtc.cmos
    assert int.from_bytes(cmos[0x15:0x17], "little") == 640
    assert int.from_bytes(cmos[0x17:0x19], "little") == 0xFFFF  # capped
    assert int.from_bytes(cmos[0x34:0x36], "little") == ((3 << 30) - (16 << 20)) >> 16
    assert int.from_bytes(cmos[0x5B:0x5E], "little") == (5 << 30) >> 16
    assert cmos[0x5F] == 3
    assert int.from_bytes(cmos[0x2E:0x30], "big") == sum(cmos[0x10:0x2E])
