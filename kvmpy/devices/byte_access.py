"""Wide accesses to 8-bit register files, split into byte accesses.

An x86 `inw`/`outl` aimed at an 8-bit ISA device reaches it as consecutive byte cycles
at consecutive ports (little-endian); QEMU does the same for devices whose
MemoryRegionOps have `impl.max_access_size = 1` (memory.c, access_with_adjusted_size).
Bytes that fall past the device's range read as 0xff (the bus floats high) and are
dropped on write.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_ACCESS = 8


def read_bytewise(read_byte: Callable[[int], int], offset: int, size: int, length: int) -> int:
    """Read `size` bytes from `offset` one register at a time, little-endian."""
    if size == 1 and 0 <= offset < length:
        return read_byte(offset) & 0xFF
    if not 0 < size <= MAX_ACCESS:
        return 0
    value = 0
    for i in range(size):
        reg = offset + i
        byte = read_byte(reg) & 0xFF if 0 <= reg < length else 0xFF
        value |= byte << (8 * i)
    return value


def write_bytewise(
    write_byte: Callable[[int, int], None], offset: int, size: int, value: int, length: int
) -> None:
    """Write `size` bytes of `value` from `offset` one register at a time, little-endian."""
    if size == 1 and 0 <= offset < length:
        write_byte(offset, value & 0xFF)
        return
    if not 0 < size <= MAX_ACCESS:
        return
    for i in range(size):
        reg = offset + i
        if 0 <= reg < length:
            write_byte(reg, (value >> (8 * i)) & 0xFF)
