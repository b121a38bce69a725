"""IA32_APIC_BASE: modes, transitions and resets (SDM 10.4.3, 10.4.4, 10.12.5)."""

import pytest

from kvmpy.apic import APIC_DEFAULT_BASE, MSR_APIC_BASE, ApicBus, ApicGP, ApicMode, LocalApic
from kvmpy.apic import constants as c
from kvmpy.apic.testing import FakeClock, make_system, read_reg, write_reg

EN, EXTD, BSP = c.APIC_BASE_EN, c.APIC_BASE_EXTD, c.APIC_BASE_BSP
D, X, X2 = ApicMode.DISABLED, ApicMode.XAPIC, ApicMode.X2APIC


def goto(apic, mode):
    """Reach ``mode`` through legal transitions from xAPIC (power-up state)."""
    if mode is D:
        apic.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE)
    elif mode is X2:
        apic.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | EN | EXTD)
    assert apic.mode is mode


# (from, EN, EXTD, expected mode or None for #GP, SDM) -- Figure 10-27.
TRANSITIONS = [
    (D, 0, 0, D, "10.12.5 stay disabled"),
    (D, 1, 0, X, "10.12.5 disabled -> xAPIC"),
    (D, 1, 1, None, "10.12.5 disabled -> x2APIC directly is illegal"),
    (D, 0, 1, None, "10.12.5 EN=0 EXTD=1 is invalid"),
    (X, 1, 0, X, "10.12.5 stay xAPIC"),
    (X, 0, 0, D, "10.12.5 xAPIC -> disabled"),
    (X, 1, 1, X2, "10.12.5 xAPIC -> x2APIC"),
    (X, 0, 1, None, "10.12.5 EN=0 EXTD=1 is invalid"),
    (X2, 1, 1, X2, "10.12.5 stay x2APIC"),
    (X2, 0, 0, D, "10.12.5 x2APIC -> disabled"),
    (X2, 1, 0, None, "10.12.5 x2APIC -> xAPIC directly is illegal"),
    (X2, 0, 1, None, "10.12.5 EN=0 EXTD=1 is invalid"),
]


@pytest.mark.parametrize(("start", "en", "extd", "expect", "sdm"), TRANSITIONS)
def test_apic_base_transitions(start, en, extd, expect, sdm):
    s = make_system(1)
    apic = s[0]
    goto(apic, start)
    value = APIC_DEFAULT_BASE | (EN if en else 0) | (EXTD if extd else 0)
    if expect is None:
        before = apic.rdmsr(MSR_APIC_BASE)
        with pytest.raises(ApicGP):
            apic.wrmsr(MSR_APIC_BASE, value)
        assert apic.mode is start and apic.rdmsr(MSR_APIC_BASE) == before, sdm
    else:
        apic.wrmsr(MSR_APIC_BASE, value)
        assert apic.mode is expect, sdm


@pytest.mark.parametrize(
    ("bit", "sdm"),
    [
        (0, "10.4.4 bits 7:0 reserved"),
        (7, "10.4.4"),
        (9, "10.4.4 bit 9 reserved"),
        (52, "10.4.4 bits above MAXPHYADDR"),
        (63, "10.4.4"),
    ],
)
def test_apic_base_reserved_bits_gp(bit, sdm):
    s = make_system(1)
    with pytest.raises(ApicGP):
        s[0].wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | EN | (1 << bit))
    assert s[0].rdmsr(MSR_APIC_BASE) == APIC_DEFAULT_BASE | EN | BSP, sdm


def make_one(**kw):
    clock = FakeClock()
    bus = ApicBus(lambda i: None)
    apic = LocalApic(5, bus, bsp=False, clock_ns=clock.ns, tsc=clock.tsc, tsc_hz=10**9, **kw)
    bus.add(apic)
    return apic


def test_maxphyaddr_and_x2apic_support_are_parameters():
    apic = make_one(maxphyaddr=40, x2apic_supported=False)
    with pytest.raises(ApicGP):
        apic.wrmsr(MSR_APIC_BASE, (1 << 40) | EN)
    with pytest.raises(ApicGP):  # SDM 10.12.1: EXTD reserved without CPUID x2APIC
        apic.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | EN | EXTD)
    apic.wrmsr(MSR_APIC_BASE, (1 << 39) | EN)
    assert apic.base_address == 1 << 39


def test_bsp_bit_read_only():
    """SDM 10.4.4: BSP flag (bit 8) reflects the processor; writes do not change it."""
    s = make_system(2)
    assert s[0].rdmsr(MSR_APIC_BASE) == APIC_DEFAULT_BASE | EN | BSP
    assert s[1].rdmsr(MSR_APIC_BASE) == APIC_DEFAULT_BASE | EN
    s[0].wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | EN)
    s[1].wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | EN | BSP)
    assert s[0].rdmsr(MSR_APIC_BASE) & BSP
    assert not s[1].rdmsr(MSR_APIC_BASE) & BSP


def test_relocation():
    s = make_system(1)
    s[0].wrmsr(MSR_APIC_BASE, 0xFED00000 | EN)
    assert s[0].base_address == 0xFED00000
    assert s[0].rdmsr(MSR_APIC_BASE) == 0xFED00000 | EN | BSP
    assert s[0].mmio_read(c.REG_VERSION, 4) == c.APIC_VERSION


@pytest.mark.parametrize("from_mode", [X, X2])
def test_disable_resets_state(from_mode):
    """SDM 10.4.3: clearing EN returns the APIC to its power-up state (10.4.7.1)."""
    s = make_system(2)
    apic = s[1]
    apic.mmio_write(c.REG_ID, 4, 0x42 << 24)  # software-changed xAPIC ID
    goto(apic, from_mode)
    write_reg(apic, c.REG_TPR, 0x20)
    write_reg(apic, c.REG_LVT_TIMER, 0x40)
    write_reg(apic, c.REG_TIMER_DIVIDE, 0xB)
    write_reg(apic, c.REG_TIMER_INITIAL, 1000)
    apic.accept_fixed(0x80, True)
    apic.ack(0x80)
    apic.accept_fixed(0x90, False)
    assert apic.timer_deadline_ns() is not None
    apic.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE)
    assert apic.mode is D
    assert apic.mmio_read(c.REG_VERSION, 4) == 0xFFFFFFFF  # not decoded while disabled
    assert not apic.accept_fixed(0x91, False)
    apic.wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE | EN)
    assert apic.irr.rfind(1) == apic.isr.rfind(1) == apic.tmr.rfind(1) == -1
    assert apic.timer_deadline_ns() is None
    assert read_reg(apic, c.REG_ID) == 1 << 24
    assert read_reg(apic, c.REG_TPR) == 0
    assert read_reg(apic, c.REG_SVR) == 0xFF
    assert read_reg(apic, c.REG_DFR) == 0xFFFFFFFF
    assert read_reg(apic, c.REG_LDR) == 0
    assert read_reg(apic, c.REG_TIMER_INITIAL) == 0
    assert read_reg(apic, c.REG_TIMER_DIVIDE) == 0
    for i in range(c.LVT_COUNT):
        assert read_reg(apic, c.REG_LVT_TIMER + 0x10 * i) == c.LVT_MASKED


def test_entering_x2apic_keeps_other_state():
    """SDM 10.12.5.1: going xAPIC -> x2APIC changes ID/LDR views, keeps the rest."""
    s = make_system(3)
    apic = s[2]
    apic.mmio_write(c.REG_ID, 4, 0x77 << 24)
    apic.mmio_write(c.REG_LDR, 4, 0x10 << 24)
    apic.mmio_write(c.REG_TPR, 4, 0x30)
    apic.accept_fixed(0x55, False)
    goto(apic, X2)
    assert apic.rdmsr(0x802) == 2
    assert apic.rdmsr(0x80D) == 1 << 2
    assert apic.rdmsr(0x808) == 0x30
    assert apic.pending_vector() == 0x55
    assert apic.stats["mode_x2apic"] == 1


def test_disabled_apic_is_off_the_bus():
    s = make_system(3)
    s[1].wrmsr(MSR_APIC_BASE, APIC_DEFAULT_BASE)
    s[0].mmio_write(c.REG_ICR_HIGH, 4, 1 << 24)
    s[0].mmio_write(c.REG_ICR_LOW, 4, c.DM_NMI << 8)
    s[0].mmio_write(c.REG_ICR_LOW, 4, (c.SH_ALL << 18) | 0x40)
    assert not s[1].nmi_pending and s[1].irr.rfind(1) == -1
    assert s.notified == [0, 2]
