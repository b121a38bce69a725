"""x2APIC MSR interface (SDM 10.12): register reads, #GP cases, fast ICR/SELF_IPI entry points."""

import pytest

from kvmpy.apic import (
    MSR_APIC_BASE,
    MSR_X2APIC_ICR,
    MSR_X2APIC_SELF_IPI,
    ApicBus,
    ApicGP,
    ApicMode,
    LocalApic,
)
from kvmpy.apic import constants as c
from kvmpy.apic.registers import REGISTERS, offset_to_msr
from kvmpy.apic.testing import FakeClock, make_system

# Every x2APIC MSR access that must #GP. (what, SDM section, msr, value or None = read)
GP_CASES = [
    ("MSR 0x800 does not exist", "10.12.1.2", 0x800, None),
    ("MSR 0x801 does not exist", "10.12.1.2", 0x801, 0),
    ("ID is read-only", "10.12.1.2 Table 10-6", 0x802, 0),
    ("VERSION is read-only", "10.12.1.2 Table 10-6", 0x803, 0x14),
    ("TPR bits 31:8 reserved", "10.12.1.3", 0x808, 0x100),
    ("TPR upper 32 bits reserved", "10.12.1.2", 0x808, 1 << 32),
    ("APR is not an x2APIC register (read)", "10.12.1.2 Table 10-6", 0x809, None),
    ("APR is not an x2APIC register (write)", "10.12.1.2 Table 10-6", 0x809, 0),
    ("PPR is read-only", "10.12.1.2 Table 10-6", 0x80A, 0),
    ("EOI is write-only", "10.12.1.2 Table 10-6", 0x80B, None),
    ("EOI nonzero write", "10.12.1.2 Table 10-6 note 3", 0x80B, 1),
    ("EOI upper-half write", "10.12.1.2", 0x80B, 1 << 40),
    ("RRD does not exist", "10.12.1.2 Table 10-6", 0x80C, None),
    ("LDR is read-only in x2APIC", "10.12.10.1", 0x80D, 0x1000000),
    ("DFR does not exist (read)", "10.12.1.2", 0x80E, None),
    ("DFR does not exist (write)", "10.12.1.2", 0x80E, 0xFFFFFFFF),
    ("SVR bit 12 (EOI suppression unsupported)", "10.9, 10.12.1.3", 0x80F, 0x10FF),
    ("SVR bit 10 reserved", "10.12.1.3", 0x80F, 0x4FF),
    ("ISR is read-only", "10.12.1.2 Table 10-6", 0x810, 0),
    ("TMR is read-only", "10.12.1.2 Table 10-6", 0x81F, 0),
    ("IRR is read-only", "10.12.1.2 Table 10-6", 0x827, 1),
    ("ESR nonzero write", "10.12.1.2 Table 10-6", 0x828, 1),
    ("CMCI LVT not implemented (read)", "10.5.1 (max LVT 5)", 0x82F, None),
    ("CMCI LVT not implemented (write)", "10.5.1 (max LVT 5)", 0x82F, 0x10000),
    ("ICR bit 13 reserved", "10.12.9", 0x830, 0x40 | 1 << 13),
    ("ICR bit 16 reserved", "10.12.9", 0x830, 0x40 | 1 << 16),
    ("ICR bit 17 reserved", "10.12.9", 0x830, 0x40 | 1 << 17),
    ("ICR bit 20 reserved", "10.12.9", 0x830, 0x40 | 1 << 20),
    ("ICR bit 31 reserved", "10.12.9", 0x830, 0x40 | 1 << 31),
    ("ICR2 does not exist (read)", "10.12.1.2", 0x831, None),
    ("ICR2 does not exist (write)", "10.12.1.2", 0x831, 0),
    ("LVT timer bit 19 reserved", "10.5.1, 10.12.1.3", 0x832, 0x80000 | 0x40),
    ("LVT timer mode 11b reserved", "10.5.1", 0x832, 0x60000 | 0x40),
    ("LVT timer bits 11:8 reserved", "10.5.1", 0x832, 0x100 | 0x40),
    ("LVT thermal bit 11 reserved", "10.5.1", 0x833, 0x800),
    ("LVT perf bit 17 reserved", "10.5.1", 0x834, 0x20000),
    ("LVT LINT0 bit 17 reserved", "10.5.1", 0x835, 0x20000),
    ("LVT LINT1 bit 11 reserved", "10.5.1", 0x836, 0x800),
    ("LVT error bits 10:8 reserved", "10.5.1", 0x837, 0x400),
    ("initial count upper 32 bits", "10.12.1.2", 0x838, 1 << 32),
    ("current count is read-only", "10.12.1.2 Table 10-6", 0x839, 5),
    ("MSR 0x83A does not exist", "10.12.1.2", 0x83A, None),
    ("MSR 0x83D does not exist", "10.12.1.2", 0x83D, 0),
    ("divide config bit 2 reserved", "10.5.4", 0x83E, 0x4),
    ("divide config bit 4 reserved", "10.5.4", 0x83E, 0x10),
    ("SELF_IPI is write-only", "10.12.11", 0x83F, None),
    ("SELF_IPI bits 31:8 reserved", "10.12.11", 0x83F, 0x140),
    ("MSR 0x840 does not exist", "10.12.1.2", 0x840, None),
    ("MSR 0x8FF does not exist", "10.12.1.2", 0x8FF, 0),
]


def snapshot(sys_):
    """Everything observable: all readable x2APIC registers of every APIC, IRR/ISR/TMR,
    pending flags, and notifications."""
    out = []
    for apic in sys_.apics:
        regs = {}
        for offset, spec in REGISTERS.items():
            if spec.in_x2apic and spec.x2_readable:
                regs[offset] = apic.rdmsr(offset_to_msr(offset))
        out.append(
            (
                regs,
                bytes(apic.irr),
                bytes(apic.isr),
                bytes(apic.tmr),
                apic.esr_pending,
                apic.nmi_pending,
                apic.init_pending,
                apic.timer_deadline_ns(),
                apic.mode,
            )
        )
    return out, list(sys_.notified)


@pytest.mark.parametrize(("what", "sdm", "msr", "value"), GP_CASES, ids=[r[0] for r in GP_CASES])
def test_x2apic_access_gp_without_side_effect(what, sdm, msr, value):
    s = make_system(3, x2apic=True)
    apic = s[0]
    apic.wrmsr(0x832, 0x40)  # something non-default to notice a change
    before = snapshot(s)
    gp_before = apic.stats["gp"]
    with pytest.raises(ApicGP):
        if value is None:
            apic.rdmsr(msr)
        else:
            apic.wrmsr(msr, value)
    assert snapshot(s) == before, f"{what} (SDM {sdm}) had a side effect"
    assert apic.stats["gp"] == gp_before + 1


@pytest.mark.parametrize("mode", [ApicMode.XAPIC, ApicMode.DISABLED])
@pytest.mark.parametrize(
    ("msr", "value"),
    [(0x802, None), (0x808, None), (0x808, 0), (0x830, 0x40), (0x83F, 0x40), (0x80B, 0)],
)
def test_x2apic_msrs_gp_outside_x2apic_mode(mode, msr, value):
    """SDM 10.12.2: RDMSR/WRMSR of 0x800-0x8FF outside x2APIC mode #GP."""
    s = make_system(2)
    apic = s[0]
    if mode is ApicMode.DISABLED:
        apic.wrmsr(MSR_APIC_BASE, c.APIC_DEFAULT_BASE)
    assert apic.mode is mode
    with pytest.raises(ApicGP):
        if value is None:
            apic.rdmsr(msr)
        else:
            apic.wrmsr(msr, value)
    assert s.notified == []


def test_non_apic_msr_gp():
    s = make_system(1, x2apic=True)
    with pytest.raises(ApicGP):
        s[0].rdmsr(0x10)
    with pytest.raises(ApicGP):
        s[0].wrmsr(0x900, 0)


@pytest.mark.parametrize("apic_id", [0, 1, 15, 16, 17, 35, 300])
def test_x2apic_id_and_ldr(apic_id):
    """SDM 10.12.5.1 (ID = x2APIC ID) and 10.12.10.2 (LDR = cluster<<16 | 1<<(id&15))."""
    clock = FakeClock()
    bus = ApicBus(lambda i: None)
    apic = LocalApic(apic_id, bus, bsp=False, clock_ns=clock.ns, tsc=clock.tsc, tsc_hz=10**9)
    bus.add(apic)
    assert apic.mmio_read(c.REG_ID, 4) == (apic_id & 0xFF) << 24
    apic.wrmsr(MSR_APIC_BASE, apic.rdmsr(MSR_APIC_BASE) | c.APIC_BASE_EXTD)
    assert apic.rdmsr(0x802) == apic_id
    assert apic.rdmsr(0x80D) == ((apic_id >> 4) << 16) | (1 << (apic_id & 0xF))


def test_x2apic_register_reads():
    s = make_system(2, x2apic=True)
    apic = s[0]
    assert apic.rdmsr(0x803) == 0x00050014  # SDM 10.4.8: version 0x14, max LVT 5
    assert apic.rdmsr(0x80F) == 0x1FF
    for msr in (0x832, 0x833, 0x834, 0x835, 0x836, 0x837):
        assert apic.rdmsr(msr) == c.LVT_MASKED  # SDM 10.4.7.1
    apic.wrmsr(0x808, 0x7F)
    assert apic.rdmsr(0x808) == 0x7F
    assert apic.rdmsr(0x80A) == 0x7F
    apic.wrmsr(0x80F, 0x3FF)  # focus-disable bit 9 is writable
    assert apic.rdmsr(0x80F) == 0x3FF
    apic.wrmsr(0x835, 0x1A7FF | c.LVT_DELIVERY_STATUS)  # read-only bit 12 ignored, no #GP
    assert apic.rdmsr(0x835) == 0x1A7FF
    apic.wrmsr(0x828, 0)  # ESR: zero is the only legal write


def test_x2apic_icr_roundtrip_bit12_ignored():
    """SDM 10.12.9: ICR is one 64-bit MSR; bit 12 is ignored on write."""
    s = make_system(4, x2apic=True)
    value = (2 << 32) | c.ICR_BUSY | 0x41
    s[0].wrmsr(MSR_X2APIC_ICR, value)
    assert s[0].rdmsr(MSR_X2APIC_ICR) == (2 << 32) | 0x41
    assert s[2].pending_vector() == 0x41
    assert s.notified == [2]


def test_icr_fast_contract():
    """kvm_x2apic_icr_write_fast contract: False and no side effect on reserved bits or
    outside x2APIC mode; otherwise the IPI is sent and ICR stored."""
    s = make_system(4, x2apic=True)
    a = s[0]
    a.wrmsr(MSR_X2APIC_ICR, (3 << 32) | 0x50)
    s.notified.clear()
    for bad in (1 << 13, 1 << 16, 1 << 17, 1 << 20, 0xFFF << 20):
        assert a.icr_write_x2apic_fast((1 << 32) | 0x60 | bad) is False
    assert a.rdmsr(MSR_X2APIC_ICR) == (3 << 32) | 0x50
    assert s.notified == [] and s[1].irr.rfind(1) == -1
    assert a.stats["ipi_sent"] == 1
    assert a.icr_write_x2apic_fast((1 << 32) | 0x60) is True
    assert s[1].pending_vector() == 0x60 and s.notified == [1]
    assert a.icr_write_xapic_fast(0x60) is False  # not in xAPIC mode

    x = make_system(4)
    assert x[0].icr_write_x2apic_fast((1 << 32) | 0x60) is False
    assert x.notified == []
    x[0].mmio_write(c.REG_ICR_HIGH, 4, 1 << 24)
    assert x[0].icr_write_xapic_fast(0x61) is True
    assert x[1].pending_vector() == 0x61 and x.notified == [1]


def test_self_ipi_msr():
    """SDM 10.12.11: SELF IPI = fixed, edge, to self; bits 31:8 reserved."""
    s = make_system(2, x2apic=True)
    s[1].wrmsr(MSR_X2APIC_SELF_IPI, 0xEE)
    assert s[1].pending_vector() == 0xEE and s[1].tmr[0xEE] == 0
    assert s.notified == [1]
    assert s[1].self_ipi_fast(0x1EE) is False
    x = make_system(1)
    assert x[0].self_ipi_fast(0x40) is False and x[0].irr.rfind(1) == -1
