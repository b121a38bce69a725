"""The vCPU thread: run loop, event injection, halt, and the race-free kick.

The loop mirrors KVM's `vcpu_enter_guest` and the seed's design (DESIGN.md, "The exit
path"):

    inject pending events
    exit = self.run()                        # returns the exit; nothing else stores it
    fp = handle_exit_irqoff(self, exit)      # fastpath: no VM lock, no stats, no dispatch
    if fp is REENTER_GUEST and nothing requested: continue
    with vm.exit_lock:                       # the srcu_read_lock analogue
        handle_exit(self, exit, fp)          # full dispatch

Kick protocol (Documentation/virt/kvm/vcpu-requests.rst, "Ensuring Requests Are Seen"):
a sender first publishes the request (IRR bit, pending NMI/INIT/SIPI) and sets
`self.request_event`, THEN reads `self.mode`; if the target is IN_GUEST it writes
`immediate_exit = 1` into the target's kvm_run and sends it a signal; if the target is
POLLING (halt polling, below) it does nothing more: the poller sees `request_event`;
if the target is BLOCKED (halted, or an AP waiting for SIPI) it leaves a token on the
target's `wake`. The target stores `mode = IN_GUEST` and THEN re-checks `request_event`
before KVM_RUN; a halted target stores `mode = POLLING` or `BLOCKED` and THEN re-checks
its pending events before it spins or sleeps. Python
runs these loads and stores one at a time under the GIL (sequentially consistent), so
of "sender reads mode" and "target re-checks the request" at least one sees the other's
store: either the target sees the request and does not enter, or the sender sees
IN_GUEST and kicks; immediate_exit covers a signal that lands before KVM_RUN starts.
`tests/test_kick_model.py` enumerates every interleaving of the two to check this.

Halt polling (KVM's `kvm_vcpu_halt`, virt/kvm/kvm_main.c): a vCPU that halts first
spins for up to `halt_poll_ns` (adaptive, grown and shrunk as KVM's
`grow_halt_poll_ns` / `shrink_halt_poll_ns` do) watching `request_event`, releasing the
GIL between looks, and only then sleeps. A wake-up inside the window costs the sender
one attribute store instead of a futex wake and the target no scheduler round trip,
which is why KVM's in-kernel halt is fast. As KVM polls only when nothing else wants
the CPU (`single_task_running`), a vCPU polls only while no more vCPU threads are busy
than the host has cores. It is off by default (`--halt-poll-ns 0`): in Python the
poller re-takes the GIL between looks and starves the very sender it waits for (README,
"Where a round trip goes").
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy.exits import Fastpath, handle_exit, handle_exit_irqoff
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.kvm.system import VcpuFd
from kvmpy.trace import ExitStats
from kvmpy.tracing import recorder as tracing
from kvmpy.wake import WakeToken

if TYPE_CHECKING:
    from kvmpy.apic import LocalApic
    from kvmpy.machine import Machine
    from kvmpy.tracing.recorder import Ring

KICK_SIGNAL = signal.SIGUSR1
# KVM's halt-polling module parameters (virt/kvm/kvm_main.c), as on these hosts.
# Off by default: polling in Python re-takes the GIL between looks and starves the
# vCPU that is about to send the wake-up (README, "Where a round trip goes").
HALT_POLL_NS_DEFAULT = 0
HALT_POLL_GROW = 2
HALT_POLL_GROW_START_NS = 10_000
HALT_POLL_SHRINK = 2


# The vCPU whose thread this is (set by run_loop): a kick requested by its exit handling
# is posted to it and sent at its next KVM_RUN entry (`Vcpu.send_posted_kicks`).
_this_thread = threading.local()


class VcpuMode(enum.IntEnum):
    """Where the vCPU thread is, as the kick protocol sees it (KVM's vcpu->mode)."""

    OUTSIDE_GUEST = 0
    IN_GUEST = 1
    BLOCKED = 2  # sleeping on `wake` (halted, or waiting for SIPI)
    POLLING = 3  # halt polling: watching `request_event`; a kick need only set it


class VcpuState(enum.Enum):
    """Architectural run state (KVM's mp_state)."""

    RUNNABLE = "runnable"
    HALTED = "halted"
    WAIT_FOR_SIPI = "wait-for-SIPI"
    STOPPED = "stopped"


class Exit(tuple):
    """What `run()` returns: (reason, a, b, c), read once from kvm_run.

    KVM_EXIT_X86_RDMSR/WRMSR: (reason, msr index, data, msr exit reason)
    KVM_EXIT_MMIO:            (reason, physical address, length, is_write)
    KVM_EXIT_IO:              (reason, port, size, direction)
    anything else:            (reason, 0, 0, 0)
    A plain tuple subclass: building one per exit is the only allocation of the loop.
    """

    __slots__ = ()

    @property
    def reason(self) -> int:
        return self[0]

    def __repr__(self) -> str:
        name = k.EXIT_REASON_NAMES.get(self[0], str(self[0]))
        return f"Exit({name}, {self[1]:#x}, {self[2]:#x}, {self[3]})"


_EXIT_INTR = Exit((k.KVM_EXIT_INTR, 0, 0, 0))
_ICR_MSRS = (0x830, 0x83F)  # x2APIC ICR, SELF_IPI


def is_icr_write(exit: Exit) -> bool:
    """An x2APIC ICR / SELF_IPI wrmsr, or an MMIO write to an xAPIC ICR-low offset."""
    reason = exit[0]
    if reason == k.KVM_EXIT_X86_WRMSR:
        return exit[1] in _ICR_MSRS
    return reason == k.KVM_EXIT_MMIO and bool(exit[3]) and exit[1] & 0xFFF == 0x300


def _noop_kick_handler(signum: int, frame: object) -> None:
    """A real handler (SIG_IGN would discard the signal): its only job is that a kicked
    thread's KVM_RUN returns EINTR."""


def install_kick_handler() -> None:
    """Install the kick signal's handler (must run on the main thread, once)."""
    if signal.getsignal(KICK_SIGNAL) is not _noop_kick_handler:
        signal.signal(KICK_SIGNAL, _noop_kick_handler)


class Vcpu:
    """One virtual CPU: its KVM fd, its local APIC, and the thread that runs it."""

    def __init__(
        self,
        machine: Machine,
        index: int,
        fd: VcpuFd,
        apic: LocalApic | None,
        *,
        fastpath: bool,
        stats: ExitStats,
    ) -> None:
        self.machine = machine
        self.index = index
        self.fd = fd
        self.view = fd.view
        self.apic = apic
        self.fastpath_enabled = fastpath
        self.stats = stats
        self.state = VcpuState.RUNNABLE
        self.mode = VcpuMode.OUTSIDE_GUEST
        self.request_event = False  # KVM_REQ_EVENT: set by senders after publishing
        self.wake = WakeToken()
        # Kicks this vCPU's exit handling asked for, sent just before its next KVM_RUN
        # (or before it sleeps): the vCPUs to wake and the vCPUs to signal.
        self._posted_wakes: list[Vcpu] = []
        self._posted_signals: list[Vcpu] = []
        # Halt polling (KVM's vcpu->halt_poll_ns): the current window, adapted per halt
        # within [0, machine.halt_poll_max_ns].
        self.halt_poll_ns = 0
        self.thread: threading.Thread | None = None
        self.thread_ident = 0
        self._cr8 = 0
        self._timer_deadline: int | None = None
        self.halt_hook: Callable[[Vcpu], None] | None = None
        # This vCPU's trace ring (kvmpy.tracing), or None: each hook is one branch.
        self.tracer: Ring | None = None

    # ---------------------------------------------------------------- the run loop

    def run(self) -> Exit:
        """KVM_RUN, then read the exit once from kvm_run and return it."""
        u32 = self.view.u32
        ret = self.fd.run()
        self.mode = VcpuMode.OUTSIDE_GUEST
        if ret < 0:
            self.view.u8[kr.IMMEDIATE_EXIT] = 0  # a kick: EINTR is an ordinary exit
            return _EXIT_INTR
        reason = u32[kr.EXIT_REASON]
        if reason == k.KVM_EXIT_X86_WRMSR or reason == k.KVM_EXIT_X86_RDMSR:
            return Exit((reason, u32[kr.MSR_INDEX], self.view.u64[kr.MSR_DATA],
                         u32[kr.MSR_REASON]))
        if reason == k.KVM_EXIT_MMIO:
            return Exit((reason, self.view.u64[kr.MMIO_PHYS_ADDR], u32[kr.MMIO_LEN],
                         self.view.u8[kr.MMIO_IS_WRITE]))
        if reason == k.KVM_EXIT_IO:
            return Exit((reason, self.view.u16[kr.IO_PORT], self.view.u8[kr.IO_SIZE],
                         self.view.u8[kr.IO_DIRECTION]))
        return Exit((reason, 0, 0, 0))

    def run_loop(self) -> None:
        """The vCPU thread's body; returns when the VM stops."""
        self.thread_ident = threading.get_ident()
        _this_thread.vcpu = self
        machine = self.machine
        stats = self.stats
        record_time = stats.record_time
        clock = time.perf_counter_ns
        exit_lock = machine.exit_lock
        tr = self.tracer
        u8 = self.view.u8
        try:
            while not machine.stopping:
                if self.state is not VcpuState.RUNNABLE:
                    self._block_until_runnable()
                    continue
                # A kick that came while this vCPU was out of KVM_RUN (it exited on its
                # own, e.g. HLT): the request it carried is picked up below, and a set
                # immediate_exit would only cost an empty KVM_RUN round trip.
                u8[kr.IMMEDIATE_EXIT] = 0
                self.request_event = False
                self._inject_pending_events()
                # Publish IN_GUEST, then re-check requests (see the module docstring).
                self.mode = VcpuMode.IN_GUEST
                if self.request_event or machine.stopping or self.state is not VcpuState.RUNNABLE:
                    self.mode = VcpuMode.OUTSIDE_GUEST
                    continue
                if self._posted_wakes or self._posted_signals:
                    self.send_posted_kicks()
                t_enter = tracing.now_ns() if tr is not None else 0
                exit = self.run()
                if tr is not None:
                    tr.ran(t_enter, exit)
                t0 = clock() if record_time else 0
                fp = handle_exit_irqoff(self, exit)
                reason = exit[0]
                stats.count[reason] += 1
                if fp is Fastpath.REENTER_GUEST:
                    if tr is not None:
                        tr.rec(tracing.DONE, reason, 1)
                    stats.fast[reason] += 1
                    if record_time:
                        dt = clock() - t0
                        stats.fast_time[reason].add(dt)
                        if is_icr_write(exit):
                            stats.icr_fast_time.add(dt)
                    continue
                with exit_lock:
                    handle_exit(self, exit, fp)
                if tr is not None:
                    tr.rec(tracing.DONE, reason, fp.value)
                if record_time:
                    dt = clock() - t0
                    stats.slow_time[reason].add(dt)
                    if is_icr_write(exit):
                        stats.icr_slow_time.add(dt)
        finally:
            _this_thread.vcpu = None  # the thread may run other code later (tests)

    # ---------------------------------------------------------------- events

    def _inject_pending_events(self) -> None:
        """Inject what the local APIC has pending (KVM's inject_pending_event), or ask
        KVM for an interrupt window when the guest cannot take it yet."""
        apic = self.apic
        if apic is None:
            return
        u8 = self.view.u8
        cr8 = self.view.u64[kr.CR8]
        if cr8 != self._cr8:  # the guest wrote CR8 (64-bit mode): TPR follows
            apic.set_cr8(cr8)
            self._cr8 = cr8
        deadline = self._timer_deadline
        if deadline is not None and time.monotonic_ns() >= deadline:
            apic.timer_expired(time.monotonic_ns())
            self.sync_timer()
        if apic.init_pending and apic.take_init():
            self.machine.on_init(self)
            self.sync_cr8()
            return
        if apic.take_nmi():
            if self.tracer is not None:
                self.tracer.rec(tracing.INJECT, 2, 1)
            self.fd.nmi()
        if apic.smi_pending and apic.take_smi():
            self.stats.smi_dropped += 1  # no SMM is modelled: an SMI is counted and dropped
        vector = apic.pending_vector()
        extint = self.extint_pending()
        if vector is None and not extint:
            u8[kr.REQUEST_INTERRUPT_WINDOW] = 0
        elif u8[kr.READY_FOR_INJECTION] and u8[kr.IF_FLAG]:
            if extint:  # the 8259 before the APIC (KVM's kvm_cpu_get_interrupt)
                vector = self.machine.pic.acknowledge()
            else:
                apic.ack(vector)
            if self.tracer is not None:
                # before the ioctl, which releases the GIL: a send recorded after this
                # (during the ioctl) is one the injection cannot be for
                self.tracer.rec(tracing.INJECT, vector, 0)
            self.fd.interrupt(vector)
            # KVM holds one queued interrupt without an in-kernel irqchip and a second
            # KVM_INTERRUPT would replace the first (kvm_vcpu_ioctl_interrupt): until
            # KVM rewrites this flag at the next exit, ask for a window instead.
            u8[kr.READY_FOR_INJECTION] = 0
            u8[kr.REQUEST_INTERRUPT_WINDOW] = 0
        else:
            u8[kr.REQUEST_INTERRUPT_WINDOW] = 1

    def extint_pending(self) -> bool:
        """Is the 8259's INTR up, and does this vCPU's APIC take it (LINT0 ExtINT)?
        KVM's kvm_cpu_has_extint."""
        pic = getattr(self.machine, "pic", None)
        return pic is not None and pic.output and self.apic.accepts_pic_interrupts()

    def after_apic_write(self) -> None:
        """After a guest write to an APIC register (slow path): re-arm the host timer
        and give KVM the TPR as CR8 (kvm_run.cr8 is read at every KVM_RUN entry)."""
        self.sync_timer()
        self.sync_cr8()

    def sync_cr8(self) -> None:
        """kvm_run.cr8 = TPR[7:4] (SDM 10.8.6.1)."""
        apic = self.apic
        if apic is not None:
            self._cr8 = apic.cr8()
            self.view.u64[kr.CR8] = self._cr8

    def sync_timer(self) -> None:
        """Arm the VM's host timer for this APIC's next expiry if it changed."""
        apic = self.apic
        if apic is None:
            return
        deadline = apic.timer_deadline_ns()
        if deadline != self._timer_deadline:
            self._timer_deadline = deadline
            if deadline is not None:
                self.machine.timers.arm(self, deadline)

    def _wakeup_pending(self) -> bool:
        """Would this blocked vCPU wake now? (KVM's kvm_vcpu_has_events)."""
        apic = self.apic
        if apic is None:
            return False
        if self._timer_deadline is not None and time.monotonic_ns() >= self._timer_deadline:
            apic.timer_expired(time.monotonic_ns())
            self.sync_timer()
        if self.state is VcpuState.WAIT_FOR_SIPI:
            return apic.has_pending_events()
        if not apic.init_pending and self.wakeup_pending_at_hlt():
            return True  # the common wake-up first, without the full check below
        # HLT with IF=0 sleeps until NMI/INIT/SMI; a maskable interrupt wakes it only
        # if it could be taken (the IF flag as of the HLT exit).
        if apic.take_init():
            self.machine.on_init(self)
            return True
        if apic.nmi_pending:
            return True
        return apic.has_pending_events() and (
            bool(self.view.u8[kr.IF_FLAG]) or apic.pending_vector() is None
        )

    def _block_until_runnable(self) -> None:
        """Sleep while halted or waiting for SIPI, until an event or the VM stops.

        A halted vCPU first polls (`_poll_halt`); the adaptive window follows KVM's
        kvm_vcpu_halt: unchanged after a wake-up inside it, grown after a short halt
        that outlasted it, shrunk after a halt longer than the maximum."""
        machine = self.machine
        tr = self.tracer
        if self._posted_wakes or self._posted_signals:
            self.send_posted_kicks()
        if tr is not None:
            tr.rec(tracing.BLOCK, 2 if self.state is VcpuState.WAIT_FOR_SIPI else 1, 0)
        self.wake.clear()
        poll_ns = self.halt_poll_ns
        halted = self.state is VcpuState.HALTED
        start = time.monotonic_ns() if halted else 0
        if halted and poll_ns and machine.may_poll() and self._poll_halt(start + poll_ns):
            self.stats.halt_poll_success += 1
            if tr is not None:
                tr.rec(tracing.UNBLOCK, 1, 0)
            return
        self._sleep_until_runnable()
        if halted:
            self.stats.halt_slept += 1
        if halted and machine.halt_poll_max_ns:
            self._adapt_halt_poll(time.monotonic_ns() - start)

    def _poll_halt(self, end_ns: int) -> bool:
        """Spin until a wake-up event or `end_ns` (time.monotonic_ns), releasing the GIL
        between looks at `request_event`. True if the vCPU became runnable.

        Order (the kick protocol): publish POLLING, clear the request, re-check pending
        events, then watch the request; a sender publishes, sets the request, then reads
        the mode and, seeing POLLING, does nothing more."""
        machine = self.machine
        clock = time.monotonic_ns
        yield_cpu = os.sched_yield
        deadline = self._timer_deadline
        if deadline is not None and deadline < end_ns:
            end_ns = deadline  # the timer is the sleeper's business
        self.mode = VcpuMode.POLLING
        try:
            while not machine.stopping:
                self.request_event = False
                if self._wakeup_pending():
                    self.state = VcpuState.RUNNABLE
                    return True
                while not self.request_event:
                    if clock() >= end_ns or machine.stopping:
                        return False
                    yield_cpu()
            return False
        finally:
            self.mode = VcpuMode.OUTSIDE_GUEST

    def _adapt_halt_poll(self, halt_ns: int) -> None:
        """KVM's grow_halt_poll_ns / shrink_halt_poll_ns (module parameters grow 2,
        grow_start 10 us, shrink 2), after a halt that ended by sleeping."""
        poll_ns = self.halt_poll_ns
        max_ns = self.machine.halt_poll_max_ns
        if poll_ns and halt_ns > max_ns:
            poll_ns //= HALT_POLL_SHRINK
            self.halt_poll_ns = 0 if poll_ns < HALT_POLL_GROW_START_NS else poll_ns
        elif poll_ns < max_ns and halt_ns < max_ns:
            self.halt_poll_ns = min(max(poll_ns * HALT_POLL_GROW, HALT_POLL_GROW_START_NS),
                                    max_ns)

    def _sleep_until_runnable(self) -> None:
        """Sleep on `wake` until an event makes the vCPU runnable or the VM stops."""
        machine = self.machine
        tr = self.tracer
        self.mode = VcpuMode.BLOCKED
        machine.note_blocked(self, True)
        try:
            while not machine.stopping:
                if self.state is VcpuState.WAIT_FOR_SIPI:
                    machine.poll_sipi(self)
                    if self.state is VcpuState.RUNNABLE:
                        return
                elif self._wakeup_pending():
                    if self.state is VcpuState.HALTED:
                        self.state = VcpuState.RUNNABLE
                    return
                timeout = None
                if self._timer_deadline is not None:
                    timeout = max(0.0, (self._timer_deadline - time.monotonic_ns()) / 1e9)
                woken = self.wake.wait(timeout)
                if tr is not None:
                    tr.rec(tracing.WOKE, woken, 0)
                self.wake.clear()
        finally:
            machine.note_blocked(self, False)
            self.mode = VcpuMode.OUTSIDE_GUEST
            if tr is not None:
                tr.rec(tracing.UNBLOCK, 2 if self.state is VcpuState.WAIT_FOR_SIPI else 1, 0)

    def apic_base_changed(self) -> None:
        """Tell KVM the new IA32_APIC_BASE through KVM_SET_SREGS: KVM's
        kvm_lapic_set_base() then updates CPUID.1:EDX.APIC to follow the enable bit
        (SDM 10.4.3), which a guest's CPUID must show."""
        sregs = self.fd.get_sregs()
        if sregs.apic_base != self.apic.apic_base:
            sregs.apic_base = self.apic.apic_base
            self.fd.set_sregs(sregs)

    def wakeup_pending_at_hlt(self) -> bool:
        """The HLT fastpath's test: an event that ends the halt at once (IF as of the
        exit)."""
        if_flag = bool(self.view.u8[kr.IF_FLAG])
        return self.apic.halt_ends_at_once(if_flag) or (if_flag and self.extint_pending())

    def halt(self) -> None:
        """KVM_EXIT_HLT: no in-kernel irqchip, so the halt is ours to implement."""
        self.state = VcpuState.HALTED

    # ---------------------------------------------------------------- the kick

    def kick(self) -> None:
        """Make this vCPU see a request that the caller has ALREADY published.

        Hot path: no allocation, no logging, no lock. See the module docstring for why
        the order "publish, set request_event, read mode" cannot lose a request. On a
        vCPU thread the signal or wake-up itself is posted to that vCPU and sent at its
        next entry (`send_posted_kicks`): the woken thread needs the GIL at once, and
        the kicker holds it until it enters KVM_RUN, so a kick sent mid-exit makes the
        two collide on it (the target sleeps again on the GIL, a second wake-up).
        """
        self.request_event = True
        mode = self.mode
        if self.tracer is not None:
            self.tracer.kicked(mode)
        if mode == VcpuMode.IN_GUEST:
            self.view.u8[kr.IMMEDIATE_EXIT] = 1
            if self.thread_ident != threading.get_ident():
                poster = getattr(_this_thread, "vcpu", None)
                if poster is not None:
                    poster._posted_signals.append(self)
                else:
                    self.signal_kick()
        elif mode == VcpuMode.BLOCKED:
            poster = getattr(_this_thread, "vcpu", None)
            if poster is not None:
                poster._posted_wakes.append(self)
            else:
                self.wake.set()

    def send_posted_kicks(self) -> None:
        """Send the kicks posted by this vCPU's exit handling (its thread, before KVM_RUN
        or before it sleeps). A posted kick is late by the rest of the exit, never lost:
        the request it carries was published before it was posted."""
        wakes = self._posted_wakes
        for target in wakes:
            target.wake_up()
        wakes.clear()
        signals = self._posted_signals
        for target in signals:
            # Gone out of KVM_RUN since the kick (on an exit of its own)? Then its loop
            # top sees the request, and the signal would only cost it an empty exit.
            if target.mode == VcpuMode.IN_GUEST:
                target.signal_kick()
        signals.clear()

    def wake_up(self) -> None:
        """Leave this blocked vCPU its wake token (the futex wake of its sleep)."""
        stats = self.stats
        t0 = time.perf_counter_ns() if stats.record_time else 0
        self.wake.set()
        if t0:
            stats.wake_time.add(time.perf_counter_ns() - t0)  # as kick_time, below

    def signal_kick(self) -> None:
        """pthread_kill this vCPU's thread out of KVM_RUN (immediate_exit already set)."""
        stats = self.stats
        t0 = time.perf_counter_ns() if stats.record_time else 0
        signal.pthread_kill(self.thread_ident, KICK_SIGNAL)
        if t0:
            # The sender's cost of a signal kick, kept on the target (a statistic: two
            # senders adding at once may rarely lose one sample).
            stats.kick_time.add(time.perf_counter_ns() - t0)

    def stop(self) -> None:
        """Kick for a VM stop: the loop checks `machine.stopping` before every entry."""
        self.request_event = True
        self.view.u8[kr.IMMEDIATE_EXIT] = 1
        self.wake.set()
        if self.mode == VcpuMode.IN_GUEST and self.thread_ident:
            try:
                signal.pthread_kill(self.thread_ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass
