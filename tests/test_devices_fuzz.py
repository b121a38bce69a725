"""Hostile-guest fuzzing: random accesses to every device never raise, reads fit their size."""

from __future__ import annotations

import io
import random

import pytest

from kvmpy.bus import Bus
from kvmpy.devices import (
    COM1_BASE,
    DEBUG_EXIT_BASE,
    DEBUG_EXIT_LENGTH,
    FW_CFG_IO_BASE,
    FW_CFG_IO_LENGTH,
    PIT_BASE,
    PIT_LENGTH,
    SERIAL_LENGTH,
    SYSTEM_CONTROL_B_LENGTH,
    SYSTEM_CONTROL_B_PORT,
    DebugExit,
    FwCfg,
    Pit8254,
    Serial16550,
    SystemControlB,
)

SIZES = (1, 2, 4, 8)
ACCESSES = 20_000


class JitteryClock:
    """A clock that moves forward by random amounts, sometimes not at all."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ns = 0

    def __call__(self) -> int:
        self.ns += self.rng.choice((0, 1, 838, 1000, 100_000, 50_000_000))
        return self.ns


def build(rng: random.Random) -> tuple[Bus, list[tuple[int, int]], dict[str, object]]:
    exits: list[int] = []
    pit = Pit8254(JitteryClock(rng))
    devices = {
        "serial": (
            COM1_BASE,
            SERIAL_LENGTH,
            Serial16550(io.BytesIO(), rx_capacity=64, irq=lambda level: None),
        ),
        "debug": (DEBUG_EXIT_BASE, DEBUG_EXIT_LENGTH, DebugExit(exits.append)),
        "fw_cfg": (
            FW_CFG_IO_BASE,
            FW_CFG_IO_LENGTH,
            FwCfg(2, 1 << 30, files={"etc/a": b"x" * 100, "etc/b": b""}),
        ),
        "pit": (PIT_BASE, PIT_LENGTH, pit),
        "port61": (SYSTEM_CONTROL_B_PORT, SYSTEM_CONTROL_B_LENGTH, SystemControlB(pit)),
    }
    bus = Bus("pio")
    ranges = []
    for base, length, dev in devices.values():
        bus.register(base, length, dev)
        ranges.append((base, length))
    return bus, ranges, {"exits": exits, **{k: v[2] for k, v in devices.items()}}


def interesting_value(rng: random.Random, size: int) -> int:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.getrandbits(8 * size)
    if kind == 1:
        return rng.choice((0, 1, 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1))
    if kind == 2:
        return rng.getrandbits(8)  # control-word-like bytes
    return rng.getrandbits(64)  # wider than the access: devices must mask


@pytest.mark.parametrize("seed", range(4))
def test_random_accesses_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    bus, ranges, parts = build(rng)
    serial = parts["serial"]
    assert isinstance(serial, Serial16550)
    for i in range(ACCESSES):
        base, length = rng.choice(ranges)
        addr = base + rng.randrange(length)
        size = rng.choice(SIZES)
        if rng.random() < 0.5:
            value = bus.read(addr, size)
            assert 0 <= value < 1 << (8 * size), (hex(addr), size, value)
        else:
            bus.write(addr, size, interesting_value(rng, size))
        if i % 97 == 0:
            serial.feed(rng.randbytes(rng.randrange(40)))
    assert bus.unclaimed_reads == 0 and bus.unclaimed_writes == 0
    assert serial.rx_pending <= serial.rx_capacity


@pytest.mark.parametrize("offset", [-1, 1 << 20])
@pytest.mark.parametrize("size", [0, 3, 16])
def test_direct_calls_with_out_of_contract_arguments_never_raise(offset: int, size: int) -> None:
    rng = random.Random(7)
    _, _, parts = build(rng)
    for name, dev in parts.items():
        if name == "exits":
            continue
        dev.write(offset, size, 0x12345)  # type: ignore[attr-defined]
        value = dev.read(offset, size)  # type: ignore[attr-defined]
        assert isinstance(value, int) and value >= 0
