"""Exit handling: the early fastpath and the full dispatch.

`handle_exit_irqoff(vcpu, exit)` is the seed's fastpath (KVM's
`vmx_handle_exit_irqoff` / `handle_fastpath_set_msr_irqoff`, today
`__handle_fastpath_wrmsr`). It runs right after KVM_RUN returns, before the VM-wide
exit lock (kvmpy's srcu_read_lock), before stats and tracing, and handles every ICR
write: x2APIC MSR 0x830, SELF_IPI 0x83f, the TSC-deadline MSR, and (beyond upstream)
the xAPIC ICR-low MMIO write, and the x2APIC timer registers (LVT timer, initial count,
divide). Beyond the ICR it completes the two other exits of every interrupt's round
trip that a userspace APIC adds: the EOI write (x2APIC MSR 0x80b, xAPIC MMIO 0xb0) of an
edge-triggered vector, and HLT with a wake-up already pending (upstream's
`handle_fastpath_hlt`: re-enter at once; otherwise the vCPU halts, EXIT_HANDLED). It
returns a `Fastpath`, never a fake exit reason.

Contract for a failed fast attempt (upstream `kvm_x2apic_icr_write_fast`): reserved
bits are checked first, and a write that would #GP returns NONE with no side effect,
so the slow path below injects the #GP.

`handle_exit(vcpu, exit, fastpath)` is the ordinary dispatch: one handler per exit
reason, called with the VM-wide exit lock held.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy.apic import (
    MSR_APIC_BASE,
    MSR_TSC_DEADLINE,
    MSR_X2APIC_ICR,
    MSR_X2APIC_SELF_IPI,
    X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
    ApicGP,
    ApicMode,
)
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr

if TYPE_CHECKING:
    from kvmpy.vcpu import Exit, Vcpu

log = logging.getLogger("kvmpy.exits")

XAPIC_ICR_LOW = 0x300
XAPIC_EOI = 0x0B0
XAPIC_PAGE_SIZE = 0x1000
MSR_X2APIC_EOI = 0x80B


class Fastpath(enum.Enum):
    """What the fastpath did with an exit (upstream's `fastpath_t`)."""

    NONE = 0  # not handled: run the full dispatch
    REENTER_GUEST = 1  # fully handled: re-enter the guest at once
    EXIT_HANDLED = 2  # handled, but go through the outer loop (handle_exit returns early)


_NONE = Fastpath.NONE
_REENTER = Fastpath.REENTER_GUEST
_HANDLED = Fastpath.EXIT_HANDLED
# Module-level names for the fastpath's comparisons: one global load each, not two.
_WRMSR = k.KVM_EXIT_X86_WRMSR
_MMIO = k.KVM_EXIT_MMIO
_INTR = k.KVM_EXIT_INTR
_HLT = k.KVM_EXIT_HLT
_XAPIC = ApicMode.XAPIC
_X2APIC = ApicMode.X2APIC
_MMIO_DATA_U32 = kr.MMIO_DATA // 4
# TSC_DEADLINE, and the x2APIC LVT timer (0x832), initial count (0x838) and divide
# configuration (0x83e) registers.
_TIMER_MSRS = frozenset((MSR_TSC_DEADLINE, 0x832, 0x838, 0x83E))


def handle_exit_irqoff(vcpu: Vcpu, exit: Exit) -> Fastpath:
    """The early fastpath. Hot: no lock, no logging, no allocation it can avoid."""
    reason = exit[0]
    if reason == _WRMSR:
        if not vcpu.fastpath_enabled:
            return _NONE
        index = exit[1]
        apic = vcpu.apic
        try:
            if index == MSR_X2APIC_ICR:
                if apic.icr_write_x2apic_fast(exit[2]):
                    vcpu.stats.icr_fast += 1
                    return _REENTER
                return _NONE
            if index == MSR_X2APIC_SELF_IPI:
                if apic.self_ipi_fast(exit[2]):
                    vcpu.stats.icr_fast += 1
                    return _REENTER
                return _NONE
        except Exception as exc:  # noqa: BLE001 - see delivery_failed
            delivery_failed(vcpu, exc)
            return _REENTER
        if index == MSR_X2APIC_EOI:
            # A nonzero write #GPs (SDM 10.12.1.2): the slow path injects it.
            if exit[2] == 0 and apic.mode is _X2APIC and apic.eoi_fast():
                return _REENTER
            return _NONE
        if index in _TIMER_MSRS:
            # The timer registers (upstream: the TSC-deadline fastpath): a write that
            # would #GP raises before it changes anything, and goes to the slow path.
            try:
                apic.wrmsr(index, exit[2])
            except ApicGP:
                return _NONE
            vcpu.sync_timer()
            return _REENTER
        return _NONE
    if reason == _MMIO:
        if not vcpu.fastpath_enabled or not exit[3]:
            return _NONE
        apic = vcpu.apic
        offset = exit[1] - apic.base_address
        if offset == XAPIC_EOI and exit[2] == 4 and apic.mode is _XAPIC:
            return _REENTER if apic.eoi_fast() else _NONE
        if offset == XAPIC_ICR_LOW and exit[2] == 4 and apic.mode is _XAPIC:
            value = vcpu.view.u32[_MMIO_DATA_U32]
            try:
                if apic.icr_write_xapic_fast(value):
                    vcpu.stats.icr_fast += 1
                    return _REENTER
                return _NONE
            except Exception as exc:  # noqa: BLE001 - see delivery_failed
                delivery_failed(vcpu, exc)
                return _REENTER
        return _NONE
    if reason == _INTR:
        # A kick: the request it carries is picked up by the injection at the loop top.
        return _REENTER
    if reason == _HLT and vcpu.fastpath_enabled:
        # handle_fastpath_hlt: KVM has stepped past the HLT. With a wake-up event already
        # pending the halt is over (the loop top injects it); else halt, and let the
        # outer loop block.
        if vcpu.wakeup_pending_at_hlt():
            return _REENTER
        vcpu.halt()
        return _HANDLED
    return _NONE


_warned_delivery = False


def delivery_failed(vcpu: Vcpu, exc: Exception) -> None:
    """An ICR write that passed the reserved-bit check cannot fail (seed, Sean: "we can
    get away with a WARN"). If delivery raises anyway it is a kvmpy bug: warn once,
    count it, and let the guest go on (the write completes, as on hardware)."""
    global _warned_delivery
    vcpu.stats.delivery_failures += 1
    if not _warned_delivery:
        _warned_delivery = True
        log.warning("vCPU %d: IPI delivery failed (a kvmpy bug): %r", vcpu.index, exc)


def handle_exit(vcpu: Vcpu, exit: Exit, fastpath: Fastpath) -> None:
    """The full dispatch (KVM's `vmx_handle_exit`), with the VM-wide exit lock held."""
    if fastpath is not Fastpath.NONE:
        return  # handled early (upstream: `if (exit_fastpath != EXIT_FASTPATH_NONE) return 1`)
    handler = EXIT_HANDLERS.get(exit[0], handle_unexpected)
    handler(vcpu, exit)


# ------------------------------------------------------------------ port and MMIO I/O


def handle_io(vcpu: Vcpu, exit: Exit) -> None:
    """KVM_EXIT_IO: `count` accesses of `size` bytes at `data_offset` in kvm_run."""
    _, port, size, direction = exit
    view = vcpu.view
    count = view.u32[kr.IO_COUNT]
    offset = view.u64[kr.IO_DATA_OFFSET]
    bus = vcpu.machine.pio_bus
    data = view.u8
    if size not in (1, 2, 4) or offset + count * size > len(data):
        vcpu.machine.guest_crash(vcpu, f"malformed I/O exit (size {size}, count {count})")
        return
    for i in range(count):
        at = offset + i * size
        if direction == k.KVM_EXIT_IO_OUT:
            bus.write(port, size, int.from_bytes(data[at : at + size], "little"))
        else:
            data[at : at + size] = bus.read(port, size).to_bytes(size, "little")


def handle_mmio(vcpu: Vcpu, exit: Exit) -> None:
    """KVM_EXIT_MMIO: the xAPIC page of this vCPU's APIC, else the MMIO bus."""
    _, addr, length, is_write = exit
    data = vcpu.view.u8
    if length not in (1, 2, 4, 8):
        length = min(max(length, 1), 8)
    apic = vcpu.apic
    mask = (1 << (8 * length)) - 1
    if apic is not None and apic.mode is ApicMode.XAPIC \
            and 0 <= addr - apic.base_address < XAPIC_PAGE_SIZE:
        offset = addr - apic.base_address
        if is_write and offset == XAPIC_ICR_LOW:
            vcpu.stats.icr_slow += 1
        if is_write:
            value = int.from_bytes(data[kr.MMIO_DATA : kr.MMIO_DATA + length], "little")
            apic.mmio_write(offset, length, value)
            vcpu.after_apic_write()
        else:
            value = apic.mmio_read(offset, length) & mask
            data[kr.MMIO_DATA : kr.MMIO_DATA + length] = value.to_bytes(length, "little")
        return
    bus = vcpu.machine.mmio_bus
    if is_write:
        bus.write(addr, length, int.from_bytes(data[kr.MMIO_DATA : kr.MMIO_DATA + length],
                                               "little"))
    else:
        value = bus.read(addr, length) & mask
        data[kr.MMIO_DATA : kr.MMIO_DATA + length] = value.to_bytes(length, "little")


# ------------------------------------------------------------------ MSRs


def _is_apic_msr(index: int) -> bool:
    return (X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST or index == MSR_APIC_BASE
            or index == MSR_TSC_DEADLINE)


def handle_rdmsr(vcpu: Vcpu, exit: Exit) -> None:
    """KVM_EXIT_X86_RDMSR: the APIC's MSRs; any other MSR gets #GP (msr.error = 1)."""
    index = exit[1]
    view = vcpu.view
    apic = vcpu.apic
    vcpu.stats.count_msr("rd", index)
    if apic is not None and _is_apic_msr(index):
        try:
            view.u64[kr.MSR_DATA] = apic.rdmsr(index) & 0xFFFF_FFFF_FFFF_FFFF
            view.u8[kr.MSR_ERROR] = 0
            return
        except ApicGP:
            pass
    view.u8[kr.MSR_ERROR] = 1


def handle_wrmsr(vcpu: Vcpu, exit: Exit) -> None:
    """KVM_EXIT_X86_WRMSR. The slow x2APIC path: an ICR write that reaches it with the
    fastpath on was refused there (reserved bits), so `apic.wrmsr` raises the #GP; ICR2
    (0x831) and DFR (0x80e) #GP as the SDM says they do not exist in x2APIC mode."""
    _, index, value, _ = exit
    view = vcpu.view
    apic = vcpu.apic
    vcpu.stats.count_msr("wr", index)
    if index == MSR_X2APIC_ICR or index == MSR_X2APIC_SELF_IPI:
        vcpu.stats.icr_slow += 1
    if apic is not None and _is_apic_msr(index):
        try:
            apic.wrmsr(index, value)
        except ApicGP:
            view.u8[kr.MSR_ERROR] = 1
            return
        view.u8[kr.MSR_ERROR] = 0
        if index == MSR_APIC_BASE:
            vcpu.apic_base_changed()
        vcpu.after_apic_write()
        return
    view.u8[kr.MSR_ERROR] = 1


# ------------------------------------------------------------------ CPU state exits


def handle_hlt(vcpu: Vcpu, exit: Exit) -> None:
    vcpu.halt()


def handle_nothing(vcpu: Vcpu, exit: Exit) -> None:
    """IRQ window open / a kick: the loop top injects what is pending."""


def handle_shutdown(vcpu: Vcpu, exit: Exit) -> None:
    vcpu.machine.guest_crash(vcpu, "triple fault (KVM_EXIT_SHUTDOWN)")


def handle_internal_error(vcpu: Vcpu, exit: Exit) -> None:
    internal = vcpu.fd.run_struct.exit.internal
    names = {
        k.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
        k.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
        k.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
        k.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
    }
    if internal.suberror == k.KVM_INTERNAL_ERROR_EMULATION and invalid_opcode_to_ud(vcpu):
        return
    what = names.get(internal.suberror, f"suberror {internal.suberror}")
    vcpu.machine.guest_crash(vcpu, f"KVM internal error: {what}")


def invalid_opcode_to_ud(vcpu: Vcpu) -> bool:
    """KVM's emulator failed on bytes that are no instruction at all: inject #UD.

    On kvm_pvm every CPL0 instruction goes through KVM's emulator, and KVM hands an
    emulation failure at CPL0 to the VMM (x86.c handle_emulation_failure) instead of
    guessing. Where capstone finds no instruction at RIP either, the architectural
    answer is an invalid-opcode exception (SDM Vol. 3A 6.15, "Interrupt 6"), as the CPU
    (or KVM itself, at CPL>0) would give. A real instruction the emulator cannot run
    (SSE, XSAVE, ...) still stops the VM with the diagnostic."""
    from kvmpy.diagnose import code_at_rip, is_invalid_opcode

    try:
        _, rip, mode, code = code_at_rip(vcpu)
    except OSError:
        return False
    if code is None or not is_invalid_opcode(code, rip, mode):
        return False
    events = vcpu.fd.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = UD_VECTOR
    events.exception.has_error_code = 0
    events.exception.pending = 0
    events.flags = 0
    vcpu.fd.set_vcpu_events(events)
    vcpu.stats.invalid_opcodes += 1
    return True


UD_VECTOR = 6


def handle_fail_entry(vcpu: Vcpu, exit: Exit) -> None:
    reason = vcpu.fd.run_struct.exit.fail_entry.hardware_entry_failure_reason
    vcpu.machine.guest_crash(vcpu, f"VM entry failed (hardware reason {reason:#x})")


def handle_system_event(vcpu: Vcpu, exit: Exit) -> None:
    ev = vcpu.fd.run_struct.exit.system_event.type
    if ev == 1:  # KVM_SYSTEM_EVENT_SHUTDOWN
        vcpu.machine.stop(0, f"vCPU {vcpu.index}: guest powered off")
    elif ev == 2:  # KVM_SYSTEM_EVENT_RESET
        vcpu.machine.stop(0, f"vCPU {vcpu.index}: guest requested a reset (not supported)")
    else:
        vcpu.machine.guest_crash(vcpu, f"system event {ev}")


def handle_unexpected(vcpu: Vcpu, exit: Exit) -> None:
    name = k.EXIT_REASON_NAMES.get(exit[0], str(exit[0]))
    vcpu.machine.guest_crash(vcpu, f"unhandled exit reason {name} ({exit[0]})")


EXIT_HANDLERS: dict[int, Callable[[Vcpu, Exit], None]] = {
    k.KVM_EXIT_IO: handle_io,
    k.KVM_EXIT_MMIO: handle_mmio,
    k.KVM_EXIT_X86_RDMSR: handle_rdmsr,
    k.KVM_EXIT_X86_WRMSR: handle_wrmsr,
    k.KVM_EXIT_HLT: handle_hlt,
    k.KVM_EXIT_IRQ_WINDOW_OPEN: handle_nothing,
    k.KVM_EXIT_INTR: handle_nothing,
    k.KVM_EXIT_SHUTDOWN: handle_shutdown,
    k.KVM_EXIT_INTERNAL_ERROR: handle_internal_error,
    k.KVM_EXIT_FAIL_ENTRY: handle_fail_entry,
    k.KVM_EXIT_SYSTEM_EVENT: handle_system_event,
}
