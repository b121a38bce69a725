"""IA32_APIC_BASE decoding and the xAPIC/x2APIC state machine (SDM 10.12.5, Figure 10-27)."""

from __future__ import annotations

import enum

from .constants import APIC_BASE_BSP, APIC_BASE_EN, APIC_BASE_EXTD
from .errors import ApicGP


class ApicMode(enum.Enum):
    """Local APIC operating mode, from IA32_APIC_BASE.EN (bit 11) and .EXTD (bit 10)."""

    DISABLED = 0  # EN=0 EXTD=0: globally disabled (SDM 10.4.3)
    XAPIC = 1  # EN=1 EXTD=0
    X2APIC = 2  # EN=1 EXTD=1


def mode_of(apic_base: int) -> ApicMode | None:
    """The mode an IA32_APIC_BASE value selects; None for the invalid EN=0, EXTD=1."""
    en = bool(apic_base & APIC_BASE_EN)
    extd = bool(apic_base & APIC_BASE_EXTD)
    if en:
        return ApicMode.X2APIC if extd else ApicMode.XAPIC
    return None if extd else ApicMode.DISABLED


def apic_base_reserved_mask(maxphyaddr: int, x2apic_supported: bool) -> int:
    """Bits of IA32_APIC_BASE that must be zero: 7:0, 9, MAXPHYADDR and up (SDM 10.4.4),
    and EXTD when the CPU does not report x2APIC (SDM 10.12.1)."""
    mask = 0xFF | (1 << 9) | ~((1 << maxphyaddr) - 1)
    if not x2apic_supported:
        mask |= APIC_BASE_EXTD
    return mask & 0xFFFFFFFFFFFFFFFF


# Allowed (from, to) transitions of Figure 10-27; staying in a state is always allowed.
_ALLOWED = frozenset(
    {
        (ApicMode.DISABLED, ApicMode.XAPIC),
        (ApicMode.XAPIC, ApicMode.DISABLED),
        (ApicMode.XAPIC, ApicMode.X2APIC),
        (ApicMode.X2APIC, ApicMode.DISABLED),
    }
)


def check_apic_base_write(
    current: ApicMode, value: int, *, maxphyaddr: int, x2apic_supported: bool
) -> ApicMode:
    """Validate a WRMSR to IA32_APIC_BASE and return the new mode, or raise ApicGP.

    #GP for reserved bits, for EN=0/EXTD=1, for x2APIC -> xAPIC and for
    disabled -> x2APIC (SDM 10.12.5: those must pass through another state).
    The BSP flag (bit 8) is read-only and ignored here.
    """
    if value & apic_base_reserved_mask(maxphyaddr, x2apic_supported):
        raise ApicGP("IA32_APIC_BASE: reserved bit set")
    new = mode_of(value & ~APIC_BASE_BSP)
    if new is None:
        raise ApicGP("IA32_APIC_BASE: EN=0 with EXTD=1 is invalid")
    if new is not current and (current, new) not in _ALLOWED:
        raise ApicGP(f"IA32_APIC_BASE: transition {current.name} -> {new.name} is invalid")
    return new
