"""What a PC BIOS leaves for a `-kernel` image: the part of it a guest can see.

QEMU boots a multiboot image through SeaBIOS (and its multiboot option ROM), so the
kernel starts on a machine the BIOS has initialized; kvmpy has no firmware and sets
up the parts kvm-unit-tests' real-mode test (x86/realmode.c) relies on when it halts
with interrupts enabled and waits for the timer:
- the 8259 PICs as SeaBIOS's pic_setup/pic_reset and timer setup leave them: vector
  bases 08h (IRQ 0-7) and 70h (IRQ 8-15), edge triggered, IRQ 0 (the PIT) and IRQ 2
  (the cascade) unmasked, everything else masked;
- the real-mode interrupt vector table (0000:0000-0000:03FF): every vector points at
  an IRET (F000:FF53, where PC BIOSes, SeaBIOS included, keep one); the IRQ vectors
  08h-0Fh at a handler that sends the master PIC a non-specific EOI, 70h-77h at one
  that sends it to both PICs (SeaBIOS's handlers do that, and more: the timer
  handler also counts ticks in the BDA and calls INT 1Ch, which kvmpy's does not).
The PIT already counts from reset in mode 3 at 18.2 Hz (kvmpy/devices/pit.py), as
SeaBIOS programs it. Not modelled: the BDA, the EBDA, BIOS services (INT 10h/13h/15h,
...), the BIOS's programming of the local APIC (kvmpy's BSP APIC starts as KVM resets
it: LINT0 ExtINT, see LocalApic.lint0_extint_at_reset). A protected-mode kernel that
enables interrupts without masking the PICs gets the timer at vector 08h, as on a PC.

Everything goes into guest RAM below 1 MiB, before the kernel is loaded: where a
kernel overlaps it, the kernel wins (QEMU's option ROM loads the kernel last too).
Multiboot images only: a `--flat` raw binary is kvmpy's bare mode, with no BIOS.
"""

from __future__ import annotations

import struct

from kvmpy.devices.i8259 import Pic8259Pair
from kvmpy.memory import GuestMemory

BIOS_SEGMENT = 0xF000
IRET_OFFSET = 0xFF53  # the IRET every PC BIOS keeps at F000:FF53
MASTER_EOI_OFFSET = 0xFF00
SLAVE_EOI_OFFSET = 0xFF10
IVT_ENTRIES = 256
MASTER_VECTOR_BASE = 0x08
SLAVE_VECTOR_BASE = 0x70
MASTER_IMR = 0xFF & ~(1 << 0 | 1 << 2)  # the timer and the cascade
SLAVE_IMR = 0xFF

IRET = bytes([0xCF])
# push ax; mov al, 20h; out 20h, al; pop ax; iret
MASTER_EOI = bytes([0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF])
# push ax; mov al, 20h; out 0A0h, al; out 20h, al; pop ax; iret
SLAVE_EOI = bytes([0x50, 0xB0, 0x20, 0xE6, 0xA0, 0xE6, 0x20, 0x58, 0xCF])


def _far(offset: int) -> int:
    return BIOS_SEGMENT << 16 | offset


def ivt() -> bytes:
    """The 1 KiB interrupt vector table (segment:offset per vector)."""
    entries = []
    for vector in range(IVT_ENTRIES):
        if MASTER_VECTOR_BASE <= vector < MASTER_VECTOR_BASE + 8:
            entries.append(_far(MASTER_EOI_OFFSET))
        elif SLAVE_VECTOR_BASE <= vector < SLAVE_VECTOR_BASE + 8:
            entries.append(_far(SLAVE_EOI_OFFSET))
        else:
            entries.append(_far(IRET_OFFSET))
    return struct.pack(f"<{IVT_ENTRIES}I", *entries)


def setup_bios_state(mem: GuestMemory, pic: Pic8259Pair | None) -> None:
    """Write the IVT and handlers; program the PICs (kvmpy's, if it has them)."""
    base = BIOS_SEGMENT << 4
    mem.write(0, ivt())
    mem.write(base + IRET_OFFSET, IRET)
    mem.write(base + MASTER_EOI_OFFSET, MASTER_EOI)
    mem.write(base + SLAVE_EOI_OFFSET, SLAVE_EOI)
    if pic is not None:
        pic.program(MASTER_VECTOR_BASE, SLAVE_VECTOR_BASE, MASTER_IMR, SLAVE_IMR)
