"""Test and simulation helpers: a fake clock and a ready-made set of APICs.

Used by tests/test_apic_*.py; also handy for a VMM's own model tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import constants as c
from .bus import ApicBus
from .lapic import LocalApic


class FakeClock:
    """A monotonic clock in ns that only moves when told to, with a TSC derived from it."""

    def __init__(self, tsc_hz: int = 2_000_000_000, start_ns: int = 1_000_000) -> None:
        self.tsc_hz = tsc_hz
        self.now = start_ns

    def ns(self) -> int:
        return self.now

    def tsc(self) -> int:
        return self.now * self.tsc_hz // 1_000_000_000

    def tsc_at(self, ns: int) -> int:
        return ns * self.tsc_hz // 1_000_000_000

    def advance(self, ns: int) -> int:
        self.now += ns
        return self.now


@dataclass
class ApicSystem:
    """``n`` APICs on one bus; ``notified`` records every notify(index) in order."""

    clock: FakeClock
    bus: ApicBus
    apics: list[LocalApic]
    notified: list[int] = field(default_factory=list)

    def __getitem__(self, index: int) -> LocalApic:
        return self.apics[index]


def make_system(
    n: int, *, x2apic: bool = False, enable: bool = True, tsc_hz: int = 2_000_000_000
) -> ApicSystem:
    """``n`` APICs, APIC ``i`` with ID ``i`` (0 is the BSP), in xAPIC or x2APIC mode and,
    if ``enable``, software-enabled through SVR (spurious vector 0xFF)."""
    clock = FakeClock(tsc_hz)
    notified: list[int] = []
    bus = ApicBus(notified.append)
    apics = []
    for i in range(n):
        apic = LocalApic(i, bus, bsp=(i == 0), clock_ns=clock.ns, tsc=clock.tsc,
                         tsc_at=clock.tsc_at, tsc_hz=tsc_hz)
        bus.add(apic)
        if x2apic:
            apic.wrmsr(c.MSR_APIC_BASE, apic.rdmsr(c.MSR_APIC_BASE) | c.APIC_BASE_EXTD)
        if enable:
            write_reg(apic, c.REG_SVR, c.SVR_APIC_ENABLED | 0xFF)
        apics.append(apic)
    return ApicSystem(clock, bus, apics, notified)


def write_reg(apic: LocalApic, offset: int, value: int) -> None:
    """Write a register through whichever interface the APIC's mode provides."""
    if apic.mode is apic.mode.X2APIC:
        apic.wrmsr(c.X2APIC_MSR_FIRST + (offset >> 4), value)
    else:
        apic.mmio_write(offset, 4, value)


def read_reg(apic: LocalApic, offset: int) -> int:
    """Read a register through whichever interface the APIC's mode provides."""
    if apic.mode is apic.mode.X2APIC:
        return apic.rdmsr(c.X2APIC_MSR_FIRST + (offset >> 4))
    return apic.mmio_read(offset, 4)


def send(apic: LocalApic, icr_low: int, dest: int) -> None:
    """Write the ICR as the guest would: MSR 0x830 in x2APIC, ICR high then low in xAPIC."""
    if apic.mode is apic.mode.X2APIC:
        apic.wrmsr(c.MSR_X2APIC_ICR, (dest << 32) | icr_low)
    else:
        apic.mmio_write(c.REG_ICR_HIGH, 4, dest << 24)
        apic.mmio_write(c.REG_ICR_LOW, 4, icr_low)
