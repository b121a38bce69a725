"""Priorities, acceptance and EOI (SDM 10.8): PPR, TPR/CR8, IRR -> ISR, EOI, level EOI."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.apic import ApicGP
from kvmpy.apic import constants as c
from kvmpy.apic.testing import make_system, read_reg, write_reg

# (TPR, vectors in service, expected PPR) -- SDM 10.8.3.1.
PPR_CASES = [
    (0x00, [], 0x00),
    (0x2F, [], 0x2F),
    (0x25, [0x31], 0x30),
    (0x35, [0x31], 0x35),
    (0x3F, [0x30], 0x3F),
    (0x10, [0x45, 0x80], 0x80),
    (0x90, [0x45, 0x80], 0x90),
]


@pytest.mark.parametrize("x2apic", [False, True])
@pytest.mark.parametrize(("tpr", "in_service", "ppr"), PPR_CASES)
def test_ppr(x2apic, tpr, in_service, ppr):
    s = make_system(1, x2apic=x2apic)
    apic = s[0]
    for v in in_service:
        apic.accept_fixed(v, False)
        apic.ack(v)
    write_reg(apic, c.REG_TPR, tpr)
    assert read_reg(apic, c.REG_PPR) == ppr


# (TPR, vector in IRR, deliverable?) -- class must be strictly above PPR[7:4] (SDM 10.8.3.1)
DELIVERABLE = [
    (0x00, 0x20, True),
    (0x30, 0x3F, False),
    (0x30, 0x40, True),
    (0x3F, 0x40, True),
    (0xF0, 0xFF, False),
]


@pytest.mark.parametrize(("tpr", "vector", "ok"), DELIVERABLE)
def test_pending_vector_respects_ppr(tpr, vector, ok):
    s = make_system(1)
    apic = s[0]
    apic.mmio_write(c.REG_TPR, 4, tpr)
    apic.accept_fixed(vector, False)
    assert apic.pending_vector() == (vector if ok else None)
    assert apic.has_pending_events() is ok
    apic.mmio_write(c.REG_TPR, 4, 0)
    assert apic.pending_vector() == vector


def test_nesting_ack_eoi():
    """SDM 10.8.4/10.8.5: a higher class preempts; EOI retires the highest ISR bit."""
    s = make_system(1)
    apic = s[0]
    apic.accept_fixed(0x41, False)
    apic.accept_fixed(0x42, False)
    assert apic.pending_vector() == 0x42
    apic.ack(0x42)
    assert apic.pending_vector() is None  # 0x41: same class as in-service 0x42
    apic.accept_fixed(0x90, False)
    assert apic.pending_vector() == 0x90
    apic.ack(0x90)
    assert apic.ppr == 0x90
    apic.mmio_write(c.REG_EOI, 4, 0)
    assert apic.ppr == 0x40 and apic.isr[0x42] == 1 and apic.isr[0x90] == 0
    apic.mmio_write(c.REG_EOI, 4, 0)
    assert apic.pending_vector() == 0x41
    assert apic.stats["eoi"] == 2 and apic.stats["injected"] == 2


def test_eoi_with_empty_isr_is_noop():
    s = make_system(1, x2apic=True)
    s[0].accept_fixed(0x50, False)
    s[0].wrmsr(0x80B, 0)
    assert s[0].irr[0x50] == 1 and s[0].stats["eoi_without_isr"] == 1


def test_level_eoi_hook():
    """SDM 10.8.5: EOI of a vector whose TMR bit is set is a level EOI (-> IOAPIC)."""
    s = make_system(1, x2apic=True)
    apic = s[0]
    seen = []
    apic.on_level_eoi = seen.append
    apic.accept_fixed(0x60, True)
    apic.accept_fixed(0x70, False)
    apic.ack(0x70)
    apic.wrmsr(0x80B, 0)
    apic.ack(0x60)
    assert apic.rdmsr(0x818 + 3) == 1  # TMR bit 0x60
    apic.wrmsr(0x80B, 0)
    assert seen == [0x60]
    assert apic.stats["eoi_level"] == 1 and apic.stats["eoi"] == 2


# SDM 10.8.6.1: CR8[3:0] <-> TPR[7:4]
@pytest.mark.parametrize(("cr8", "tpr"), [(0, 0), (1, 0x10), (0xF, 0xF0)])
def test_cr8_writes_tpr(cr8, tpr):
    s = make_system(1)
    s[0].set_cr8(cr8)
    assert s[0].mmio_read(c.REG_TPR, 4) == tpr
    assert s[0].cr8() == cr8


def test_cr8_reads_tpr_high_nibble_and_rejects_reserved():
    s = make_system(1)
    s[0].mmio_write(c.REG_TPR, 4, 0x5A)
    assert s[0].cr8() == 5
    with pytest.raises(ApicGP):
        s[0].set_cr8(0x10)
    assert s[0].cr8() == 5


def test_apr_xapic():
    """SDM 10.6.2.4 Figure 10-15 arbitration priority."""
    s = make_system(1)
    apic = s[0]
    apic.mmio_write(c.REG_TPR, 4, 0x35)
    assert apic.mmio_read(c.REG_APR, 4) == 0x35
    apic.accept_fixed(0x61, False)
    assert apic.mmio_read(c.REG_APR, 4) == 0x60
    apic.ack(0x61)
    apic.accept_fixed(0x22, False)
    assert apic.mmio_read(c.REG_APR, 4) == 0x60


# ---- property: PPR definition and one in-service vector per priority class -------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("accept"), st.integers(16, 255), st.booleans()),
        st.tuples(st.just("tpr"), st.integers(0, 255), st.just(False)),
        st.tuples(st.just("inject"), st.just(0), st.just(False)),
        st.tuples(st.just("eoi"), st.just(0), st.just(False)),
        st.tuples(st.just("cr8"), st.integers(0, 15), st.just(False)),
    ),
    max_size=60,
)


def isr_vectors(apic):
    out = []
    for word in range(8):
        bits = apic.rdmsr(0x810 + word)
        out += [32 * word + b for b in range(32) if bits >> b & 1]
    return out


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_priority_invariants(ops):
    s = make_system(1, x2apic=True)
    apic = s[0]
    for op, arg, flag in ops:
        if op == "accept":
            assert apic.accept_fixed(arg, flag)
        elif op == "tpr":
            apic.wrmsr(0x808, arg)
        elif op == "cr8":
            apic.set_cr8(arg)
        elif op == "inject":
            v = apic.pending_vector()
            if v is not None:
                in_service = isr_vectors(apic)
                assert all((v >> 4) > (w >> 4) for w in in_service)  # preemption by class
                apic.ack(v)
        else:
            apic.wrmsr(0x80B, 0)
        in_service = isr_vectors(apic)
        classes = [v >> 4 for v in in_service]
        assert len(classes) == len(set(classes)), "two in-service vectors share a class"
        tpr = apic.rdmsr(0x808)
        isrv = max(in_service, default=0)
        expect = tpr if (tpr >> 4) >= (isrv >> 4) else isrv & 0xF0
        assert apic.rdmsr(0x80A) == expect  # SDM 10.8.3.1
        v = apic.pending_vector()
        irr = [x for x in range(256) if apic.irr[x]]
        top = max(irr, default=-1)
        assert v == (top if top >= 0 and (top >> 4) > (expect >> 4) else None)
