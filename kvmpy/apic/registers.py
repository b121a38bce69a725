"""Which APIC registers exist in each mode, and their x2APIC access rules.

One table for both interfaces (the bhyve vlapic.c approach): the xAPIC MMIO path
and the x2APIC MSR path both index it by xAPIC offset (SDM Table 10-1, Table 10-6).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import constants as c


@dataclass(frozen=True, slots=True)
class RegSpec:
    """Access rules of one register.

    ``x2_reserved`` lists the low-32-bit bits whose nonzero write #GPs in x2APIC mode
    (SDM 10.12.1.3 "Reserved Bit Checking"); the upper 32 bits are always reserved
    except in the ICR.
    """

    name: str
    in_xapic: bool
    in_x2apic: bool
    x2_readable: bool  # RDMSR allowed (xAPIC MMIO reads of anything that exists succeed)
    x2_writable: bool  # WRMSR allowed
    xapic_writable: bool  # an MMIO write has an effect (else it is ignored)
    x2_reserved: int = 0


def _lvt_reserved(index: int) -> int:
    """Reserved LVT bits (SDM Figure 10-8): delivery status is read-only in every LVT,
    remote IRR exists only in LINT0/LINT1 and is reserved in the others."""
    remote_irr = c.LVT_REMOTE_IRR if index in (c.LVT_LINT0, c.LVT_LINT1) else 0
    return ~(c.LVT_WRITABLE[index] | c.LVT_DELIVERY_STATUS | remote_irr) & 0xFFFFFFFF


_FULL = 0xFFFFFFFF

REGISTERS: dict[int, RegSpec] = {
    c.REG_ID: RegSpec("ID", True, True, True, False, True),
    c.REG_VERSION: RegSpec("VERSION", True, True, True, False, False),
    c.REG_TPR: RegSpec("TPR", True, True, True, True, True, ~0xFF & _FULL),
    c.REG_APR: RegSpec("APR", True, False, False, False, False),  # not in Table 10-6
    c.REG_PPR: RegSpec("PPR", True, True, True, False, False),
    # EOI: write-only; a nonzero x2APIC write #GPs (Table 10-6 note 3).
    c.REG_EOI: RegSpec("EOI", True, True, False, True, True, _FULL),
    c.REG_RRD: RegSpec("RRD", True, False, False, False, False),  # not in Table 10-6
    c.REG_LDR: RegSpec("LDR", True, True, True, False, True),  # read-only in x2APIC
    c.REG_DFR: RegSpec("DFR", True, False, False, False, True),  # no MSR 0x80E
    c.REG_SVR: RegSpec("SVR", True, True, True, True, True, ~c.SVR_WRITABLE & _FULL),
    # ESR: a nonzero x2APIC write #GPs (Table 10-6).
    c.REG_ESR: RegSpec("ESR", True, True, True, True, True, _FULL),
    c.REG_ICR_LOW: RegSpec("ICR", True, True, True, True, True, c.X2APIC_ICR_RESERVED),
    c.REG_ICR_HIGH: RegSpec("ICR_HIGH", True, False, False, False, True),  # no MSR 0x831
    c.REG_TIMER_INITIAL: RegSpec("TIMER_INITIAL", True, True, True, True, True, 0),
    c.REG_TIMER_CURRENT: RegSpec("TIMER_CURRENT", True, True, True, False, False),
    c.REG_TIMER_DIVIDE: RegSpec(
        "TIMER_DIVIDE", True, True, True, True, True, ~c.TDCR_WRITABLE & _FULL
    ),
    c.REG_SELF_IPI: RegSpec("SELF_IPI", False, True, False, True, False, ~0xFF & _FULL),
}
for _i in range(8):
    REGISTERS[c.REG_ISR0 + 0x10 * _i] = RegSpec(f"ISR{_i}", True, True, True, False, False)
    REGISTERS[c.REG_TMR0 + 0x10 * _i] = RegSpec(f"TMR{_i}", True, True, True, False, False)
    REGISTERS[c.REG_IRR0 + 0x10 * _i] = RegSpec(f"IRR{_i}", True, True, True, False, False)
_LVT_NAMES = ("LVT_TIMER", "LVT_THERMAL", "LVT_PERF", "LVT_LINT0", "LVT_LINT1", "LVT_ERROR")
for _i, _name in enumerate(_LVT_NAMES):
    REGISTERS[c.REG_LVT_TIMER + 0x10 * _i] = RegSpec(
        _name, True, True, True, True, True, _lvt_reserved(_i)
    )


def msr_to_offset(msr: int) -> int:
    """xAPIC offset of x2APIC MSR ``msr`` (SDM 10.12.1.2)."""
    return (msr - c.X2APIC_MSR_FIRST) << 4


def offset_to_msr(offset: int) -> int:
    """x2APIC MSR index of the register at xAPIC ``offset``."""
    return c.X2APIC_MSR_FIRST + (offset >> 4)


def x2apic_spec(msr: int) -> RegSpec | None:
    """The spec of an x2APIC MSR, or None if no such register exists in x2APIC mode."""
    spec = REGISTERS.get(msr_to_offset(msr))
    if spec is None or not spec.in_x2apic:
        return None
    return spec


def xapic_spec(offset: int) -> RegSpec | None:
    """The spec of the register at 16-byte-aligned xAPIC ``offset``, or None."""
    spec = REGISTERS.get(offset)
    if spec is None or not spec.in_xapic:
        return None
    return spec
