"""IRQ 0 from the PIT (kvmpy.devices.pit_irq) with a fake clock, a recording timer and
the real I/O APIC behind the line."""

from __future__ import annotations

from kvmpy.apic.ioapic import IoApic
from kvmpy.apic.testing import FakeClock, make_system
from kvmpy.devices.irq import IrqRouter, isa_gsi
from kvmpy.devices.pit import PIT_FREQ_HZ, Pit8254, ns_for_ticks
from kvmpy.devices.pit_irq import MIN_PERIOD_NS, PitIrq0


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock(start_ns=0)
        self.armed: list[int] = []
        self.levels: list[tuple[int, bool]] = []
        router = IrqRouter(lambda gsi, level: self.levels.append((gsi, level)))
        self.pit = Pit8254(self.clock.ns)
        self.irq0 = PitIrq0(self.pit, router.line(isa_gsi(0)), self.armed.append,
                            self.clock.ns)
        self.pit.on_channel0_change = self.irq0.reschedule

    def program(self, mode: int, count: int) -> None:
        self.pit.write(3, 1, 0x30 | mode << 1)  # channel 0, lobyte/hibyte
        self.pit.write(0, 1, count & 0xFF)
        self.pit.write(0, 1, count >> 8)

    def fire(self) -> None:
        """Run the clock to the last armed deadline and tick."""
        self.clock.now = max(self.clock.now, self.armed[-1])
        self.irq0.tick()


def test_reset_state_ticks_at_18_2_hz_on_gsi2() -> None:
    rig = Rig()
    rig.irq0.reschedule()
    assert rig.armed == [ns_for_ticks(0x10000)]  # mode 3, count 65536: 54.9 ms
    rig.fire()
    assert rig.levels == [(2, True), (2, False)]
    assert rig.armed[-1] == ns_for_ticks(2 * 0x10000)


def test_periodic_mode2_at_1khz_and_lost_ticks_are_discarded() -> None:
    rig = Rig()
    count = PIT_FREQ_HZ // 1000
    rig.program(2, count)
    first = rig.armed[-1]
    assert abs(first - 1_000_000) < 1_000
    rig.fire()
    rig.clock.now += 10_000_000  # the host timer ran 10 ms late: ten ticks lost
    rig.irq0.tick()
    assert rig.irq0.edges == 2  # one pulse for the late tick, none replayed
    assert rig.armed[-1] > rig.clock.now


def test_one_shot_mode0_pulses_once() -> None:
    rig = Rig()
    rig.program(0, 1000)
    rig.fire()
    assert rig.irq0.edges == 1 and rig.irq0.deadline is None
    n = len(rig.armed)
    rig.irq0.tick()
    assert rig.irq0.edges == 1 and len(rig.armed) == n and rig.irq0.stale == 1


def test_fast_rates_are_coalesced_to_the_minimum_period() -> None:
    rig = Rig()
    rig.program(2, 2)  # ~600 kHz
    rig.fire()
    assert rig.armed[-1] - rig.clock.now >= MIN_PERIOD_NS - 1_000
    for _ in range(5):
        rig.fire()
    assert rig.irq0.edges == 6


def test_timer_armed_before_a_reprogramming_is_ignored() -> None:
    rig = Rig()
    rig.program(2, PIT_FREQ_HZ // 1000)  # 1 ms
    early = rig.armed[-1]
    rig.program(2, PIT_FREQ_HZ // 100)  # 10 ms, from now
    rig.clock.now = early
    rig.irq0.tick()
    assert rig.irq0.edges == 0 and rig.irq0.stale == 1
    rig.fire()
    assert rig.irq0.edges == 1


def test_irq0_reaches_ioapic_pin2() -> None:
    system = make_system(1)
    io = IoApic(system.bus)
    clock = FakeClock(start_ns=0)
    armed: list[int] = []
    pit = Pit8254(clock.ns)
    irq0 = PitIrq0(pit, IrqRouter(io.set_irq).line(isa_gsi(0)), armed.append, clock.ns)
    io.write(0, 4, 0x10 + 2 * 2)
    io.write(0x10, 4, 0x30)  # pin 2: vector 0x30, edge, unmasked
    irq0.reschedule()
    clock.now = armed[-1]
    irq0.tick()
    assert system[0].irr[0x30]
