"""The local APIC (xAPIC and x2APIC) as a pure state machine, and IPI routing.

No KVM here: the VMM feeds register accesses (``rdmsr``/``wrmsr``/``mmio_*``), asks
for interrupts to inject (``pending_vector``/``ack``/``take_*``), drives the timer
with a clock, and is told through ``ApicBus.notify`` which vCPU to kick. Intel SDM
Vol. 3A ch. 10; see lapic.py for the threading contract.
"""

from .bus import ApicBus
from .constants import (
    APIC_DEFAULT_BASE,
    DM_EXTINT,
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_SIPI,
    DM_SMI,
    ESR_ILLEGAL_REGISTER,
    ESR_RECV_ILLEGAL_VECTOR,
    ESR_SEND_ILLEGAL_VECTOR,
    ICR_DEST_LOGICAL,
    ICR_LEVEL_ASSERT,
    ICR_TRIGGER_LEVEL,
    MSR_APIC_BASE,
    MSR_TSC_DEADLINE,
    MSR_X2APIC_ICR,
    MSR_X2APIC_SELF_IPI,
    SH_ALL,
    SH_ALL_BUT,
    SH_NONE,
    SH_SELF,
    X2APIC_ICR_RESERVED,
    X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
)
from .errors import ApicGP
from .lapic import LocalApic
from .mode import ApicMode

__all__ = [
    "APIC_DEFAULT_BASE",
    "ApicBus",
    "ApicGP",
    "ApicMode",
    "DM_EXTINT",
    "DM_FIXED",
    "DM_INIT",
    "DM_LOWEST",
    "DM_NMI",
    "DM_SIPI",
    "DM_SMI",
    "ESR_ILLEGAL_REGISTER",
    "ESR_RECV_ILLEGAL_VECTOR",
    "ESR_SEND_ILLEGAL_VECTOR",
    "ICR_DEST_LOGICAL",
    "ICR_LEVEL_ASSERT",
    "ICR_TRIGGER_LEVEL",
    "LocalApic",
    "MSR_APIC_BASE",
    "MSR_TSC_DEADLINE",
    "MSR_X2APIC_ICR",
    "MSR_X2APIC_SELF_IPI",
    "SH_ALL",
    "SH_ALL_BUT",
    "SH_NONE",
    "SH_SELF",
    "X2APIC_ICR_RESERVED",
    "X2APIC_MSR_FIRST",
    "X2APIC_MSR_LAST",
]
