"""ACPI tables describing the machine kvmpy builds (ACPI 6.3, chapter 5.2).

`build_tables(platform, base)` lays out RSDP, FACS, DSDT, FADT, MADT, RSDT and XSDT
from `base` upward and returns them as (address, bytes) blobs, each with a valid
checksum. The RSDP comes first, on a 16-byte boundary in the BIOS read-only area
(0xE0000-0xFFFFF) where an OS looks for it (5.2.5.1: "the first 1 KB of the EBDA, or
the BIOS read-only memory space between 0E0000h and 0FFFFFh"). Addresses in the tables
all fit in 32 bits, so the RSDT and XSDT list the same tables.

What the tables say is what kvmpy wires (`AcpiPlatform`):
- MADT (5.2.12): a Processor Local APIC entry per vCPU with its APIC ID (an x2APIC
  entry for an ID above 254, 5.2.12.12), the I/O APIC at 0xFEC00000 with GSI base 0,
  and Interrupt Source Overrides for ISA IRQ 0 -> GSI 2 (the PIT, as QEMU's
  build_madt) and for the SCI (IRQ 9, level-triggered, active high: kvmpy's I/O APIC,
  as QEMU's, does not apply polarity). PCAT_COMPAT only when an 8259 exists (KVM's
  in-kernel irqchip); kvmpy's own irqchip has none.
- FADT (5.2.9, revision 6.3): PM1a event block, PM1a control block and the 24-bit PM
  timer at I/O ports (`PmBlocks`), the SCI on IRQ 9, no SMI command port (the machine
  is always in ACPI mode: SCI_EN reads 1), the RTC century register at CMOS 0x32, the
  FACS and DSDT addresses. The FACS address is in the 32-bit FIRMWARE_CTRL and
  X_FIRMWARE_CTRL is 0, as the spec asks when both would hold it.
- FACS (5.2.10): version 2, no 64-bit wake support: the waking vector is real mode
  (or 32-bit protected mode through X_Firmware_Waking_Vector).
- DSDT (5.2.11.1): \\_S3_ (when S3 is offered) and \\_S5_ sleep packages with QEMU's
  SLP_TYP values (S3 = 1, S5 = 0: hw/acpi/core.c acpi_pm1_cnt_write), and PNP
  descriptions of the RTC (PNP0B00) and COM1 (PNP0501) under \\_SB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmpy.acpi import aml

OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPYVM "
OEM_REVISION = 1
CREATOR_ID = b"KVMP"
CREATOR_REVISION = 1

HEADER_SIZE = 36
RSDP_SIZE = 36
RSDP_V1_SIZE = 20
FACS_SIZE = 64
FADT_SIZE = 276  # FADT revision 6 (ACPI 6.0-6.5)
FADT_REVISION = 6
FADT_MINOR_REVISION = 3
MADT_REVISION = 5
DSDT_REVISION = 2  # 64-bit AML integers

# BIOS area where the RSDP is searched for (5.2.5.1), and where kvmpy puts the tables.
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000
ACPI_TABLES_BASE = 0xF0000  # reserved in the multiboot memory map (0xF0000-0xFFFFF)

LOCAL_APIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
IOAPIC_ID = 0

# MADT structure types (5.2.12, Table 5-45)
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_X2APIC = 9
MADT_PCAT_COMPAT = 1 << 0
MADT_ENABLED = 1 << 0
MAX_XAPIC_ID = 254  # 255 is the xAPIC broadcast ID: higher IDs need x2APIC entries

# MPS INTI flags (5.2.12.5, Table 5-50)
INTI_CONFORMS = 0
INTI_ACTIVE_HIGH = 0b01
INTI_LEVEL = 0b11 << 2

# FADT fixed feature flags (5.2.9, Table 5-34)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8  # 32-bit PM timer (kvmpy's is 24-bit: not set)
FADT_HEADLESS = 1 << 12
# IA-PC boot architecture flags (5.2.9.3, Table 5-35)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2
BOOT_MSI_NOT_SUPPORTED = 1 << 3
BOOT_CMOS_RTC_NOT_PRESENT = 1 << 5

# Generic Address Structure (5.2.3.2)
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3

RTC_CENTURY_INDEX = 0x32
SCI_IRQ = 9

# SLP_TYP values (the DSDT's sleep packages; QEMU's acpi_pm1_cnt_write).
SLP_TYP_S5 = 0
SLP_TYP_S3 = 1


@dataclass(frozen=True)
class PmBlocks:
    """Where the ACPI fixed hardware registers are (QEMU's PIIX4 PM layout at 0x600)."""

    pm1a_evt: int = 0x600
    pm1_evt_len: int = 4
    pm1a_cnt: int = 0x604
    pm1_cnt_len: int = 2
    pm_tmr: int = 0x608
    pm_tmr_len: int = 4


@dataclass(frozen=True)
class InterruptOverride:
    """An ISA IRQ delivered on another GSI or with other flags than ISA's defaults."""

    irq: int
    gsi: int
    flags: int = INTI_CONFORMS


@dataclass(frozen=True)
class AcpiPlatform:
    """What the tables describe."""

    apic_ids: tuple[int, ...]  # one per vCPU, the BSP first
    pcat_compat: bool = False  # an 8259 pair exists (KVM's in-kernel irqchip)
    overrides: tuple[InterruptOverride, ...] = (
        InterruptOverride(0, 2),
        InterruptOverride(SCI_IRQ, SCI_IRQ, INTI_ACTIVE_HIGH | INTI_LEVEL),
    )
    pm: PmBlocks = field(default_factory=PmBlocks)
    s3: bool = True  # offer S3 (\\_S3_ in the DSDT)
    sci_irq: int = SCI_IRQ
    com1: tuple[int, int] | None = (0x3F8, 4)  # port, IRQ
    rtc: tuple[int, int] | None = (0x70, 8)


@dataclass(frozen=True)
class AcpiTables:
    """The built tables: each table's address and bytes, by signature."""

    blobs: dict[str, tuple[int, bytes]]

    def address(self, signature: str) -> int:
        return self.blobs[signature][0]

    def data(self, signature: str) -> bytes:
        return self.blobs[signature][1]

    @property
    def end(self) -> int:
        return max(addr + len(data) for addr, data in self.blobs.values())


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with it in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def with_checksum(data: bytes, offset: int, length: int | None = None) -> bytes:
    """`data` with the checksum of its first `length` bytes (default all) at `offset`."""
    buf = bytearray(data)
    buf[offset] = 0
    end = len(buf) if length is None else length
    buf[offset] = checksum(bytes(buf[:end]))
    return bytes(buf)


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (5.2.6) and `body`, checksummed."""
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID,
                         OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    return with_checksum(header + body, 9)


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """RSDP revision 2 (5.2.5.3): the first 20 bytes and all 36 each sum to 0."""
    data = struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, rsdt_addr, RSDP_SIZE,
                       xsdt_addr, 0)
    data = with_checksum(data, 8, RSDP_V1_SIZE)
    return with_checksum(data, 32)


def rsdt(addresses: list[int]) -> bytes:
    return table(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in addresses))


def xsdt(addresses: list[int]) -> bytes:
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


def facs() -> bytes:
    """FACS (5.2.10): 64 bytes, no checksum; version 2, no S4BIOS, no 64-bit wake."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0)


def madt(platform: AcpiPlatform) -> bytes:
    """MADT (5.2.12): local APIC address and flags, then the interrupt structures."""
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS,
                                 MADT_PCAT_COMPAT if platform.pcat_compat else 0))
    for uid, apic_id in enumerate(platform.apic_ids):
        if apic_id <= MAX_XAPIC_ID:
            body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, uid, apic_id, MADT_ENABLED)
        else:
            body += struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id, MADT_ENABLED,
                                uid)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
    for o in platform.overrides:
        body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, o.irq, o.gsi, o.flags)
    return table(b"APIC", MADT_REVISION, bytes(body))


def _gas(space: int, bit_width: int, access: int, address: int) -> bytes:
    """A Generic Address Structure (5.2.3.2), 12 bytes; all zero for "none"."""
    if not address:
        return bytes(12)
    return struct.pack("<BBBBQ", space, bit_width, 0, access, address)


def fadt(platform: AcpiPlatform, facs_addr: int, dsdt_addr: int) -> bytes:
    """FADT revision 6 (5.2.9, Table 5-33), 276 bytes."""
    pm = platform.pm
    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_HEADLESS
    boot_arch = BOOT_LEGACY_DEVICES | BOOT_VGA_NOT_PRESENT | BOOT_MSI_NOT_SUPPORTED
    body = struct.pack(
        "<IIBBHIBBBB"  # 36: FIRMWARE_CTRL .. PSTATE_CNT
        "IIIIIIII"  # 56: PM1a_EVT_BLK .. GPE1_BLK
        "BBBBBBBB"  # 88: PM1_EVT_LEN .. CST_CNT
        "HHHHBBBBBHBI",  # 96: P_LVL2_LAT .. Flags
        facs_addr, dsdt_addr, 0, 0, platform.sci_irq, 0, 0, 0, 0, 0,
        pm.pm1a_evt, 0, pm.pm1a_cnt, 0, 0, pm.pm_tmr, 0, 0,
        pm.pm1_evt_len, pm.pm1_cnt_len, 0, pm.pm_tmr_len, 0, 0, 0, 0,
        0x0FFF, 0x0FFF,  # C2 and C3 latencies above 100 / 1000 us: not supported
        0, 0, 0, 0, 0, 0, RTC_CENTURY_INDEX, boot_arch, 0, flags,
    )
    body += _gas(0, 0, 0, 0)  # RESET_REG: none (RESET_REG_SUP clear)
    body += struct.pack("<BHB", 0, 0, FADT_MINOR_REVISION)
    body += struct.pack("<QQ", 0, dsdt_addr)  # X_FIRMWARE_CTRL (see module doc), X_DSDT
    body += _gas(GAS_SYSTEM_IO, 8 * pm.pm1_evt_len, GAS_ACCESS_WORD, pm.pm1a_evt)
    body += _gas(0, 0, 0, 0)  # X_PM1b_EVT_BLK
    body += _gas(GAS_SYSTEM_IO, 8 * pm.pm1_cnt_len, GAS_ACCESS_WORD, pm.pm1a_cnt)
    body += _gas(0, 0, 0, 0) * 2  # X_PM1b_CNT_BLK, X_PM2_CNT_BLK
    body += _gas(GAS_SYSTEM_IO, 8 * pm.pm_tmr_len, GAS_ACCESS_DWORD, pm.pm_tmr)
    body += _gas(0, 0, 0, 0) * 4  # X_GPE0_BLK, X_GPE1_BLK, SLEEP_CONTROL, SLEEP_STATUS
    body += bytes(8)  # hypervisor vendor identity: none
    data = table(b"FACP", FADT_REVISION, body)
    assert len(data) == FADT_SIZE
    return data


def dsdt_aml(platform: AcpiPlatform) -> bytes:
    """The DSDT's AML body: the sleep packages and the ISA devices kvmpy has."""
    terms = []
    if platform.s3:
        terms.append(aml.name("\\_S3", aml.package([aml.integer(SLP_TYP_S3)] * 2
                                                   + [aml.integer(0)] * 2)))
    terms.append(aml.name("\\_S5", aml.package([aml.integer(SLP_TYP_S5)] * 4)))
    devices = []
    if platform.rtc is not None:
        port, irq = platform.rtc
        devices.append(aml.device(
            "RTC", aml.name("_HID", aml.eisa_id("PNP0B00")),
            aml.name("_CRS", aml.resource_template(aml.io_port(port, 2),
                                                   aml.irq_no_flags(irq)))))
    if platform.com1 is not None:
        port, irq = platform.com1
        devices.append(aml.device(
            "COM1", aml.name("_HID", aml.eisa_id("PNP0501")), aml.name("_UID", aml.integer(1)),
            aml.name("_CRS", aml.resource_template(aml.io_port(port, 8),
                                                   aml.irq_no_flags(irq)))))
    if devices:
        terms.append(aml.scope("\\_SB", *devices))
    return b"".join(terms)


def dsdt(platform: AcpiPlatform) -> bytes:
    return table(b"DSDT", DSDT_REVISION, dsdt_aml(platform))


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def build_tables(platform: AcpiPlatform, base: int = ACPI_TABLES_BASE) -> AcpiTables:
    """Every table, laid out from `base` (16-byte aligned; the FACS 64-byte aligned,
    5.2.10), each table on a 16-byte boundary."""
    if base % 16:
        raise ValueError(f"ACPI tables base {base:#x} is not 16-byte aligned")
    blobs: dict[str, tuple[int, bytes]] = {}
    rsdp_addr = base
    facs_addr = _align(rsdp_addr + RSDP_SIZE, 64)
    blobs["FACS"] = (facs_addr, facs())
    dsdt_addr = facs_addr + FACS_SIZE
    dsdt_data = dsdt(platform)
    blobs["DSDT"] = (dsdt_addr, dsdt_data)
    fadt_addr = _align(dsdt_addr + len(dsdt_data), 16)
    blobs["FACP"] = (fadt_addr, fadt(platform, facs_addr, dsdt_addr))
    madt_addr = _align(fadt_addr + FADT_SIZE, 16)
    madt_data = madt(platform)
    blobs["APIC"] = (madt_addr, madt_data)
    listed = [fadt_addr, madt_addr]
    rsdt_addr = _align(madt_addr + len(madt_data), 16)
    rsdt_data = rsdt(listed)
    blobs["RSDT"] = (rsdt_addr, rsdt_data)
    xsdt_addr = _align(rsdt_addr + len(rsdt_data), 16)
    blobs["XSDT"] = (xsdt_addr, xsdt(listed))
    blobs["RSDP"] = (rsdp_addr, rsdp(rsdt_addr, xsdt_addr))
    return AcpiTables(blobs)
