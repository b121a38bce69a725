"""QEMU's pc-testdev (hw/misc/pc-testdev.c), the ports kvm-unit-tests' x86 tests use.

- 0xe0-0xe3 ("ioport") and 0xe8-0xeb ("ioport-byte"): one 32-bit scratch register; an
  access of n bytes at offset o reads or writes bytes o..o+n-1 of it (test_ioport_read
  and _write; bytes beyond the register are cut off, as QEMU's uint32_t). emulator.flat,
  realmode.flat and amd_sev.flat echo values through 0xe0.
- 0xe4 ("flush-page", 32-bit writes only): the value is a guest-physical address whose
  mapping KVM is made to drop (QEMU mprotects the host page; see
  GuestMemory.flush_page), so the guest's next access faults it back in. eventinj.flat
  uses it when TEST_DEVICE is set. The VMM supplies ``flush_page``.
- 0x2000-0x2017 ("irq-line", byte writes): a write of v to 0x2000 + n drives line n to
  (v != 0). Lines 0-15 are ISA IRQs (QEMU's isa_get_irq; IRQ 0 is GSI 2), 16-23 GSIs
  16-23 (QEMU would abort: isa_get_irq asserts n < 16). ioapic.flat's set_irq_line.
  Reads return 0; other sizes are ignored; both are counted.

- 0xff000000-0xff00ffff ("iomem", MMIO): 64 KiB that read back what was written, at
  every size (test_iomem_read/_write: a memcpy of the access's bytes, little-endian).
  emulator.flat and lam.flat map it to make KVM emulate instructions on MMIO
  (kvm-unit-tests x86/ioram.h). It is MMIO here too, not a KVM memory slot: the point
  of those tests is KVM's emulation of each instruction's MMIO access, which a RAM slot
  would bypass. An access running past the end is cut off there (reads give 0 for the
  missing bytes); QEMU's core rejects it before the device sees it.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmpy.devices.irq import ISA_IRQS, IrqRouter, isa_gsi

PC_TESTDEV_BASE = 0xE0
PC_TESTDEV_LENGTH = 12  # 0xe0 ioport, 0xe4 flush-page, 0xe8 ioport-byte
PC_TESTDEV_IRQ_BASE = 0x2000
PC_TESTDEV_IRQ_LINES = 24
PC_TESTDEV_IOMEM_BASE = 0xFF00_0000
PC_TESTDEV_IOMEM_LENGTH = 0x1_0000

_IOPORT, _FLUSH, _IOPORT_BYTE = 0, 4, 8


class PcTestdev:
    """Ports 0xe0-0xeb: the scratch register and the flush-page port."""

    def __init__(self, flush_page: Callable[[int], None] | None = None,
                 name: str = "pc-testdev") -> None:
        self.name = name
        self.flush_page = flush_page
        self.data = 0
        self.flushes = 0
        self.unexpected_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if offset >= _IOPORT_BYTE or offset < _FLUSH:
            shift = 8 * (offset & 3)
            return (self.data & _mask(size, shift)) >> shift
        self.unexpected_accesses += 1  # flush-page has no read side
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= _IOPORT_BYTE or offset < _FLUSH:
            shift = 8 * (offset & 3)
            mask = _mask(size, shift)
            self.data = (self.data & ~mask) | ((value << shift) & mask)
            return
        if offset == _FLUSH and size == 4:
            self.flushes += 1
            if self.flush_page is not None:
                self.flush_page(value & 0xFFFF_F000)
            return
        self.unexpected_accesses += 1


def _mask(size: int, shift: int) -> int:
    """The bytes of the 32-bit register an access of ``size`` at bit ``shift`` covers."""
    return (((1 << (8 * min(max(size, 0), 4))) - 1) << shift) & 0xFFFF_FFFF


class PcTestdevIrq:
    """Ports 0x2000-0x2017: one interrupt line per port, driven by byte writes."""

    def __init__(self, router: IrqRouter, name: str = "pc-testdev-irq") -> None:
        self.name = name
        self.router = router
        self.source = router.new_source()
        self.writes = 0
        self.unexpected_accesses = 0

    def read(self, offset: int, size: int) -> int:
        self.unexpected_accesses += 1
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or not 0 <= offset < PC_TESTDEV_IRQ_LINES:
            self.unexpected_accesses += 1
            return
        gsi = isa_gsi(offset) if offset < ISA_IRQS else offset
        self.writes += 1
        self.router.set_irq(gsi, bool(value & 0xFF), self.source)


class PcTestdevIomem:
    """MMIO 0xff000000-0xff00ffff: 64 KiB of scratch memory (QEMU's test_iomem_ops)."""

    def __init__(self, name: str = "pc-testdev-iomem") -> None:
        self.name = name
        self.buf = bytearray(PC_TESTDEV_IOMEM_LENGTH)

    def read(self, offset: int, size: int) -> int:
        if not 0 <= offset < len(self.buf) or size <= 0:
            return 0
        return int.from_bytes(self.buf[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < len(self.buf) or size <= 0:
            return
        n = min(size, len(self.buf) - offset)
        self.buf[offset : offset + n] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little")[:n]
