"""GSI lines (kvmpy.devices.irq), QEMU's pc-testdev (kvmpy.devices.pc_testdev), the
flush-page helper of guest memory and device timer callbacks."""

from __future__ import annotations

import threading
import time

import pytest

from kvmpy.apic.ioapic import IoApic
from kvmpy.apic.testing import make_system
from kvmpy.bus import Bus
from kvmpy.devices.irq import IrqRouter, isa_gsi
from kvmpy.devices.pc_testdev import (
    PC_TESTDEV_BASE,
    PC_TESTDEV_IOMEM_BASE,
    PC_TESTDEV_IOMEM_LENGTH,
    PC_TESTDEV_IRQ_BASE,
    PC_TESTDEV_IRQ_LINES,
    PC_TESTDEV_LENGTH,
    PcTestdev,
    PcTestdevIomem,
    PcTestdevIrq,
)
from kvmpy.memory import PAGE_SIZE, GuestMemory
from kvmpy.timers import TimerCallback, TimerService


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, gsi: int, level: bool) -> None:
        self.calls.append((gsi, level))


# ---------------------------------------------------------------- GSI router


def test_isa_irq0_is_gsi2_others_identity() -> None:
    assert isa_gsi(0) == 2
    assert [isa_gsi(i) for i in range(1, 16)] == list(range(1, 16))


def test_shared_gsi_is_the_or_of_its_sources() -> None:
    sink = Sink()
    router = IrqRouter(sink)
    a, b = router.line(5), router.line(5)
    assert a.source != b.source
    a.set(True)
    b.set(True)
    a.set(False)
    assert router.level(5)
    b.set(False)
    assert not router.level(5)
    assert sink.calls == [(5, True), (5, True), (5, True), (5, False)]


def test_every_set_is_forwarded_even_unchanged() -> None:
    # A level pin re-asserted retries a delivery nobody took (KVM's kvm_set_irq).
    sink = Sink()
    line = IrqRouter(sink).line(3)
    line.set(True)
    line.set(True)
    line.pulse()
    assert sink.calls == [(3, True), (3, True), (3, True), (3, False)]


def test_gsi_out_of_range() -> None:
    sink = Sink()
    router = IrqRouter(sink)
    assert not router.set_irq(24, True)
    assert not router.set_irq(-1, True)
    assert sink.calls == []
    with pytest.raises(ValueError):
        router.line(24)


# ---------------------------------------------------------------- pc-testdev ports


@pytest.mark.parametrize("base", [0, 8])  # 0xe0 "ioport" and 0xe8 "ioport-byte"
def test_scratch_register_echoes_bytes_words_longs(base: int) -> None:
    dev = PcTestdev()
    dev.write(base, 4, 0x12345678)
    assert dev.read(base, 4) == 0x12345678
    assert dev.read(base, 2) == 0x5678 and dev.read(base + 2, 2) == 0x1234
    assert [dev.read(base + i, 1) for i in range(4)] == [0x78, 0x56, 0x34, 0x12]
    dev.write(base + 1, 1, 0xAB)
    assert dev.read(base, 4) == 0x1234AB78
    dev.write(base, 2, 0x9999)
    assert dev.read(base, 4) == 0x12349999
    dev.write(base + 2, 4, 0xFFFFFFFF)  # runs past the register: the excess is cut off
    assert dev.read(base, 4) == 0xFFFF9999


def test_both_scratch_ports_are_one_register() -> None:
    dev = PcTestdev()
    dev.write(0, 4, 0xCAFEF00D)
    assert dev.read(8, 4) == 0xCAFEF00D


def test_flush_page_takes_32_bit_writes_of_an_address() -> None:
    flushed: list[int] = []
    dev = PcTestdev(flushed.append)
    dev.write(4, 4, 0x12345678)
    dev.write(4, 1, 0x1000)
    dev.write(4, 2, 0x1000)
    assert flushed == [0x12345000]
    assert dev.read(4, 4) == 0
    assert dev.unexpected_accesses == 3


def test_irq_ports_drive_isa_irqs_and_gsis() -> None:
    sink = Sink()
    dev = PcTestdevIrq(IrqRouter(sink))
    dev.write(0x0E, 1, 1)
    dev.write(0x0E, 1, 0)
    dev.write(0x00, 1, 0x80)  # ISA IRQ 0 -> GSI 2; any nonzero byte asserts
    dev.write(0x11, 1, 1)
    assert sink.calls == [(14, True), (14, False), (2, True), (17, True)]


def test_irq_ports_ignore_other_sizes_and_reads() -> None:
    sink = Sink()
    dev = PcTestdevIrq(IrqRouter(sink))
    dev.write(0x0E, 2, 1)
    dev.write(0x0E, 4, 1)
    assert dev.read(0x0E, 1) == 0
    assert sink.calls == [] and dev.unexpected_accesses == 3


def test_pc_testdev_on_a_port_bus_drives_the_ioapic() -> None:
    system = make_system(1)
    io = IoApic(system.bus)
    router = IrqRouter(io.set_irq)
    bus = Bus("pio")
    bus.register(PC_TESTDEV_BASE, PC_TESTDEV_LENGTH, PcTestdev())
    bus.register(PC_TESTDEV_IRQ_BASE, PC_TESTDEV_IRQ_LINES, PcTestdevIrq(router))
    io.write(0, 4, 0x10 + 2 * 14)
    io.write(0x10, 4, 0x76)  # pin 14: vector 0x76, edge, unmasked, dest 0
    bus.write(0x2000 + 14, 1, 1)
    bus.write(0x2000 + 14, 1, 0)
    assert system[0].irr[0x76]
    bus.write(0xE0, 2, 0xBEEF)
    assert bus.read(0xE0, 2) == 0xBEEF
    assert bus.read(0x2000 + 24, 1) == 0xFF  # past the 24 lines: unclaimed


# ---------------------------------------------------------------- flush_page, timers


def test_flush_page_keeps_the_data() -> None:
    mem = GuestMemory(1 << 20)
    try:
        mem.write(0x3000, b"kvmpy")
        assert mem.flush_page(0x3123)
        assert mem.read(0x3000, 5) == b"kvmpy"
        mem.write(0x3000, b"again")
        assert mem.read(0x3000, 5) == b"again"
        assert not mem.flush_page(1 << 20)
        assert not mem.flush_page(0xFFFF_F000)
    finally:
        mem.close()
    assert PAGE_SIZE == 4096


def test_timer_callback_runs_on_the_timer_thread() -> None:
    fired = threading.Event()
    where: list[str] = []

    def fn() -> None:
        where.append(threading.current_thread().name)
        fired.set()

    timers = TimerService()
    timers.start()
    try:
        cb = TimerCallback(fn)
        assert cb.index < 0
        timers.arm(cb, time.monotonic_ns() + 1_000_000)
        assert fired.wait(2)
    finally:
        timers.stop()
    assert where == ["kvmpy-timers"]


# ---------------------------------------------------------------- iomem (0xff000000)


def test_iomem_reads_back_what_was_written_at_every_size() -> None:
    bus = Bus("mmio")
    bus.register(PC_TESTDEV_IOMEM_BASE, PC_TESTDEV_IOMEM_LENGTH, PcTestdevIomem())
    base = PC_TESTDEV_IOMEM_BASE
    assert bus.read(base, 8) == 0  # zero at power-up, not the unclaimed all ones
    bus.write(base, 8, 0x1122334455667788)
    assert bus.read(base, 8) == 0x1122334455667788
    assert [bus.read(base + i, 1) for i in range(8)] == [0x88, 0x77, 0x66, 0x55, 0x44,
                                                         0x33, 0x22, 0x11]
    assert bus.read(base + 2, 2) == 0x5566 and bus.read(base + 4, 4) == 0x11223344
    bus.write(base + 3, 2, 0xAABB)  # an unaligned word inside: little endian, in place
    assert bus.read(base, 8) == 0x112233AABB667788
    bus.write(base + 0xFFF0, 4, 0xDEADBEEF)  # the last page: the whole 64 KiB is there
    assert bus.read(base + 0xFFF0, 4) == 0xDEADBEEF
    assert bus.read(base + PC_TESTDEV_IOMEM_LENGTH, 1) == 0xFF  # past the end: unclaimed


def test_iomem_access_past_its_end_is_cut_off() -> None:
    dev = PcTestdevIomem()
    dev.write(PC_TESTDEV_IOMEM_LENGTH - 2, 4, 0xAABBCCDD)
    assert dev.read(PC_TESTDEV_IOMEM_LENGTH - 2, 4) == 0xCCDD
    dev.write(PC_TESTDEV_IOMEM_LENGTH, 1, 1)  # nothing there, nothing raised
    assert dev.read(-1, 4) == 0 and dev.read(0, 0) == 0
