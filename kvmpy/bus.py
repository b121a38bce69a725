"""Address buses: port I/O and MMIO dispatch to devices registered by range.

Mirrors kvmtool's ioport.c / mmio.c (one bus, devices claim [base, base + length)) and
QEMU's unassigned-access behaviour: a read nobody claims returns all ones for its size
(an undriven ISA/PCI bus floats high), a write nobody claims is dropped. Both are
counted, never raised: the guest is free to poke any address.

Lookup is a bisect over the sorted bases (C speed, no allocation). Registration is rare
and may be slow.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Protocol

UNCLAIMED_ADDR_SLOTS = 256  # distinct unclaimed addresses remembered for diagnostics


class Device(Protocol):
    """Anything that answers accesses at offsets from its registered base.

    `read` and `write` must never raise on any offset inside the range, any size 1, 2, 4
    or 8 and any value: unexpected accesses are ignored and counted by the device.
    """

    name: str

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


def all_ones(size: int) -> int:
    """The value an unclaimed read of `size` bytes returns: every bit set."""
    return (1 << (8 * size)) - 1 if size > 0 else 0


class Bus:
    """An address bus (port I/O or MMIO) dispatching accesses to devices registered by range."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._ends: list[int] = []  # exclusive, parallel to _bases
        self._devices: list[Device] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        # addr -> number of unclaimed accesses; bounded so a scanning guest cannot grow it.
        self.unclaimed_by_addr: dict[int, int] = {}

    def register(self, base: int, length: int, device: Device) -> None:
        """Claim [base, base + length) for `device`; overlapping an existing range is an error."""
        if base < 0 or length <= 0:
            raise ValueError(f"{self.name}: bad range base={base:#x} length={length:#x}")
        end = base + length
        i = bisect_right(self._bases, base)
        if i > 0 and self._ends[i - 1] > base:
            other = self._devices[i - 1]
            raise ValueError(
                f"{self.name}: {device.name} at {base:#x}+{length:#x} overlaps "
                f"{other.name} at {self._bases[i - 1]:#x}"
            )
        if i < len(self._bases) and self._bases[i] < end:
            other = self._devices[i]
            raise ValueError(
                f"{self.name}: {device.name} at {base:#x}+{length:#x} overlaps "
                f"{other.name} at {self._bases[i]:#x}"
            )
        self._bases.insert(i, base)
        self._ends.insert(i, end)
        self._devices.insert(i, device)

    def unregister(self, base: int) -> Device:
        """Remove the device registered exactly at `base` and return it (KeyError if none)."""
        i = bisect_right(self._bases, base) - 1
        if i < 0 or self._bases[i] != base:
            raise KeyError(f"{self.name}: no device registered at {base:#x}")
        del self._bases[i], self._ends[i]
        return self._devices.pop(i)

    def find(self, addr: int) -> tuple[Device, int] | None:
        """The device claiming `addr` and the offset of `addr` within its range, or None."""
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._devices[i], addr - self._bases[i]
        return None

    def read(self, addr: int, size: int) -> int:
        """Dispatch a read of `size` bytes; unclaimed reads return all ones."""
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._devices[i].read(addr - self._bases[i], size)
        self.unclaimed_reads += 1
        self._note_unclaimed(addr)
        return all_ones(size)

    def write(self, addr: int, size: int, value: int) -> None:
        """Dispatch a write of `size` bytes; unclaimed writes are dropped."""
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            self._devices[i].write(addr - self._bases[i], size, value)
            return
        self.unclaimed_writes += 1
        self._note_unclaimed(addr)

    def _note_unclaimed(self, addr: int) -> None:
        counts = self.unclaimed_by_addr
        if addr in counts:
            counts[addr] += 1
        elif len(counts) < UNCLAIMED_ADDR_SLOTS:
            counts[addr] = 1

    def ranges(self) -> list[tuple[int, int, Device]]:
        """(base, length, device) for every registration, in address order."""
        return [
            (b, e - b, d) for b, e, d in zip(self._bases, self._ends, self._devices, strict=True)
        ]

    def __repr__(self) -> str:
        return f"Bus({self.name!r}, {len(self._bases)} devices)"
