"""Non-vectored events, errors, software disable, and cross-thread delivery
(SDM 10.4.7, 10.5.3, 10.6.1, 10.9)."""

import sys
import threading

import pytest

from kvmpy.apic import (
    ESR_RECV_ILLEGAL_VECTOR,
    ESR_SEND_ILLEGAL_VECTOR,
    MSR_X2APIC_SELF_IPI,
)
from kvmpy.apic import constants as c
from kvmpy.apic.lapic import ACCEPT_REJECTED, ACCEPT_SET
from kvmpy.apic.testing import make_system, read_reg, send, write_reg


def test_nmi_smi_take():
    s = make_system(1)
    apic = s[0]
    assert not apic.has_pending_events()
    apic.accept_nmi()
    apic.accept_nmi()  # counted, as KVM's nmi_queued: KVM_NMI collapses beyond 1+1
    apic.accept_smi()
    assert apic.has_pending_events()
    assert apic.take_nmi() is True and apic.take_nmi() is True
    assert apic.take_nmi() is False
    assert apic.take_smi() is True and not apic.has_pending_events()
    assert apic.stats["nmi_received"] == 2


def test_power_up_wait_for_sipi():
    """APs wait for SIPI after power-up; the BSP runs (SDM 8.4.1)."""
    s = make_system(2)
    assert s[0].wait_for_sipi is False and s[1].wait_for_sipi is True
    s[1].accept_sipi(0x10)
    assert s[1].has_pending_events()
    assert s[1].take_sipi() == 0x10 and s[1].wait_for_sipi is False
    s[1].accept_sipi(0x20)  # running: ignored
    assert s[1].take_sipi() is None and s[1].stats["sipi_ignored"] == 1


@pytest.mark.parametrize("x2apic", [False, True])
def test_init_sipi_sequence(x2apic):
    """SDM 8.4.4.1 / 10.4.7.3: INIT resets the APIC (ID and mode kept) and puts an AP in
    wait-for-SIPI; the SIPI vector is then delivered once."""
    s = make_system(2, x2apic=x2apic)
    ap = s[1]
    ap.take_sipi()
    write_reg(ap, c.REG_TPR, 0x40)
    ap.accept_fixed(0x80, False)
    ap.accept_nmi()
    send(s[0], (c.DM_INIT << 8) | c.ICR_LEVEL_ASSERT, 1)
    send(s[0], (c.DM_SIPI << 8) | 0x9F, 1)  # arrives before the AP processed INIT: kept
    assert ap.take_sipi() is None  # INIT first
    assert ap.take_init() is True and ap.take_init() is False
    assert ap.wait_for_sipi and not ap.nmi_pending
    assert ap.mode.name == ("X2APIC" if x2apic else "XAPIC")
    assert read_reg(ap, c.REG_ID) == (1 if x2apic else 1 << 24)
    assert read_reg(ap, c.REG_TPR) == 0 and read_reg(ap, c.REG_SVR) == 0xFF
    assert ap.irr.rfind(1) == -1
    assert ap.take_sipi() == 0x9F and ap.take_sipi() is None
    assert not ap.wait_for_sipi


def test_init_on_bsp_does_not_wait_for_sipi():
    s = make_system(2)
    s[0].accept_init()
    assert s[0].take_init() and not s[0].wait_for_sipi
    s[0].accept_sipi(0x10)
    assert s[0].take_sipi() is None


def test_esr_write_then_read():
    """SDM 10.5.3: a write to ESR makes the errors since the previous write readable."""
    s = make_system(2)
    apic = s[0]
    send(apic, 0x05, 1)  # send illegal vector
    assert apic.mmio_read(c.REG_ESR, 4) == 0
    apic.mmio_write(c.REG_ESR, 4, 0x1234)  # value written does not matter in xAPIC
    assert apic.mmio_read(c.REG_ESR, 4) == ESR_SEND_ILLEGAL_VECTOR
    apic.accept_fixed(0x07, False)  # receive illegal vector
    assert apic.mmio_read(c.REG_ESR, 4) == ESR_SEND_ILLEGAL_VECTOR
    apic.mmio_write(c.REG_ESR, 4, 0)
    assert apic.mmio_read(c.REG_ESR, 4) == ESR_RECV_ILLEGAL_VECTOR
    apic.mmio_write(c.REG_ESR, 4, 0)
    assert apic.mmio_read(c.REG_ESR, 4) == 0


def test_receive_illegal_vector_sets_no_irr():
    """SDM 10.5.3: receiving vector 0-15 sets ESR bit 6 and no IRR bit."""
    s = make_system(1, x2apic=True)
    apic = s[0]
    for v in range(16):
        assert apic.accept_fixed(v, False) == ACCEPT_REJECTED
    assert apic.irr.rfind(1) == -1
    apic.wrmsr(0x828, 0)
    assert apic.rdmsr(0x828) == ESR_RECV_ILLEGAL_VECTOR
    assert apic.stats["illegal_vector_received"] == 16


def test_self_ipi_illegal_vector_is_receive_error():
    s = make_system(1, x2apic=True)
    s[0].wrmsr(MSR_X2APIC_SELF_IPI, 0x3)
    s[0].wrmsr(0x828, 0)
    assert s[0].rdmsr(0x828) == ESR_RECV_ILLEGAL_VECTOR
    assert s[0].irr.rfind(1) == -1


@pytest.mark.parametrize("x2apic", [False, True])
def test_error_lvt_interrupt(x2apic):
    """SDM 10.5.3: a detected error raises the LVT error interrupt when unmasked."""
    s = make_system(2, x2apic=x2apic)
    apic = s[0]
    send(apic, 0x01, 1)
    assert apic.irr.rfind(1) == -1  # error LVT masked at reset
    write_reg(apic, c.REG_LVT_ERROR, 0xFE)
    send(apic, 0x01, 1)
    assert apic.pending_vector() == 0xFE
    assert s[1].accept_fixed(0x02, False) == ACCEPT_REJECTED  # target's error LVT still masked
    write_reg(s[1], c.REG_LVT_ERROR, 0xFD)
    assert s[1].accept_fixed(0x02, False) == ACCEPT_SET
    assert s[1].pending_vector() == 0xFD


def test_error_lvt_with_illegal_vector_does_not_recurse():
    s = make_system(1)
    apic = s[0]
    apic.mmio_write(c.REG_LVT_ERROR, 4, 0x05)
    assert apic.accept_fixed(0x03, False) == ACCEPT_REJECTED
    assert apic.irr.rfind(1) == -1
    apic.mmio_write(c.REG_ESR, 4, 0)
    assert apic.mmio_read(c.REG_ESR, 4) == ESR_RECV_ILLEGAL_VECTOR


@pytest.mark.parametrize("x2apic", [False, True])
def test_software_disable(x2apic):
    """SDM 10.4.7.2: SVR[8]=0 masks all LVTs, keeps them masked, refuses fixed
    interrupts, still accepts NMI and still sends IPIs."""
    s = make_system(2, x2apic=x2apic)
    apic = s[0]
    for i in range(c.LVT_COUNT):
        write_reg(apic, c.REG_LVT_TIMER + 0x10 * i, 0x40 + i)
    write_reg(apic, c.REG_SVR, 0x0FF)
    for i in range(c.LVT_COUNT):
        assert read_reg(apic, c.REG_LVT_TIMER + 0x10 * i) == c.LVT_MASKED | (0x40 + i)
    write_reg(apic, c.REG_LVT_ERROR, 0x50)
    assert read_reg(apic, c.REG_LVT_ERROR) == c.LVT_MASKED | 0x50
    assert apic.accept_fixed(0x60, False) == ACCEPT_REJECTED and apic.irr[0x60] == 0
    apic.accept_nmi()
    assert apic.has_pending_events()
    send(apic, 0x61, 1)
    assert s[1].irr[0x61] == 1
    write_reg(apic, c.REG_SVR, 0x1FF)
    write_reg(apic, c.REG_LVT_ERROR, 0x50)
    assert read_reg(apic, c.REG_LVT_ERROR) == 0x50


def test_pending_vector_needs_sw_enable():
    s = make_system(1)
    s[0].accept_fixed(0x70, False)
    s[0].mmio_write(c.REG_SVR, 4, 0xFF)
    assert s[0].pending_vector() is None
    assert s[0].irr[0x70] == 1  # held (SDM 10.4.7.2)


def test_concurrent_ipis_are_all_published_before_notify():
    """Four sender threads hammer one target through the fast ICR path: at every notify
    the sender's vector is already in the target's IRR, nothing is lost, and the
    receive counter is exact (no lost increments)."""
    s = make_system(5, x2apic=True)
    target = s[4]
    last_sent = {}
    errors = []

    def notify(index):
        v = last_sent[threading.get_ident()]
        if index != 4 or not target.irr[v]:
            errors.append((index, v))

    s.bus.notify = notify
    per_thread = 3000

    def sender(i):
        apic = s[i]
        me = threading.get_ident()
        for n in range(per_thread):
            v = 0x40 + 0x20 * i + (n & 0x1F)
            last_sent[me] = v
            assert apic.icr_write_x2apic_fast((4 << 32) | v)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the senders as much as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == []
    assert [v for v in range(256) if target.irr[v]] == list(range(0x40, 0xC0))
    assert target.stats["ipi_received"] == 4 * per_thread
    assert sum(s[i].stats["ipi_sent"] for i in range(4)) == 4 * per_thread
