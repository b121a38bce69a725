"""ACPI sleep states on kvmpy's machine: S3 (suspend to RAM) woken by the RTC alarm, and
S5 (soft off). ACPI 6.3 sections 7.4.2 (\\_Sx objects), 16.1 (sleeping states) and
16.3 (waking), as QEMU drives them (hw/acpi/core.c acpi_pm1_cnt_write, softmmu/runstate.c
qemu_system_suspend / qemu_system_wakeup, with SeaBIOS's S3 resume path).

- PM1a_CNT SLP_EN with SLP_TYP 0 (the DSDT's \\_S5_): the VM stops, status 0, as
  QEMU's soft power-off (`qemu_system_shutdown_request`).
- SLP_TYP 1 (\\_S3_, offered only with kvmpy's own irqchip): every vCPU receives INIT
  (the writer stops before its next instruction, the others when the kick reaches
  them) and the machine sleeps; CMOS byte 0x0F is set to 0xFE (QEMU's RTC suspend
  notifier, the resume flag SeaBIOS looks for). Guest RAM is kept.
- An RTC alarm with AIE set wakes it if PM1_EN.RTC_EN is set (QEMU's wake-up reason
  mask); nothing else can, so a guest that sleeps with no wake source is reported hung.
- Waking: PM1_STS gets WAK_STS and RTC_STS, PM1_EN and PM1_CNT are reset, the I/O APIC
  is reset (every entry masked) and the RTC's interrupt enables cleared (its RESET, as
  QEMU's machine reset on wake-up). The boot vCPU resumes at the FACS waking vector:
  X_Firmware_Waking_Vector if non-zero (32-bit flat protected mode, paging off, as
  16.3.2 asks; kvmpy's FACS offers no 64-bit wake), else Firmware_Waking_Vector in real
  mode, CS:IP = vector >> 4 : vector & 0xF, the other segments 0. The other vCPUs stay
  in wait-for-SIPI, as after INIT; their local APICs keep their mode (x2APIC or xAPIC)
  as INIT does.
- Other SLP_TYP values are ignored (there is no \\_S1_, \\_S2_ or \\_S4_) and counted.
"""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING

from kvmpy.acpi.tables import SLP_TYP_S3, SLP_TYP_S5
from kvmpy.boot.cpu import setup_protected_mode, setup_real_mode
from kvmpy.devices.rtc import REG_B_AIE, SHUTDOWN_STATUS

if TYPE_CHECKING:
    from kvmpy.acpi.pm import AcpiPm
    from kvmpy.devices.rtc import Rtc
    from kvmpy.machine import Machine
    from kvmpy.vcpu import Vcpu

FACS_WAKING_VECTOR = 12
FACS_X_WAKING_VECTOR = 24
FACS_VERSION = 32
CMOS_S3_RESUME = 0xFE


class SleepState(enum.Enum):
    S0 = "S0"  # working
    S3 = "S3"  # sleeping, RAM kept
    WAKING = "waking"  # woken; the boot vCPU has not resumed yet


class AcpiSleep:
    """The machine's sleep-state logic (its methods are called by the PM1 control
    register, the RTC, and the boot vCPU's wait-for-SIPI loop)."""

    def __init__(self, machine: Machine, pm: AcpiPm, rtc: Rtc, facs_address: int, *,
                 s3: bool) -> None:
        self.machine = machine
        self.pm = pm
        self.rtc = rtc
        self.facs_address = facs_address
        self.s3_supported = s3
        self.state = SleepState.S0
        self._lock = threading.Lock()
        self.suspends = 0
        self.wakeups = 0
        self.ignored_requests = 0

    def request(self, slp_typ: int) -> None:
        """PM1a_CNT.SLP_EN was written with `slp_typ` (on the writing vCPU's thread)."""
        if slp_typ == SLP_TYP_S5:
            from kvmpy.machine import STATUS_OK

            self.machine.stop(STATUS_OK, "the guest powered off (ACPI S5 through PM1a_CNT)")
        elif slp_typ == SLP_TYP_S3 and self.s3_supported:
            self.suspend()
        else:
            self.ignored_requests += 1

    def suspend(self) -> None:
        with self._lock:
            if self.state is not SleepState.S0:
                return
            self.state = SleepState.S3
            self.suspends += 1
        self.rtc.write_register(SHUTDOWN_STATUS, CMOS_S3_RESUME)
        for vcpu in self.machine.vcpus:
            if vcpu.apic is not None:
                vcpu.apic.accept_init()
                vcpu.kick()

    def rtc_alarm(self) -> None:
        """The RTC's alarm fired with AIE set: a wake-up event if RTC_EN allows it."""
        with self._lock:
            if self.state is not SleepState.S3 or not self.pm.rtc_wake_enabled:
                return
            self.state = SleepState.WAKING
            self.wakeups += 1
        self.pm.wake(rtc=True)
        self.rtc.reset()
        if self.machine.ioapic is not None:
            self.machine.ioapic.reset()
        self.machine.vcpus[0].kick()

    def take_resume(self, vcpu: Vcpu) -> bool:
        """On a vCPU in wait-for-SIPI: if it is the boot vCPU and the machine has woken,
        load the waking state and return True (the caller makes it runnable)."""
        if vcpu.index != 0 or self.state is not SleepState.WAKING:
            return False
        with self._lock:
            if self.state is not SleepState.WAKING:
                return False
            self.state = SleepState.S0
        if vcpu.apic is not None:
            vcpu.apic.take_init()
        mem = self.machine.memory
        facs = self.facs_address
        vector = mem.read_u32(facs + FACS_WAKING_VECTOR)
        x_vector = mem.read_u64(facs + FACS_X_WAKING_VECTOR)
        if x_vector and mem.read(facs + FACS_VERSION, 1)[0] >= 1 and x_vector < 1 << 32:
            setup_protected_mode(vcpu.fd, entry=x_vector, eax=0, ebx=0)
        else:
            setup_real_mode(vcpu.fd, cs=(vector >> 4) & 0xFFFF, ip=vector & 0xF)
        return True

    @property
    def asleep(self) -> bool:
        return self.state is not SleepState.S0

    def can_wake(self) -> bool:
        """Could the machine still wake (or is it waking)?"""
        if self.state is SleepState.WAKING:
            return True
        return self.state is SleepState.S3 and self.pm.rtc_wake_enabled \
            and bool(self.rtc.interrupts_enabled() & REG_B_AIE)
