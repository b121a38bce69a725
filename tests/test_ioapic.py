"""The I/O APIC model (kvmpy.apic.ioapic) with real local APICs on a fake-clock bus.

Each test drives the window as a guest does (IOREGSEL then IOWIN), the pins as devices
do, and plays the CPU on the local APIC side (pending_vector -> ack -> EOI register), so
the EOI broadcast goes through ApicBus exactly as in the VMM.
"""

from __future__ import annotations

import pytest

from kvmpy.apic import constants as c
from kvmpy.apic.ioapic import (
    IOAPIC_MMIO_SIZE,
    NUM_PINS,
    RTE_DELIVERY_STATUS,
    RTE_MASKED,
    RTE_REMOTE_IRR,
    STORM_DELAY_NS,
    SUCCESSIVE_IRQ_MAX_COUNT,
    VERSION_VALUE,
    IoApic,
)
from kvmpy.apic.testing import ApicSystem, make_system, read_reg, write_reg

IOREGSEL, IOWIN, IOEOI = 0x00, 0x10, 0x40
FIXED, LOWEST, SMI, DM3, NMI, INIT, DM6, EXTINT = range(8)


def setup(n: int = 2, *, x2apic: bool = False, **kw: object) -> tuple[ApicSystem, IoApic]:
    system = make_system(n, x2apic=x2apic)
    return system, IoApic(system.bus, **kw)


def reg_write(io: IoApic, index: int, value: int) -> None:
    io.write(IOREGSEL, 4, index)
    io.write(IOWIN, 4, value)


def reg_read(io: IoApic, index: int) -> int:
    io.write(IOREGSEL, 4, index)
    return io.read(IOWIN, 4)


def entry(vector: int, *, dm: int = FIXED, level: bool = False, logical: bool = False,
          dest: int = 0, masked: bool = False) -> int:
    return (vector | dm << 8 | int(logical) << 11 | int(level) << 15 | int(masked) << 16
            | dest << 56)


def program(io: IoApic, pin: int, value: int) -> None:
    """High half first, as Linux and kvm-unit-tests do."""
    reg_write(io, 0x11 + 2 * pin, value >> 32)
    reg_write(io, 0x10 + 2 * pin, value & 0xFFFFFFFF)


def read_entry(io: IoApic, pin: int) -> int:
    return reg_read(io, 0x10 + 2 * pin) | reg_read(io, 0x11 + 2 * pin) << 32


def take(apic) -> int | None:
    """The CPU takes the highest deliverable interrupt (INTA)."""
    vector = apic.pending_vector()
    if vector is not None:
        apic.ack(vector)
    return vector


def eoi(apic) -> None:
    write_reg(apic, c.REG_EOI, 0)


def tmr(apic, vector: int) -> bool:
    return bool(read_reg(apic, c.REG_TMR0 + 0x10 * (vector >> 5)) >> (vector & 31) & 1)


# ---------------------------------------------------------------- registers


def test_reset_state_every_entry_masked_id_zero() -> None:
    _, io = setup()
    assert reg_read(io, 0) == 0
    for pin in range(NUM_PINS):
        assert read_entry(io, pin) == RTE_MASKED


def test_version_register_is_0x20_with_24_entries_and_read_only() -> None:
    _, io = setup()
    assert reg_read(io, 1) == VERSION_VALUE == 0x00170020
    reg_write(io, 1, 0xFFFFFFFF)
    assert reg_read(io, 1) == 0x00170020


def test_id_bits_27_24_writable_and_arbitration_follows_read_only() -> None:
    _, io = setup()
    reg_write(io, 0, 0xFFFFFFFF)
    assert reg_read(io, 0) == 0x0F000000
    assert reg_read(io, 2) == 0x0F000000
    reg_write(io, 2, 0)
    assert reg_read(io, 2) == 0x0F000000
    reg_write(io, 0, 0x05000000)
    assert reg_read(io, 2) == 0x05000000


def test_ioregsel_is_8_bits_at_any_size() -> None:
    _, io = setup()
    io.write(IOREGSEL, 4, 0x1234)
    assert io.read(IOREGSEL, 4) == 0x34
    io.write(IOREGSEL, 1, 0x12)
    assert io.read(IOREGSEL, 1) == 0x12
    io.write(IOREGSEL, 8, 0xFFFF_FFFF_FFFF_FF11)
    assert io.read(IOREGSEL, 2) == 0x11


def test_iowin_other_sizes_read_zero_and_write_nothing() -> None:
    _, io = setup()
    io.write(IOREGSEL, 4, 0x10)
    assert io.read(IOWIN, 1) == 0 and io.read(IOWIN, 2) == 0 and io.read(IOWIN, 8) == 0
    io.write(IOWIN, 1, 0x42)
    io.write(IOWIN, 8, 0x42)
    assert read_entry(io, 0) == RTE_MASKED
    assert io.stats["mmio_write_ignored"] == 2


def test_window_decodes_modulo_0x100_and_unknown_offsets_are_inert() -> None:
    _, io = setup()
    io.write(0x100 + IOREGSEL, 4, 0x12)  # alias of IOREGSEL
    io.write(0xF00 + IOWIN, 4, 0x77)  # alias of IOWIN (last alias in the 4 KiB region)
    assert read_entry(io, 1) & 0xFF == 0x77
    assert IOAPIC_MMIO_SIZE == 0x1000
    for offset in (0x04, 0x08, 0x20, 0x30, 0x44, 0xFC):
        io.write(offset, 4, 0xFFFFFFFF)
        assert io.read(offset, 4) == 0
    assert read_entry(io, 1) & 0xFF == 0x77


@pytest.mark.parametrize("index", [3, 4, 0xF, 0x10 + 2 * NUM_PINS, 0x40, 0x80, 0xFF])
def test_out_of_range_index_reads_zero_and_ignores_writes(index: int) -> None:
    _, io = setup()
    before = [read_entry(io, pin) for pin in range(NUM_PINS)]
    reg_write(io, index, 0xFFFFFFFF)
    assert reg_read(io, index) == 0
    assert [read_entry(io, pin) for pin in range(NUM_PINS)] == before
    assert reg_read(io, 0) == 0 and reg_read(io, 1) == VERSION_VALUE


def test_reserved_bits_are_stored_read_only_bits_are_not() -> None:
    _, io = setup()
    program(io, 3, 0xFFFF_FFFF_FFFF_FFFF)
    value = read_entry(io, 3)
    assert value == 0xFFFF_FFFF_FFFF_FFFF & ~(RTE_DELIVERY_STATUS | RTE_REMOTE_IRR)
    reserved = ((1 << 39) - 1) << 17  # bits 55:17
    assert value & reserved == reserved


def test_reserved_bits_have_no_effect_on_delivery() -> None:
    system, io = setup()
    program(io, 5, entry(0x40) | (0xFF << 48) | (0x7F << 17) & ~RTE_MASKED)
    io.set_irq(5, True)
    assert system[0].irr[0x40]


# ---------------------------------------------------------------- edge


def test_edge_delivers_on_rising_edge_only() -> None:
    system, io = setup()
    program(io, 14, entry(0x76))
    io.set_irq(14, True)
    assert take(system[0]) == 0x76
    eoi(system[0])
    io.set_irq(14, True)  # still asserted: no edge
    assert system[0].pending_vector() is None
    io.set_irq(14, False)
    io.set_irq(14, True)
    assert take(system[0]) == 0x76
    assert not tmr(system[0], 0x76)
    assert io.stats["edge_while_asserted"] == 1


def test_masked_edge_is_lost_and_unmasking_does_not_deliver_it() -> None:
    system, io = setup()
    program(io, 14, entry(0x81, masked=True))
    io.set_irq(14, True)
    io.set_irq(14, False)
    program(io, 14, entry(0x81))
    assert system[0].pending_vector() is None
    io.set_irq(14, True)  # asserted while masked, then unmasked: still no edge either
    io.set_irq(14, False)
    io.set_irq(14, True)
    assert take(system[0]) == 0x81


def test_edge_entry_never_sets_remote_irr_and_eoi_ignores_it() -> None:
    system, io = setup()
    program(io, 2, entry(0x50))
    io.set_irq(2, True)
    assert not io.remote_irr(2)
    assert take(system[0]) == 0x50
    io.write(IOEOI, 4, 0x50)
    assert io.stats["remote_irr_cleared"] == 0


# ---------------------------------------------------------------- level


def test_level_sets_remote_irr_and_tmr_eoi_clears_it() -> None:
    system, io = setup()
    program(io, 14, entry(0x77, level=True))
    io.set_irq(14, True)
    assert io.remote_irr(14) and read_entry(io, 14) & RTE_REMOTE_IRR
    assert take(system[0]) == 0x77
    assert tmr(system[0], 0x77)
    io.set_irq(14, False)
    eoi(system[0])
    assert not io.remote_irr(14)
    assert system[0].pending_vector() is None


def test_level_assertions_during_service_are_coalesced() -> None:
    # kvm-unit-tests "coalesce simultaneous level interrupts"
    system, io = setup()
    program(io, 14, entry(0x98, level=True))
    io.set_irq(14, True)
    assert take(system[0]) == 0x98
    io.set_irq(14, False)
    io.set_irq(14, True)
    io.set_irq(14, False)
    eoi(system[0])
    assert system[0].pending_vector() is None
    assert io.stats["coalesced"] == 1 and io.stats["delivered"] == 1


def test_still_asserted_level_is_redelivered_after_eoi() -> None:
    system, io = setup()
    program(io, 14, entry(0x9A, level=True))
    io.set_irq(14, True)
    assert take(system[0]) == 0x9A
    eoi(system[0])
    assert io.remote_irr(14)  # delivered again at once
    assert take(system[0]) == 0x9A
    io.set_irq(14, False)
    eoi(system[0])
    assert not io.remote_irr(14) and system[0].pending_vector() is None
    assert io.stats["delivered"] == 2


def test_sequential_level_interrupts() -> None:
    system, io = setup()
    program(io, 14, entry(0x99, level=True))
    for _ in range(2):
        io.set_irq(14, True)
        assert take(system[0]) == 0x99
        io.set_irq(14, False)
        eoi(system[0])
    assert io.stats["delivered"] == 2


def test_masked_level_is_delivered_on_unmask_while_asserted() -> None:
    system, io = setup()
    program(io, 14, entry(0x82, level=True, masked=True))
    io.set_irq(14, True)
    assert system[0].pending_vector() is None and not io.remote_irr(14)
    program(io, 14, entry(0x82, level=True))
    assert take(system[0]) == 0x82 and io.remote_irr(14)


def test_masked_level_deasserted_before_unmask_is_not_delivered() -> None:
    system, io = setup()
    program(io, 14, entry(0x82, level=True, masked=True))
    io.set_irq(14, True)
    io.set_irq(14, False)
    program(io, 14, entry(0x82, level=True))
    assert system[0].pending_vector() is None


def test_eoi_while_masked_clears_remote_irr_unmask_redelivers() -> None:
    # kvm-unit-tests "retriggered level interrupts with mask"
    system, io = setup()
    program(io, 14, entry(0x83, level=True))
    io.set_irq(14, True)
    assert take(system[0]) == 0x83
    program(io, 14, entry(0x83, level=True, masked=True))
    eoi(system[0])
    assert not io.remote_irr(14) and system[0].pending_vector() is None
    program(io, 14, entry(0x83, level=True))
    assert take(system[0]) == 0x83


def test_rewriting_entry_as_edge_clears_remote_irr() -> None:
    _, io = setup()
    program(io, 7, entry(0x60, level=True))
    io.set_irq(7, True)
    assert io.remote_irr(7)
    program(io, 7, entry(0x60, level=True, masked=True))
    assert io.remote_irr(7)  # remote IRR survives a rewrite...
    program(io, 7, entry(0x60, masked=True))
    assert not io.remote_irr(7)  # ...unless the entry becomes edge-triggered


def test_directed_eoi_register_clears_remote_irr_32_bit_only() -> None:
    system, io = setup()
    program(io, 9, entry(0x61, level=True))
    io.set_irq(9, True)
    io.set_irq(9, False)
    io.write(IOEOI, 1, 0x61)
    io.write(IOEOI, 8, 0x61)
    assert io.remote_irr(9)
    io.write(IOEOI, 4, 0x62)
    assert io.remote_irr(9)
    io.write(IOEOI, 4, 0xFFFFFF00 | 0x61)  # bits 31:8 ignored
    assert not io.remote_irr(9)
    assert system[0].irr[0x61]  # the LAPIC still holds it: only the IOAPIC side cleared


def test_eoi_clears_every_level_entry_with_that_vector() -> None:
    system, io = setup()
    program(io, 3, entry(0x70, level=True))
    program(io, 4, entry(0x70, level=True))
    program(io, 5, entry(0x71, level=True))
    for pin in (3, 4, 5):
        io.set_irq(pin, True)
        io.set_irq(pin, False)
    io.eoi(0x70)
    assert (io.remote_irr(3), io.remote_irr(4), io.remote_irr(5)) == (False, False, True)


def test_edge_eoi_of_same_vector_is_not_broadcast() -> None:
    system, io = setup()
    program(io, 4, entry(0x70, level=True))
    program(io, 5, entry(0x70))
    io.set_irq(4, True)
    assert take(system[0]) == 0x70
    io.set_irq(4, False)
    eoi(system[0])  # TMR set: level EOI, broadcast
    assert not io.remote_irr(4)
    io.set_irq(4, True)
    io.set_irq(5, True)  # the LAPIC merges the edge into the same vector: TMR now 0
    assert take(system[0]) == 0x70
    eoi(system[0])
    assert io.remote_irr(4)  # the EOI was an edge EOI: no broadcast
    assert io.stats["eoi_broadcast"] == 1


# ---------------------------------------------------------------- destinations


def test_physical_destination_and_notify() -> None:
    system, io = setup(3)
    program(io, 1, entry(0x41, dest=2))
    io.set_irq(1, True)
    assert system[2].irr[0x41] and not system[0].irr[0x41]
    assert system.notified == [2]


@pytest.mark.parametrize("x2apic", [False, True])
def test_broadcast_0xff_reaches_every_apic(x2apic: bool) -> None:
    system, io = setup(4, x2apic=x2apic)
    program(io, 1, entry(0x42, dest=0xFF))
    io.set_irq(1, True)
    assert [bool(a.irr[0x42]) for a in system.apics] == [True] * 4
    assert sorted(system.notified) == [0, 1, 2, 3]


def test_logical_flat_xapic() -> None:
    system, io = setup(4)
    for i, apic in enumerate(system.apics):
        write_reg(apic, c.REG_LDR, (1 << i) << 24)
    program(io, 1, entry(0x43, logical=True, dest=0b1010, level=True))
    io.set_irq(1, True)
    assert [bool(a.irr[0x43]) for a in system.apics] == [False, True, False, True]
    assert all(tmr(a, 0x43) for a in (system[1], system[3]))


def test_logical_cluster_xapic() -> None:
    system, io = setup(4)
    for i, apic in enumerate(system.apics):
        write_reg(apic, c.REG_DFR, 0x0FFFFFFF)  # cluster model
        write_reg(apic, c.REG_LDR, ((i >> 1) << 4 | 1 << (i & 1)) << 24)
    program(io, 1, entry(0x44, logical=True, dest=0x13))  # cluster 1, members 0 and 1
    io.set_irq(1, True)
    assert [bool(a.irr[0x44]) for a in system.apics] == [False, False, True, True]


def test_logical_x2apic_cluster_zero_with_8_bit_destination() -> None:
    # ioapic.flat "ioapic logical destination mode": dest 0xd = CPUs 0, 2, 3 in x2APIC
    system, io = setup(4, x2apic=True)
    program(io, 14, entry(0x86, logical=True, dest=0x0D, level=True))
    io.set_irq(14, True)
    assert [bool(a.irr[0x86]) for a in system.apics] == [True, False, True, True]
    io.set_irq(14, False)
    for i in (0, 2, 3):
        assert take(system[i]) == 0x86
    eoi(system[2])  # the first EOI clears remote IRR
    assert not io.remote_irr(14)
    eoi(system[0])
    eoi(system[3])
    assert io.stats["delivered"] == 1 and io.stats["remote_irr_cleared"] == 1


def test_lowest_priority_picks_the_lowest_ppr() -> None:
    system, io = setup(3)
    for i, apic in enumerate(system.apics):
        write_reg(apic, c.REG_LDR, (1 << i) << 24)
        write_reg(apic, c.REG_TPR, (3 - i) << 4)  # APIC 2 has the lowest priority
    program(io, 1, entry(0x45, dm=LOWEST, logical=True, dest=0b111))
    io.set_irq(1, True)
    assert [bool(a.irr[0x45]) for a in system.apics] == [False, False, True]


def test_lowest_priority_physical_goes_to_that_apic() -> None:
    system, io = setup(3)
    program(io, 1, entry(0x46, dm=LOWEST, dest=1, level=True))
    io.set_irq(1, True)
    assert [bool(a.irr[0x46]) for a in system.apics] == [False, True, False]
    assert io.remote_irr(1)


@pytest.mark.parametrize("level", [False, True])
def test_nmi_init_smi_are_edge_whatever_the_trigger_bit(level: bool) -> None:
    system, io = setup(2)
    program(io, 1, entry(0, dm=NMI, dest=1, level=level))
    program(io, 2, entry(0, dm=INIT, dest=1, level=level))
    program(io, 3, entry(0, dm=SMI, dest=0, level=level))
    for pin in (1, 2, 3):
        io.set_irq(pin, True)
        io.set_irq(pin, True)  # no second edge
        assert not io.remote_irr(pin)
    assert system[1].stats["nmi_received"] == 1
    assert system[1].init_pending and system[0].smi_pending
    assert system[1].stats["init_received"] == 1
    program(io, 1, entry(0, dm=NMI, dest=1, level=level))  # rewrite while asserted
    assert system[1].stats["nmi_received"] == 1


@pytest.mark.parametrize("dm,counter", [(EXTINT, "extint_dropped"), (DM3, "reserved_dm_dropped"),
                                        (DM6, "reserved_dm_dropped")])
def test_extint_and_reserved_delivery_modes_are_counted_and_dropped(dm: int, counter: str) -> None:
    system, io = setup(2)
    program(io, 1, entry(0x47, dm=dm, dest=0xFF))
    io.set_irq(1, True)
    assert io.stats[counter] == 1
    assert not any(a.has_pending_events() for a in system.apics)
    assert system.notified == []


def test_illegal_vector_is_a_receive_error_and_sets_no_remote_irr() -> None:
    system, io = setup(2)
    program(io, 1, entry(0x05, dest=1, level=True))
    io.set_irq(1, True)
    apic = system[1]
    assert not any(apic.irr[:16])
    write_reg(apic, c.REG_ESR, 0)
    assert read_reg(apic, c.REG_ESR) & c.ESR_RECV_ILLEGAL_VECTOR
    assert not io.remote_irr(1)
    assert io.stats["not_accepted"] == 1


def test_illegal_vector_raises_the_lvt_error_interrupt_if_unmasked() -> None:
    system, io = setup(1)
    write_reg(system[0], c.REG_LVT_ERROR, 0xE0)
    program(io, 1, entry(0x0F, level=True))
    io.set_irq(1, True)
    assert take(system[0]) == 0xE0
    assert not io.remote_irr(1)


def test_message_nobody_accepts_leaves_remote_irr_clear_and_is_retried() -> None:
    system, io = setup(2)
    write_reg(system[1], c.REG_SVR, 0xFF)  # software-disabled
    program(io, 1, entry(0x48, dest=1, level=True))
    io.set_irq(1, True)
    assert not io.remote_irr(1) and io.stats["not_accepted"] == 1
    write_reg(system[1], c.REG_SVR, 0x1FF)
    io.set_irq(1, True)  # asserted again: a device re-raising its line retries
    assert system[1].irr[0x48] and io.remote_irr(1)


def test_no_such_destination() -> None:
    system, io = setup(2)
    program(io, 1, entry(0x49, dest=7, level=True))
    io.set_irq(1, True)
    assert not io.remote_irr(1) and not system[0].irr[0x49] and not system[1].irr[0x49]


# ---------------------------------------------------------------- storms, bad input


def test_level_storm_is_throttled_after_the_successive_limit() -> None:
    calls: list[int] = []
    system, io = setup(1, defer=calls.append, storm_limit=5)
    program(io, 1, entry(0x50, level=True))
    io.set_irq(1, True)
    for _ in range(4):
        assert take(system[0]) == 0x50
        eoi(system[0])
    assert take(system[0]) == 0x50
    eoi(system[0])  # the 5th successive re-delivery is deferred
    assert calls == [STORM_DELAY_NS] and io.deferred
    assert system[0].pending_vector() is None and not io.remote_irr(1)
    io.service_deferred()
    assert take(system[0]) == 0x50 and not io.deferred
    assert io.stats["storm_deferred"] == 1


def test_deasserting_resets_the_storm_count() -> None:
    calls: list[int] = []
    system, io = setup(1, defer=calls.append, storm_limit=3)
    program(io, 1, entry(0x50, level=True))
    for _ in range(10):
        io.set_irq(1, True)
        assert take(system[0]) == 0x50
        eoi(system[0])
        take(system[0])
        io.set_irq(1, False)
        eoi(system[0])
    assert calls == []


def test_deferred_pin_deasserted_meanwhile_is_not_delivered() -> None:
    system, io = setup(1, defer=lambda ns: None, storm_limit=1)
    program(io, 1, entry(0x50, level=True))
    io.set_irq(1, True)
    assert take(system[0]) == 0x50
    eoi(system[0])
    assert io.deferred
    io.set_irq(1, False)
    io.service_deferred()
    assert system[0].pending_vector() is None


def test_default_storm_limit_is_kvm_and_qemu_s() -> None:
    assert SUCCESSIVE_IRQ_MAX_COUNT == 10_000 and STORM_DELAY_NS == 10_000_000
    _, io = setup(1)
    assert io.storm_limit == SUCCESSIVE_IRQ_MAX_COUNT


def test_level_storm_of_assertions_is_bounded() -> None:
    system, io = setup(1)
    program(io, 1, entry(0x50, level=True))
    for _ in range(10_000):
        io.set_irq(1, True)
    assert io.stats["delivered"] == 1 and io.stats["coalesced"] == 9_999
    assert take(system[0]) == 0x50 and system[0].pending_vector() is None


@pytest.mark.parametrize("pin", [-1, 24, 1000])
def test_bad_pin_is_counted(pin: int) -> None:
    _, io = setup(1)
    io.set_irq(pin, True)
    assert io.stats["bad_pin"] == 1


def test_eoi_from_any_local_apic_reaches_the_ioapic_through_the_bus() -> None:
    system, io = setup(2)
    assert io.eoi in system.bus.eoi_listeners
    assert system[1].on_level_eoi == system.bus.broadcast_eoi
    program(io, 1, entry(0x51, dest=1, level=True))
    io.set_irq(1, True)
    io.set_irq(1, False)
    assert take(system[1]) == 0x51
    eoi(system[1])
    assert not io.remote_irr(1) and io.stats["eoi_broadcast"] == 1


def test_reset_masks_everything() -> None:
    _, io = setup(1)
    reg_write(io, 0, 0x03000000)
    program(io, 1, entry(0x51, level=True))
    io.set_irq(1, True)
    io.reset()
    assert reg_read(io, 0) == 0 and read_entry(io, 1) == RTE_MASKED


def test_entry_rewritten_to_nmi_keeps_remote_irr_but_delivers_on_edges() -> None:
    # Remote IRR survives a rewrite that stays level (QEMU, KVM), but an NMI entry is
    # edge-triggered whatever its trigger bit says: the leftover bit does not block it.
    system, io = setup(2)
    program(io, 1, entry(0x40, dest=1, level=True))
    io.set_irq(1, True)
    assert io.remote_irr(1)
    program(io, 1, entry(0x40, dm=NMI, dest=1, level=True))
    assert io.remote_irr(1)
    io.set_irq(1, False)
    io.set_irq(1, True)
    assert system[1].stats["nmi_received"] == 1
    io.eoi(0x40)  # the vector field still matches: the broadcast clears the leftover
    assert not io.remote_irr(1)
