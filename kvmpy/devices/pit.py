"""Intel 8254 programmable interval timer (ports 0x40-0x43) and port 0x61.

Counting follows QEMU's hw/timer/i8254.c and i8254_common.c: a channel's counter and its
OUT pin are functions of the CLK ticks elapsed since the count was loaded, computed from
`clock_ns` at 1.193182 MHz (pit_get_count, pit_get_out); nothing ticks in the
background. Where QEMU cuts corners this model follows the 8254 data sheet instead:

- Gate: modes 0 and 4 pause while GATE is low; modes 2 and 3 stop with OUT high and
  reload on GATE's rising edge; modes 1 and 5 start (and restart) on the rising edge.
- OUT after a control word: low in mode 0, high otherwise, until a count is loaded.
- Mode 2's OUT is low for the one tick when the counter reads 1 (QEMU reports the
  opposite polarity); modes 4 and 5 strobe OUT low for the tick at terminal count.
- Writing the first byte of a lobyte/hibyte count in mode 0 stops counting.
- Modes 6 and 7 act as 2 and 3; read-back reports the mode bits as written.

Simplifications (as QEMU): a new count takes effect at once (the data sheet loads it
on the next CLK, or at the end of the period in modes 2 and 3); BCD counting is not
supported: the BCD bit is stored and reported but counting is binary.

Channel 0's interrupt is left to the VMM: `next_irq0_ns()` gives the time of OUT0's next
rising edge (the edge an i8259/IOAPIC pin 0/2 latches), and `on_channel0_change` is
called whenever the guest reprograms channel 0 so the VMM can re-arm its timer.

Linux's and most test kernels' TSC calibration (pit_calibrate_tsc, pit_hpet_ptimer_
calibrate_cpu) raise channel 2's gate through port 0x61, program channel 2 in mode 0 and
poll OUT2 at bit 5 of port 0x61: `SystemControlB` provides exactly that.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmpy.devices.byte_access import read_bytewise, write_bytewise

PIT_FREQ_HZ = 1_193_182
NS_PER_S = 1_000_000_000
PIT_BASE = 0x40
PIT_LENGTH = 4
SYSTEM_CONTROL_B_PORT = 0x61
SYSTEM_CONTROL_B_LENGTH = 1

CONTROL_REG = 3
READ_BACK = 3  # channel field of a control word selecting the read-back command

# Access modes (control word bits 5:4) and the read/write byte state machine.
RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD0 = 3  # lobyte/hibyte, low byte next
RW_WORD1 = 4  # lobyte/hibyte, high byte next

MAX_COUNT = 0x10000  # a count of 0 means 65536 in binary mode


def ticks_between(start_ns: int, now_ns: int) -> int:
    """Whole PIT clock ticks in [start_ns, now_ns) (muldiv64 in pit_get_count)."""
    if now_ns <= start_ns:
        return 0
    return (now_ns - start_ns) * PIT_FREQ_HZ // NS_PER_S


def ns_for_ticks(ticks: int) -> int:
    """The fewest nanoseconds in which `ticks` whole ticks elapse."""
    return -(-ticks * NS_PER_S // PIT_FREQ_HZ)


class PitChannel:
    """One 8254 counter: count register, counting element, latches, OUT and GATE."""

    def __init__(self, index: int, gate: bool, now: int) -> None:
        self.index = index
        self.gate = gate
        # Reset state as QEMU's pit_reset_common (and what a BIOS leaves): mode 3,
        # count 65536; lobyte/hibyte access.
        self.mode_bits = 3  # control word bits 3:1 as written (reported by read-back)
        self.mode = 3  # effective mode: 6 and 7 act as 2 and 3
        self.rw_mode = RW_WORD0
        self.bcd = 0
        self.read_state = RW_WORD0
        self.write_state = RW_WORD0
        self.write_latch = 0
        self.count_latched = 0  # 0, or the byte state of a latched count
        self.latched_count = 0
        self.status_latched = False
        self.status = 0
        self.cr = MAX_COUNT  # count register: the next initial count
        self.cr_valid = True
        self.null_count = True
        self.n = MAX_COUNT  # initial count of the current run
        self.loaded = False  # a run is under way (counter and OUT follow the clock)
        self.ticking = False  # time advances the run (modes 0/4 pause on GATE low)
        self.start_ns = now
        self.base_ticks = 0  # ticks counted before start_ns (pauses in modes 0/4)
        self.held = 0  # counter value shown when no run is under way
        if gate:
            self._start(now)

    # -- counting (pit_get_count / pit_get_out) ------------------------------------

    def ticks(self, now: int) -> int:
        if not self.ticking:
            return self.base_ticks
        return self.base_ticks + ticks_between(self.start_ns, now)

    def counter(self, now: int) -> int:
        """The counting element's value as a read would see it (16 bits)."""
        if not self.loaded:
            return self.held & 0xFFFF
        d = self.ticks(now)
        n = self.n
        mode = self.mode
        if mode == 2:
            return (n - d % n) & 0xFFFF
        if mode == 3:
            return (n - (2 * d) % n) & 0xFFFF  # decrements by 2 per tick (QEMU's approximation)
        return (n - d) & 0xFFFF

    def out(self, now: int) -> int:
        """The OUT pin level, 0 or 1."""
        mode = self.mode
        if not self.loaded:
            return 0 if mode == 0 else 1
        d = self.ticks(now)
        n = self.n
        if mode == 0 or mode == 1:
            return 1 if d >= n else 0
        if mode == 2:
            return 0 if d % n == n - 1 else 1
        if mode == 3:
            return 1 if d % n < (n + 1) >> 1 else 0
        return 0 if d == n else 1  # modes 4 and 5: one-tick strobe

    def next_rising_edge_ns(self, now: int) -> int | None:
        """Absolute time of OUT's next low-to-high transition after `now`, if one is due."""
        if not self.loaded or not self.ticking:
            return None
        d = self.ticks(now)
        n = self.n
        mode = self.mode
        if mode == 0 or mode == 1:
            target = n if d < n else None
        elif mode == 2 or mode == 3:
            target = (d // n + 1) * n if n > 1 else None
        else:
            target = n + 1 if d <= n else None
        if target is None:
            return None
        return self.start_ns + ns_for_ticks(target - self.base_ticks)

    def _start(self, now: int) -> None:
        """Load the count register into the counting element and begin a run."""
        self.n = self.cr
        self.loaded = True
        self.base_ticks = 0
        self.start_ns = now
        self.ticking = self.gate if self.mode in (0, 4) else True
        self.null_count = False

    # -- control -------------------------------------------------------------------

    def program(self, rw_mode: int, mode_bits: int, bcd: int, now: int) -> None:
        """A control word with a non-zero access mode: new mode, counting stops."""
        self.held = self.counter(now)
        self.rw_mode = rw_mode
        self.read_state = rw_mode
        self.write_state = rw_mode
        self.mode_bits = mode_bits
        self.mode = mode_bits - 4 if mode_bits >= 6 else mode_bits
        self.bcd = bcd
        self.loaded = False
        self.ticking = False
        self.cr_valid = False
        self.null_count = True
        self.count_latched = 0
        self.status_latched = False

    def latch_count(self, now: int) -> None:
        """Counter latch command; a second latch before the first is read is ignored."""
        if not self.count_latched:
            self.latched_count = self.counter(now)
            self.count_latched = self.rw_mode

    def latch_status(self, now: int) -> None:
        """Read-back status latch: OUT, NULL COUNT, access mode, mode, BCD."""
        if not self.status_latched:
            self.status = (
                (self.out(now) << 7)
                | (int(self.null_count) << 6)
                | (self.rw_mode << 4)
                | (self.mode_bits << 1)
                | self.bcd
            )
            self.status_latched = True

    def set_gate(self, level: bool, now: int) -> None:
        """Drive GATE (pit_set_channel_gate, with the data sheet's per-mode effect)."""
        if level == self.gate:
            return
        self.gate = level
        mode = self.mode
        if level:
            if mode in (0, 4):
                if self.loaded:
                    self.start_ns = now
                    self.ticking = True
            elif self.cr_valid:
                self._start(now)  # modes 1, 2, 3, 5: the rising edge (re)starts the count
        elif mode in (0, 4):
            if self.loaded and self.ticking:
                self.base_ticks = self.ticks(now)
                self.ticking = False
        elif mode in (2, 3) and self.loaded:
            self.held = self.counter(now)
            self.loaded = False

    # -- data port -------------------------------------------------------------------

    def read_port(self, now: int) -> int:
        if self.status_latched:
            self.status_latched = False
            return self.status
        latched = self.count_latched
        if latched:
            if latched == RW_MSB:
                self.count_latched = 0
                return (self.latched_count >> 8) & 0xFF
            self.count_latched = RW_MSB if latched == RW_WORD0 else 0
            return self.latched_count & 0xFF
        state = self.read_state
        count = self.counter(now)
        if state == RW_MSB:
            return (count >> 8) & 0xFF
        if state == RW_WORD0:
            self.read_state = RW_WORD1
        elif state == RW_WORD1:
            self.read_state = RW_WORD0
            return (count >> 8) & 0xFF
        return count & 0xFF

    def write_port(self, val: int, now: int) -> None:
        state = self.write_state
        if state == RW_LSB:
            self._load(val, now)
        elif state == RW_MSB:
            self._load(val << 8, now)
        elif state == RW_WORD0:
            self.write_latch = val
            self.write_state = RW_WORD1
            if self.mode == 0 and self.loaded and self.ticking:
                self.base_ticks = self.ticks(now)  # mode 0: the first byte stops counting
                self.ticking = False
        else:
            self.write_state = RW_WORD0
            self._load(self.write_latch | (val << 8), now)

    def _load(self, value: int, now: int) -> None:
        """A complete count was written (pit_load_count)."""
        self.cr = value if value else MAX_COUNT
        self.cr_valid = True
        self.null_count = True
        mode = self.mode
        if mode in (0, 4) or (mode in (2, 3) and self.gate):
            self._start(now)
        # Modes 1 and 5 wait for GATE's rising edge; so do 2 and 3 while GATE is low.


class Pit8254:
    """The PIT at ports 0x40-0x43: register with length PIT_LENGTH."""

    def __init__(
        self,
        clock_ns: Callable[[], int],
        name: str = "pit",
        *,
        on_channel0_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.clock_ns = clock_ns
        self.on_channel0_change = on_channel0_change
        self.unexpected_accesses = 0
        now = clock_ns()
        # Channels 0 and 1 have GATE tied high on a PC; channel 2's is port 0x61 bit 0.
        self.channels = (
            PitChannel(0, True, now),
            PitChannel(1, True, now),
            PitChannel(2, False, now),
        )

    def read(self, offset: int, size: int) -> int:
        if size == 1 and 0 <= offset < PIT_LENGTH:
            return self._read_reg(offset)
        self.unexpected_accesses += 1  # counted, then served byte by byte as on ISA
        return read_bytewise(self._read_reg, offset, size, PIT_LENGTH)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and 0 <= offset < PIT_LENGTH:
            self._write_reg(offset, value & 0xFF)
            return
        self.unexpected_accesses += 1
        write_bytewise(self._write_reg, offset, size, value, PIT_LENGTH)

    def _read_reg(self, reg: int) -> int:
        if reg == CONTROL_REG:
            return 0  # the control register is write-only (QEMU returns 0)
        return self.channels[reg].read_port(self.clock_ns())

    def _write_reg(self, reg: int, val: int) -> None:
        now = self.clock_ns()
        if reg != CONTROL_REG:
            self.channels[reg].write_port(val, now)
            if reg == 0 and self.on_channel0_change is not None:
                self.on_channel0_change()
            return
        select = val >> 6
        if select == READ_BACK:
            for ch in self.channels:
                if val & (2 << ch.index):
                    if not val & 0x20:
                        ch.latch_count(now)
                    if not val & 0x10:
                        ch.latch_status(now)
            return
        ch = self.channels[select]
        access = (val >> 4) & 3
        if access == RW_LATCH:
            ch.latch_count(now)
            return
        ch.program(access, (val >> 1) & 7, val & 1, now)
        if select == 0 and self.on_channel0_change is not None:
            self.on_channel0_change()

    # -- wiring for port 0x61 and the VMM -------------------------------------------

    def set_gate(self, channel: int, level: bool) -> None:
        self.channels[channel].set_gate(level, self.clock_ns())

    def gate(self, channel: int) -> bool:
        return self.channels[channel].gate

    def out(self, channel: int) -> int:
        return self.channels[channel].out(self.clock_ns())

    def next_irq0_ns(self) -> int | None:
        """When OUT0 next rises (IRQ0's edge) on the `clock_ns` timeline, or None."""
        return self.channels[0].next_rising_edge_ns(self.clock_ns())


class SystemControlB:
    """Port 0x61 (PC/AT system control port B), as QEMU's pcspk_io_read/write.

    Bit 0: channel 2 GATE; bit 1: speaker data enable; bits 2-3 (parity/IOCHK check
    disables) read back as written; bit 4: refresh toggle, flipped on every read;
    bit 5: OUT2; bits 6-7 (NMI sources) read 0.
    """

    def __init__(self, pit: Pit8254, name: str = "port61") -> None:
        self.name = name
        self.pit = pit
        self.speaker_data = 0
        self.check_bits = 0
        self.refresh = 0
        self.unexpected_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if size == 1 and 0 <= offset < SYSTEM_CONTROL_B_LENGTH:
            return self._read_reg(offset)
        self.unexpected_accesses += 1  # counted, then served byte by byte as on ISA
        return read_bytewise(self._read_reg, offset, size, SYSTEM_CONTROL_B_LENGTH)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and 0 <= offset < SYSTEM_CONTROL_B_LENGTH:
            self._write_reg(offset, value & 0xFF)
            return
        self.unexpected_accesses += 1
        write_bytewise(self._write_reg, offset, size, value, SYSTEM_CONTROL_B_LENGTH)

    def _read_reg(self, reg: int) -> int:
        self.refresh ^= 0x10
        pit = self.pit
        return (
            int(pit.gate(2))
            | (self.speaker_data << 1)
            | self.check_bits
            | self.refresh
            | (pit.out(2) << 5)
        )

    def _write_reg(self, reg: int, val: int) -> None:
        self.speaker_data = (val >> 1) & 1
        self.check_bits = val & 0x0C
        self.pit.set_gate(2, bool(val & 1))
