"""Architectural invariants of one local APIC, checked from outside (SDM Vol. 3A ch. 10).

``check_invariants(apic)`` reads the APIC through the interface its mode provides (x2APIC
MSRs or the xAPIC page; IA32_APIC_BASE and IA32_TSC_DEADLINE always) and compares what a
guest would see with the SDM and with the model's own vector arrays. It raises
AssertionError naming the register and the rule. It has no side effect on the APIC: it
reads only registers that exist in the current mode (an xAPIC read of an unimplemented
register would log an ESR error) and never reads through a path that #GPs.

The SDM rules are written out here independently of ``registers.py``/``lapic.py`` so the
check is a second opinion, not a copy. Used by the property tests and the guest fuzzer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lapic import LocalApic
from .mode import ApicMode

if TYPE_CHECKING:
    from .ioapic import IoApic

# IA32_APIC_BASE (SDM 10.4.4, Figure 10-5; EXTD SDM 10.12.1).
_BASE_BSP, _BASE_EXTD, _BASE_EN = 1 << 8, 1 << 10, 1 << 11
_BASE_RESERVED_LOW = 0xFF | (1 << 9)

# Version register (SDM 10.4.8): integrated APIC 0x14, six LVT entries (max LVT 5),
# no EOI-broadcast suppression (bit 24).
_VERSION = 0x14 | (5 << 16)

# Bits each LVT may read as 1 (SDM 10.5.1, Figure 10-8): vector 7:0, delivery mode 10:8
# (not timer/error), delivery status 12, polarity 13 and remote IRR 14 and trigger 15
# (LINT0/1 only), mask 16, timer mode 18:17 (timer only).
_LVT_MAY_BE_SET = (
    0xFF | 1 << 12 | 1 << 16 | 3 << 17,  # timer
    0xFF | 0x700 | 1 << 12 | 1 << 16,  # thermal
    0xFF | 0x700 | 1 << 12 | 1 << 16,  # performance counters
    0xFF | 0x700 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15 | 1 << 16,  # LINT0
    0xFF | 0x700 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15 | 1 << 16,  # LINT1
    0xFF | 1 << 12 | 1 << 16,  # error
)
# ICR low bits that read back (SDM 10.6.1, Figure 10-12): vector, delivery mode,
# destination mode, level, trigger, shorthand. Delivery status (12) reads idle here.
_ICR_LOW_MAY_BE_SET = 0xFF | 0x700 | 1 << 11 | 1 << 14 | 1 << 15 | 3 << 18
# Defined ESR bits (SDM 10.5.3, Figure 10-9): 7:0.
_ESR_DEFINED = 0xFF


def _fail(apic: LocalApic, what: str) -> AssertionError:
    return AssertionError(f"{apic!r}: {what}")


def _vectors(arr: bytearray) -> list[int]:
    return [v for v in range(256) if arr[v]]


def _priority_class(vector: int) -> int:
    return vector >> 4


def expected_ppr(tpr: int, isr_vectors: list[int]) -> int:
    """PPR (SDM 10.8.3.1): TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4] << 4 with 3:0 zero.
    ISRV is the highest in-service vector, 0 if none."""
    isrv = max(isr_vectors, default=0)
    if (tpr >> 4) >= (isrv >> 4):
        return tpr
    return isrv & 0xF0


def expected_apr(tpr: int, irr_vectors: list[int], isr_vectors: list[int]) -> int:
    """APR (SDM 10.6.2.4): TPR if TPR[7:4] >= IRRV[7:4] and TPR[7:4] > ISRV[7:4], else the
    highest of the three classes with bits 3:0 zero."""
    irrv = max(irr_vectors, default=0)
    isrv = max(isr_vectors, default=0)
    if (tpr >> 4) >= (irrv >> 4) and (tpr >> 4) > (isrv >> 4):
        return tpr
    return max(tpr >> 4, irrv >> 4, isrv >> 4) << 4


def x2apic_logical_id(x2apic_id: int) -> int:
    """x2APIC LDR (SDM 10.12.10.2): cluster = ID[19:4] in bits 31:16, bit ID[3:0] set in
    bits 15:0."""
    return ((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))


def _reader(apic: LocalApic):
    """A 32-bit register reader for the current mode, or None when disabled."""
    if apic.mode is ApicMode.X2APIC:
        return lambda offset: apic.rdmsr(0x800 + (offset >> 4))
    if apic.mode is ApicMode.XAPIC:
        return lambda offset: apic.mmio_read(offset, 4)
    return None


def check_vector_arrays(apic: LocalApic) -> None:
    """IRR/ISR/TMR hold only 0/1 and never vectors 0-15 (SDM 10.5.3: illegal vectors are
    never accepted); a disabled APIC has nothing pending or in service (SDM 10.4.3)."""
    for name in ("irr", "isr", "tmr"):
        arr: bytearray = getattr(apic, name)
        if len(arr) != 256:
            raise _fail(apic, f"{name} has {len(arr)} entries, not 256")
        bad = [v for v in range(256) if arr[v] not in (0, 1)]
        if bad:
            raise _fail(apic, f"{name} holds non-boolean entries at vectors {bad}")
        low = [v for v in range(16) if arr[v]]
        if low:
            raise _fail(apic, f"{name} holds illegal vectors {low} (SDM 10.5.3)")
    if apic.mode is ApicMode.DISABLED and (any(apic.irr) or any(apic.isr)):
        raise _fail(apic, "globally disabled APIC holds IRR/ISR bits (SDM 10.4.3)")


def check_isr_classes(apic: LocalApic) -> None:
    """At most one in-service vector per priority class, true when the CPU only acks an
    interrupt whose class is above the PPR class (SDM 10.8.3.1)."""
    seen: dict[int, int] = {}
    for v in _vectors(apic.isr):
        cls = _priority_class(v)
        if cls in seen:
            raise _fail(apic, f"ISR holds {seen[cls]:#x} and {v:#x}, both in class {cls:#x}")
        seen[cls] = v


def check_priorities(apic: LocalApic) -> None:
    """PPR matches its definition from TPR and ISR (SDM 10.8.3.1), TPR is 8 bits."""
    if not 0 <= apic.tpr <= 0xFF:
        raise _fail(apic, f"TPR {apic.tpr:#x} is not 8 bits (SDM 10.8.3)")
    want = expected_ppr(apic.tpr, _vectors(apic.isr))
    if apic.ppr != want:
        raise _fail(
            apic,
            f"PPR {apic.ppr:#x} != {want:#x} from TPR {apic.tpr:#x} and ISR "
            f"{[hex(v) for v in _vectors(apic.isr)]} (SDM 10.8.3.1)",
        )


def check_apic_base(apic: LocalApic) -> None:
    """IA32_APIC_BASE reads back EN/EXTD for the mode, BSP for the BSP, reserved 0."""
    base = apic.rdmsr(0x1B)
    en, extd = bool(base & _BASE_EN), bool(base & _BASE_EXTD)
    mode = {(False, False): ApicMode.DISABLED, (True, False): ApicMode.XAPIC}.get(
        (en, extd), ApicMode.X2APIC if en else None
    )
    if mode is not apic.mode:
        raise _fail(apic, f"IA32_APIC_BASE {base:#x} says {mode}, mode is {apic.mode}")
    if bool(base & _BASE_BSP) != apic.bsp:
        raise _fail(apic, f"IA32_APIC_BASE {base:#x}: BSP flag != bsp={apic.bsp}")
    if base & _BASE_RESERVED_LOW or base >> apic.maxphyaddr:
        raise _fail(apic, f"IA32_APIC_BASE {base:#x}: reserved bits read as 1 (SDM 10.4.4)")


def check_register_view(apic: LocalApic) -> None:
    """What a guest reads through the mode's interface agrees with the SDM and the
    model's arrays: ID per mode, version, LDR (derived in x2APIC), DFR, ISR/TMR/IRR words,
    reserved bits 0, timer counts."""
    read = _reader(apic)
    if read is None:
        return
    x2 = apic.mode is ApicMode.X2APIC

    def expect(offset: int, got: int, want: int, rule: str) -> None:
        if got != want:
            raise _fail(apic, f"register {offset:#x} reads {got:#x}, expected {want:#x} ({rule})")

    def zero_bits(offset: int, value: int, mask: int, rule: str) -> None:
        if value & mask:
            raise _fail(apic, f"register {offset:#x} = {value:#x}: reserved bits set ({rule})")

    reg_id = read(0x20)
    if x2:
        expect(0x20, reg_id, apic.apic_id, "x2APIC ID is the initial ID, SDM 10.12.5.1")
    else:
        zero_bits(0x20, reg_id, 0x00FFFFFF, "xAPIC ID bits 23:0, SDM 10.4.6")
    expect(0x30, read(0x30), _VERSION, "version register, SDM 10.4.8")
    tpr = read(0x80)
    zero_bits(0x80, tpr, ~0xFF, "TPR 31:8, SDM 10.8.3")
    isr_v, irr_v = _vectors(apic.isr), _vectors(apic.irr)
    ppr = read(0xA0)
    expect(0xA0, ppr, expected_ppr(tpr, isr_v), "PPR, SDM 10.8.3.1")
    ldr = read(0xD0)
    if x2:
        expect(0xD0, ldr, x2apic_logical_id(apic.apic_id), "x2APIC LDR, SDM 10.12.10.2")
    else:
        zero_bits(0xD0, ldr, 0x00FFFFFF, "xAPIC LDR 23:0, SDM 10.6.2.2")
        expect(0x90, read(0x90), expected_apr(tpr, irr_v, isr_v), "APR, SDM 10.6.2.4")
        dfr = read(0xE0)
        expect(0xE0, dfr & 0x0FFFFFFF, 0x0FFFFFFF, "DFR 27:0 read as 1s, SDM 10.6.2.2")
        zero_bits(0x310, read(0x310), 0x00FFFFFF, "ICR high 23:0, SDM 10.6.1")
    zero_bits(0xF0, read(0xF0), ~0x3FF, "SVR 31:10 (no EOI suppression), SDM 10.9")
    for word in range(8):
        for base, arr, name in (
            (0x100, apic.isr, "ISR"),
            (0x180, apic.tmr, "TMR"),
            (0x200, apic.irr, "IRR"),
        ):
            offset = base + 0x10 * word
            want = sum(1 << i for i in range(32) if arr[32 * word + i])
            expect(offset, read(offset), want, f"{name}{word} packs {name.lower()}[]")
    zero_bits(0x280, read(0x280), ~_ESR_DEFINED, "ESR 31:8, SDM 10.5.3")
    icr = apic.rdmsr(0x830) if x2 else read(0x300)
    zero_bits(0x300, icr & 0xFFFFFFFF, ~_ICR_LOW_MAY_BE_SET, "ICR low reserved, SDM 10.6.1")
    for i, may in enumerate(_LVT_MAY_BE_SET):
        offset = 0x320 + 0x10 * i
        lvt = read(offset)
        zero_bits(offset, lvt, ~may, "LVT reserved bits, SDM 10.5.1")
        if not apic.svr & 0x100 and not lvt & (1 << 16):
            raise _fail(apic, f"LVT {offset:#x} unmasked while software-disabled (SDM 10.4.7.2)")
    initial, current = read(0x380), read(0x390)
    if not 0 <= current <= initial <= 0xFFFFFFFF:
        raise _fail(apic, f"timer current count {current:#x} > initial {initial:#x} (SDM 10.5.4)")
    zero_bits(0x3E0, read(0x3E0), ~0xB, "divide configuration bits 31:4, 2, SDM 10.5.4")
    lvt_timer = read(0x320)
    if (lvt_timer >> 17) & 3 != 2 and apic.rdmsr(0x6E0) != 0:
        raise _fail(apic, "IA32_TSC_DEADLINE reads nonzero outside TSC-deadline mode")
    if (lvt_timer >> 17) & 3 == 2 and (initial or current):
        raise _fail(apic, "timer counts nonzero in TSC-deadline mode (SDM 10.5.4.1)")


def check_invariants(apic: LocalApic, *, architectural_acks: bool = True) -> None:
    """Check every invariant of ``apic``; raise AssertionError with a clear message.

    ``architectural_acks``: the driver only acks the vector ``pending_vector()`` returns
    (class above PPR), so ISR holds at most one vector per class. Pass False for a driver
    that acks arbitrary vectors.
    """
    check_vector_arrays(apic)
    check_priorities(apic)
    if architectural_acks:
        check_isr_classes(apic)
    check_apic_base(apic)
    check_register_view(apic)


# ---- the I/O APIC (82093AA datasheet section 3; kvmpy's choices in ioapic.py) --------
_IOAPIC_PINS = 24
_IOAPIC_VERSION = 0x20 | (_IOAPIC_PINS - 1) << 16  # version 0x20, max entry 23
_RTE_DELIVERY_STATUS, _RTE_REMOTE_IRR, _RTE_LEVEL = 1 << 12, 1 << 14, 1 << 15


def check_ioapic_invariants(ioapic: IoApic) -> None:
    """What a guest reads from the I/O APIC agrees with the datasheet: ID in bits 27:24
    only, arbitration = ID, the version constant; every entry 64 bits
    with delivery status 0 and remote IRR only on a level-triggered entry (an entry
    rewritten to another delivery mode keeps it, as in QEMU and KVM); 24 input pins.
    Reads through ``read_register`` (no side effect on IOREGSEL). Raises AssertionError
    naming the register."""

    def fail(what: str) -> AssertionError:
        return AssertionError(f"{ioapic!r}: {what}")

    if not 0 <= ioapic.ioregsel <= 0xFF:
        raise fail(f"IOREGSEL {ioapic.ioregsel:#x} is not 8 bits")
    reg_id = ioapic.read_register(0)
    if reg_id & ~0x0F000000:
        raise fail(f"ID register {reg_id:#x}: bits outside 27:24")
    if ioapic.read_register(2) != reg_id:
        raise fail(f"arbitration {ioapic.read_register(2):#x} != ID {reg_id:#x}")
    if ioapic.read_register(1) != _IOAPIC_VERSION:
        raise fail(f"version {ioapic.read_register(1):#x} != {_IOAPIC_VERSION:#x}")
    if ioapic.lines >> _IOAPIC_PINS:
        raise fail(f"input lines {ioapic.lines:#x} beyond pin 23")
    for pin in range(_IOAPIC_PINS):
        low = ioapic.read_register(0x10 + 2 * pin)
        high = ioapic.read_register(0x11 + 2 * pin)
        if not (0 <= low <= 0xFFFFFFFF and 0 <= high <= 0xFFFFFFFF):
            raise fail(f"entry {pin}: halves {high:#x}:{low:#x} not 32 bits")
        if low & _RTE_DELIVERY_STATUS:
            raise fail(f"entry {pin} {low:#x}: delivery status set (delivery is instant)")
        if low & _RTE_REMOTE_IRR:
            if not low & _RTE_LEVEL:
                raise fail(f"entry {pin} {low:#x}: remote IRR on an edge entry")
