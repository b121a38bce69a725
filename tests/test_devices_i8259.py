"""The 8259A pair (kvmpy/devices/i8259.py), driven through its ports as a guest would,
checked against the 8259A datasheet's behaviour (QEMU's hw/intc/i8259.c is the model),
and the BIOS state kvmpy leaves (kvmpy/boot/bios.py)."""

from __future__ import annotations

import struct

from kvmpy.boot.bios import (
    IRET_OFFSET,
    MASTER_EOI,
    MASTER_EOI_OFFSET,
    SLAVE_EOI_OFFSET,
    ivt,
    setup_bios_state,
)
from kvmpy.bus import Bus
from kvmpy.devices.i8259 import ElcrPorts, Pic8259Pair, PicPorts
from kvmpy.memory import GuestMemory


class Pc:
    """The PICs on a PIO bus, with their INT output recorded."""

    def __init__(self) -> None:
        self.edges: list[bool] = []
        self.pic = Pic8259Pair(self.edges.append)
        self.bus = Bus("pio")
        self.bus.register(0x20, 2, PicPorts(self.pic, 0))
        self.bus.register(0xA0, 2, PicPorts(self.pic, 1))
        self.bus.register(0x4D0, 2, ElcrPorts(self.pic))

    def out(self, port: int, value: int, size: int = 1) -> None:
        self.bus.write(port, size, value)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def init(self, master_base: int = 0x08, slave_base: int = 0x70, auto_eoi: bool = False,
             sfnm: bool = False) -> None:
        icw4 = 0x01 | (0x02 if auto_eoi else 0) | (0x10 if sfnm else 0)
        for cmd, data, base, cascade in ((0x20, 0x21, master_base, 4),
                                         (0xA0, 0xA1, slave_base, 2)):
            self.out(cmd, 0x11)
            self.out(data, base)
            self.out(data, cascade)
            self.out(data, icw4)
        self.out(0x21, 0)
        self.out(0xA1, 0)


def test_initialization_sets_vector_bases_and_an_edge_is_delivered_once() -> None:
    pc = Pc()
    pc.init()
    pc.pic.set_irq(1, True)
    assert pc.pic.output and pc.edges == [True]
    assert pc.pic.acknowledge() == 0x09
    assert not pc.pic.output  # in service now, nothing else pending
    pc.pic.set_irq(1, True)  # still high: no new edge, no new request
    assert not pc.pic.output
    pc.out(0x20, 0x20)  # non-specific EOI
    assert not pc.pic.output
    pc.pic.set_irq(1, False)
    pc.pic.set_irq(1, True)
    assert pc.pic.output and pc.pic.acknowledge() == 0x09


def test_priority_and_nesting() -> None:
    pc = Pc()
    pc.init()
    pc.pic.set_irq(4, True)
    pc.pic.set_irq(3, True)
    assert pc.pic.acknowledge() == 0x0B  # IRQ 3 first: lower number, higher priority
    assert not pc.pic.output  # IRQ 4 waits behind IRQ 3 in service ...
    pc.out(0x20, 0x0B)  # OCW3: read ISR
    assert pc.inb(0x20) == 1 << 3
    pc.pic.set_irq(1, True)
    assert pc.pic.acknowledge() == 0x09  # ... but IRQ 1 nests over IRQ 3
    assert pc.inb(0x20) == 1 << 3 | 1 << 1
    pc.out(0x20, 0x20)  # EOI ends the highest-priority in service: IRQ 1
    assert pc.inb(0x20) == 1 << 3
    pc.out(0x20, 0x63)  # specific EOI of IRQ 3
    assert pc.inb(0x20) == 0
    assert pc.pic.acknowledge() == 0x0C
    pc.out(0x20, 0x0A)  # OCW3: read IRR
    assert pc.inb(0x20) == 0


def test_mask_and_the_slave_cascade() -> None:
    pc = Pc()
    pc.init()
    pc.out(0xA1, 0xFF)
    pc.pic.set_irq(8, True)
    assert not pc.pic.output and pc.pic.masked(8)
    pc.out(0xA1, 0xFE)
    assert pc.pic.output and not pc.pic.masked(8)
    assert pc.pic.acknowledge() == 0x70
    pc.out(0xA1, 0)
    pc.out(0x21, 0x04)  # mask the cascade: the slave is cut off
    assert pc.pic.masked(12) and pc.inb(0x21) == 0x04
    pc.pic.set_irq(12, True)
    assert not pc.pic.output
    pc.out(0x21, 0)
    pc.out(0xA0, 0x20)
    pc.out(0x20, 0x20)
    assert pc.pic.output and pc.pic.acknowledge() == 0x74


def test_spurious_interrupt_reads_as_irq_7() -> None:
    pc = Pc()
    pc.init()
    assert pc.pic.acknowledge() == 0x0F and pc.pic.spurious == 1
    pc.out(0x20, 0x0B)
    assert pc.inb(0x20) == 0  # a spurious IRQ 7 sets no ISR bit


def test_level_triggered_via_elcr_stays_requested_until_lowered() -> None:
    pc = Pc()
    pc.init()
    pc.out(0x4D1, 0xFF)
    assert pc.inb(0x4D1) == 0xDE  # IRQ 8 and 13 are always edge
    pc.pic.set_irq(11, True)
    assert pc.pic.acknowledge() == 0x73
    pc.out(0xA0, 0x20)
    pc.out(0x20, 0x20)
    assert pc.pic.output  # still high: requested again
    pc.pic.set_irq(11, False)
    # The slave drops its request, but the master latched the cascade's edge: the INTA
    # finds nothing on the slave, a spurious IRQ 7 there (8259A datasheet; QEMU, KVM).
    assert pc.pic.acknowledge() == 0x77 and pc.pic.spurious == 1
    assert not pc.pic.output


def test_auto_eoi_and_poll_mode() -> None:
    pc = Pc()
    pc.init(auto_eoi=True)
    pc.pic.set_irq(5, True)
    assert pc.pic.acknowledge() == 0x0D
    pc.out(0x20, 0x0B)
    assert pc.inb(0x20) == 0  # auto EOI: nothing stays in service
    pc.pic.set_irq(6, True)
    pc.out(0x20, 0x0C)  # OCW3 poll
    assert pc.inb(0x20) == 0x80 | 6
    pc.out(0x20, 0x0C)
    assert pc.inb(0x20) == 0


def test_icw1_resets_and_a_word_access_is_two_byte_accesses() -> None:
    pc = Pc()
    pc.init()
    pc.out(0x21, 0xAA)
    assert pc.bus.read(0x20, 2) >> 8 == 0xAA
    pc.out(0x20, 0x11)  # ICW1: IMR cleared, waiting for ICW2
    assert pc.inb(0x21) == 0
    pc.out(0x20, 0x5511, size=2)  # ICW1 again, then ICW2 = 0x55 & 0xf8 at 0x21
    pc.out(0x21, 4)
    pc.out(0x21, 1)
    pc.pic.set_irq(0, True)
    assert pc.pic.acknowledge() == 0x50


def test_program_is_what_seabios_writes() -> None:
    pc = Pc()
    pc.pic.program(0x08, 0x70, 0xFA, 0xFF)
    assert (pc.inb(0x21), pc.inb(0xA1)) == (0xFA, 0xFF)
    pc.pic.set_irq(0, True)
    assert pc.pic.acknowledge() == 0x08


def test_bios_state_ivt_handlers_and_pics() -> None:
    mem = GuestMemory(2 << 20)
    try:
        pic = Pic8259Pair()
        setup_bios_state(mem, pic)
        table = struct.unpack("<256I", mem.read(0, 1024))
        assert table == struct.unpack("<256I", ivt())
        assert table[0x08] == table[0x0F] == 0xF000_0000 | MASTER_EOI_OFFSET
        assert table[0x70] == table[0x77] == 0xF000_0000 | SLAVE_EOI_OFFSET
        assert table[0x00] == table[0x10] == table[0xFF] == 0xF000_0000 | IRET_OFFSET
        assert mem.read(0xFFF53, 1) == b"\xcf"
        assert mem.read(0xF0000 + MASTER_EOI_OFFSET, len(MASTER_EOI)) == MASTER_EOI
        assert not pic.masked(0) and pic.masked(1) and pic.masked(8)
        pic.set_irq(0, True)
        assert pic.output and pic.acknowledge() == 0x08
    finally:
        mem.close()


def test_power_on_every_input_is_masked_until_programmed() -> None:
    pc = Pc()
    assert (pc.inb(0x21), pc.inb(0xA1)) == (0xFF, 0xFF)
    pc.pic.set_irq(0, True)
    assert not pc.pic.output and pc.edges == []
    pc.init()  # ICW1 clears the mask and the edge latches (QEMU's pic_init_reset)
    assert not pc.pic.output
    pc.pic.set_irq(0, False)
    pc.pic.set_irq(0, True)
    assert pc.pic.output and pc.pic.acknowledge() == 0x08


def test_the_native_cores_extint_word_follows_intr_and_lint0() -> None:
    from kvmpy import _core as nc
    from kvmpy.apic import ApicBus, LocalApic
    from kvmpy.apic import constants as c
    from kvmpy.apic.testing import FakeClock

    clock = FakeClock()
    bsp = LocalApic(0, ApicBus(lambda i: None), bsp=True, clock_ns=clock.ns, tsc=clock.tsc,
                    tsc_at=clock.tsc_at, tsc_hz=clock.tsc_hz, lint0_extint_at_reset=True)
    ap = LocalApic(1, ApicBus(lambda i: None), bsp=False, clock_ns=clock.ns, tsc=clock.tsc,
                   tsc_at=clock.tsc_at, tsc_hz=clock.tsc_hz)
    assert bsp.lvt(c.LVT_LINT0) == 0x700 and ap.lvt(c.LVT_LINT0) == c.LVT_MASKED
    for apic in (bsp, ap):
        apic.set_extint_line(True)
    assert bsp._r[nc.R_EXTINT] == 1 and ap._r[nc.R_EXTINT] == 0  # the AP's LINT0 is masked
    bsp.mmio_write(c.REG_SVR, 4, 0xFF)  # software-disable: every LVT masked, ExtINT too
    assert not bsp.accepts_pic_interrupts() and bsp._r[nc.R_EXTINT] == 0
    bsp.mmio_write(c.REG_SVR, 4, c.SVR_APIC_ENABLED | 0xFF)
    bsp.mmio_write(c.REG_LVT_LINT0, 4, 0x700)
    assert bsp._r[nc.R_EXTINT] == 1
    bsp.set_extint_line(False)
    assert bsp._r[nc.R_EXTINT] == 0
