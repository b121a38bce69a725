"""8254 PIT and port 0x61 against a fake clock: modes 0-5, latches, read-back, gates."""

from __future__ import annotations

import time

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.pit import (
    PIT_BASE,
    PIT_FREQ_HZ,
    PIT_LENGTH,
    SYSTEM_CONTROL_B_PORT,
    Pit8254,
    SystemControlB,
    ns_for_ticks,
    ticks_between,
)

CH0, CH1, CH2, CTRL, PORT61 = 0x40, 0x41, 0x42, 0x43, 0x61


class FakeClock:
    def __init__(self) -> None:
        self.ns = 5_000_000_000
        self.origin = self.ns

    def __call__(self) -> int:
        return self.ns

    def mark(self) -> None:
        """Make the current time the origin for `at_tick`."""
        self.origin = self.ns

    def at_tick(self, ticks: int) -> None:
        """Set the time to exactly `ticks` PIT ticks after the last mark."""
        self.ns = self.origin + ns_for_ticks(ticks)


class Machine:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.changes = 0
        self.pit = Pit8254(self.clock, on_channel0_change=self._changed)
        self.port61 = SystemControlB(self.pit)
        self.bus = Bus("pio")
        self.bus.register(PIT_BASE, PIT_LENGTH, self.pit)
        self.bus.register(SYSTEM_CONTROL_B_PORT, 1, self.port61)

    def _changed(self) -> None:
        self.changes += 1

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def program(self, channel: int, mode: int, count: int, access: int = 3) -> None:
        """Control word then the count, and mark the clock at the load."""
        self.outb(CTRL, channel << 6 | access << 4 | mode << 1)
        port = CH0 + channel
        if access in (1, 3):
            self.outb(port, count & 0xFF)
        if access in (2, 3):
            self.outb(port, (count >> 8) & 0xFF)
        self.clock.mark()

    def latched(self, channel: int) -> int:
        self.outb(CTRL, channel << 6)  # counter latch command
        return self.inb(CH0 + channel) | self.inb(CH0 + channel) << 8

    def out2(self) -> int:
        return (self.inb(PORT61) >> 5) & 1

    def gate2(self, level: int) -> None:
        self.outb(PORT61, (self.inb(PORT61) & 0x0C) | level)


def test_tick_conversion_round_trips() -> None:
    for ticks in (0, 1, 2, 1193, 65536, 10**7):
        assert ticks_between(0, ns_for_ticks(ticks)) == ticks
        assert ticks_between(0, ns_for_ticks(ticks) - 1) == max(ticks - 1, 0)
    assert ticks_between(100, 50) == 0  # a clock going backwards never counts negative
    assert ticks_between(0, 1_000_000_000) == PIT_FREQ_HZ


def test_linux_tsc_calibration_sequence_mode0_on_channel2() -> None:
    """pit_calibrate_tsc(): gate high, speaker off, ch2 mode 0 lohi, poll OUT2 (bit 5)."""
    m = Machine()
    m.outb(PORT61, (m.inb(PORT61) & ~0x02) | 0x01)
    latch = PIT_FREQ_HZ // 20  # 50 ms, CAL_LATCH
    m.outb(CTRL, 0xB0)
    m.outb(CH2, latch & 0xFF)
    assert m.out2() == 0  # OUT low after the control word in mode 0
    m.outb(CH2, latch >> 8)
    m.clock.mark()
    assert m.out2() == 0
    m.clock.at_tick(latch - 1)
    assert m.out2() == 0
    assert m.latched(2) == 1
    m.clock.at_tick(latch)
    assert m.out2() == 1
    assert m.latched(2) == 0
    m.clock.at_tick(latch + 5)
    assert m.out2() == 1  # OUT stays high after terminal count ...
    assert m.latched(2) == 0x10000 - 5  # ... while the counter wraps and keeps counting


def test_linux_quick_pit_calibration_reads_msb() -> None:
    """quick_pit_calibrate(): ch2 mode 0 count 0xffff, reads via inb(0x42) twice (LSB, MSB)."""
    m = Machine()
    m.outb(PORT61, (m.inb(PORT61) & ~0x02) | 0x01)
    m.program(2, 0, 0xFFFF)
    for ticks in (0, 256, 1000, 30000):
        m.clock.at_tick(ticks)
        lsb, msb = m.inb(CH2), m.inb(CH2)
        assert msb << 8 | lsb == 0xFFFF - ticks


def test_mode0_gate_low_pauses_counting() -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, 0, 1000)
    m.clock.at_tick(300)
    m.gate2(0)
    m.clock.at_tick(900)
    assert m.latched(2) == 700  # frozen while GATE is low
    assert m.out2() == 0
    m.gate2(1)
    m.clock.mark()
    m.clock.at_tick(699)
    assert m.out2() == 0 and m.latched(2) == 1
    m.clock.at_tick(700)
    assert m.out2() == 1


def test_mode0_first_byte_of_a_new_count_stops_counting() -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, 0, 1000)
    m.clock.at_tick(100)
    m.outb(CH2, 0x10)  # low byte of a new count
    m.clock.at_tick(400)
    assert m.latched(2) == 900
    m.outb(CH2, 0x00)  # high byte: count 0x10 loads and starts
    m.clock.mark()
    m.clock.at_tick(0x10)
    assert m.out2() == 1


def test_mode2_rate_generator() -> None:
    m = Machine()
    m.gate2(1)
    n = 5
    m.program(2, 2, n)
    seen = []
    for t in range(2 * n + 1):
        m.clock.at_tick(t)
        seen.append((m.latched(2), m.out2()))
    assert seen == [
        (5, 1),
        (4, 1),
        (3, 1),
        (2, 1),
        (1, 0),
        (5, 1),
        (4, 1),
        (3, 1),
        (2, 1),
        (1, 0),
        (5, 1),
    ]


def test_mode3_square_wave_even_and_odd() -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, 3, 6)
    outs = []
    for t in range(12):
        m.clock.at_tick(t)
        outs.append(m.out2())
    assert outs == [1, 1, 1, 0, 0, 0] * 2
    m.clock.at_tick(1)
    assert m.latched(2) == 4  # counts down by two
    m.program(2, 3, 5)  # odd: high for (N+1)/2, low for (N-1)/2
    outs = []
    for t in range(10):
        m.clock.at_tick(t)
        outs.append(m.out2())
    assert outs == [1, 1, 1, 0, 0] * 2


def test_modes_6_and_7_alias_2_and_3_but_report_their_bits() -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, 7, 4)
    outs = []
    for t in range(4):
        m.clock.at_tick(t)
        outs.append(m.out2())
    assert outs == [1, 1, 0, 0]
    m.outb(CTRL, 0xC0 | 0x20 | 0x08)  # read-back: status only, channel 2
    assert (m.inb(CH2) >> 1) & 7 == 7


def test_mode2_and_3_gate_low_forces_out_high_and_rising_edge_reloads() -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, 3, 10)
    m.clock.at_tick(7)
    assert m.out2() == 0
    m.gate2(0)
    assert m.out2() == 1
    m.clock.at_tick(50)
    assert m.out2() == 1
    m.gate2(1)
    m.clock.mark()
    assert m.latched(2) == 10  # reloaded on the rising edge
    m.clock.at_tick(5)
    assert m.out2() == 0


def test_mode1_hardware_retriggerable_one_shot() -> None:
    m = Machine()
    m.program(2, 1, 100)
    m.clock.at_tick(500)
    assert m.out2() == 1  # waiting for a trigger: OUT high, not counting
    m.gate2(1)  # rising edge triggers
    m.clock.mark()
    m.clock.at_tick(99)
    assert m.out2() == 0
    m.clock.at_tick(100)
    assert m.out2() == 1
    m.gate2(0)
    m.gate2(1)  # retrigger
    m.clock.mark()
    m.clock.at_tick(1)
    assert m.out2() == 0


def test_mode4_software_strobe() -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, 4, 3)
    outs = []
    for t in range(6):
        m.clock.at_tick(t)
        outs.append(m.out2())
    assert outs == [1, 1, 1, 0, 1, 1]


def test_latch_holds_value_and_second_latch_is_ignored() -> None:
    m = Machine()
    m.program(0, 2, 1000)
    m.clock.at_tick(10)
    m.outb(CTRL, 0x00)  # latch channel 0
    m.clock.at_tick(20)
    m.outb(CTRL, 0x00)  # ignored: the first latch has not been read
    m.clock.at_tick(30)
    assert m.inb(CH0) | m.inb(CH0) << 8 == 990
    lsb, msb = m.inb(CH0), m.inb(CH0)  # live again
    assert msb << 8 | lsb == 970


def test_lobyte_only_and_hibyte_only_access() -> None:
    m = Machine()
    m.program(0, 2, 0x40, access=1)
    m.clock.at_tick(1)
    assert m.inb(CH0) == 0x3F
    assert m.inb(CH0) == 0x3F  # no flip-flop in lobyte mode
    m.program(0, 2, 0x0200, access=2)
    m.clock.at_tick(0x100)
    assert m.inb(CH0) == 0x01  # high byte of 0x100
    m.outb(CTRL, 0x00)
    assert m.inb(CH0) == 0x01  # a latched count in hibyte mode yields one byte


def test_count_zero_means_65536() -> None:
    m = Machine()
    m.program(0, 2, 0)
    assert m.latched(0) == 0
    m.clock.at_tick(1)
    assert m.latched(0) == 0xFFFF


def test_read_back_status_and_count() -> None:
    m = Machine()
    m.gate2(1)
    m.outb(CTRL, 0xB0)  # ch2, lohi, mode 0
    m.outb(CTRL, 0xC0 | 0x20 | 0x08)  # read-back status of channel 2 only
    # OUT low, NULL COUNT set (no count written yet), lohi (3), mode 0, binary.
    assert m.inb(CH2) == 0x40 | 0x30
    m.outb(CH2, 0x10)
    m.outb(CH2, 0x00)
    m.clock.mark()
    m.clock.at_tick(0x20)
    m.outb(CTRL, 0xC0 | 0x08)  # read-back count and status of channel 2
    m.clock.at_tick(0x30)
    assert m.inb(CH2) == 0x80 | 0x30  # status first: OUT high, count loaded
    assert m.inb(CH2) | m.inb(CH2) << 8 == (0x10 - 0x20) & 0xFFFF  # then the latched count
    # A read-back selecting channels 0 and 1 leaves channel 2 alone.
    m.outb(CTRL, 0xC0 | 0x06)
    assert m.inb(CH0) == 0x80 | 0x30 | (3 << 1)  # ch0 reset state: mode 3, lohi, OUT high


def test_reset_state_channel0_runs_mode3_full_count() -> None:
    m = Machine()
    m.clock.at_tick(1)
    assert m.latched(0) == 0xFFFE
    assert m.pit.out(2) == 1  # channel 2: gate low in mode 3, OUT high


def test_next_irq0_and_channel0_change_hook() -> None:
    m = Machine()
    m.changes = 0
    m.program(0, 2, 1193)
    assert m.changes == 3  # control word and two count bytes
    start = m.clock.ns
    assert m.pit.next_irq0_ns() == start + ns_for_ticks(1193)
    m.clock.at_tick(1193 * 4 + 7)
    assert m.pit.next_irq0_ns() == start + ns_for_ticks(1193 * 5)
    m.program(0, 0, 100)
    assert m.pit.next_irq0_ns() == m.clock.ns + ns_for_ticks(100)
    m.clock.at_tick(100)
    assert m.pit.next_irq0_ns() is None  # one-shot done
    m.program(2, 0, 10)
    assert m.changes == 6  # channel 2 programming does not count


def test_port61_bits() -> None:
    m = Machine()
    first = m.inb(PORT61)
    second = m.inb(PORT61)
    assert (first ^ second) == 0x10  # refresh toggle flips on every read
    m.outb(PORT61, 0x0F)
    value = m.inb(PORT61) & ~0x10 & 0xFF
    assert value & 0x0F == 0x0F  # gate, speaker data, check-disable bits read back
    assert value & 0xC0 == 0
    assert m.pit.gate(2) is True
    m.outb(PORT61, 0x00)
    assert m.pit.gate(2) is False
    assert m.inb(PORT61) & 0x0F == 0


def test_control_register_reads_zero_and_wide_access_splits() -> None:
    m = Machine()
    assert m.inb(CTRL) == 0
    m.bus.write(CH0, 2, 0x3400 | 0x30)  # outw 0x40: 0x30 to ch0 data, 0x34 to ch1 data
    assert m.pit.unexpected_accesses == 1


def test_real_clock_out2_goes_high() -> None:
    pit = Pit8254(time.monotonic_ns)
    port61 = SystemControlB(pit)
    port61.write(0, 1, 0x01)
    pit.write(3, 1, 0xB0)
    pit.write(2, 1, 1193 & 0xFF)  # ~1 ms
    pit.write(2, 1, 1193 >> 8)
    assert port61.read(0, 1) & 0x20 == 0
    deadline = time.monotonic() + 2
    while not port61.read(0, 1) & 0x20:
        assert time.monotonic() < deadline, "OUT2 never rose"
    assert pit.out(2) == 1


@pytest.mark.parametrize("mode", range(8))
def test_every_mode_count_and_out_are_well_formed(mode: int) -> None:
    m = Machine()
    m.gate2(1)
    m.program(2, mode, 7)
    for t in range(40):
        m.clock.at_tick(t)
        assert 0 <= m.latched(2) <= 0xFFFF
        assert m.out2() in (0, 1)
