"""Wiring ACPI into a Machine: the RTC and the PM registers on the port bus, their IRQ 8
and SCI (IRQ 9) lines, their host timers, the tables in guest memory (from what the
machine has: its vCPUs' APIC IDs, which irqchip), and the sleep-state logic."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmpy.acpi.pm import AcpiPm
from kvmpy.acpi.sleep import AcpiSleep
from kvmpy.acpi.tables import AcpiPlatform, AcpiTables, PmBlocks, build_tables
from kvmpy.devices.irq import isa_gsi
from kvmpy.devices.rtc import RTC_BASE, RTC_IRQ, RTC_LENGTH, Rtc, pc_cmos_init
from kvmpy.timers import TimerCallback

if TYPE_CHECKING:
    from kvmpy.machine import Machine


@dataclass(frozen=True)
class Acpi:
    """What `install` made."""

    rtc: Rtc
    pm: AcpiPm
    sleep: AcpiSleep
    tables: AcpiTables
    platform: AcpiPlatform


def install(machine: Machine) -> Acpi:
    """Create and wire the RTC, the PM registers, the tables and the sleep logic.
    Needs the machine's memory, port bus, timers, IRQ router and vCPUs."""
    timers = machine.timers
    mem = machine.memory
    rtc = Rtc(time.monotonic_ns, time.time_ns)
    rtc_timer = TimerCallback(rtc.tick)
    rtc.arm = lambda deadline: timers.arm(rtc_timer, deadline)
    pc_cmos_init(rtc, ram_below_4g=mem.low_size, ram_above_4g=mem.size - mem.low_size,
                 cpus=len(machine.vcpus))
    pm = AcpiPm(time.monotonic_ns)
    pm_timer = TimerCallback(pm.tick)
    pm.arm = lambda deadline: timers.arm(pm_timer, deadline)
    blocks = PmBlocks()
    bus = machine.pio_bus
    bus.register(RTC_BASE, RTC_LENGTH, rtc)
    bus.register(blocks.pm1a_evt, blocks.pm1_evt_len, pm.event_block)
    bus.register(blocks.pm1a_cnt, blocks.pm1_cnt_len, pm.control_block)
    bus.register(blocks.pm_tmr, blocks.pm_tmr_len, pm.timer_block)
    platform = AcpiPlatform(
        apic_ids=tuple(v.index for v in machine.vcpus),  # kvmpy's APIC ID = vCPU index
        pcat_compat=machine.kernel_irqchip,  # KVM_CREATE_IRQCHIP makes an 8259 pair
        s3=not machine.kernel_irqchip,  # S3 parks vCPUs through kvmpy's local APICs
        pm=blocks,
    )
    rtc.irq = machine.irq.line(isa_gsi(RTC_IRQ)).set
    pm.sci = machine.irq.line(isa_gsi(platform.sci_irq)).set
    tables = build_tables(platform)
    for address, data in tables.blobs.values():
        mem.write(address, data)
    sleep = AcpiSleep(machine, pm, rtc, tables.address("FACS"), s3=platform.s3)
    pm.on_sleep = sleep.request
    rtc.on_alarm = sleep.rtc_alarm
    return Acpi(rtc, pm, sleep, tables, platform)
