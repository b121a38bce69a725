"""The local APIC timer as pure arithmetic on a clock (SDM 10.5.4, 10.5.4.1).

No thread and no host timer: the VMM asks ``deadline_ns`` for the next expiry, and
calls ``expire(now)`` when that time has come. The count is derived from the clock:
the APIC bus runs at 1 GHz (one tick per ns, as KVM's APIC_BUS_CYCLE_NS = 1), and the
counter decrements once per ``divide`` ticks.

A periodic timer's period is clamped to ``min_periodic_ns`` (the VMM passes
KVM_MIN_TIMER_PERIOD_NS): KVM's limit_periodic_timer_frequency (arch/x86/kvm/lapic.c)
does so at each start, divide change and mode change of a periodic timer, "since the
hrtimers are not throttled by the host scheduler"; one-shot and TSC-deadline timers
are not clamped.

The mode, the TSC deadline and the next expiry are words of the register buffer shared
with the native exit core (``regs``; kvmpy/native/core.h R_TIMER_MODE, Q_TSC_DEADLINE,
Q_TIMER_DEADLINE): the core's fastpath completes IA32_TSC_DEADLINE writes on them.
"""

from __future__ import annotations

from kvmpy import _core as nc

from .constants import (
    APIC_BUS_NS_PER_TICK,
    TDCR_WRITABLE,
    TIMER_ONESHOT,
    TIMER_PERIODIC,
    TIMER_TSC_DEADLINE,
)

# KVM's min_timer_period_us module parameter (arch/x86/kvm/x86.c, default 200): the
# shortest period of a periodic APIC timer (lapic.c limit_periodic_timer_frequency).
KVM_MIN_TIMER_PERIOD_NS = 200_000


def divide_from_tdcr(tdcr: int) -> int:
    """Divisor encoded by the divide configuration register (SDM Figure 10-10).

    Bits 3,1,0 form a 3-bit value v; the divisor is 2**((v + 1) % 8), so 0b111 is 1.
    """
    v = ((tdcr & 0x8) >> 1) | (tdcr & 0x3)
    return 1 << ((v + 1) & 7)


_NEVER = (1 << 64) - 1  # a deadline past the uint64 word: centuries away, kept there


class ApicTimer:
    """One-shot, periodic and TSC-deadline timer state of one local APIC."""

    def __init__(self, tsc_hz: int, min_periodic_ns: int = 0,
                 regs: bytearray | None = None) -> None:
        self.tsc_hz = tsc_hz
        self.min_periodic_ns = min_periodic_ns
        self.clamped = 0  # periodic periods clamped to min_periodic_ns (kept across INIT)
        self.expirations = 0  # expire() calls that expired the timer (kept across INIT)
        regs = regs if regs is not None else bytearray(nc.REGS_BYTES)
        self._r = memoryview(regs).cast("I")
        self._q = memoryview(regs).cast("Q")
        self.reset()

    @property
    def mode(self) -> int:
        """LVT timer bits 18:17 as the timer runs them (R_TIMER_MODE)."""
        return self._r[nc.R_TIMER_MODE]

    @mode.setter
    def mode(self, value: int) -> None:
        self._r[nc.R_TIMER_MODE] = value

    @property
    def tsc_deadline(self) -> int:
        """IA32_TSC_DEADLINE as armed, 0 when disarmed (Q_TSC_DEADLINE)."""
        return self._q[nc.Q_TSC_DEADLINE]

    @tsc_deadline.setter
    def tsc_deadline(self, value: int) -> None:
        self._q[nc.Q_TSC_DEADLINE] = value

    @property
    def deadline_ns(self) -> int | None:
        """The next expiry, absolute clock ns, or None (Q_TIMER_DEADLINE, 0: none; the
        clock, CLOCK_MONOTONIC or a test's, is never 0 when a timer is armed)."""
        return self._q[nc.Q_TIMER_DEADLINE] or None

    @deadline_ns.setter
    def deadline_ns(self, value: int | None) -> None:
        self._q[nc.Q_TIMER_DEADLINE] = min(value, _NEVER) if value else 0

    def reset(self) -> None:
        """Power-up state (SDM 10.4.7.1): counts 0, divide config 0 (divide by 2)."""
        self.mode = TIMER_ONESHOT  # LVT timer bits 18:17 (3 is reserved: acts as one-shot)
        self.initial_count = 0
        self.tdcr = 0
        self.divide = divide_from_tdcr(0)
        self.start_ns = 0  # clock time at which the current count was initial_count
        self.deadline_ns = None  # next expiry, absolute clock ns
        self.tsc_deadline = 0  # IA32_TSC_DEADLINE as armed (0: disarmed)
        self.missed_periods = 0

    # --- derived values ---------------------------------------------------------
    def _tick_ns(self) -> int:
        return self.divide * APIC_BUS_NS_PER_TICK

    def period_ns(self) -> int:
        """Length of one count-down from initial_count (periodic: clamped to the minimum)."""
        ns = self.initial_count * self._tick_ns()
        if self.mode == TIMER_PERIODIC:
            ns = max(ns, self.min_periodic_ns)
        return ns

    def current_count(self, now_ns: int) -> int:
        """Current-count register (SDM 10.5.4): 0 when stopped and in TSC-deadline mode."""
        if self.mode == TIMER_TSC_DEADLINE or self.initial_count == 0:
            return 0
        elapsed = now_ns - self.start_ns
        if self.mode == TIMER_PERIODIC:
            if self.deadline_ns is None:
                return 0
            elapsed %= self.period_ns()
        elif self.deadline_ns is None:
            return 0  # a one-shot count-down that fired stays at 0
        return max(self.initial_count - elapsed // self._tick_ns(), 0)

    # --- register writes ----------------------------------------------------------
    def set_mode(self, mode: int, now_ns: int) -> None:
        """LVT timer mode change. Entering or leaving TSC-deadline mode disarms the
        timer (SDM 10.5.4.1); one-shot <-> periodic keeps the running count-down."""
        if mode == self.mode:
            return
        if (mode == TIMER_TSC_DEADLINE) != (self.mode == TIMER_TSC_DEADLINE):
            self.mode = mode
            self.initial_count = 0
            self.tsc_deadline = 0
            self.deadline_ns = None
            return
        count = self.current_count(now_ns)
        self.mode = mode
        if self.deadline_ns is not None:
            self._rebase(count, now_ns)

    def set_initial_count(self, count: int, now_ns: int) -> None:
        """Initial-count write: (re)starts the count-down; 0 stops the timer. Ignored in
        TSC-deadline mode (SDM 10.5.4.1)."""
        if self.mode == TIMER_TSC_DEADLINE:
            return
        self.initial_count = count & 0xFFFFFFFF
        if self.initial_count == 0:
            self.deadline_ns = None
            return
        self.start_ns = now_ns
        self.deadline_ns = now_ns + self.period_ns()
        self._count_clamp()

    def set_divide(self, tdcr: int, now_ns: int) -> None:
        """Divide-configuration write; a running count-down continues from its current
        value at the new rate."""
        count = self.current_count(now_ns)
        self.tdcr = tdcr & TDCR_WRITABLE
        self.divide = divide_from_tdcr(self.tdcr)
        if self.deadline_ns is not None and self.mode != TIMER_TSC_DEADLINE:
            self._rebase(count, now_ns)

    def _rebase(self, count: int, now_ns: int) -> None:
        """Move start_ns so that the count-down reads ``count`` now."""
        self.start_ns = now_ns - (self.initial_count - count) * self._tick_ns()
        self.deadline_ns = self.start_ns + self.period_ns()
        self._count_clamp()

    def _count_clamp(self) -> None:
        """After a periodic count-down (re)started: count it if its period was clamped
        (where KVM calls limit_periodic_timer_frequency, which logs it)."""
        if self.mode == TIMER_PERIODIC and \
                self.initial_count * self._tick_ns() < self.min_periodic_ns:
            self.clamped += 1

    def set_tsc_deadline(self, value: int, now_ns: int, tsc_now: int) -> None:
        """IA32_TSC_DEADLINE write in TSC-deadline mode: arm at ``value`` (TSC units), or
        disarm with 0. A deadline already past fires at once (SDM 10.5.4.1)."""
        self.tsc_deadline = value
        if value == 0:
            self.deadline_ns = None
            return
        delta = value - tsc_now
        if delta <= 0:
            self.deadline_ns = now_ns
        else:
            self.deadline_ns = now_ns + -(-delta * 1_000_000_000 // self.tsc_hz)

    # --- expiry ---------------------------------------------------------------------
    def expire(self, now_ns: int) -> bool:
        """Advance past an expiry due at ``now_ns``; True if the timer expired.

        One-shot stops, TSC-deadline disarms (the MSR then reads 0), periodic rearms on
        the next period boundary after ``now_ns`` (missed periods are counted, not
        replayed: an APIC holds one pending interrupt per vector anyway).
        """
        deadline = self.deadline_ns
        if deadline is None or now_ns < deadline:
            return False
        self.expirations += 1
        if self.mode == TIMER_PERIODIC:
            period = self.period_ns()
            done = (now_ns - self.start_ns) // period + 1
            self.missed_periods += done - (deadline - self.start_ns) // period
            self.missed_periods -= 1
            self.deadline_ns = self.start_ns + done * period
        elif self.mode == TIMER_TSC_DEADLINE:
            self.tsc_deadline = 0
            self.deadline_ns = None
        else:
            self.deadline_ns = None
        return True
