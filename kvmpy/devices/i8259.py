"""The PC's two cascaded 8259A programmable interrupt controllers (the "PIC").

Mirrors QEMU hw/intc/i8259.c (and KVM's arch/x86/kvm/i8259.c, which copies it):
ICW1-ICW4 initialization, OCW1 (IMR), OCW2 (non-specific, specific and rotating EOI,
priority rotation), OCW3 (IRR/ISR read select, poll, special mask), auto-EOI,
special fully nested mode, edge and level triggering (ELCR at ports 0x4d0/0x4d1, or
ICW1.LTIM), and the INTA cycle (`acknowledge`): the slave on master pin 2, a spurious
interrupt reads as IRQ 7 of the controller that had none. Datasheet: Intel 8259A,
order number 231468-003.

Ports: master 0x20-0x21, slave 0xa0-0xa1, ELCR 0x4d0-0x4d1. Every register is one
byte; a wider access is taken as that many one-byte accesses at consecutive ports, as
QEMU's memory core splits it for these byte-wide regions.

Power-on state: every input masked. QEMU's reset leaves IMR = 0 and vector base 0,
but no QEMU guest ever sees that (SeaBIOS programs the PICs first); kvmpy's guests get
the programmed state from kvmpy/boot/bios.py, and a `--flat` guest, which has no BIOS,
gets no PIC interrupt before it programs the PICs itself (ICW1 clears IMR).

The master's INT output is `output`; `on_output(level)` is called (outside the lock)
whenever it changes. Where it goes is the machine's business: in a PC, to LINT0 of
every local APIC (kvmpy/machine.py: accepted per KVM's kvm_apic_accept_pic_intr).
Threading: every entry point takes the device's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

PIC_MASTER_BASE = 0x20
PIC_SLAVE_BASE = 0xA0
PIC_ELCR_BASE = 0x4D0
CASCADE_IRQ = 2
ELCR_MASK = (0xF8, 0xDE)  # IRQ 0-2 and 8, 13 are always edge (QEMU's elcr_mask)
SPURIOUS_IRQ = 7


class _Chip:
    """One 8259A (QEMU's PICCommonState)."""

    def __init__(self, master: bool) -> None:
        self.master = master
        self.elcr = 0
        self.elcr_mask = ELCR_MASK[0 if master else 1]
        self.irr = 0
        self.last_irr = 0
        self.init_reset()
        self.imr = 0xFF  # power-on: masked until programmed (see the module docstring)

    def init_reset(self) -> None:
        """ICW1 (and power-on): QEMU's pic_init_reset. The ELCR is not reset."""
        self.last_irr = 0
        self.irr &= self.elcr
        self.imr = 0
        self.isr = 0
        self.priority_add = 0
        self.irq_base = 0
        self.read_reg_select = 0
        self.poll = False
        self.special_mask = False
        self.init_state = 0
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.init4 = False
        self.single_mode = False
        self.ltim = False

    def priority(self, mask: int) -> int:
        """The priority (0 highest) of the best bit of `mask`; 8 if none."""
        if mask == 0:
            return 8
        prio = 0
        while not mask & (1 << ((prio + self.priority_add) & 7)):
            prio += 1
        return prio

    def get_irq(self) -> int:
        """The IRQ this chip would signal now, or -1 (QEMU's pic_get_irq)."""
        prio = self.priority(self.irr & ~self.imr)
        if prio == 8:
            return -1
        mask = self.isr
        if self.special_mask:
            mask &= ~self.imr
        if self.special_fully_nested and self.master:
            mask &= ~(1 << CASCADE_IRQ)
        if prio < self.priority(mask):
            return (prio + self.priority_add) & 7
        return -1

    def set_irq(self, irq: int, level: bool) -> None:
        mask = 1 << irq
        if self.ltim or self.elcr & mask:  # level triggered
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:  # edge: a rising edge latches IRR
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask

    def intack(self, irq: int) -> None:
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.ltim and not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)  # a level-triggered request stays until lowered

    def write(self, port: int, value: int) -> None:
        if port == 0:
            if value & 0x10:  # ICW1
                self.init_reset()
                self.init_state = 1
                self.init4 = bool(value & 1)
                self.single_mode = bool(value & 2)
                self.ltim = bool(value & 8)
            elif value & 0x08:  # OCW3
                if value & 0x04:
                    self.poll = True
                if value & 0x02:
                    self.read_reg_select = value & 1
                if value & 0x40:
                    self.special_mask = bool(value & 0x20)
            else:
                self._ocw2(value)
            return
        if self.init_state == 0:  # OCW1
            self.imr = value
        elif self.init_state == 1:  # ICW2
            self.irq_base = value & 0xF8
            self.init_state = 2 if not self.single_mode else 3 if self.init4 else 0
        elif self.init_state == 2:  # ICW3 (the cascade wiring is fixed in a PC)
            self.init_state = 3 if self.init4 else 0
        else:  # ICW4
            self.special_fully_nested = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5
        if cmd in (0, 4):  # (clear / set) rotate in automatic EOI mode
            self.rotate_on_auto_eoi = cmd == 4
        elif cmd in (1, 5):  # non-specific EOI (5: and rotate)
            prio = self.priority(self.isr)
            if prio != 8:
                irq = (prio + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if cmd == 5:
                    self.priority_add = (irq + 1) & 7
        elif cmd == 3:  # specific EOI
            self.isr &= ~(1 << (value & 7))
        elif cmd == 6:  # set priority
            self.priority_add = (value + 1) & 7
        elif cmd == 7:  # rotate on specific EOI
            irq = value & 7
            self.isr &= ~(1 << irq)
            self.priority_add = (irq + 1) & 7

    def read(self, port: int) -> int:
        if self.poll:  # OCW3 poll: the read is the acknowledge
            self.poll = False
            irq = self.get_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if port == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr


class Pic8259Pair:
    """The master and slave 8259A of a PC, cascaded on master IRQ 2."""

    def __init__(self, on_output: Callable[[bool], None] | None = None) -> None:
        self.master = _Chip(master=True)
        self.slave = _Chip(master=False)
        self.on_output = on_output
        self.output = False
        self.acks = 0
        self.spurious = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lines

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ line `irq` (0-15) to `level`."""
        if not 0 <= irq < 16 or irq == CASCADE_IRQ:
            return
        with self._lock:
            if irq < 8:
                self.master.set_irq(irq, level)
            else:
                self.slave.set_irq(irq - 8, level)
            changed = self._update()
        self._notify(changed)

    def _update(self) -> bool:
        """Propagate slave INT to master IRQ 2, recompute INT; True if it changed."""
        self.master.set_irq(CASCADE_IRQ, self.slave.get_irq() >= 0)
        out = self.master.get_irq() >= 0
        changed = out != self.output
        self.output = out
        return changed

    def _notify(self, changed: bool) -> None:
        if changed and self.on_output is not None:
            self.on_output(self.output)

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to deliver (QEMU's pic_read_irq)."""
        with self._lock:
            m, s = self.master, self.slave
            irq = m.get_irq()
            if irq >= 0:
                if irq == CASCADE_IRQ:
                    irq2 = s.get_irq()
                    if irq2 >= 0:
                        s.intack(irq2)
                    else:
                        irq2 = SPURIOUS_IRQ
                        self.spurious += 1
                    vector = s.irq_base + irq2
                else:
                    vector = m.irq_base + irq
                m.intack(irq)
            else:
                self.spurious += 1
                vector = m.irq_base + SPURIOUS_IRQ
            self.acks += 1
            changed = self._update()
        self._notify(changed)
        return vector

    def masked(self, irq: int) -> bool:
        """Is ISA IRQ `irq` masked (on its chip, or the slave on the master's pin 2)?"""
        with self._lock:
            if irq < 8:
                return bool(self.master.imr >> irq & 1)
            return bool(self.slave.imr >> (irq - 8) & 1 or self.master.imr >> CASCADE_IRQ & 1)

    # ---------------------------------------------------------------- ports

    def port_write(self, chip: int, port: int, value: int) -> None:
        with self._lock:
            (self.master if chip == 0 else self.slave).write(port, value & 0xFF)
            changed = self._update()
        self._notify(changed)

    def port_read(self, chip: int, port: int) -> int:
        with self._lock:
            value = (self.master if chip == 0 else self.slave).read(port)
            changed = self._update()
        self._notify(changed)
        return value

    def elcr_write(self, chip: int, value: int) -> None:
        with self._lock:
            c = self.master if chip == 0 else self.slave
            c.elcr = value & c.elcr_mask
            changed = self._update()
        self._notify(changed)

    def elcr_read(self, chip: int) -> int:
        with self._lock:
            return (self.master if chip == 0 else self.slave).elcr

    def program(self, master_base: int, slave_base: int, master_imr: int,
                slave_imr: int) -> None:
        """ICW1-ICW4 and OCW1 as a BIOS writes them (SeaBIOS pic_reset): edge, cascade,
        8086 mode, the given vector bases and masks."""
        for chip, base, cascade, imr in ((0, master_base, 1 << CASCADE_IRQ, master_imr),
                                         (1, slave_base, CASCADE_IRQ, slave_imr)):
            for port, value in ((0, 0x11), (1, base), (1, cascade), (1, 0x01), (1, imr)):
                self.port_write(chip, port, value)


class PicPorts:
    """One chip's two ports (0x20-0x21 or 0xa0-0xa1) on the PIO bus."""

    def __init__(self, pic: Pic8259Pair, chip: int) -> None:
        self.name = "pic-master" if chip == 0 else "pic-slave"
        self.pic = pic
        self.chip = chip

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(max(size, 1)):
            if offset + i < 2:
                value |= self.pic.port_read(self.chip, offset + i) << (8 * i)
            else:
                value |= 0xFF << (8 * i)  # past the device: unclaimed, all ones
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(max(size, 1)):
            if offset + i < 2:
                self.pic.port_write(self.chip, offset + i, value >> (8 * i))


class ElcrPorts:
    """The edge/level control registers, 0x4d0 (master) and 0x4d1 (slave)."""

    name = "pic-elcr"

    def __init__(self, pic: Pic8259Pair) -> None:
        self.pic = pic

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(max(size, 1)):
            byte = self.pic.elcr_read(offset + i) if offset + i < 2 else 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(max(size, 1)):
            if offset + i < 2:
                self.pic.elcr_write(offset + i, value >> (8 * i))
