"""Bus dispatch: registration, overlap rejection, range edges, unclaimed accesses."""

from __future__ import annotations

import pytest

from kvmpy.bus import UNCLAIMED_ADDR_SLOTS, Bus, all_ones


class Recorder:
    """A device that records its accesses and reads back offset-dependent values."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return 0x100 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_dispatch_at_range_edges() -> None:
    bus = Bus("pio")
    a, b = Recorder("a"), Recorder("b")
    bus.register(0x3F8, 8, a)
    bus.register(0x400, 4, b)  # adjacent-ish, not touching a
    assert bus.read(0x3F8, 1) == 0x100
    assert bus.read(0x3FF, 2) == 0x107
    assert bus.read(0x400, 4) == 0x100
    assert bus.read(0x403, 1) == 0x103
    assert a.reads == [(0, 1), (7, 2)]
    assert b.reads == [(0, 4), (3, 1)]
    bus.write(0x3FC, 1, 0x5A)
    assert a.writes == [(4, 1, 0x5A)]
    assert bus.unclaimed_reads == 0 and bus.unclaimed_writes == 0


def test_just_outside_a_range_is_unclaimed() -> None:
    bus = Bus("pio")
    dev = Recorder("d")
    bus.register(0x40, 4, dev)
    assert bus.read(0x3F, 1) == 0xFF
    assert bus.read(0x44, 2) == 0xFFFF
    bus.write(0x44, 1, 1)
    bus.write(0x3F, 4, 1)
    assert dev.reads == [] and dev.writes == []
    assert bus.unclaimed_reads == 2
    assert bus.unclaimed_writes == 2
    assert bus.unclaimed_by_addr == {0x3F: 2, 0x44: 2}


@pytest.mark.parametrize(
    "size,expected", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, 0xFFFF_FFFF_FFFF_FFFF)]
)
def test_unclaimed_read_is_all_ones(size: int, expected: int) -> None:
    bus = Bus("mmio")
    assert bus.read(0xFEE0_0000, size) == expected
    assert all_ones(size) == expected
    assert bus.unclaimed_reads == 1


def test_find_returns_device_and_offset() -> None:
    bus = Bus("mmio")
    dev = Recorder("d")
    bus.register(0xFEC0_0000, 0x1000, dev)
    assert bus.find(0xFEC0_0000) == (dev, 0)
    assert bus.find(0xFEC0_0FFF) == (dev, 0xFFF)
    assert bus.find(0xFEC0_1000) is None
    assert bus.find(0xFEBF_FFFF) is None
    assert bus.find(0) is None


@pytest.mark.parametrize(
    "base,length",
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x3F0, 0x100), (0x3F4, 5)],
)
def test_overlap_is_rejected(base: int, length: int) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder("serial"))
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(base, length, Recorder("other"))
    assert len(bus.ranges()) == 1


def test_touching_ranges_are_allowed_and_sorted() -> None:
    bus = Bus("pio")
    c, a, b = Recorder("c"), Recorder("a"), Recorder("b")
    bus.register(0x20, 0x10, c)
    bus.register(0x00, 0x10, a)
    bus.register(0x10, 0x10, b)
    assert [(base, length, d.name) for base, length, d in bus.ranges()] == [
        (0x00, 0x10, "a"),
        (0x10, 0x10, "b"),
        (0x20, 0x10, "c"),
    ]
    assert bus.find(0x0F) == (a, 0x0F)
    assert bus.find(0x10) == (b, 0)
    assert bus.find(0x2F) == (c, 0x0F)


@pytest.mark.parametrize("base,length", [(-1, 4), (0x10, 0), (0x10, -3)])
def test_bad_ranges_are_rejected(base: int, length: int) -> None:
    with pytest.raises(ValueError):
        Bus("pio").register(base, length, Recorder("d"))


def test_unregister() -> None:
    bus = Bus("pio")
    dev = Recorder("d")
    bus.register(0x60, 1, dev)
    with pytest.raises(KeyError):
        bus.unregister(0x61)
    assert bus.unregister(0x60) is dev
    assert bus.find(0x60) is None
    bus.register(0x60, 2, Recorder("e"))  # the range is free again


def test_unclaimed_address_memory_is_bounded() -> None:
    bus = Bus("mmio")
    for addr in range(UNCLAIMED_ADDR_SLOTS + 100):
        bus.read(addr * 0x1000, 4)
    assert bus.unclaimed_reads == UNCLAIMED_ADDR_SLOTS + 100
    assert len(bus.unclaimed_by_addr) == UNCLAIMED_ADDR_SLOTS
