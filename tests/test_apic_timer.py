"""The local APIC timer with a fake clock (SDM 10.5.4, 10.5.4.1)."""

import pytest

from kvmpy.apic import MSR_TSC_DEADLINE, ApicBus, LocalApic
from kvmpy.apic import constants as c
from kvmpy.apic.testing import FakeClock, make_system, read_reg, write_reg
from kvmpy.apic.timer import KVM_MIN_TIMER_PERIOD_NS, divide_from_tdcr

ONESHOT, PERIODIC, DEADLINE = 0, 1 << 17, 2 << 17
VEC = 0xEC


# SDM Figure 10-10: divide configuration register encoding.
@pytest.mark.parametrize(
    ("tdcr", "divide"),
    [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1)],
)
def test_divide_encoding(tdcr, divide):
    assert divide_from_tdcr(tdcr) == divide
    s = make_system(1)
    write_reg(s[0], c.REG_LVT_TIMER, VEC)
    write_reg(s[0], c.REG_TIMER_DIVIDE, tdcr)
    write_reg(s[0], c.REG_TIMER_INITIAL, 10)
    assert s[0].timer_deadline_ns() == s.clock.now + 10 * divide  # 1 GHz bus


def armed(x2apic=False, lvt=VEC, tdcr=0xB, count=1000):
    s = make_system(1, x2apic=x2apic)
    apic = s[0]
    write_reg(apic, c.REG_LVT_TIMER, lvt)
    write_reg(apic, c.REG_TIMER_DIVIDE, tdcr)
    if count:
        write_reg(apic, c.REG_TIMER_INITIAL, count)
    return s, apic


@pytest.mark.parametrize("x2apic", [False, True])
def test_one_shot(x2apic):
    s, apic = armed(x2apic)
    t0 = s.clock.now
    assert apic.timer_deadline_ns() == t0 + 1000
    s.clock.advance(250)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 750
    assert apic.timer_expired(t0 + 999) is False and apic.irr[VEC] == 0
    s.clock.advance(750)
    assert apic.timer_expired(s.clock.now) is True
    assert apic.pending_vector() == VEC and apic.tmr[VEC] == 0
    assert apic.timer_deadline_ns() is None
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 0  # one-shot stops at 0
    assert read_reg(apic, c.REG_TIMER_INITIAL) == 1000
    assert apic.timer_expired(s.clock.advance(10_000)) is False
    assert apic.stats["timer_fired"] == 1


def test_count_with_divider():
    s, apic = armed(tdcr=0x3, count=100)  # divide by 16
    t0 = s.clock.now
    assert apic.timer_deadline_ns() == t0 + 1600
    s.clock.advance(160)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 90
    s.clock.advance(15)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 90
    s.clock.advance(1)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 89


def test_periodic_rearms_and_skips_missed():
    s, apic = armed(lvt=VEC | PERIODIC, count=100)
    t0 = s.clock.now
    assert apic.timer_expired(t0 + 100) is True
    assert apic.timer_deadline_ns() == t0 + 200
    apic.ack(VEC)
    apic.eoi()
    assert apic.timer_expired(t0 + 350) is True  # late: one interrupt, next boundary
    assert apic.timer_deadline_ns() == t0 + 400
    assert apic.stats["timer_missed_periods"] == 1
    s.clock.now = t0 + 420
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 80
    assert apic.stats["timer_fired"] == 2


def test_initial_count_zero_stops():
    s, apic = armed()
    write_reg(apic, c.REG_TIMER_INITIAL, 0)
    assert apic.timer_deadline_ns() is None
    assert apic.timer_expired(s.clock.advance(10**6)) is False
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 0


def test_rewrite_initial_count_restarts():
    s, apic = armed()
    s.clock.advance(600)
    write_reg(apic, c.REG_TIMER_INITIAL, 1000)
    assert apic.timer_deadline_ns() == s.clock.now + 1000


def test_masked_timer_counts_without_interrupt():
    """SDM 10.5.1: the mask inhibits the interrupt, not the count-down."""
    s, apic = armed(lvt=VEC | c.LVT_MASKED | PERIODIC)
    s.clock.advance(400)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 600
    assert apic.timer_expired(s.clock.advance(600)) is True
    assert apic.irr.rfind(1) == -1
    assert apic.timer_deadline_ns() == s.clock.now + 1000
    assert apic.stats["timer_masked"] == 1 and apic.stats["timer_fired"] == 0


def test_divide_change_mid_count():
    s, apic = armed(count=1000)  # divide by 1
    s.clock.advance(400)
    write_reg(apic, c.REG_TIMER_DIVIDE, 0x0)  # divide by 2: 600 counts left
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 600
    assert apic.timer_deadline_ns() == s.clock.now + 1200
    s.clock.advance(200)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 500


def test_oneshot_to_periodic_keeps_count():
    s, apic = armed(count=1000)
    s.clock.advance(300)
    write_reg(apic, c.REG_LVT_TIMER, VEC | PERIODIC)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 700
    assert apic.timer_deadline_ns() == s.clock.now + 700
    assert apic.timer_expired(s.clock.advance(700))
    assert apic.timer_deadline_ns() == s.clock.now + 1000


def test_timer_illegal_vector():
    """SDM 10.5.3: an LVT with vector < 16 raises a receive-illegal-vector error."""
    s, apic = armed(lvt=0x0E)
    assert apic.timer_expired(s.clock.advance(1000))
    assert apic.irr.rfind(1) == -1
    write_reg(apic, c.REG_ESR, 0)
    assert read_reg(apic, c.REG_ESR) == c.ESR_RECV_ILLEGAL_VECTOR


def test_min_periodic_clamp():
    clock = FakeClock()
    bus = ApicBus(lambda i: None)
    apic = LocalApic(
        0,
        bus,
        bsp=True,
        clock_ns=clock.ns,
        tsc=clock.tsc,
        tsc_hz=clock.tsc_hz,
        min_periodic_ns=50_000,
    )
    bus.add(apic)
    apic.mmio_write(c.REG_SVR, 4, 0x1FF)
    apic.mmio_write(c.REG_LVT_TIMER, 4, VEC | PERIODIC)
    apic.mmio_write(c.REG_TIMER_DIVIDE, 4, 0xB)
    apic.mmio_write(c.REG_TIMER_INITIAL, 4, 10)
    assert apic.timer_deadline_ns() == clock.now + 50_000
    apic.mmio_write(c.REG_LVT_TIMER, 4, VEC)  # one-shot: no clamp on the next start
    apic.mmio_write(c.REG_TIMER_INITIAL, 4, 10)
    assert apic.timer_deadline_ns() == clock.now + 10


def kvm_clamped_apic() -> tuple[FakeClock, LocalApic]:
    """An enabled APIC with KVM's minimum period, as Machine makes it (the default
    --min-timer-period-us)."""
    clock = FakeClock()
    bus = ApicBus(lambda i: None)
    apic = LocalApic(0, bus, bsp=True, clock_ns=clock.ns, tsc=clock.tsc,
                     tsc_hz=clock.tsc_hz, min_periodic_ns=KVM_MIN_TIMER_PERIOD_NS)
    bus.add(apic)
    apic.mmio_write(c.REG_SVR, 4, 0x1FF)
    apic.mmio_write(c.REG_TIMER_DIVIDE, 4, 0xB)  # divide by 1: one count per ns
    return clock, apic


def test_kvm_clamps_a_tiny_periodic_period_to_200_us():
    """KVM's limit_periodic_timer_frequency (min_timer_period_us = 200): a 1-count
    period (1 ns, guest/timer_storm.c) fires every 200 us, not every ns; counted."""
    assert KVM_MIN_TIMER_PERIOD_NS == 200_000
    clock, apic = kvm_clamped_apic()
    apic.mmio_write(c.REG_LVT_TIMER, 4, VEC | PERIODIC)
    apic.mmio_write(c.REG_TIMER_INITIAL, 4, 1)
    t0 = clock.now
    assert apic.timer_deadline_ns() == t0 + 200_000
    assert not apic.timer_expired(clock.advance(199_999))
    assert apic.timer_expired(clock.advance(1)) and apic.irr[VEC]
    assert apic.timer_deadline_ns() == t0 + 400_000
    assert apic.timer_expired(clock.advance(1_000_000))  # 5 periods late: one interrupt
    assert apic.timer_deadline_ns() == t0 + 1_400_000
    assert apic.timer.missed_periods == 4
    assert apic.stats["timer_period_clamped"] == 1
    apic.mmio_write(c.REG_TIMER_DIVIDE, 4, 0x0)  # divide by 2: 2 ns, still clamped
    assert apic.timer_deadline_ns() - clock.now <= 200_000
    assert apic.stats["timer_period_clamped"] == 2


def test_kvm_leaves_a_normal_period_and_one_shot_timers_alone():
    clock, apic = kvm_clamped_apic()
    apic.mmio_write(c.REG_LVT_TIMER, 4, VEC | PERIODIC)
    apic.mmio_write(c.REG_TIMER_INITIAL, 4, 1_000_000)  # 1 ms
    t0 = clock.now
    assert apic.timer_deadline_ns() == t0 + 1_000_000
    assert apic.timer_expired(clock.advance(1_000_000))
    assert apic.timer_deadline_ns() == t0 + 2_000_000
    apic.mmio_write(c.REG_TIMER_INITIAL, 4, 200_000)  # exactly the minimum
    assert apic.timer_deadline_ns() == clock.now + 200_000
    apic.mmio_write(c.REG_LVT_TIMER, 4, VEC | ONESHOT)
    apic.mmio_write(c.REG_TIMER_INITIAL, 4, 10)  # one-shot: KVM does not clamp it
    assert apic.timer_deadline_ns() == clock.now + 10
    assert apic.stats["timer_period_clamped"] == 0
    apic.mmio_write(c.REG_LVT_TIMER, 4, VEC | PERIODIC)  # the running 10 ns, periodic now
    assert apic.stats["timer_period_clamped"] == 1  # KVM: apic_update_lvtt clamps it
    assert apic.timer_deadline_ns() == clock.now + 200_000


# ---- TSC-deadline mode (SDM 10.5.4.1); fake TSC runs at 2 GHz -----------------------
@pytest.mark.parametrize("x2apic", [False, True])
def test_tsc_deadline(x2apic):
    s, apic = armed(x2apic, lvt=VEC | DEADLINE, count=0)
    tsc0 = s.clock.tsc()
    apic.wrmsr(MSR_TSC_DEADLINE, tsc0 + 2000)
    assert apic.rdmsr(MSR_TSC_DEADLINE) == tsc0 + 2000
    assert apic.timer_deadline_ns() == s.clock.now + 1000
    write_reg(apic, c.REG_TIMER_INITIAL, 5)  # ignored in TSC-deadline mode
    assert read_reg(apic, c.REG_TIMER_INITIAL) == 0
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 0
    assert apic.timer_expired(s.clock.advance(999)) is False
    assert apic.timer_expired(s.clock.advance(1)) is True
    assert apic.pending_vector() == VEC
    assert apic.rdmsr(MSR_TSC_DEADLINE) == 0  # reads 0 after firing
    assert apic.timer_deadline_ns() is None


def test_tsc_deadline_zero_disarms_and_past_fires_now():
    s, apic = armed(lvt=VEC | DEADLINE, count=0)
    apic.wrmsr(MSR_TSC_DEADLINE, s.clock.tsc() + 10**6)
    apic.wrmsr(MSR_TSC_DEADLINE, 0)
    assert apic.timer_deadline_ns() is None
    apic.wrmsr(MSR_TSC_DEADLINE, 1)  # in the past
    assert apic.timer_deadline_ns() == s.clock.now
    assert apic.timer_expired(s.clock.now)


def test_tsc_deadline_ignored_in_other_modes():
    s, apic = armed(count=0)
    apic.wrmsr(MSR_TSC_DEADLINE, s.clock.tsc() + 100)
    assert apic.rdmsr(MSR_TSC_DEADLINE) == 0
    assert apic.timer_deadline_ns() is None
    assert apic.stats["tsc_deadline_ignored"] == 1


def test_mode_switch_to_and_from_tsc_deadline_disarms():
    """SDM 10.5.4.1: changing to or from TSC-deadline mode disarms the timer."""
    s, apic = armed(count=1000)
    write_reg(apic, c.REG_LVT_TIMER, VEC | DEADLINE)
    assert apic.timer_deadline_ns() is None
    assert read_reg(apic, c.REG_TIMER_INITIAL) == 0
    apic.wrmsr(MSR_TSC_DEADLINE, s.clock.tsc() + 100)
    write_reg(apic, c.REG_LVT_TIMER, VEC)
    assert apic.timer_deadline_ns() is None
    assert apic.rdmsr(MSR_TSC_DEADLINE) == 0
    write_reg(apic, c.REG_LVT_TIMER, VEC | DEADLINE)
    assert apic.rdmsr(MSR_TSC_DEADLINE) == 0


def test_sw_disabled_timer_raises_nothing():
    s, apic = armed()
    write_reg(apic, c.REG_SVR, 0xFF)  # masks the LVT (SDM 10.4.7.2)
    assert apic.timer_expired(s.clock.advance(1000))
    assert apic.irr.rfind(1) == -1
