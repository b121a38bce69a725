"""xAPIC MMIO interface (SDM 10.4.1, Table 10-1): sizes, reserved bits, invalid offsets."""

import pytest

from kvmpy.apic import ESR_ILLEGAL_REGISTER
from kvmpy.apic import constants as c
from kvmpy.apic.testing import make_system

# (register, written value, value read back, SDM) -- reserved bits are ignored in xAPIC.
WRITE_READ = [
    (c.REG_ID, 0xFFFFFFFF, 0xFF000000, "10.4.6 ID[31:24]"),
    (c.REG_TPR, 0xFFFFFFFF, 0xFF, "10.8.3.1 TPR[7:0]"),
    (c.REG_LDR, 0xFFFFFFFF, 0xFF000000, "10.6.2.2 LDR[31:24]"),
    (c.REG_DFR, 0x0, 0x0FFFFFFF, "10.6.2.2 DFR[27:0] reads as ones"),
    (c.REG_SVR, 0xFFFFFFFF, 0x3FF, "10.9 SVR (no EOI-broadcast suppression)"),
    (c.REG_LVT_TIMER, 0xFFFFFFFF, 0x700FF, "10.5.1 timer LVT"),
    (c.REG_LVT_THERMAL, 0xFFFFFFFF, 0x107FF, "10.5.1 thermal LVT"),
    (c.REG_LVT_PERF, 0xFFFFFFFF, 0x107FF, "10.5.1 perf LVT"),
    (c.REG_LVT_LINT0, 0xFFFFFFFF, 0x1A7FF, "10.5.1 LINT0 (remote IRR, status read-only)"),
    (c.REG_LVT_LINT1, 0xFFFFFFFF, 0x1A7FF, "10.5.1 LINT1"),
    (c.REG_LVT_ERROR, 0xFFFFFFFF, 0x100FF, "10.5.1 error LVT"),
    (c.REG_TIMER_DIVIDE, 0xFFFFFFFF, 0xB, "10.5.4 divide config bits 0,1,3"),
    (c.REG_TIMER_INITIAL, 0xFFFFFFFF, 0xFFFFFFFF, "10.5.4 initial count"),
    (c.REG_ICR_HIGH, 0xFFFFFFFF, 0xFF000000, "10.6.1 ICR[63:56]"),
    (c.REG_VERSION, 0, c.APIC_VERSION, "10.4.8 read-only"),
    (c.REG_PPR, 0xFF, 0, "10.8.3.1 read-only"),
    (c.REG_IRR0 + 0x10, 0xFFFFFFFF, 0, "10.8.4 IRR read-only"),
    (c.REG_ISR0 + 0x70, 0xFFFFFFFF, 0, "10.8.4 ISR read-only"),
    (c.REG_TIMER_CURRENT, 1234, 0, "10.5.4 current count read-only"),
    (c.REG_RRD, 1234, 0, "10.6.1 remote read unsupported"),
]


@pytest.mark.parametrize(("offset", "value", "expect", "sdm"), WRITE_READ)
def test_write_read(offset, value, expect, sdm):
    s = make_system(1, enable=False)
    apic = s[0]
    apic.mmio_write(c.REG_SVR, 4, 0x1FF)
    apic.mmio_write(offset, 4, value)
    if offset == c.REG_TIMER_INITIAL:
        assert apic.mmio_read(c.REG_TIMER_CURRENT, 4) == 0xFFFFFFFF
    assert apic.mmio_read(offset, 4) == expect, sdm
    assert apic.esr_pending == 0


def test_sizes_and_slot_bytes():
    s = make_system(4)
    apic = s[3]
    assert apic.mmio_read(c.REG_ID, 4) == 3 << 24
    assert apic.mmio_read(c.REG_ID + 3, 1) == 3
    assert apic.mmio_read(c.REG_VERSION, 2) == 0x14
    assert apic.mmio_read(c.REG_VERSION + 2, 1) == 5
    assert apic.mmio_read(c.REG_VERSION, 8) == c.APIC_VERSION  # bytes 4..7 of slot are 0
    assert apic.mmio_read(c.REG_VERSION + 4, 4) == 0
    assert apic.mmio_read(c.REG_VERSION + 0xC, 4) == 0


@pytest.mark.parametrize(
    ("offset", "size"),
    [(c.REG_TPR, 1), (c.REG_TPR, 2), (c.REG_TPR, 8), (c.REG_TPR + 4, 4), (c.REG_TPR + 1, 1)],
)
def test_non_dword_writes_ignored(offset, size):
    """SDM 10.4.1: registers are 32 bits wide, 16-byte aligned; other writes are dropped."""
    s = make_system(1)
    s[0].mmio_write(offset, size, 0x50)
    assert s[0].mmio_read(c.REG_TPR, 4) == 0
    assert s[0].stats["mmio_write_ignored"] == 1


@pytest.mark.parametrize("offset", [0x000, 0x010, 0x040, 0x2A0, 0x2F0, 0x3A0, 0x3F0, 0x400, 0xFF0])
def test_invalid_offsets(offset):
    """SDM 10.5.3: unimplemented registers read 0, ignore writes, set ESR bit 7.
    0x3F0 (SELF IPI) exists only in x2APIC mode; 0x2F0 (CMCI) is not modelled."""
    s = make_system(1)
    apic = s[0]
    assert apic.mmio_read(offset, 4) == 0
    apic.mmio_write(offset, 4, 0x40)
    assert apic.irr.rfind(1) == -1
    apic.mmio_write(c.REG_ESR, 4, 0)
    assert apic.mmio_read(c.REG_ESR, 4) == ESR_ILLEGAL_REGISTER


def test_mmio_in_x2apic_mode_is_a_hole():
    """SDM 10.12.2: in x2APIC mode the MMIO page behaves as a disabled xAPIC. kvmpy
    reads all ones (unclaimed bus) and drops writes."""
    s = make_system(2, x2apic=True)
    apic = s[0]
    assert apic.mmio_read(c.REG_ID, 4) == 0xFFFFFFFF
    assert apic.mmio_read(c.REG_ID, 1) == 0xFF
    apic.mmio_write(c.REG_TPR, 4, 0x50)
    apic.mmio_write(c.REG_ICR_LOW, 4, (c.SH_ALL << 18) | 0x40)
    assert apic.rdmsr(0x808) == 0
    assert s.notified == []


def test_eoi_write_any_value():
    s = make_system(1)
    apic = s[0]
    apic.accept_fixed(0x40, False)
    apic.ack(0x40)
    apic.mmio_write(c.REG_EOI, 4, 0xDEADBEEF)  # xAPIC: the value is ignored (SDM 10.8.5)
    assert apic.isr.rfind(1) == -1
    assert apic.mmio_read(c.REG_EOI, 4) == 0


def test_icr_low_high():
    """SDM 10.6.1: writing ICR low sends, to the destination in ICR high bits 31:24."""
    s = make_system(4)
    apic = s[0]
    apic.mmio_write(c.REG_ICR_HIGH, 4, 2 << 24)
    assert s.notified == []
    apic.mmio_write(c.REG_ICR_LOW, 4, 0xFFF00000 | c.ICR_BUSY | 0x45)
    assert s[2].pending_vector() == 0x45
    assert apic.mmio_read(c.REG_ICR_LOW, 4) == 0x45  # reserved bits 31:20 and busy dropped
    assert apic.mmio_read(c.REG_ICR_HIGH, 4) == 2 << 24
    apic.mmio_write(c.REG_ICR_LOW, 4, 0x46)  # same destination again
    assert s[2].irr[0x46] == 1 and s.notified == [2, 2]


def test_isr_irr_tmr_register_view():
    s = make_system(1)
    apic = s[0]
    for v in (0x20, 0x3F, 0xFF):
        apic.accept_fixed(v, v == 0x3F)
    assert apic.mmio_read(c.REG_IRR0 + 0x10, 4) == (1 << 0) | (1 << 31)
    assert apic.mmio_read(c.REG_IRR0 + 0x70, 4) == 1 << 31
    assert apic.mmio_read(c.REG_TMR0 + 0x10, 4) == 1 << 31
    apic.ack(0xFF)
    assert apic.mmio_read(c.REG_ISR0 + 0x70, 4) == 1 << 31
    assert apic.mmio_read(c.REG_IRR0 + 0x70, 4) == 0
