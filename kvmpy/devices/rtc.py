"""The MC146818 real-time clock and its CMOS RAM, at ports 0x70 (index) and 0x71 (data).

Follows the Motorola MC146818A data sheet and QEMU's hw/rtc/mc146818rtc.c:

- Time of day: the host's wall clock (UTC, as QEMU's default `-rtc base=utc`) when the
  machine is created, then advanced by the host's monotonic clock; a guest that writes
  the time registers moves it (while running the sub-second phase is kept, as QEMU's
  rtc_set_time). Registers read in BCD or binary (register B's DM bit) and 24 or 12
  hours (bit 1; in 12-hour mode bit 7 of the hours is PM), the century at CMOS 0x32
  (the FADT's CENTURY index). SET (register B bit 7) freezes the time so the guest can
  load it, and clears UIE; a divider in reset (register A DV = 11x) freezes it too,
  and the first update after the reset ends comes half a second later (data sheet).
- Update cycle: UIP (register A bit 7) reads 1 from 244 us before each second
  boundary until the end of the 1984 us update cycle after it (data sheet, "Update
  Cycle"; QEMU holds it only for the 244 us), so "wait for UIP to rise, then fall"
  ends just after the seconds changed.
- Register C: UF at every update, AF when the alarm matches, PF at the periodic rate
  (RS in register A; PF is set whether or not PIE is), IRQF when a flag is set whose
  enable bit (UIE, AIE, PIE) is set; reading C returns and clears them all and lowers
  IRQ 8. Enabling an interrupt whose flag is already set raises IRQF at once (QEMU).
  Alarm bytes with both top bits set (0xC0-0xFF) match any value (data sheet).
- Interrupts: IRQ 8 is held high from IRQF until register C is read. The device asks
  the VMM (``arm``) to call ``tick`` at the next second while AIE or UIE is set, and at
  the next periodic edge while PIE is set, no more often than every ``MIN_PERIOD_NS``
  (faster periodic rates coalesce, as PIT IRQ 0 does). Without an enabled interrupt
  nothing runs in the background: flags are brought up to date when read.
- Wake-up: an alarm match with AIE set calls ``on_alarm`` (QEMU's
  qemu_system_wakeup_request(QEMU_WAKEUP_REASON_RTC) in rtc_update_timer).
- CMOS RAM: 128 bytes; ``pc_cmos_init`` fills what QEMU's pc_cmos_init does (memory
  sizes, CPU count, checksum). Port 0x70's bit 7 (NMI disable) is kept but nothing
  raises NMIs here; reading port 0x70 returns 0xFF (QEMU).
- Register D reads VRT (valid RAM and time) = 1; writes to C and D are ignored (QEMU).

Threading: vCPU threads (port accesses) and the timer thread (``tick``) both enter; a
lock serialises them, and ``on_alarm`` is called after it is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from itertools import chain

from kvmpy.devices.byte_access import read_bytewise, write_bytewise

RTC_BASE = 0x70
RTC_LENGTH = 2
RTC_IRQ = 8
CMOS_SIZE = 128

SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
SHUTDOWN_STATUS = 0x0F
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

REG_A_UIP = 0x80
REG_A_DV = 0x70
REG_A_RS = 0x0F
REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04  # 1: binary, 0: BCD
REG_B_24H = 0x02
REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10
REG_C_FLAGS = REG_C_PF | REG_C_AF | REG_C_UF  # lined up with PIE, AIE, UIE in B
REG_D_VRT = 0x80
ALARM_DONT_CARE = 0xC0

NS_PER_S = 1_000_000_000
SECONDS_PER_DAY = 86_400
RTC_HZ = 32_768  # the time base the rates of register A's RS assume (DV = 010)
UIP_BEFORE_NS = 244_000  # UIP rises this long before the update (data sheet, 244 us)
UPDATE_CYCLE_NS = 1_984_000  # and stays up through the update cycle (1984 us)
MIN_PERIOD_NS = 1_000_000
REG_A_RESET = 0x26  # DV = 010 (32.768 kHz), RS = 0110 (1024 Hz): QEMU's power-up value
REG_B_RESET = REG_B_24H  # BCD, 24 hours (QEMU's)


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 for a proleptic Gregorian date (QEMU's mktimegm formula:
    any month or day value gives a number, as a guest may write garbage)."""
    if month < 3:
        month += 12
        year -= 1
    return day + (153 * month - 457) // 5 + 365 * year + year // 4 - year // 100 \
        + year // 400 - 719469


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day number since 1970-01-01 (H. Hinnant's algorithm)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def periodic_shift(rs: int) -> int | None:
    """log2 of the periodic interrupt's period in 32.768 kHz ticks for rate select
    `rs` (data sheet Table 5: RS 1 and 2 give 256 and 128 Hz, RS n >= 3 gives
    65536 >> n Hz), or None for RS 0 (no periodic interrupt)."""
    if rs == 0:
        return None
    if rs <= 2:
        rs += 7
    return rs - 1


class Rtc:
    """The MC146818 at ports 0x70-0x71 (a bus Device of length 2)."""

    def __init__(self, clock_ns: Callable[[], int], wall_ns: Callable[[], int], *,
                 arm: Callable[[int], None] | None = None, name: str = "rtc") -> None:
        self.name = name
        self.clock_ns = clock_ns
        self.arm = arm  # call tick() at (or after) this clock_ns() deadline
        self.irq: Callable[[bool], None] | None = None  # IRQ 8
        self.on_alarm: Callable[[], None] | None = None  # an alarm with AIE: wake-up
        self.cmos = bytearray(CMOS_SIZE)
        self.index = 0
        self.nmi_disabled = False
        self.unexpected_accesses = 0
        self.stale_ticks = 0
        self._lock = threading.RLock()
        self._wake_pending = False
        now = clock_ns()
        self.cmos[REG_A] = REG_A_RESET
        self.cmos[REG_B] = REG_B_RESET
        self.cmos[REG_D] = REG_D_VRT
        self._base_mono = now
        self._base_rtc_ns = wall_ns()
        self._last_second = self._base_rtc_ns // NS_PER_S
        self._divider_origin = now
        self._last_ptick = 0
        self._last_periodic_fire = now - MIN_PERIOD_NS
        self._deadline: int | None = None
        self._sync_time_registers(self._last_second)

    # ------------------------------------------------------------ bus interface
    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read_port, offset, size, RTC_LENGTH)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write_port, offset, size, value, RTC_LENGTH)

    def _read_port(self, offset: int) -> int:
        if offset == 0:
            return 0xFF  # the index register is write-only (QEMU reads 0xff)
        return self.read_register(self.index)

    def _write_port(self, offset: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
        else:
            self.write_register(self.index, value)

    # ------------------------------------------------------------ registers
    def read_register(self, index: int) -> int:
        """CMOS byte `index` (0-127) as the data port returns it."""
        index &= 0x7F
        with self._lock:
            now = self.clock_ns()
            if index in TIME_REGISTERS or index in (REG_A, REG_C):
                self._update(now)
            if index == REG_A:
                value = (self.cmos[REG_A] & ~REG_A_UIP) | (REG_A_UIP if self._uip(now) else 0)
            elif index == REG_C:
                value = self.cmos[REG_C]
                self.cmos[REG_C] = 0
                if value & REG_C_IRQF:
                    self._set_irq(False)
            else:
                value = self.cmos[index]
        self._deliver_wake()
        return value

    def write_register(self, index: int, value: int) -> None:
        """A data-port write of `value` to CMOS byte `index`."""
        index &= 0x7F
        value &= 0xFF
        with self._lock:
            now = self.clock_ns()
            self._update(now)
            if index in TIME_REGISTERS:
                self.cmos[index] = value
                if self._running():
                    self._set_time_from_registers(now, self._rtc_ns(now) % NS_PER_S)
            elif index == REG_A:
                self._write_reg_a(now, value)
            elif index == REG_B:
                self._write_reg_b(now, value)
            elif index in (REG_C, REG_D):
                self.unexpected_accesses += 1  # read-only
            else:
                self.cmos[index] = value  # alarms and RAM
            self._reschedule(now)
        self._deliver_wake()

    def _write_reg_a(self, now: int, value: int) -> None:
        was_running = self._running()
        was_reset = self._divider_in_reset()
        if was_running:
            self._freeze(now)
        self.cmos[REG_A] = value & ~REG_A_UIP
        if self._divider_in_reset():
            return
        if was_reset:
            # The divider leaves reset: the first update comes 500 ms later (data sheet).
            self._divider_origin = now
            self._last_ptick = 0
            self._set_time_from_registers(now, NS_PER_S // 2)
            return
        if self._running():
            self._thaw(now)
        self._last_ptick = self._ptick(now)  # a new rate counts from here

    def _write_reg_b(self, now: int, value: int) -> None:
        old = self.cmos[REG_B]
        if value & REG_B_SET:
            value &= ~REG_B_UIE  # data sheet: SET clears UIE
            if self._running():
                self._freeze(now)
            self.cmos[REG_B] = value
        else:
            self.cmos[REG_B] = value
            if old & REG_B_SET and self._running():
                # Leaving SET: run from the registers the guest loaded, keeping the
                # sub-second phase (QEMU's s->offset).
                self._set_time_from_registers(now, self._base_rtc_ns % NS_PER_S)
            elif self._running() and not old & REG_B_SET:
                self._sync_time_registers(self._rtc_ns(now) // NS_PER_S)  # DM/24h changed
        if value & self.cmos[REG_C] & REG_C_FLAGS:
            self.cmos[REG_C] |= REG_C_IRQF
            self._set_irq(True)
        elif self.cmos[REG_C] & REG_C_IRQF:
            self.cmos[REG_C] &= ~REG_C_IRQF
            self._set_irq(False)

    def reset(self) -> None:
        """The RESET pin (data sheet): PIE, AIE, UIE and SQWE cleared, and IRQF, PF, AF
        and UF; the time and the rest of the CMOS are kept (QEMU's rtc_reset on a
        machine reset)."""
        with self._lock:
            now = self.clock_ns()
            self._update(now)
            self.cmos[REG_B] &= ~(REG_B_PIE | REG_B_AIE | REG_B_UIE | REG_B_SQWE)
            self.cmos[REG_C] = 0
            self._set_irq(False)
            self._wake_pending = False
            self._reschedule(now)

    # ------------------------------------------------------------ time keeping
    def _divider_in_reset(self) -> bool:
        return (self.cmos[REG_A] & 0x60) == 0x60

    def _running(self) -> bool:
        """The time advances (QEMU's rtc_running: SET clear and DV 000-010)."""
        return not self.cmos[REG_B] & REG_B_SET and (self.cmos[REG_A] & REG_A_DV) <= 0x20

    def _rtc_ns(self, now: int) -> int:
        if self._running():
            return self._base_rtc_ns + now - self._base_mono
        return self._base_rtc_ns

    def _freeze(self, now: int) -> None:
        """Stop the clock at its current time (before a write makes it not running)."""
        self._base_rtc_ns = self._rtc_ns(now)
        self._base_mono = now

    def _thaw(self, now: int) -> None:
        self._base_mono = now

    def _set_time_from_registers(self, now: int, phase_ns: int) -> None:
        """The time the registers hold, at sub-second `phase_ns`, from now on."""
        cmos = self.cmos
        hour = self._from_reg(cmos[HOURS] & 0x7F)
        if not cmos[REG_B] & REG_B_24H:
            hour %= 12
            if cmos[HOURS] & 0x80:
                hour += 12
        year = self._from_reg(cmos[YEAR]) + 100 * self._from_reg(cmos[CENTURY])
        days = days_from_civil(year, self._from_reg(cmos[MONTH]),
                               self._from_reg(cmos[DAY_OF_MONTH]))
        seconds = days * SECONDS_PER_DAY + hour * 3600 + self._from_reg(cmos[MINUTES]) * 60 \
            + self._from_reg(cmos[SECONDS])
        self._base_rtc_ns = seconds * NS_PER_S + phase_ns
        self._base_mono = now
        self._last_second = seconds
        if self._running():
            self._sync_time_registers(seconds)

    def _to_reg(self, value: int) -> int:
        if self.cmos[REG_B] & REG_B_DM:
            return value & 0xFF
        return (((value // 10) << 4) | (value % 10)) & 0xFF

    def _from_reg(self, value: int) -> int:
        if self.cmos[REG_B] & REG_B_DM:
            return value
        return (value >> 4) * 10 + (value & 0x0F)

    def _encode(self, seconds: int) -> tuple[int, int, int]:
        """The (seconds, minutes, hours) register bytes for a time, in this format."""
        rem = seconds % SECONDS_PER_DAY
        hour, rem = divmod(rem, 3600)
        minute, sec = divmod(rem, 60)
        if self.cmos[REG_B] & REG_B_24H:
            hours = self._to_reg(hour)
        else:
            hours = self._to_reg(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        return self._to_reg(sec), self._to_reg(minute), hours

    def _sync_time_registers(self, seconds: int) -> None:
        cmos = self.cmos
        cmos[SECONDS], cmos[MINUTES], cmos[HOURS] = self._encode(seconds)
        days = seconds // SECONDS_PER_DAY
        year, month, day = civil_from_days(days)
        cmos[DAY_OF_WEEK] = self._to_reg((days + 4) % 7 + 1)  # 1970-01-01: Thursday; Sunday = 1
        cmos[DAY_OF_MONTH] = self._to_reg(day)
        cmos[MONTH] = self._to_reg(month)
        cmos[YEAR] = self._to_reg(year % 100)
        cmos[CENTURY] = self._to_reg(year // 100)

    def _alarm_matches(self, seconds: int) -> bool:
        cmos = self.cmos
        alarms = (cmos[SECONDS_ALARM], cmos[MINUTES_ALARM], cmos[HOURS_ALARM])
        if all(a >= ALARM_DONT_CARE for a in alarms):
            return True
        return all(a >= ALARM_DONT_CARE or a == v
                   for a, v in zip(alarms, self._encode(seconds), strict=True))

    def _alarm_matches_between(self, first: int, last: int) -> bool:
        """Does the alarm match any second in [first, last]? Only the seconds that can
        differ in outcome are tried: those with the alarm's seconds value, or one per
        minute (seconds don't care), or one per hour (minutes too): at most 1440 for a
        day, where trying each second would take 86400."""
        cmos = self.cmos
        if cmos[SECONDS_ALARM] < ALARM_DONT_CARE:
            sec = next((v for v in range(60) if self._to_reg(v) == cmos[SECONDS_ALARM]), None)
            if sec is None:
                return False  # no second encodes to that byte: it never matches
            candidates: Iterable[int] = range(first + (sec - first) % 60, last + 1, 60)
        else:
            unit = 60 if cmos[MINUTES_ALARM] < ALARM_DONT_CARE else 3600
            candidates = chain([first], range((first // unit + 1) * unit, last + 1, unit))
        return any(self._alarm_matches(s) for s in candidates)

    def _uip(self, now: int) -> bool:
        if not self._running():
            return False
        phase = self._rtc_ns(now) % NS_PER_S
        return phase >= NS_PER_S - UIP_BEFORE_NS or phase < UPDATE_CYCLE_NS

    # ------------------------------------------------------------ flags and interrupts
    def _ptick(self, now: int) -> int:
        """Periodic edges since the divider started, at the current rate (0 if none)."""
        shift = periodic_shift(self.cmos[REG_A] & REG_A_RS)
        if shift is None or self._divider_in_reset():
            return 0
        return ((now - self._divider_origin) * RTC_HZ // NS_PER_S) >> shift

    def _update(self, now: int) -> None:
        """Bring the time registers and register C's flags up to `now`."""
        flags = 0
        if self._running():
            second = self._rtc_ns(now) // NS_PER_S
            if second > self._last_second:
                flags |= REG_C_UF
                # Every alarm pattern recurs within a day: a longer gap checks one day.
                first = max(self._last_second + 1, second - SECONDS_PER_DAY + 1)
                if self._alarm_matches_between(first, second):
                    flags |= REG_C_AF
            self._last_second = second
            self._sync_time_registers(second)
        ptick = self._ptick(now)
        if ptick > self._last_ptick:
            flags |= REG_C_PF
        self._last_ptick = ptick
        if flags:
            self._raise_flags(flags)

    def _raise_flags(self, flags: int) -> None:
        """rtc_update_timer / rtc_periodic_timer: set the flags; IRQF and IRQ 8 for a
        new flag that is enabled; an alarm with AIE set is a wake-up event."""
        if flags & REG_C_AF and self.cmos[REG_B] & REG_B_AIE:
            self._wake_pending = True
        new = flags & ~self.cmos[REG_C]
        self.cmos[REG_C] |= flags
        if new & self.cmos[REG_B] & REG_C_FLAGS:
            self.cmos[REG_C] |= REG_C_IRQF
            self._set_irq(True)

    def _set_irq(self, level: bool) -> None:
        if self.irq is not None:
            self.irq(level)

    def _deliver_wake(self) -> None:
        if self._wake_pending:
            self._wake_pending = False
            if self.on_alarm is not None:
                self.on_alarm()

    def _next_deadline(self, now: int) -> int | None:
        b = self.cmos[REG_B]
        deadlines = []
        if b & (REG_B_AIE | REG_B_UIE) and self._running():
            rtc = self._rtc_ns(now)
            deadlines.append(now + NS_PER_S - rtc % NS_PER_S)
        shift = periodic_shift(self.cmos[REG_A] & REG_A_RS)
        if b & REG_B_PIE and shift is not None and not self._divider_in_reset():
            edge_ticks = (self._ptick(now) + 1) << shift
            edge = self._divider_origin + -(-edge_ticks * NS_PER_S // RTC_HZ)
            deadlines.append(max(edge, self._last_periodic_fire + MIN_PERIOD_NS))
        return min(deadlines) if deadlines else None

    def _reschedule(self, now: int) -> None:
        deadline = self._next_deadline(now)
        if deadline == self._deadline:
            return
        self._deadline = deadline
        if deadline is not None and self.arm is not None:
            self.arm(deadline)

    def tick(self) -> None:
        """The VMM's timer fired: update, raise what is due, arm the next event. A
        firing before the current deadline (one that was moved) is ignored."""
        with self._lock:
            now = self.clock_ns()
            if self._deadline is None or now < self._deadline:
                self.stale_ticks += 1
                return
            self._deadline = None
            if self.cmos[REG_B] & REG_B_PIE:
                self._last_periodic_fire = now
            self._update(now)
            self._reschedule(now)
        self._deliver_wake()

    @property
    def deadline(self) -> int | None:
        """When ``tick`` is next due, or None."""
        return self._deadline

    def interrupts_enabled(self) -> int:
        """Register B's PIE, AIE and UIE bits."""
        return self.cmos[REG_B] & (REG_B_PIE | REG_B_AIE | REG_B_UIE)


def pc_cmos_init(rtc: Rtc, *, ram_below_4g: int, ram_above_4g: int, cpus: int) -> None:
    """The CMOS bytes QEMU's pc_cmos_init fills (hw/i386/pc.c): base memory 640 KiB,
    extended memory in KiB (0x17/0x18, 0x30/0x31, at most 63 MiB), memory above 16 MiB
    in 64 KiB units (0x34/0x35), above 4 GiB in 64 KiB units (0x5b-0x5d), the CPU
    count less one (0x5f), and the checksum of 0x10-0x2d at 0x2e/0x2f."""
    cmos = rtc.cmos
    cmos[0x15:0x17] = (640).to_bytes(2, "little")
    extended = min(max(ram_below_4g - (1 << 20), 0) // 1024, 0xFFFF)
    cmos[0x17:0x19] = extended.to_bytes(2, "little")
    cmos[0x30:0x32] = extended.to_bytes(2, "little")
    above_16m = min(max(ram_below_4g - (16 << 20), 0) >> 16, 0xFFFF)
    cmos[0x34:0x36] = above_16m.to_bytes(2, "little")
    cmos[0x5B:0x5E] = min(ram_above_4g >> 16, 0xFFFFFF).to_bytes(3, "little")
    cmos[0x5F] = (cpus - 1) & 0xFF
    cmos[0x2E:0x30] = (sum(cmos[0x10:0x2E]) & 0xFFFF).to_bytes(2, "big")
