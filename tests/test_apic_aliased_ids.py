"""Aliased xAPIC physical IDs: software gave two APICs the same xAPIC ID (the ID register
is writable, SDM 10.4.6). Every local APIC compares a physical destination with its
own ID (SDM 10.6.2.1), so an IPI to that ID reaches all of them, as in KVM without its
32-bit x2APIC-ID quirk. kvm-unit-tests apic.c test_aliased_xapic_physical_ipi (run when
the CPU has no x2APIC: the `xapic` configuration, `-cpu qemu64,-x2apic`) checks it;
before the fix the IPI reached one APIC only (256 "Want 2 IPI(s)" failures)."""

from __future__ import annotations

import pytest

from kvmpy.apic import DM_FIXED, DM_INIT, DM_LOWEST, DM_NMI
from kvmpy.apic import constants as c
from kvmpy.apic.testing import make_system, send, write_reg

V = 0xF1


def set_id(apic, xapic_id: int) -> None:
    write_reg(apic, c.REG_ID, xapic_id << 24)


def pending(s, vector: int = V) -> set[int]:
    return {i for i, a in enumerate(s.apics) if a.irr[vector]}


def clear(s) -> None:
    for a in s.apics:
        a.irr[:] = bytes(256)


@pytest.mark.parametrize("alias", [0, 1, 7, 0xFE])
def test_physical_ipi_reaches_every_apic_with_that_id(alias: int) -> None:
    s = make_system(3)
    set_id(s[0], alias)
    set_id(s[1], alias)
    send(s[2], DM_FIXED << 8 | V, alias)
    assert pending(s) == {0, 1}
    assert sorted(s.notified) == [0, 1]


def test_hot_route_target_keeps_its_id_and_another_takes_it_too() -> None:
    s = make_system(2)
    set_id(s[0], 1)  # APIC 1 still has ID 1: the index-numbered route must not stop there
    send(s[0], DM_FIXED << 8 | V, 1)
    assert pending(s) == {0, 1}
    clear(s)
    send(s[1], DM_FIXED << 8 | V, 0)
    assert pending(s) == set()  # nobody has ID 0 now


def test_the_chain_of_apic_c() -> None:
    """Both IDs 0, then each IPI to ID i makes both handlers move their ID to i + 1."""
    s = make_system(2)
    set_id(s[0], 0)
    set_id(s[1], 0)
    for i in range(0x100):
        clear(s)
        send(s[0], DM_FIXED << 8 | V, i)
        assert pending(s) == {0, 1}, i
        for a in s.apics:
            set_id(a, (i + 1) & 0xFF)


def test_nmi_and_init_reach_every_alias() -> None:
    s = make_system(3)
    set_id(s[1], 2)
    send(s[0], DM_NMI << 8, 2)
    assert [a.nmi_pending for a in s.apics] == [False, True, True]
    send(s[0], DM_INIT << 8 | c.ICR_LEVEL_ASSERT, 2)
    assert [a.init_pending for a in s.apics] == [False, True, True]


def test_lowest_priority_to_an_aliased_id_picks_one() -> None:
    s = make_system(3)
    set_id(s[0], 2)
    send(s[1], DM_LOWEST << 8 | V, 2)
    assert len(pending(s)) == 1 and pending(s) <= {0, 2}


def test_renumbered_ids_without_aliases() -> None:
    s = make_system(3)
    set_id(s[0], 1)
    set_id(s[1], 0)
    send(s[2], DM_FIXED << 8 | V, 1)
    assert pending(s) == {0}
    clear(s)
    set_id(s[0], 0)
    set_id(s[1], 1)  # back to the numbering kvmpy starts with
    send(s[2], DM_FIXED << 8 | V, 1)
    assert pending(s) == {1}
