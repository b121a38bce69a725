"""IPI routing on a bus of several APICs (SDM 10.6): destination modes, shorthands,
broadcast, delivery modes, lowest priority, and the publish-then-notify order."""

import pytest

from kvmpy.apic import (
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_SIPI,
    DM_SMI,
    ESR_SEND_ILLEGAL_VECTOR,
    ICR_DEST_LOGICAL,
    ICR_LEVEL_ASSERT,
    ICR_TRIGGER_LEVEL,
    SH_ALL,
    SH_ALL_BUT,
    SH_NONE,
    SH_SELF,
)
from kvmpy.apic import constants as c
from kvmpy.apic.testing import make_system, read_reg, send, write_reg

V = 0x61
LOG = ICR_DEST_LOGICAL


def icr(dm=DM_FIXED, vector=V, sh=SH_NONE, logical=False):
    return vector | (dm << 8) | (sh << 18) | (LOG if logical else 0)


def flat_ldr(i):
    """xAPIC flat model: APIC i gets logical bit i."""
    return (1 << i) << 24


def cluster_ldr(i):
    """xAPIC cluster model: cluster i//4, member bit i%4."""
    return (((i // 4) << 4) | (1 << (i % 4))) << 24


# (name, SDM, x2apic, setup, source, icr_low, dest, expected targets)
ROUTES = [
    ("x phys single", "10.6.2.1", False, None, 0, icr(), 3, {3}),
    ("x phys self by id", "10.6.2.1", False, None, 2, icr(), 2, {2}),
    ("x phys broadcast 0xFF", "10.6.2.1", False, None, 0, icr(), 0xFF, set(range(8))),
    ("x phys no such id", "10.6.2.1", False, None, 0, icr(), 0x20, set()),
    ("x shorthand self", "10.6.1", False, None, 5, icr(sh=SH_SELF), 3, {5}),
    ("x shorthand all", "10.6.1", False, None, 5, icr(sh=SH_ALL), 3, set(range(8))),
    ("x shorthand all-but", "10.6.1", False, None, 5, icr(sh=SH_ALL_BUT), 5, set(range(8)) - {5}),
    ("x flat logical", "10.6.2.2", False, "flat", 0, icr(logical=True), 0b00100110, {1, 2, 5}),
    ("x flat logical none", "10.6.2.2", False, "flat", 0, icr(logical=True), 0, set()),
    ("x flat logical 0xFF", "10.6.2.2", False, "flat", 0, icr(logical=True), 0xFF, set(range(8))),
    ("x cluster logical 1", "10.6.2.2", False, "cluster", 0, icr(logical=True), 0x13, {4, 5}),
    ("x cluster logical 0", "10.6.2.2", False, "cluster", 7, icr(logical=True), 0x0C, {2, 3}),
    ("x cluster wrong cluster", "10.6.2.2", False, "cluster", 0, icr(logical=True), 0x21, set()),
    (
        "x cluster broadcast 0xFF",
        "10.6.2.2",
        False,
        "cluster",
        0,
        icr(logical=True),
        0xFF,
        set(range(8)),
    ),
    ("x logical unset LDR", "10.6.2.2", False, None, 0, icr(logical=True), 0x0F, set()),
    ("x2 phys single", "10.12.9", True, None, 0, icr(), 6, {6}),
    ("x2 phys 0xFF is an ID", "10.12.9", True, None, 0, icr(), 0xFF, set()),
    ("x2 phys broadcast", "10.12.9", True, None, 1, icr(), 0xFFFFFFFF, set(range(8))),
    (
        "x2 logical broadcast",
        "10.12.9",
        True,
        None,
        1,
        icr(logical=True),
        0xFFFFFFFF,
        set(range(8)),
    ),
    ("x2 cluster 0 bits", "10.12.10.2", True, None, 0, icr(logical=True), 0x00000085, {0, 2, 7}),
    ("x2 cluster 1 absent", "10.12.10.2", True, None, 0, icr(logical=True), 0x00010001, set()),
    ("x2 shorthand self", "10.12.9", True, None, 3, icr(sh=SH_SELF), 0, {3}),
    ("x2 shorthand all", "10.12.9", True, None, 3, icr(sh=SH_ALL), 0, set(range(8))),
    ("x2 shorthand all-but", "10.12.9", True, None, 3, icr(sh=SH_ALL_BUT), 3, set(range(8)) - {3}),
]


def build(x2apic, setup, n=8):
    s = make_system(n, x2apic=x2apic)
    if setup == "flat":
        for i, apic in enumerate(s.apics):
            write_reg(apic, c.REG_LDR, flat_ldr(i))
    elif setup == "cluster":
        for i, apic in enumerate(s.apics):
            write_reg(apic, c.REG_DFR, 0x0FFFFFFF)
            write_reg(apic, c.REG_LDR, cluster_ldr(i))
    return s


def pending(s, vector=V):
    return {i for i, apic in enumerate(s.apics) if apic.irr[vector]}


@pytest.mark.parametrize(
    ("name", "sdm", "x2apic", "setup", "source", "low", "dest", "expect"),
    ROUTES,
    ids=[r[0] for r in ROUTES],
)
def test_fixed_routing(name, sdm, x2apic, setup, source, low, dest, expect):
    s = build(x2apic, setup)
    send(s[source], low, dest)
    assert pending(s) == expect, f"{name} (SDM {sdm})"
    assert s.notified == sorted(expect)
    assert s[source].stats["ipi_sent"] == 1
    for i in expect:
        assert s[i].stats["ipi_received"] == 1
        assert s[i].tmr[V] == 0  # IPIs are edge-triggered (SDM 10.6.1 trigger mode)


def test_x2apic_cluster_beyond_16():
    """SDM 10.12.10.2: cluster = x2APIC ID[19:4]; 20 APICs span clusters 0 and 1."""
    s = make_system(20, x2apic=True)
    send(s[0], icr(logical=True), (1 << 16) | 0b1001)
    assert pending(s) == {16, 19}
    send(s[0], icr(logical=True, vector=V + 1), 0b1001)
    assert pending(s, V + 1) == {0, 3}


def test_mixed_modes_broadcast_width_follows_sender():
    """SDM 10.12.9: 0xFF broadcasts from an xAPIC sender; an x2APIC sender needs 0xFFFFFFFF."""
    s = make_system(3)
    s[2].wrmsr(c.MSR_APIC_BASE, c.APIC_DEFAULT_BASE | c.APIC_BASE_EN | c.APIC_BASE_EXTD)
    send(s[0], icr(), 0xFF)
    assert pending(s) == {0, 1, 2}
    send(s[2], icr(vector=0x70), 0xFF)
    assert pending(s, 0x70) == set()
    send(s[2], icr(vector=0x71), 1)
    assert pending(s, 0x71) == {1}


# (name, SDM, icr_low, dest, attribute expected True on the targets)
OTHER_MODES = [
    ("NMI physical", "10.6.1", icr(DM_NMI, 0), 2, "nmi_pending", {2}),
    ("NMI all-but", "10.6.1", icr(DM_NMI, 0, SH_ALL_BUT), 0, "nmi_pending", {1, 2, 3}),
    ("NMI all (Linux backtrace)", "10.6.1", icr(DM_NMI, 0, SH_ALL), 0, "nmi_pending", {0, 1, 2, 3}),
    ("SMI physical", "10.6.1", icr(DM_SMI, 0), 1, "smi_pending", {1}),
    (
        "INIT all-but",
        "10.6.1",
        icr(DM_INIT, 0, SH_ALL_BUT) | ICR_LEVEL_ASSERT,
        0,
        "init_pending",
        {1, 2, 3},
    ),
    ("INIT edge, level 0", "10.6.1", icr(DM_INIT, 0), 3, "init_pending", {3}),
    (
        "INIT level de-assert",
        "10.6.1",
        icr(DM_INIT, 0) | ICR_TRIGGER_LEVEL,
        3,
        "init_pending",
        set(),
    ),
    (
        "SIPI to APs (wait-for-SIPI)",
        "10.4.4.1",
        icr(DM_SIPI, 0x9A, SH_ALL_BUT),
        0,
        "sipi_pending",
        {1, 2, 3},
    ),
    ("SIPI to running BSP ignored", "10.4.4.1", icr(DM_SIPI, 0x9A), 0, "sipi_pending", set()),
]


@pytest.mark.parametrize("x2apic", [False, True])
@pytest.mark.parametrize(
    ("name", "sdm", "low", "dest", "attr", "expect"), OTHER_MODES, ids=[r[0] for r in OTHER_MODES]
)
def test_other_delivery_modes(x2apic, name, sdm, low, dest, attr, expect):
    s = make_system(4, x2apic=x2apic)
    src = s[1] if "BSP" in name else s[0]
    send(src, low, dest)
    got = {i for i, apic in enumerate(s.apics) if getattr(apic, attr)}
    assert got == expect, f"{name} (SDM {sdm})"
    assert all(apic.irr.rfind(1) == -1 for apic in s.apics)
    if expect:
        assert set(s.notified) >= expect
    if attr == "sipi_pending":
        assert all(s[i].sipi_vector == 0x9A for i in expect)


def test_illegal_vector_send():
    """SDM 10.5.3: sending fixed/lowest vector 0-15 sets ESR bit 5; nothing is delivered."""
    for x2apic in (False, True):
        s = make_system(4, x2apic=x2apic)
        for dm in (DM_FIXED, DM_LOWEST):
            send(s[0], icr(dm, 15), 1)
        assert all(apic.irr.rfind(1) == -1 for apic in s.apics) and s.notified == []
        write_reg(s[0], c.REG_ESR, 0)
        assert read_reg(s[0], c.REG_ESR) == ESR_SEND_ILLEGAL_VECTOR
        assert s[0].stats["illegal_vector_sent"] == 2
        send(s[0], icr(DM_NMI, 3), 1)  # the vector of an NMI is ignored
        assert s[1].nmi_pending


def test_reserved_delivery_modes_dropped():
    s = make_system(2)
    send(s[0], icr(3), 1)
    send(s[0], icr(7), 1)
    assert s.notified == [] and s[1].irr.rfind(1) == -1
    assert s[0].stats["ipi_reserved_delivery_mode"] == 2


def test_sw_disabled_target_takes_nmi_not_fixed():
    """SDM 10.4.7.2: a software-disabled APIC accepts NMI/INIT/SIPI/SMI, not fixed."""
    s = make_system(3)
    write_reg(s[1], c.REG_SVR, 0xFF)
    send(s[0], icr(), 1)
    assert s[1].irr[V] == 0 and s.notified == []
    send(s[0], icr(DM_NMI, 0), 1)
    assert s[1].nmi_pending and s.notified == [1]
    assert s[1].stats["fixed_rejected_disabled"] == 1


def test_sw_disabled_source_can_send():
    """SDM 10.4.7.2: a software-disabled APIC can still issue IPIs."""
    s = make_system(3)
    write_reg(s[0], c.REG_SVR, 0xFF)
    send(s[0], icr(), 2)
    assert pending(s) == {2}


# ---- lowest priority (SDM 10.6.2.4): focus processor, else lowest PPR, ties lowest index.
LP_CASES = [
    ("ties go to lowest index", {}, 0b1110, {}, None, 1),
    ("lowest TPR wins", {1: 0x30, 2: 0x10, 3: 0x20}, 0b1110, {}, None, 2),
    ("in-service class raises PPR", {}, 0b0110, {1: 0x80}, None, 2),
    ("focus processor wins", {1: 0x00, 3: 0x40}, 0b1010, {3: V}, None, 3),
    ("focus checking disabled", {1: 0x00, 3: 0x40}, 0b1010, {3: V}, 3, 1),
]


@pytest.mark.parametrize(
    ("name", "tprs", "mda", "in_service", "focus_off", "winner"),
    LP_CASES,
    ids=[r[0] for r in LP_CASES],
)
def test_lowest_priority_xapic_flat(name, tprs, mda, in_service, focus_off, winner):
    s = build(False, "flat", n=4)
    for i, tpr in tprs.items():
        write_reg(s[i], c.REG_TPR, tpr)
    for i, vector in in_service.items():
        s[i].accept_fixed(vector, False)
        s[i].ack(vector)
    if focus_off is not None:
        write_reg(s[focus_off], c.REG_SVR, 0x3FF)
    s.notified.clear()
    send(s[0], icr(DM_LOWEST, logical=True), mda)
    assert s.notified == [winner], name
    assert s[winner].irr[V] == 1
    assert sum(apic.irr[V] for apic in s.apics) == 1


def test_lowest_priority_skips_disabled_and_self():
    s = build(False, "flat", n=4)
    write_reg(s[1], c.REG_SVR, 0xFF)  # software-disabled: cannot accept
    send(s[0], icr(DM_LOWEST, sh=SH_ALL_BUT), 0)
    assert s.notified == [2]
    s.notified.clear()
    send(s[0], icr(DM_LOWEST, logical=True), 0b0010)  # only candidate is disabled
    assert s.notified == [] and s[0].stats["ipi_no_target"] == 1


def test_lowest_priority_x2apic_cluster_and_physical():
    s = make_system(8, x2apic=True)
    s[4].wrmsr(0x808, 0x50)
    s[5].wrmsr(0x808, 0x20)
    send(s[0], icr(DM_LOWEST, logical=True), 0b110000)
    assert s.notified == [5]
    send(s[0], icr(DM_LOWEST), 6)
    assert s.notified == [5, 6]


def test_notify_after_publish():
    """DESIGN 'Delivering an interrupt': the target's state is visible when notify runs."""
    seen = []
    s = make_system(4, x2apic=True)

    def notify(index):
        apic = s.apics[index]
        seen.append((index, apic.has_pending_events()))

    s.bus.notify = notify
    send(s[0], icr(sh=SH_ALL), 0)
    send(s[0], icr(DM_NMI, 0), 2)
    send(s[0], icr(DM_INIT, 0, SH_ALL_BUT) | ICR_LEVEL_ASSERT, 0)
    assert len(seen) == 4 + 1 + 3
    assert all(flag for _, flag in seen)
