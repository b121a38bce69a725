"""isa-debug-exit: status (V << 1) | 1 with V masked to the access size; reads return 0."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.debug_exit import DEBUG_EXIT_BASE, DEBUG_EXIT_LENGTH, DebugExit


@pytest.mark.parametrize(
    "size,value,status",
    [
        (4, 0, 1),
        (4, 1, 3),  # kvm-unit-tests: exit(1) -> status 3
        (4, 0x7FFF_FFFF, 0xFFFF_FFFF),
        (4, 0xFFFF_FFFF, 0x1_FFFF_FFFF),
        (2, 0x1_2345, 0x2345 << 1 | 1),
        (1, 0x1FF, 0xFF << 1 | 1),
    ],
)
def test_write_exits_with_shifted_status(size: int, value: int, status: int) -> None:
    got: list[int] = []
    bus = Bus("pio")
    bus.register(DEBUG_EXIT_BASE, DEBUG_EXIT_LENGTH, DebugExit(got.append))
    bus.write(DEBUG_EXIT_BASE, size, value)
    assert got == [status]


def test_any_port_of_the_range_exits_and_reads_are_zero() -> None:
    got: list[int] = []
    dev = DebugExit(got.append)
    dev.write(3, 1, 2)
    assert got == [5]
    assert dev.exit_writes == 1 and dev.last_status == 5
    assert [dev.read(off, 4) for off in range(DEBUG_EXIT_LENGTH)] == [0, 0, 0, 0]


def test_eight_byte_write_is_invalid_and_ignored() -> None:
    got: list[int] = []
    dev = DebugExit(got.append)
    dev.write(0, 8, 1)
    assert got == []
    assert dev.unexpected_accesses == 1
