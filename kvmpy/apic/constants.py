"""Architectural constants of the local APIC (Intel SDM Vol. 3A ch. 10/11).

Register offsets are xAPIC MMIO offsets; the x2APIC MSR of a register is
``X2APIC_MSR_FIRST + (offset >> 4)`` (SDM 10.12.1.2, Table 10-6).
"""

# --- MSRs (SDM 10.4.4, 10.5.4.1, 10.12.1.2) -------------------------------------------
MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
X2APIC_MSR_FIRST = 0x800
X2APIC_MSR_LAST = 0x8FF
MSR_X2APIC_ICR = 0x830
MSR_X2APIC_SELF_IPI = 0x83F

APIC_DEFAULT_BASE = 0xFEE00000
APIC_MMIO_SIZE = 0x1000

# IA32_APIC_BASE bits (SDM 10.4.4, Figure 10-5; 10.12.1 for EXTD).
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_EN = 1 << 11
APIC_BASE_ADDR_SHIFT = 12

# --- register offsets (SDM Table 10-1) ---------------------------------------------
REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_RRD = 0x0C0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR0 = 0x100
REG_TMR0 = 0x180
REG_IRR0 = 0x200
REG_ESR = 0x280
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0
REG_SELF_IPI = 0x3F0  # x2APIC only

# LVT entries in register order; index i lives at REG_LVT_TIMER + 0x10 * i.
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_COUNT = 6

# Version register (SDM 10.4.8): version 0x14 (integrated APIC), max LVT entry = 5
# (six LVTs, no CMCI), bit 24 (EOI-broadcast suppression) not supported.
APIC_VERSION = 0x14 | ((LVT_COUNT - 1) << 16)

# --- ICR fields (SDM 10.6.1, Figure 10-12; x2APIC Figure 10-28) --------------------
ICR_VECTOR = 0xFF
ICR_DM_SHIFT = 8
ICR_DM_MASK = 0x7 << ICR_DM_SHIFT
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_RESERVED3 = 3
DM_NMI = 4
DM_INIT = 5
DM_SIPI = 6
DM_EXTINT = 7  # LVT only; reserved in the ICR
ICR_DEST_LOGICAL = 1 << 11
ICR_BUSY = 1 << 12  # delivery status: always reads idle here (delivery is instantaneous)
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SH_SHIFT = 18
ICR_SH_MASK = 0x3 << ICR_SH_SHIFT
SH_NONE = 0
SH_SELF = 1
SH_ALL = 2  # all including self
SH_ALL_BUT = 3  # all excluding self
# x2APIC ICR reserved bits: 13, 17:16, 31:20 (#GP); bit 12 is ignored on write.
X2APIC_ICR_RESERVED = (1 << 13) | (0x3 << 16) | (0xFFF << 20)
# Bits of ICR low an xAPIC write stores (reserved bits are ignored; SDM 10.6.1).
XAPIC_ICR_LOW_WRITABLE = 0x000CCFFF & ~ICR_BUSY
XAPIC_ICR_HIGH_WRITABLE = 0xFF000000

XAPIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFFFFFF

# --- LVT fields (SDM 10.5.1, Figure 10-8) -------------------------------------------
LVT_VECTOR = 0xFF
LVT_DM_MASK = 0x700
LVT_DELIVERY_STATUS = 1 << 12
LVT_POLARITY = 1 << 13
LVT_REMOTE_IRR = 1 << 14
LVT_TRIGGER_LEVEL = 1 << 15
LVT_MASKED = 1 << 16
LVT_TIMER_MODE_SHIFT = 17
LVT_TIMER_MODE_MASK = 0x3 << LVT_TIMER_MODE_SHIFT
TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2

# Bits software may write in each LVT (the rest is reserved or read-only).
LVT_WRITABLE = (
    LVT_VECTOR | LVT_MASKED | LVT_TIMER_MODE_MASK,  # timer
    LVT_VECTOR | LVT_DM_MASK | LVT_MASKED,  # thermal
    LVT_VECTOR | LVT_DM_MASK | LVT_MASKED,  # performance counters
    LVT_VECTOR | LVT_DM_MASK | LVT_POLARITY | LVT_TRIGGER_LEVEL | LVT_MASKED,  # LINT0
    LVT_VECTOR | LVT_DM_MASK | LVT_POLARITY | LVT_TRIGGER_LEVEL | LVT_MASKED,  # LINT1
    LVT_VECTOR | LVT_MASKED,  # error
)
# Read-only LVT bits: writing them is ignored, not a reserved-bit #GP.
LVT_READ_ONLY = LVT_DELIVERY_STATUS | LVT_REMOTE_IRR

# --- SVR (SDM 10.9, Figure 10-23) -----------------------------------------------------
SVR_VECTOR = 0xFF
SVR_APIC_ENABLED = 1 << 8
SVR_FOCUS_DISABLED = 1 << 9
SVR_WRITABLE = SVR_VECTOR | SVR_APIC_ENABLED | SVR_FOCUS_DISABLED  # bit 12 unsupported

# --- ESR bits (SDM 10.5.3, Figure 10-9) -----------------------------------------------
ESR_SEND_CHECKSUM = 1 << 0
ESR_RECV_CHECKSUM = 1 << 1
ESR_SEND_ACCEPT = 1 << 2
ESR_RECV_ACCEPT = 1 << 3
ESR_REDIRECTABLE_IPI = 1 << 4
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# --- DFR (SDM 10.6.2.2) ---------------------------------------------------------------
DFR_MODEL_FLAT = 0xF
DFR_MODEL_CLUSTER = 0x0
DFR_RESET = 0xFFFFFFFF

# Timer divide configuration (SDM 10.5.4, Figure 10-10): bits 0, 1, 3.
TDCR_WRITABLE = 0xB

# The APIC timer counts at the APIC bus frequency, 1 GHz here as in KVM
# (APIC_BUS_CYCLE_NS = 1): one tick per nanosecond before division.
APIC_BUS_NS_PER_TICK = 1
