"""The core's kvm_queue_interrupt (kvmpy/native/vcpu_loop.c) on a real vCPU: an interrupt
queued in kvm_run.s.regs.events (KVM_CAP_SYNC_REGS) is delivered by the next KVM_RUN; a
vCPU ioctl from Python first hands it to KVM by KVM_INTERRUPT; without a snapshot taken
at an exit, or without the capability, the ioctl is used.

The guest is real-mode code: `out 0x10` then `jmp $` at 0x1000, and a handler for vector
0x30 (IVT entry at 0xC0) at 0x2000: `out 0x11` then `jmp $`. A port-0x11 exit proves the
interrupt was delivered.
"""

from __future__ import annotations

import gc
import struct
import threading
from collections.abc import Iterator

import pytest
from conftest import RealModeGuest

from kvmpy import _core as nc
from kvmpy.kvm import ioctls as k

CODE, HANDLER, VECTOR = 0x1000, 0x2000, 0x30
BOUND_S = 5.0
OUT_JMP = bytes([0xE6, 0x10, 0xEB, 0xFE])      # out 0x10, al; jmp $
HANDLER_CODE = bytes([0xE6, 0x11, 0xEB, 0xFE])  # out 0x11, al; jmp $


class RealModeVcpu:
    def __init__(self, sync_events: bool) -> None:
        self.guest = RealModeGuest({CODE: OUT_JMP, HANDLER: HANDLER_CODE,
                                    VECTOR * 4: struct.pack("<HH", HANDLER, 0)},  # IVT
                                   rip=CODE, rsp=0x8000)
        self.fd = self.guest.fd
        self.sync_supported = bool(self.guest.kvm.check_extension(k.KVM_CAP_SYNC_REGS)
                                   & k.KVM_SYNC_X86_EVENTS)
        self.core = nc.Core(1, 2)
        self.core.set(sync_events=int(sync_events and self.sync_supported))
        self.bufs = {"irr": bytearray(256), "isr": bytearray(256), "tmr": bytearray(256),
                     "regs": bytearray(nc.REGS_BYTES), "stats": bytearray(nc.S_NWORDS * 8)}
        self.stats = memoryview(self.bufs["stats"]).cast("Q")
        b = self.bufs
        self.core.attach(0, self.fd.fd, self.fd.mapping, b["irr"], b["isr"], b["tmr"],
                         b["regs"], b["stats"])

    def run_to_port(self) -> int:
        """core.run until an exit for Python; the port of that I/O exit. A guest left
        spinning (an interrupt never delivered) is stopped after BOUND_S and fails."""
        got: list[tuple[int, ...]] = []
        t = threading.Thread(target=lambda: got.append(self.core.run(0)))
        t.start()
        t.join(BOUND_S)
        if t.is_alive():
            self.core.stop()
            t.join(BOUND_S)
            pytest.fail("no exit for Python: the guest is still spinning at `jmp $`")
        ret, reason, port, _, _, _, _ = got[0]
        assert ret == nc.RET_EXIT and reason == k.KVM_EXIT_IO, (ret, reason)
        return port

    def injected(self) -> tuple[int, int]:
        return self.stats[nc.S_INJECT_SYNC], self.stats[nc.S_INJECT_IOCTL]

    def close(self) -> None:
        self.core.stop()
        self.stats.release()
        del self.core
        gc.collect()
        self.guest.close()


@pytest.fixture
def vcpu() -> Iterator[RealModeVcpu]:
    v = RealModeVcpu(sync_events=True)
    if not v.sync_supported:
        v.close()
        pytest.skip("this KVM has no KVM_CAP_SYNC_REGS with KVM_SYNC_X86_EVENTS")
    try:
        yield v
    finally:
        v.close()


@pytest.mark.kvm
def test_an_interrupt_queued_in_kvm_run_is_delivered_by_the_next_kvm_run(
        vcpu: RealModeVcpu) -> None:
    assert vcpu.run_to_port() == 0x10  # KVM stored the events at this exit
    vcpu.core.queue_interrupt(0, VECTOR)
    assert vcpu.injected() == (1, 0)  # no ioctl: it rides on KVM_RUN
    assert vcpu.run_to_port() == 0x11  # the handler ran


@pytest.mark.kvm
def test_a_vcpu_ioctl_first_hands_the_queued_interrupt_to_kvm(vcpu: RealModeVcpu) -> None:
    assert vcpu.run_to_port() == 0x10
    vcpu.core.queue_interrupt(0, VECTOR)
    vcpu.core.events_changed(0)  # what VcpuFd.before_ioctl does before any vCPU ioctl
    assert vcpu.injected() == (0, 1)
    events = vcpu.fd.get_vcpu_events()
    assert events.interrupt.injected == 1 and events.interrupt.nr == VECTOR
    # The snapshot is stale now: the next queue would use the ioctl too; the queued one
    # is delivered once.
    assert vcpu.run_to_port() == 0x11


@pytest.mark.kvm
def test_without_an_exit_since_the_snapshot_is_not_trusted(vcpu: RealModeVcpu) -> None:
    vcpu.core.queue_interrupt(0, VECTOR)  # before any KVM_RUN: no snapshot
    assert vcpu.injected() == (0, 1)
    assert vcpu.run_to_port() == 0x11  # delivered at the first entry


@pytest.mark.kvm
def test_without_sync_events_the_ioctl_is_used() -> None:
    v = RealModeVcpu(sync_events=False)
    try:
        assert v.run_to_port() == 0x10
        v.core.queue_interrupt(0, VECTOR)
        assert v.injected() == (0, 1)
        assert v.run_to_port() == 0x11
    finally:
        v.close()


def test_queue_interrupt_checks_its_arguments() -> None:
    core = nc.Core(1, 2)
    with pytest.raises(ValueError, match="not attached"):
        core.queue_interrupt(0, VECTOR)
    with pytest.raises(ValueError, match="not attached"):
        core.events_changed(0)


@pytest.mark.kvm
def test_a_sipi_start_drops_an_interrupt_queued_before_the_init(vcpu: RealModeVcpu) -> None:
    from kvmpy.boot.cpu import setup_real_mode_sipi

    assert vcpu.run_to_port() == 0x10
    vcpu.core.queue_interrupt(0, VECTOR)  # acked by the APIC, queued for the next entry
    vcpu.fd.before_ioctl = lambda: vcpu.core.events_changed(0)  # as Vcpu.attach_core does
    setup_real_mode_sipi(vcpu.fd, CODE >> 12)  # INIT, then SIPI: CS:IP = 0x100:0
    vcpu.fd.before_ioctl = None
    assert vcpu.injected() == (0, 1)  # handed to KVM first, then dropped by the reset
    events = vcpu.fd.get_vcpu_events()
    assert events.interrupt.injected == 0 and events.nmi.injected == 0
    assert vcpu.run_to_port() == 0x10  # the SIPI's code runs; the handler does not


@pytest.mark.kvm
def test_kvmpy_info_names_the_injection_route() -> None:
    import subprocess
    import sys

    from kvmpy.kvm import Kvm

    r = subprocess.run([sys.executable, "-m", "kvmpy", "info"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kvm = Kvm.open()
    try:
        sync = kvm.check_extension(k.KVM_CAP_SYNC_REGS)
    finally:
        kvm.close()
    route = "kvm_run.s.regs" if sync & k.KVM_SYNC_X86_EVENTS else "KVM_INTERRUPT"
    assert f"KVM_CAP_SYNC_REGS: {sync:#x}; interrupts injected by {route}" in r.stdout
