"""Destination matching for interrupt messages (SDM 10.6.2).

Targets are duck-typed: anything with ``mode``, ``apic_id`` (x2APIC ID), ``xapic_id``
(8-bit xAPIC ID), ``x2apic_ldr``, ``ldr`` (xAPIC LDR register) and ``dfr`` works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import DFR_MODEL_FLAT, X2APIC_BROADCAST, XAPIC_BROADCAST
from .mode import ApicMode

if TYPE_CHECKING:
    from .lapic import LocalApic

_X2APIC = ApicMode.X2APIC


def x2apic_ldr(x2apic_id: int) -> int:
    """The read-only x2APIC LDR (SDM 10.12.10.2): cluster ID in bits 31:16 (x2APIC ID
    bits 19:4), and bit (ID[3:0]) of the 16-bit logical ID in bits 15:0."""
    return ((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))


def is_broadcast(dest: int, source_mode: ApicMode) -> bool:
    """0xFF in xAPIC and 0xFFFFFFFF in x2APIC address every APIC, in physical and logical
    destination mode alike (SDM 10.6.2.1, 10.12.9). The sender's mode decides the width."""
    return dest == (X2APIC_BROADCAST if source_mode is _X2APIC else XAPIC_BROADCAST)


def match_physical(target: LocalApic, dest: int) -> bool:
    """Physical destination (SDM 10.6.2.1): dest equals the target's APIC ID (8-bit
    xAPIC ID, or the 32-bit x2APIC ID when the target is in x2APIC mode)."""
    if target.mode is _X2APIC:
        return dest == target.apic_id
    return dest == target.xapic_id


def match_logical(target: LocalApic, dest: int) -> bool:
    """Logical destination (SDM 10.6.2.2, 10.12.10.2).

    x2APIC (cluster only): dest[31:16] equals the cluster of LDR and dest[15:0] AND
    LDR[15:0] is nonzero. xAPIC flat model (DFR[31:28]=0xF): MDA AND LDR[31:24] is
    nonzero. xAPIC cluster model (0x0): high nibbles equal and low nibbles intersect.
    """
    if target.mode is _X2APIC:
        ldr = target.x2apic_ldr
        return (dest >> 16) == (ldr >> 16) and (dest & ldr & 0xFFFF) != 0
    logical_id = target.ldr >> 24
    mda = dest & 0xFF
    if (target.dfr >> 28) == DFR_MODEL_FLAT:
        return (mda & logical_id) != 0
    return (mda >> 4) == (logical_id >> 4) and (mda & logical_id & 0xF) != 0
