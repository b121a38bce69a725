"""kvmpy's ACPI tables read back by ACPICA (Debian's acpica-tools), not by kvmpy.

`iasl -d` disassembles each table binary and flags a wrong checksum ("Incorrect
checksum"); the fields are taken from its listing by offset. iasl cannot disassemble
an RSDP from a file, so the RSDP is compiled by iasl from its template with kvmpy's
values, iasl computing both checksums, and compared byte for byte. `acpiexec` loads
the DSDT and evaluates the sleep packages and the devices' resources.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmpy.acpi import aml
from kvmpy.acpi.tables import (
    ACPI_TABLES_BASE,
    BIOS_AREA_END,
    BIOS_AREA_START,
    FADT_SIZE,
    AcpiPlatform,
    build_tables,
    checksum,
)

FIELD = re.compile(r"^\[([0-9A-F]{3,4})h ([0-9]{4}) +([0-9]+)\] +(.*?) : (.*)$")


def require_acpica(tool: str = "iasl") -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {tool} (acpica-tools) must be installed", pytrace=False)
        pytest.skip(f"{tool} (Debian's acpica-tools) is not installed")
    return path


@dataclass(frozen=True)
class Field:
    offset: int
    length: int
    name: str
    value: str

    @property
    def int(self) -> int:
        return int(self.value.split()[0], 16)


def disassemble(data: bytes, tmp_path: Path, name: str) -> tuple[list[Field], str]:
    """`iasl -d` on one table binary: its fields (by offset) and the whole listing."""
    iasl = require_acpica()
    src = tmp_path / f"{name}.dat"
    src.write_bytes(data)
    r = subprocess.run([iasl, "-d", str(src)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / f"{name}.dsl").read_text()
    fields = []
    for line in text.splitlines():
        m = FIELD.match(line.strip())
        if m:
            fields.append(Field(int(m.group(2)), int(m.group(3)), m.group(4).strip(),
                                m.group(5).strip()))
    return fields, text


def at(fields: list[Field], offset: int) -> Field:
    matches = [f for f in fields if f.offset == offset and "[Generic Address" not in f.value]
    assert matches, f"no field at offset {offset}"
    return matches[0]


def check_header(fields: list[Field], text: str, signature: str, length: int) -> None:
    assert "Incorrect checksum" not in text, text
    assert at(fields, 0).value.startswith(f'"{signature}"')
    assert at(fields, 4).int == length
    assert at(fields, 10).value == '"KVMPY "'


def platform(cpus: int = 4, **kw: object) -> AcpiPlatform:
    return AcpiPlatform(apic_ids=tuple(range(cpus)), **kw)  # type: ignore[arg-type]


def test_every_table_has_a_valid_checksum_and_sits_in_the_bios_area() -> None:
    tables = build_tables(platform())
    for sig, (addr, data) in tables.blobs.items():
        assert BIOS_AREA_START <= addr and addr + len(data) <= BIOS_AREA_END, sig
        if sig == "RSDP":
            assert sum(data[:20]) % 256 == 0 and sum(data) % 256 == 0
        elif sig != "FACS":  # the FACS has no checksum
            assert sum(data) % 256 == 0, sig
    assert tables.address("RSDP") == ACPI_TABLES_BASE and ACPI_TABLES_BASE % 16 == 0
    assert tables.address("FACS") % 64 == 0
    # No two tables overlap.
    spans = sorted((a, a + len(d)) for a, d in tables.blobs.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))


def test_rsdp_matches_what_iasl_compiles_from_the_same_fields(tmp_path: Path) -> None:
    iasl = require_acpica()
    tables = build_tables(platform())
    r = subprocess.run([iasl, "-T", "RSDP"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    src = (tmp_path / "rsdp.asl").read_text()
    values = {
        "Checksum": "00", "Oem ID": '"KVMPY "', "Revision": "02",
        "RSDT Address": f"{tables.address('RSDT'):08X}", "Length": "00000024",
        "XSDT Address": f"{tables.address('XSDT'):016X}", "Extended Checksum": "00",
    }
    lines = []
    for line in src.splitlines():
        for key, value in values.items():
            m = re.match(rf"^(\[\d+\]\s+{re.escape(key)} : ).*$", line)
            if m:
                line = m.group(1) + value
        lines.append(line)
    (tmp_path / "rsdp.asl").write_text("\n".join(lines) + "\n")
    r = subprocess.run([iasl, "rsdp.asl"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "rsdp.aml").read_bytes() == tables.data("RSDP")


@pytest.mark.parametrize("cpus", [1, 2, 4, 255])
def test_madt_as_acpica_reads_it(tmp_path: Path, cpus: int) -> None:
    tables = build_tables(platform(cpus))
    data = tables.data("APIC")
    fields, text = disassemble(data, tmp_path, "apic")
    check_header(fields, text, "APIC", len(data))
    assert at(fields, 36).int == 0xFEE00000  # local APIC address
    assert at(fields, 40).int == 0  # no PCAT_COMPAT: kvmpy's irqchip has no 8259
    types = [f for f in fields if f.name == "Subtable Type"]
    lapics = [f for f in types if f.value.startswith("00 ")]
    assert len(lapics) == cpus
    for uid, f in enumerate(lapics):
        assert at(fields, f.offset + 2).int == uid  # Processor ID
        assert at(fields, f.offset + 3).int == uid  # Local APIC ID = vCPU index
        assert at(fields, f.offset + 4).int == 1  # enabled
    ioapic = [f for f in types if f.value.startswith("01 ")]
    assert len(ioapic) == 1
    assert at(fields, ioapic[0].offset + 4).int == 0xFEC00000
    assert at(fields, ioapic[0].offset + 8).int == 0  # GSI base
    overrides = [(at(fields, f.offset + 3).int, at(fields, f.offset + 4).int,
                  at(fields, f.offset + 8).int)
                 for f in types if f.value.startswith("02 ")]
    assert overrides == [(0, 2, 0), (9, 9, 0xD)]  # PIT IRQ 0 -> GSI 2; SCI level, high


def test_madt_uses_x2apic_entries_for_ids_above_254(tmp_path: Path) -> None:
    ids = (0, 1, 254, 255, 300)
    data = build_tables(AcpiPlatform(apic_ids=ids)).data("APIC")
    fields, text = disassemble(data, tmp_path, "apic")
    check_header(fields, text, "APIC", len(data))
    entries = [(f.value[:2], f.offset) for f in fields if f.name == "Subtable Type"]
    x2 = [off for t, off in entries if t == "09"]
    assert [at(fields, off + 4).int for off in x2] == [255, 300]
    assert [at(fields, off + 12).int for off in x2] == [3, 4]  # processor UIDs
    assert [at(fields, off + 3).int for t, off in entries if t == "00"] == [0, 1, 254]


def test_madt_with_the_in_kernel_irqchip_sets_pcat_compat(tmp_path: Path) -> None:
    data = build_tables(platform(2, pcat_compat=True, s3=False)).data("APIC")
    fields, text = disassemble(data, tmp_path, "apic")
    check_header(fields, text, "APIC", len(data))
    assert at(fields, 40).int == 1


def test_fadt_as_acpica_reads_it(tmp_path: Path) -> None:
    tables = build_tables(platform())
    data = tables.data("FACP")
    assert len(data) == FADT_SIZE
    fields, text = disassemble(data, tmp_path, "facp")
    check_header(fields, text, "FACP", FADT_SIZE)
    assert at(fields, 8).int == 6 and at(fields, 131).int == 3  # FADT 6.3
    assert at(fields, 36).int == tables.address("FACS")
    assert at(fields, 40).int == tables.address("DSDT")
    assert at(fields, 46).int == 9  # SCI interrupt
    assert at(fields, 48).int == 0  # no SMI command port: always in ACPI mode
    assert at(fields, 56).int == 0x600 and at(fields, 88).int == 4  # PM1a event block
    assert at(fields, 64).int == 0x604 and at(fields, 89).int == 2  # PM1a control block
    assert at(fields, 76).int == 0x608 and at(fields, 91).int == 4  # PM timer
    assert at(fields, 108).int == 0x32  # century in CMOS
    assert "32-bit PM Timer (V1) : 0" in text  # a 24-bit timer
    assert "CMOS RTC Not Present (V5) : 0" in text
    assert at(fields, 132).int == 0  # X_FIRMWARE_CTRL 0 when FIRMWARE_CTRL holds it
    assert at(fields, 140).int == tables.address("DSDT")
    # The extended blocks say the same as the 32-bit ones: SystemIO, width, address.
    for gas, port, bits in ((148, 0x600, 32), (172, 0x604, 16), (208, 0x608, 32)):
        assert at(fields, gas).value.startswith("01 [SystemIO]")
        assert at(fields, gas + 1).int == bits
        assert at(fields, gas + 4).int == port


def test_facs_and_root_tables_as_acpica_reads_them(tmp_path: Path) -> None:
    tables = build_tables(platform())
    fields, text = disassemble(tables.data("FACS"), tmp_path, "facs")
    assert at(fields, 0).value.startswith('"FACS"') and at(fields, 4).int == 64
    assert at(fields, 12).int == 0 and at(fields, 24).int == 0  # waking vectors
    assert at(fields, 32).int == 2  # version
    assert "64-bit Wake Supported (V2) : 0" in text
    listed = [tables.address("FACP"), tables.address("APIC")]
    for sig, width in (("RSDT", 4), ("XSDT", 8)):
        data = tables.data(sig)
        fields, text = disassemble(data, tmp_path, sig.lower())
        check_header(fields, text, sig, len(data))
        entries = [f.int for f in fields if f.name.startswith("ACPI Table Address")]
        assert entries == listed, (sig, width, text)


def test_dsdt_evaluated_by_acpiexec(tmp_path: Path) -> None:
    acpiexec = require_acpica("acpiexec")
    tables = build_tables(platform())
    fields, text = disassemble(tables.data("DSDT"), tmp_path, "dsdt")
    assert "Incorrect checksum" not in text
    (tmp_path / "dsdt.dat").write_bytes(tables.data("DSDT"))
    cmds = "evaluate \\_S3; evaluate \\_S5; evaluate \\_SB.RTC._CRS; evaluate \\_SB.COM1._CRS;" \
        " evaluate \\_SB.RTC._HID"
    r = subprocess.run([acpiexec, "-b", cmds, "dsdt.dat"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    out = r.stdout
    assert r.returncode == 0 and "AE_" not in out.split("ACPI: 1 ACPI AML tables")[-1], out
    packages = re.findall(r"\[Package\] Contains 4 Elements:\s+((?:\[Integer\] = \w+\s+){4})",
                          out)
    values = [[int(v, 16) for v in re.findall(r"= (\w+)", p)] for p in packages]
    assert values == [[1, 1, 0, 0], [0, 0, 0, 0]]  # \_S3 SLP_TYP 1, \_S5 SLP_TYP 0
    assert "47 01 70 00 70 00 01 02 22 00 01 79 00" in out  # IO 0x70-0x71, IRQ 8
    assert "47 01 F8 03 F8 03 01 08 22 10 00 79 00" in out  # IO 0x3f8-0x3ff, IRQ 4
    assert "000BD041" in out.upper()  # _HID EISAID("PNP0B00")


def test_dsdt_without_s3_has_no_s3_package(tmp_path: Path) -> None:
    tables = build_tables(platform(s3=False))
    _, text = disassemble(tables.data("DSDT"), tmp_path, "dsdt")
    assert "_S5" in text and "_S3" not in text


def test_aml_encodings() -> None:
    assert aml.pkg_length(5) == b"\x06"
    assert aml.pkg_length(62) == b"\x3f"
    assert aml.pkg_length(63) == bytes([0x40 | 1, 0x04])  # 65 = 0x41: two bytes
    assert aml.pkg_length(5000) == bytes([0x80 | 0xB, 0x38, 0x01])  # 5003 = 0x138B
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01"
    assert aml.integer(0x12) == b"\x0a\x12" and aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.eisa_id("PNP0B00") == b"\x0c\x41\xd0\x0b\x00"
    assert aml.name_string("\\_SB.RTC") == b"\\\x2e_SB_RTC_"
    with pytest.raises(ValueError):
        aml.name_seg("bad!")
    assert checksum(b"\x01\x02") == 0xFD
