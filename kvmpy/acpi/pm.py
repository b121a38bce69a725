"""ACPI fixed hardware: the PM1a event and control blocks and the PM timer (ACPI 6.3
section 4.8), as port devices. The layout is QEMU's PIIX4 PM at 0x600 (tables.PmBlocks).

- PM timer (4.8.2.1): a 24-bit up-counter at 3.579545 MHz (FADT TMR_VAL_EXT clear, as
  QEMU's acpi_pm_tmr_get), the host's monotonic clock since the machine was created.
  Any read size returns the low bytes of the count from its offset; writes are ignored.
- PM1_STS (4.8.3.1.1, write 1 to clear): TMR_STS is set when bit 23 of the timer
  toggles; WAK_STS and RTC_STS are set when the machine wakes from S3 on the RTC alarm
  (QEMU's acpi_notify_wakeup: the alarm sets RTC_STS only as a wake-up event).
  PWRBTN, SLPBTN, GBL, BM and PCIEXP_WAKE are never set here: nothing raises them.
- PM1_EN (4.8.3.1.2): read/write; RTC_EN arms the RTC alarm as a wake-up source.
- PM1_CNT (4.8.3.2.1): SCI_EN reads 1 (the FADT has no SMI command port: the machine
  is always in ACPI mode), BM_RLD and SLP_TYP read back; GBL_RLS and SLP_EN are
  write-only. Writing SLP_EN calls ``on_sleep(SLP_TYP)``; the VMM decides what the
  type means (the DSDT's packages: 1 = S3, 0 = S5).
- SCI (5.2.9 SCI_INT): held high while a status bit and its enable bit are both set
  (TMR, GBL, PWRBTN, SLPBTN, RTC: QEMU's acpi_pm1_evt_get_sts / acpi_update_sci).
  With TMR_EN set the VMM is asked (``arm``) to call ``tick`` when bit 23 next
  toggles, about every 2.34 s.

Registers take accesses of 1, 2 or 4 bytes at any offset in their block and act on
the bytes covered (QEMU splits them the same way); the sleep request is acted on when
the byte holding SLP_EN is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmpy.devices.byte_access import read_bytewise, write_bytewise

PM_TIMER_HZ = 3_579_545
PM_TIMER_BITS = 24
PM_TIMER_MASK = (1 << PM_TIMER_BITS) - 1
NS_PER_S = 1_000_000_000

TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
STS_BITS = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | PCIEXP_WAKE_STS \
    | WAK_STS

TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
EN_BITS = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS
SCI_EVENTS = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN

SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_STORED = BM_RLD | SLP_TYP_MASK


class AcpiPm:
    """The PM1a registers and the PM timer; `event_block`, `control_block` and
    `timer_block` are the three bus devices."""

    def __init__(self, clock_ns: Callable[[], int], *,
                 on_sleep: Callable[[int], None] | None = None,
                 arm: Callable[[int], None] | None = None) -> None:
        self.clock_ns = clock_ns
        self.on_sleep = on_sleep
        self.arm = arm
        self.sci: Callable[[bool], None] | None = None
        self._origin = clock_ns()
        self._lock = threading.RLock()
        self.sts = 0  # PM1_STS without TMR_STS, which is computed
        self.en = 0
        self.cnt = SCI_EN
        self._tmr_sts_base = 0  # timer count when TMR_STS was last cleared
        self._sci_level = False
        self._deadline: int | None = None
        self.sleep_requests = 0
        self.event_block = _Block("acpi-pm1a-evt", 4, self._read_evt, self._write_evt)
        self.control_block = _Block("acpi-pm1a-cnt", 2, self._read_cnt, self._write_cnt)
        self.timer_block = PmTimerBlock(self)

    # ------------------------------------------------------------ the timer
    def ticks(self, now: int | None = None) -> int:
        """Timer ticks since power-up (all bits; the register shows the low 24)."""
        if now is None:
            now = self.clock_ns()
        return (now - self._origin) * PM_TIMER_HZ // NS_PER_S

    def timer_value(self) -> int:
        return self.ticks() & PM_TIMER_MASK

    def _tmr_sts(self, now: int) -> bool:
        return self.ticks(now) >> (PM_TIMER_BITS - 1) > self._tmr_sts_base >> (PM_TIMER_BITS - 1)

    def status(self) -> int:
        """PM1_STS as read."""
        with self._lock:
            return self.sts | (TMR_STS if self._tmr_sts(self.clock_ns()) else 0)

    # ------------------------------------------------------------ PM1 event block
    def _read_evt(self, offset: int) -> int:
        reg = self.status() if offset < 2 else self.en
        return (reg >> (8 * (offset & 1))) & 0xFF

    def _write_evt(self, offset: int, value: int) -> None:
        shift = 8 * (offset & 1)
        with self._lock:
            now = self.clock_ns()
            if offset < 2:
                clear = (value << shift) & STS_BITS
                if clear & TMR_STS:
                    self._tmr_sts_base = self.ticks(now)
                self.sts &= ~clear
            else:
                mask = 0xFF << shift
                self.en = (self.en & ~mask | (value << shift) & mask) & EN_BITS
            self._update_sci(now)

    # ------------------------------------------------------------ PM1 control block
    def _read_cnt(self, offset: int) -> int:
        return (self.cnt >> (8 * offset)) & 0xFF

    def _write_cnt(self, offset: int, value: int) -> None:
        shift = 8 * offset
        mask = 0xFF << shift
        value <<= shift
        with self._lock:
            self.cnt = (self.cnt & ~mask | value & mask & CNT_STORED) | SCI_EN
        if value & SLP_EN:
            self.sleep_requests += 1
            if self.on_sleep is not None:
                self.on_sleep((self.cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT)

    # ------------------------------------------------------------ events
    def wake(self, *, rtc: bool) -> None:
        """The machine woke from a sleep state: as QEMU's machine reset (PM1_EN and
        PM1_CNT to their reset values) then acpi_notify_wakeup (WAK_STS, and RTC_STS
        for an RTC alarm)."""
        with self._lock:
            self.en = 0
            self.cnt = SCI_EN
            self.sts |= WAK_STS | (RTC_STS if rtc else 0)
            self._update_sci(self.clock_ns())

    @property
    def rtc_wake_enabled(self) -> bool:
        return bool(self.en & RTC_EN)

    def _update_sci(self, now: int) -> None:
        level = bool(self.status() & self.en & SCI_EVENTS)
        if level != self._sci_level:
            self._sci_level = level
            if self.sci is not None:
                self.sci(level)
        self._deadline = None
        if self.en & TMR_EN and not self._tmr_sts(now):
            half = 1 << (PM_TIMER_BITS - 1)
            toggle = (self._tmr_sts_base // half + 1) * half
            self._deadline = self._origin + -(-toggle * NS_PER_S // PM_TIMER_HZ)
            if self.arm is not None:
                self.arm(self._deadline)

    def tick(self) -> None:
        """The VMM's timer fired: TMR_STS may be due (a stale firing does nothing)."""
        with self._lock:
            now = self.clock_ns()
            if self._deadline is None or now < self._deadline:
                return
            self._update_sci(now)


class _Block:
    """A bank of 8-bit register bytes on the port bus."""

    def __init__(self, name: str, length: int, read_byte: Callable[[int], int],
                 write_byte: Callable[[int, int], None]) -> None:
        self.name = name
        self.length = length
        self._read_byte = read_byte
        self._write_byte = write_byte

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read_byte, offset, size, self.length)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, offset, size, value, self.length)


class PmTimerBlock:
    """PM_TMR_BLK: 4 bytes, the 24-bit count (bits 31:24 read 0); read-only."""

    name = "acpi-pm-timer"

    def __init__(self, pm: AcpiPm) -> None:
        self.pm = pm
        self.ignored_writes = 0

    def read(self, offset: int, size: int) -> int:
        value = self.pm.timer_value()
        if offset == 0 and size == 4:
            return value
        return read_bytewise(lambda i: (value >> (8 * i)) & 0xFF, offset, size, 4)

    def write(self, offset: int, size: int, value: int) -> None:
        self.ignored_writes += 1
