"""fw_cfg over I/O ports, driven the way kvm-unit-tests' lib/x86/fwcfg.c drives it."""

from __future__ import annotations

import struct

import pytest

from kvmpy.bus import Bus
from kvmpy.devices.fw_cfg import (
    FW_CFG_FILE_DIR,
    FW_CFG_FILE_FIRST,
    FW_CFG_ID,
    FW_CFG_IO_BASE,
    FW_CFG_IO_LENGTH,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FW_CFG_UUID,
    FwCfg,
)

BIOS_CFG_IOPORT = 0x510


def fwcfg_get_u(bus: Bus, index: int, nbytes: int) -> int:
    """lib/x86/fwcfg.c fwcfg_get_u(): outw(index, 0x510); nbytes x inb(0x511), LE."""
    bus.write(BIOS_CFG_IOPORT, 2, index)
    r = 0
    for i in range(nbytes):
        r |= bus.read(BIOS_CFG_IOPORT + 1, 1) << (i * 8)
    return r


def read_item(bus: Bus, key: int, nbytes: int) -> bytes:
    bus.write(BIOS_CFG_IOPORT, 2, key)
    return bytes(bus.read(BIOS_CFG_IOPORT + 1, 1) for _ in range(nbytes))


def make_bus(fw: FwCfg) -> Bus:
    bus = Bus("pio")
    bus.register(FW_CFG_IO_BASE, FW_CFG_IO_LENGTH, fw)
    return bus


def test_kvm_unit_tests_reads() -> None:
    ram = 512 << 20
    bus = make_bus(FwCfg(nr_cpus=3, ram_size=ram))
    assert read_item(bus, FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert fwcfg_get_u(bus, FW_CFG_NB_CPUS, 2) == 3  # fwcfg_get_nb_cpus()
    assert fwcfg_get_u(bus, FW_CFG_RAM_SIZE, 8) == ram  # setup_vm(): end_of_memory
    assert fwcfg_get_u(bus, FW_CFG_MAX_CPUS, 2) == 3
    assert fwcfg_get_u(bus, FW_CFG_ID, 4) == 1  # traditional interface, no DMA
    assert fwcfg_get_u(bus, FW_CFG_UUID, 8) == 0


def test_ram_size_above_4g_is_64_bit() -> None:
    bus = make_bus(FwCfg(nr_cpus=1, ram_size=6 << 30, max_cpus=8))
    assert fwcfg_get_u(bus, FW_CFG_RAM_SIZE, 8) == 6 << 30
    assert fwcfg_get_u(bus, FW_CFG_MAX_CPUS, 2) == 8


def test_select_rewinds_and_reads_past_end_are_zero() -> None:
    bus = make_bus(FwCfg(nr_cpus=1, ram_size=1 << 20))
    assert read_item(bus, FW_CFG_SIGNATURE, 2) == b"QE"
    assert read_item(bus, FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    # Port 0x510 reads data as well (QEMU's combined region).
    bus.write(BIOS_CFG_IOPORT, 2, FW_CFG_SIGNATURE)
    assert bus.read(BIOS_CFG_IOPORT, 1) == ord("Q")
    assert bus.read(BIOS_CFG_IOPORT + 1, 1) == ord("E")


@pytest.mark.parametrize("key", [0x07, 0x18, 0x3F, 0x1234, 0x8001, 0xFFFF])
def test_unknown_keys_read_zero(key: int) -> None:
    bus = make_bus(FwCfg(nr_cpus=1, ram_size=1 << 20))
    assert read_item(bus, key, 8) == bytes(8)


def test_write_channel_bit_selects_the_same_item() -> None:
    bus = make_bus(FwCfg(nr_cpus=2, ram_size=1 << 20))
    assert fwcfg_get_u(bus, 0x4000 | FW_CFG_NB_CPUS, 2) == 2


def test_file_directory() -> None:
    files = {"etc/zeta": b"zz", "etc/alpha": b"abcdef", "opt/kvmpy/x": b""}
    fw = FwCfg(nr_cpus=1, ram_size=1 << 20, files=files)
    bus = make_bus(fw)
    (count,) = struct.unpack(">I", read_item(bus, FW_CFG_FILE_DIR, 4))
    assert count == 3
    raw = read_item(bus, FW_CFG_FILE_DIR, 4 + 64 * count)[4:]
    entries = []
    for i in range(count):
        size, select, _reserved, name = struct.unpack(">IHH56s", raw[64 * i : 64 * (i + 1)])
        entries.append((name.rstrip(b"\0").decode(), size, select))
    assert entries == [
        ("etc/alpha", 6, FW_CFG_FILE_FIRST),
        ("etc/zeta", 2, FW_CFG_FILE_FIRST + 1),
        ("opt/kvmpy/x", 0, FW_CFG_FILE_FIRST + 2),
    ]
    for name, size, select in entries:
        assert read_item(bus, select, size) == files[name]
        assert fw.file_key(name) == select


def test_add_file_rebuilds_directory() -> None:
    fw = FwCfg(nr_cpus=1, ram_size=1 << 20, files={"b": b"1"})
    fw.add_file("a", b"22")
    bus = make_bus(fw)
    assert read_item(bus, FW_CFG_FILE_FIRST, 2) == b"22"
    assert read_item(bus, FW_CFG_FILE_FIRST + 1, 1) == b"1"
    assert struct.unpack(">I", read_item(bus, FW_CFG_FILE_DIR, 4)) == (2,)


@pytest.mark.parametrize("name", ["", "x" * 56, "a\0b"])
def test_bad_file_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        FwCfg(nr_cpus=1, ram_size=0, files={name: b""})


def test_invalid_sizes_are_ignored_and_counted() -> None:
    fw = FwCfg(nr_cpus=4, ram_size=1 << 20)
    fw.write(0, 2, FW_CFG_NB_CPUS)
    assert fw.read(1, 2) == 0  # 16-bit data read: invalid for the IO region
    fw.write(0, 4, FW_CFG_SIGNATURE)  # 32-bit select: invalid, selection unchanged
    fw.write(1, 1, 0xAA)  # data write: ignored (read-only since QEMU 2.4)
    assert fw.read(1, 1) == 4  # offset not advanced by the invalid accesses
    assert fw.unexpected_accesses == 2


def test_constructor_validates_configuration() -> None:
    with pytest.raises(ValueError):
        FwCfg(nr_cpus=0, ram_size=1)
    with pytest.raises(ValueError):
        FwCfg(nr_cpus=4, ram_size=1, max_cpus=2)
    with pytest.raises(ValueError):
        FwCfg(nr_cpus=1, ram_size=-1)
