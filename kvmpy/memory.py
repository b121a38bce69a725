"""Guest physical memory: anonymous host mappings registered as KVM memory slots.

Guest RAM is one contiguous range starting at guest-physical 0, split around the
PCI hole when it is larger than `PCI_HOLE_START` (as on a PC: RAM above 3 GiB is moved
to 4 GiB). Every access helper is bounds-checked: device code never touches host
memory outside guest RAM, whatever the guest asks for.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

PAGE_SIZE = 4096
_libc = ctypes.CDLL(None, use_errno=True)
PCI_HOLE_START = 0xC000_0000  # 3 GiB: the xAPIC page, IOAPIC and PCI MMIO live above it
HIGH_RAM_START = 0x1_0000_0000


class GuestMemoryError(Exception):
    """A guest-physical access outside guest RAM."""


@dataclass(frozen=True)
class MemoryRegion:
    """One KVM memory slot: guest-physical range backed by a host mapping."""

    slot: int
    gpa: int
    size: int
    mapping: mmap.mmap

    @property
    def host_address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """Guest RAM of `size` bytes, as a list of regions (memory slots)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size must be a positive multiple of 4 KiB: {size}")
        self.size = size
        self.regions: list[MemoryRegion] = []
        low = min(size, PCI_HOLE_START)
        self._add_region(0, low)
        if size > low:
            self._add_region(HIGH_RAM_START, size - low)

    def _add_region(self, gpa: int, size: int) -> None:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.regions.append(MemoryRegion(len(self.regions), gpa, size, mapping))

    @property
    def low_size(self) -> int:
        """Bytes of RAM below the PCI hole (what a multiboot mem_upper describes)."""
        return self.regions[0].size

    def _region(self, gpa: int, length: int) -> MemoryRegion:
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at {gpa:#x}")
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not in guest RAM")

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        return any(r.contains(gpa, length) for r in self.regions)

    def read(self, gpa: int, length: int) -> bytes:
        region = self._region(gpa, length)
        off = gpa - region.gpa
        return region.mapping[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region = self._region(gpa, len(data))
        off = gpa - region.gpa
        region.mapping[off : off + len(data)] = bytes(data)

    def zero(self, gpa: int, length: int) -> None:
        self.write(gpa, bytes(length))

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string at `gpa`, at most `limit` bytes, clipped to RAM."""
        out = bytearray()
        while len(out) < limit and self.is_ram(gpa + len(out)):
            b = self.read(gpa + len(out), 1)
            if b == b"\0":
                break
            out += b
        return bytes(out)

    def flush_page(self, gpa: int) -> bool:
        """Make KVM drop its mapping of guest page ``gpa`` so that the guest's next access
        faults it back in (QEMU's pc-testdev test_flush_page). QEMU mprotects the page
        PROT_NONE and back; here the page gains PROT_EXEC and loses it again: mprotect
        sends the same MMU-notifier invalidation (MMU_NOTIFY_PROTECTION_VMA) and the page
        never becomes inaccessible, so another vCPU touching it meanwhile cannot make
        KVM_RUN fail with EFAULT. False if ``gpa`` is not RAM."""
        gpa &= ~(PAGE_SIZE - 1)
        if not self.is_ram(gpa, PAGE_SIZE):
            return False
        region = self._region(gpa, PAGE_SIZE)
        addr = ctypes.c_void_p(region.host_address + gpa - region.gpa)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        _libc.mprotect(addr, PAGE_SIZE, rw | mmap.PROT_EXEC)
        _libc.mprotect(addr, PAGE_SIZE, rw)
        return True

    def close(self) -> None:
        for region in self.regions:
            try:
                region.mapping.close()
            except BufferError:
                # A ctypes view still points into it; the mapping goes with the process.
                pass
        self.regions.clear()
