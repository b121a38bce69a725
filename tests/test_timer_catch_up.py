"""A timer expiry that is due but not yet processed when the guest reprograms the timer.

kvmpy's APIC timer fires when the owning vCPU's loop calls `timer_expired()`; in KVM an
hrtimer fires on its own. When the host stalls the vCPU thread across a deadline (here:
4 ms scheduler ticks on two shared cores), the guest's next timer-register write can
arrive before the loop has processed the expiry. The write must then see the timer as
KVM (and hardware) would: already expired, its interrupt raised under the old LVT.

kvm-unit-tests apic.c test_apic_change_mode is the guest that showed it: one-shot
count-down to half, a stall, then LVT timer -> periodic. Before the fix the expired
one-shot was restarted as a periodic count-down from the initial count (TMCCT read
TMICT: "TMCCT should not be reset to TMICT value" failed), or, when the loop had
processed the expiry one exit earlier, stayed at 0: the outcome depended on which exit
the stall fell before, on either path (fastpath or slow). Now both read 0, as KVM's
apic_get_tmcct does after the hrtimer has fired.
"""

from __future__ import annotations

import pytest

from kvmpy.apic import MSR_TSC_DEADLINE
from kvmpy.apic import constants as c
from kvmpy.apic.testing import make_system, read_reg, write_reg
from kvmpy.exits import Fastpath, handle_exit, handle_exit_irqoff
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.vcpu import Exit

ONESHOT, PERIODIC, DEADLINE = 0, 1 << 17, 2 << 17
VEC = 0xEE
TMICT = 0x999999  # apic.c's initial count; divide by 1: 10.07 ms at the 1 GHz bus
MODES = [False, True]


def armed(x2apic: bool, lvt: int = VEC | ONESHOT, count: int = TMICT):
    s = make_system(1, x2apic=x2apic)
    apic = s[0]
    write_reg(apic, c.REG_LVT_TIMER, lvt)
    write_reg(apic, c.REG_TIMER_DIVIDE, 0xB)
    if count:
        write_reg(apic, c.REG_TIMER_INITIAL, count)
    return s, apic


@pytest.mark.parametrize("x2apic", MODES)
def test_expired_oneshot_switched_to_periodic_stays_at_zero(x2apic: bool) -> None:
    s, apic = armed(x2apic)
    s.clock.advance(TMICT + 5_000)  # past the deadline; the vCPU loop has not run
    write_reg(apic, c.REG_LVT_TIMER, VEC | PERIODIC)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 0
    assert apic.irr[VEC] == 1  # the one-shot's interrupt, raised before the switch
    assert apic.timer_deadline_ns() is None  # nothing left to fire
    s.clock.advance(3 * TMICT)
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 0
    assert not apic.timer_expired(s.clock.now)
    assert apic.stats["timer_fired"] == 1


@pytest.mark.parametrize("x2apic", MODES)
def test_due_period_is_delivered_before_a_switch_to_oneshot(x2apic: bool) -> None:
    s, apic = armed(x2apic, lvt=VEC | PERIODIC)
    s.clock.advance(TMICT + 1_000)  # one period done, not processed
    write_reg(apic, c.REG_LVT_TIMER, VEC | ONESHOT)
    assert apic.irr[VEC] == 1 and apic.stats["timer_fired"] == 1
    # The count-down continues from where the period wrapped, then stops at 0.
    assert read_reg(apic, c.REG_TIMER_CURRENT) == TMICT - 1_000
    assert apic.timer_deadline_ns() == s.clock.now + TMICT - 1_000


@pytest.mark.parametrize("x2apic", MODES)
def test_expired_oneshot_still_interrupts_when_the_count_is_rewritten(x2apic: bool) -> None:
    s, apic = armed(x2apic)
    s.clock.advance(TMICT)
    write_reg(apic, c.REG_TIMER_INITIAL, 1000)
    assert apic.irr[VEC] == 1 and apic.stats["timer_fired"] == 1
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 1000
    assert apic.timer_deadline_ns() == s.clock.now + 1000


@pytest.mark.parametrize("x2apic", MODES)
def test_expiry_due_before_masking_is_delivered(x2apic: bool) -> None:
    s, apic = armed(x2apic)
    s.clock.advance(TMICT + 1)
    write_reg(apic, c.REG_LVT_TIMER, VEC | ONESHOT | c.LVT_MASKED)
    assert apic.irr[VEC] == 1


@pytest.mark.parametrize("x2apic", MODES)
def test_divide_change_after_expiry_keeps_the_expired_oneshot_at_zero(x2apic: bool) -> None:
    s, apic = armed(x2apic)
    s.clock.advance(TMICT + 7)
    write_reg(apic, c.REG_TIMER_DIVIDE, 0x0)
    assert apic.irr[VEC] == 1
    assert read_reg(apic, c.REG_TIMER_CURRENT) == 0
    assert apic.timer_deadline_ns() is None


def test_tsc_deadline_due_before_rearming_is_delivered() -> None:
    s, apic = armed(True, lvt=VEC | DEADLINE, count=0)
    apic.wrmsr(MSR_TSC_DEADLINE, s.clock.tsc() + 2_000)
    s.clock.advance(2_000)  # due (1000 ns at 2 GHz), not processed
    apic.wrmsr(MSR_TSC_DEADLINE, s.clock.tsc() + 2_000_000)
    assert apic.irr[VEC] == 1 and apic.stats["timer_fired"] == 1
    assert apic.rdmsr(MSR_TSC_DEADLINE) == s.clock.tsc() + 2_000_000


# ---------------------------------------------------------------- through the exit paths


class TimerVcpu:
    """The attributes exits.py uses, around one real x2APIC; counts timer syncs."""

    def __init__(self, apic, view, *, fastpath: bool) -> None:
        from kvmpy.trace import ExitStats

        self.apic = apic
        self.index = 0
        self.fastpath_enabled = fastpath
        self.view = view
        self.stats = ExitStats(False)
        self.machine = None
        self.syncs = 0

    def sync_timer(self) -> None:
        self.syncs += 1

    def after_apic_write(self) -> None:
        self.syncs += 1

    def apic_base_changed(self) -> None:
        pass


def _exit(vcpu: TimerVcpu, reason: int, index: int, value: int = 0) -> int:
    """One MSR exit as Vcpu.run_loop handles it; returns the RDMSR result."""
    exit = Exit((reason, index, value, 0))
    fp = handle_exit_irqoff(vcpu, exit)
    if fp is not Fastpath.REENTER_GUEST:
        handle_exit(vcpu, exit, fp)
    assert vcpu.view.u8[kr.MSR_ERROR] == 0
    return vcpu.view.u64[kr.MSR_DATA] if reason == k.KVM_EXIT_X86_RDMSR else 0


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "slow-path"])
def test_apic_change_mode_with_a_stall_before_the_lvt_write(fastpath: bool) -> None:
    """apic.c test_apic_change_mode, x2APIC, with the host stalling the vCPU between
    the LVT timer read and the LVT timer write, across the one-shot's deadline."""
    import mmap

    from kvmpy.kvm.run import RunView

    s = make_system(1, x2apic=True)
    apic = s[0]
    view = RunView(mmap.mmap(-1, 4096))
    vcpu = TimerVcpu(apic, view, fastpath=fastpath)
    rd, wr = k.KVM_EXIT_X86_RDMSR, k.KVM_EXIT_X86_WRMSR
    lvtt, tmict, tmcct, tdcr = 0x832, 0x838, 0x839, 0x83E
    _exit(vcpu, wr, lvtt, VEC | ONESHOT)
    _exit(vcpu, wr, tdcr, 0xB)
    _exit(vcpu, wr, tmict, TMICT)
    s.clock.advance(TMICT // 2 + 10)  # wait_until_tmcct_is_zero(tmict, true)
    assert _exit(vcpu, rd, tmcct) < TMICT // 2
    value = _exit(vcpu, rd, lvtt)  # apic_change_mode: read LVTT ...
    s.clock.advance(TMICT)  # ... the host stalls the vCPU past the deadline ...
    _exit(vcpu, wr, lvtt, (value & ~(3 << 17)) | PERIODIC)  # ... then writes it
    # KVM: the hrtimer fired during the stall; the switched timer stays at 0.
    assert _exit(vcpu, rd, tmcct) == 0
    assert apic.irr[VEC] == 1
    s.clock.advance(2 * TMICT)
    assert _exit(vcpu, rd, tmcct) == 0
    assert vcpu.syncs == 4  # every timer-register write re-synced the host timer


@pytest.mark.parametrize("x2apic", MODES)
def test_past_tsc_deadline_fires_before_a_mode_switch(x2apic: bool) -> None:
    """Found by the hypothesis model (test_apic_properties): a deadline already past
    fires at once (SDM 10.5.4.1), so the LVT write that leaves TSC-deadline mode next,
    at the same instant, finds the interrupt raised, not a disarmed timer."""
    s, apic = armed(x2apic, lvt=VEC | DEADLINE, count=0)
    apic.wrmsr(MSR_TSC_DEADLINE, 1)
    write_reg(apic, c.REG_LVT_TIMER, VEC | ONESHOT)
    assert apic.irr[VEC] == 1 and apic.timer_deadline_ns() is None
