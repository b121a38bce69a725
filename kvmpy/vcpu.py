"""The vCPU thread: the Python half of the run loop, event injection, halt, the kick.

The loop itself runs in the native exit core (kvmpy/native/vcpu_loop.c) with the GIL
released: inject the pending interrupt, KVM_RUN, read the exit, handle_exit_irqoff,
halt polling and blocking, the kick. It comes back here only with what Python must
do (DESIGN.md, "The native exit core"):

    inject pending events                    # NMI/INIT/SMI/timer/CR8: Python's share
    exit, fp = self.run()                    # core: loops while the fastpath completes
    if setting is python:                    # --fastpath python: the prototype's place
        fp = handle_exit_irqoff(self, exit)
        if fp is REENTER_GUEST: continue
    with vm.exit_lock:                       # the srcu_read_lock analogue
        handle_exit(self, exit, fp)          # full dispatch

`--fastpath native` (default) runs the C fastpath; `--fastpath python` hands every exit
to Python's `handle_exit_irqoff` (kvmpy/exits.py, under the GIL); `--fastpath off`
sends every exit to the dispatch. One kick protocol serves all three: it is the core's
(kvmpy/native/kick.c), and Python calls it. A sender first publishes the request (IRR
bit, pending NMI/INIT/SIPI), then calls `kick`, which sets the target's request and
THEN reads its mode (seq_cst): IN_GUEST gets immediate_exit and a signal, BLOCKED a
wake token and a futex wake, POLLING nothing. The target stores its mode THEN
re-checks the request before KVM_RUN or sleep, so of the two at least one sees the
other. `tests/test_kick_model.py` enumerates every interleaving of these steps.

Halt polling (KVM's `kvm_vcpu_halt`) runs in the core without the GIL: a HLT with a
wake-up already pending re-enters at once; else the vCPU polls for up to
`halt_poll_ns` (adaptive, grown and shrunk as KVM's), then sleeps on its futex. It
polls only while the vCPU threads not asleep fit on the host's cores. A HLT with IF=0
and the wait for SIPI sleep here in Python, on the same futex.
"""

from __future__ import annotations

import enum
import functools
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy import _core as nc
from kvmpy.exits import Fastpath, handle_exit, handle_exit_irqoff
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.kvm.system import VcpuFd
from kvmpy.trace import ExitStats, Histogram, bucket_floor
from kvmpy.tracing import recorder as tracing

if TYPE_CHECKING:
    from kvmpy.apic import LocalApic
    from kvmpy.machine import Machine
    from kvmpy.tracing.recorder import Ring

KICK_SIGNAL = signal.SIGUSR1
# KVM's halt_poll_ns module parameter (virt/kvm/kvm_main.c): the maximum window, KVM's
# default 200 us. The core polls without the GIL, and grows and shrinks the window
# (grow 2, grow_start 10 us, shrink 2: vcpu_loop.c adapt_halt_poll).
HALT_POLL_NS_DEFAULT = 200_000


# The vCPU whose thread this is (set by run_loop): a kick requested by its exit handling
# is posted to it and sent at its next KVM_RUN entry (`Vcpu.send_posted_kicks`).
_this_thread = threading.local()


class VcpuMode(enum.IntEnum):
    """Where the vCPU thread is, as the kick protocol sees it (KVM's vcpu->mode; the
    core's enum vcpu_mode)."""

    OUTSIDE_GUEST = nc.OUTSIDE_GUEST
    IN_GUEST = nc.IN_GUEST
    BLOCKED = nc.BLOCKED  # sleeping on the futex (halted, or waiting for SIPI)
    POLLING = nc.POLLING  # halt polling: watching its request; a kick need only set it


class FastpathSetting(enum.IntEnum):
    """Which fastpath runs (`--fastpath`): the core's enum fastpath_setting."""

    OFF = nc.SETTING_OFF  # every exit to handle_exit (--no-fastpath)
    PYTHON = nc.SETTING_PYTHON  # exits.handle_exit_irqoff, under the GIL
    NATIVE = nc.SETTING_NATIVE  # the C fastpath, before the GIL

    @classmethod
    def parse(cls, value: bool | str) -> FastpathSetting:
        """`True`/"native", "python", `False`/"off" (the CLI's and MachineConfig's)."""
        if value is True:
            return cls.NATIVE
        if value is False:
            return cls.OFF
        try:
            return cls[str(value).upper()]
        except KeyError:
            raise ValueError(
                f"fastpath setting {value!r}: expected native, python or off") from None


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


class Vcpu:
    """One virtual CPU: its KVM fd, its local APIC, and the thread that runs it."""

    def __init__(
        self,
        machine: Machine,
        index: int,
        fd: VcpuFd,
        apic: LocalApic | None,
        *,
        fastpath: bool | str,
        stats: ExitStats,
    ) -> None:
        self.machine = machine
        self.index = index
        self.fd = fd
        self.view = fd.view
        self.apic = apic
        self.setting = FastpathSetting.parse(fastpath) if apic is not None \
            else FastpathSetting.OFF
        # Python's handle_exit_irqoff acts only with --fastpath python.
        self.fastpath_enabled = self.setting is not FastpathSetting.OFF
        self.stats = stats
        # The core's statistics for this vCPU (kvmpy/native/core.h S_*), filled by C.
        self.native_stats = bytearray(nc.S_NWORDS * 8)
        self._native = memoryview(self.native_stats).cast("Q")
        self._native[nc.S_RECORD_TIME] = 1 if stats.record_time else 0
        self.state = VcpuState.RUNNABLE
        self.thread: threading.Thread | None = None
        self.thread_ident = 0
        # A LocalApic-less vCPU (in-kernel irqchip) gets register memory of its own:
        # mode 0 (disabled), so the core's fastpath never acts on it.
        self._regs = apic.regs if apic is not None else bytearray(nc.REGS_BYTES)
        self._regs_u32 = memoryview(self._regs).cast("I")
        self._regs_u64 = memoryview(self._regs).cast("Q")
        self._timer_armed: int | None = None  # the deadline sync_timer last armed
        self.halt_hook: Callable[[Vcpu], None] | None = None
        self._timer_expirations = 0  # apic.timer.expirations as of the last core.run
        # This vCPU's trace ring (kvmpy.tracing), or None: each hook is one branch.
        self.tracer: Ring | None = None

    def attach_core(self, core: nc.Core) -> None:
        """Give the core this vCPU's fd, kvm_run and APIC memory (Machine, once)."""
        self.core = core
        apic = self.apic
        if apic is not None:
            irr, isr, tmr = apic.irr, apic.isr, apic.tmr
        else:
            irr = isr = tmr = bytearray(256)
        core.attach(self.index, self.fd.fd, self.fd.mapping, irr, isr, tmr, self._regs,
                    self.native_stats)
        self.fd.before_ioctl = functools.partial(core.events_changed, self.index)

    # ---------------------------------------------------------------- shared state

    @property
    def mode(self) -> VcpuMode:
        """The kick protocol's mode, as the core holds it."""
        return VcpuMode(self.core.mode(self.index))

    @property
    def halt_poll_ns(self) -> int:
        """The adaptive halt-polling window (KVM's vcpu->halt_poll_ns), the core's."""
        return self.core.halt_poll_ns(self.index)

    @halt_poll_ns.setter
    def halt_poll_ns(self, value: int) -> None:
        self.core.halt_poll_ns(self.index, value)

    @property
    def _cr8(self) -> int:
        """kvm_run.cr8 as last synced with TPR (shared with the core)."""
        return self._regs_u32[nc.R_CR8]

    @_cr8.setter
    def _cr8(self, value: int) -> None:
        self._regs_u32[nc.R_CR8] = value

    @property
    def _timer_deadline(self) -> int | None:
        """The APIC timer's next expiry (time.monotonic_ns): ApicTimer.deadline_ns, the
        word the core wakes a halted vCPU for."""
        return self._regs_u64[nc.Q_TIMER_DEADLINE] or None

    # ---------------------------------------------------------------- the run loop

    def run(self) -> tuple[Exit, Fastpath, int] | None:
        """The core's vcpu_enter_guest: KVM_RUN and the fastpath, looped without the
        GIL. Returns the exit it did not complete, with the fastpath's verdict and
        the time KVM_RUN returned, or None when only the loop top has work (events
        only Python injects, or a stop)."""
        # Did Python expire the APIC timer since the last call? (vcpu_enter_guest: only
        # then may a due timer wait for one entry.)
        expired = self.apic.timer.expirations if self.apic is not None else 0
        fresh = expired != self._timer_expirations
        self._timer_expirations = expired
        ret, reason, a, b, c, fp, t_exit = self.core.run(self.index, fresh)
        if ret != nc.RET_EXIT:
            return None
        return Exit((reason, a, b, c)), _FASTPATH[fp], t_exit

    def run_loop(self) -> None:
        """The vCPU thread's body; returns when the VM stops."""
        self.thread_ident = threading.get_ident()
        _this_thread.vcpu = self
        machine = self.machine
        stats = self.stats
        record_time = stats.record_time
        clock = time.perf_counter_ns  # CLOCK_MONOTONIC, the core's clock
        exit_lock = machine.exit_lock
        tr = self.tracer
        python_fastpath = self.setting is FastpathSetting.PYTHON
        try:
            while not machine.stopping:
                if self.state is not VcpuState.RUNNABLE:
                    self._block_until_runnable()
                    continue
                self._inject_pending_events()
                if self.state is not VcpuState.RUNNABLE:
                    continue  # an INIT was taken: wait for SIPI, not KVM_RUN
                got = self.run()  # the core records each KVM_RUN in this vCPU's native ring
                if got is None:
                    continue
                exit, fp, t0 = got
                # The guest may have moved CR8 (no exit) before this exit: TPR takes it
                # now, before a handler writes TPR back into kvm_run.cr8
                # (QEMU's kvm_arch_post_run).
                self._take_guest_cr8()
                reason = exit[0]
                if python_fastpath:
                    fp = handle_exit_irqoff(self, exit)
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
                elif fp is Fastpath.EXIT_HANDLED and reason == k.KVM_EXIT_HLT:
                    self.halt()  # the core's HLT fastpath: a HLT with IF=0 halts here
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
            if tr is not None and tr.native is not None:
                tr.native_count = self.core.trace_count(self.index)

    def collect_stats(self) -> ExitStats:
        """This vCPU's statistics: Python's, plus what the core counted."""
        total = ExitStats(self.stats.record_time)
        total.merge(self.stats)
        add_native_stats(total, self._native)
        if self.apic is not None:
            total.timer_clamped += self.apic.timer.clamped
        return total

    # ---------------------------------------------------------------- events

    def _inject_pending_events(self) -> None:
        """Inject what the local APIC has pending (KVM's inject_pending_event), or ask
        KVM for an interrupt window when the guest cannot take it yet. The core does the
        same for IRR vectors at each entry; NMI, INIT, SMI, the timer's expiry and a CR8
        with reserved bits are only done here."""
        apic = self.apic
        if apic is None:
            return
        apic.clear_slow_events()
        u8 = self.view.u8
        self._take_guest_cr8()
        deadline = self._timer_deadline
        if deadline is not None and time.monotonic_ns() >= deadline:
            apic.timer_expired(time.monotonic_ns())
            self.sync_timer()
        if apic.init_pending and apic.take_init():
            self.machine.on_init(self)
            self.sync_cr8()
            apic.slow_events_left()
            return
        if apic.take_nmi():
            if self.tracer is not None:
                self.tracer.rec(tracing.INJECT, 2, 1)
            self.fd.nmi()
        if apic.smi_pending and apic.take_smi():
            self.stats.smi_dropped += 1  # no SMM is modelled: an SMI is counted and dropped
        apic.slow_events_left()
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
            self.core.queue_interrupt(self.index, vector)  # KVM_INTERRUPT, or by KVM_RUN
            # KVM holds one queued interrupt without an in-kernel irqchip and a second
            # KVM_INTERRUPT would replace the first (kvm_vcpu_ioctl_interrupt): until
            # KVM rewrites this flag at the next exit, ask for a window instead.
            u8[kr.READY_FOR_INJECTION] = 0
            u8[kr.REQUEST_INTERRUPT_WINDOW] = 0
        else:
            u8[kr.REQUEST_INTERRUPT_WINDOW] = 1

    def _take_guest_cr8(self) -> None:
        """The guest wrote CR8 (64-bit mode, no exit): TPR follows (SDM 10.8.6.1)."""
        apic = self.apic
        if apic is None:
            return
        cr8 = self.view.u64[kr.CR8]
        if cr8 != self._cr8:
            apic.set_cr8(cr8)
            self._cr8 = cr8

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
        """Arm the VM's host timer (TimerService) for this APIC's next expiry if it
        changed since Python last armed it. The core arms its own timer thread for the
        IA32_TSC_DEADLINE writes it completes (kvmpy/native/timer.c); a deadline armed
        on both only costs a stale kick."""
        if self.apic is None:
            return
        deadline = self._timer_deadline
        if deadline != self._timer_armed:
            self._timer_armed = deadline
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

        A halted vCPU first polls (`_poll_halt`); after a halt that slept, the core
        adapts the window as KVM's kvm_vcpu_halt (vcpu_loop.c adapt_halt_poll, the one
        implementation): unchanged after a wake-up inside it, grown after a short halt
        that outlasted it, shrunk after a halt longer than the maximum."""
        tr = self.tracer
        if tr is not None:
            tr.rec(tracing.BLOCK, 2 if self.state is VcpuState.WAIT_FOR_SIPI else 1, 0)
        poll_ns = self.halt_poll_ns
        halted = self.state is VcpuState.HALTED
        start = time.monotonic_ns() if halted else 0
        if halted and poll_ns and self.core.may_poll(self.index) \
                and self._poll_halt(start + poll_ns):
            self.stats.halt_poll_success += 1
            if tr is not None:
                tr.rec(tracing.UNBLOCK, 1, 0)
            return
        self._sleep_until_runnable()
        if halted:
            self.stats.halt_slept += 1
            self.core.adapt_halt_poll(self.index, time.monotonic_ns() - start)

    def _poll_halt(self, end_ns: int) -> bool:
        """Poll until a wake-up event or `end_ns` (time.monotonic_ns), the spinning done
        by the core without the GIL. True if the vCPU became runnable.

        Order (the kick protocol): publish POLLING and clear the request (poll_begin),
        re-check pending events, then watch the request; a sender publishes, sets the
        request, then reads the mode and, seeing POLLING, does nothing more."""
        core, i = self.core, self.index
        deadline = self._timer_deadline
        if deadline is not None and deadline < end_ns:
            end_ns = deadline  # the timer is the sleeper's business
        core.send_posted_kicks(i)
        core.poll_begin(i)
        try:
            while not self.machine.stopping:
                if self._wakeup_pending():
                    self.state = VcpuState.RUNNABLE
                    return True
                if not core.poll(i, end_ns):  # clears the request it saw
                    return False
            return False
        finally:
            core.poll_end(i)

    def _sleep_until_runnable(self) -> None:
        """Sleep on the core's futex until an event makes the vCPU runnable or the VM
        stops: publish BLOCKED (sleep_begin), then per pass drop a stale token,
        re-check, and wait."""
        machine = self.machine
        core, i = self.core, self.index
        tr = self.tracer
        core.sleep_begin(i)  # sends this vCPU's posted kicks first
        machine.note_blocked(self, True)
        try:
            while True:
                # Drop a stale token, THEN look at the stop and the events: a stop (or
                # kick) whose token this clear dropped has already published its cause.
                core.wake_clear(i)
                if machine.stopping:
                    return
                if self.state is VcpuState.WAIT_FOR_SIPI:
                    machine.poll_sipi(self)
                    if self.state is VcpuState.RUNNABLE:
                        return
                elif self._wakeup_pending():
                    if self.state is VcpuState.HALTED:
                        self.state = VcpuState.RUNNABLE
                    return
                timeout = -1
                if self._timer_deadline is not None:
                    timeout = max(0, self._timer_deadline - time.monotonic_ns())
                woken = core.wait(i, timeout)
                if tr is not None:
                    tr.rec(tracing.WOKE, woken, 0)
        finally:
            machine.note_blocked(self, False)
            core.sleep_end(i)
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
        """Make this vCPU see a request that the caller has ALREADY published: the
        core's kvm_vcpu_kick (kvmpy/native/kick.c). On a vCPU thread the signal or
        wake-up is posted to that vCPU and sent at its next entry or sleep: the woken
        thread would otherwise run into a kicker that is still busy with its exit."""
        poster = getattr(_this_thread, "vcpu", None)
        if self.tracer is not None:
            self.tracer.kicked(self.core.mode(self.index))
        self.core.kick(self.index, poster.index if poster is not None else -1)

    def send_posted_kicks(self) -> None:
        """Send the kicks posted by this vCPU's exit handling (its own thread)."""
        self.core.send_posted_kicks(self.index)

    def wake_up(self) -> None:
        """Leave this blocked vCPU its wake token (the futex wake of its sleep)."""
        self.core.wake(self.index)


_FASTPATH = (Fastpath.NONE, Fastpath.REENTER_GUEST, Fastpath.EXIT_HANDLED)


def add_native_stats(stats: ExitStats, native: memoryview) -> None:
    """Add the core's counters and histograms (kvmpy/native/core.h S_*) to `stats`."""
    nb = nc.NBUCKETS
    for reason in range(nc.MAX_REASON):
        stats.count[reason] += native[nc.S_COUNT + reason]
        fast = native[nc.S_FAST + reason]
        if fast:
            stats.fast[reason] += fast
            _add_hist(stats.fast_time[reason], native, nc.S_HIST + reason * nb,
                      native[nc.S_FAST_TOTAL + reason])
    stats.icr_fast += native[nc.S_ICR_FAST]
    _add_hist(stats.icr_fast_time, native, nc.S_ICR_HIST, 0)
    _add_hist(stats.kick_time, native, nc.S_KICK_HIST, 0)
    _add_hist(stats.wake_time, native, nc.S_WAKE_HIST, 0)
    stats.halt_poll_success += native[nc.S_HALT_POLL_OK]
    stats.halt_slept += native[nc.S_HALT_SLEPT]
    stats.inject_sync += native[nc.S_INJECT_SYNC]
    stats.inject_ioctl += native[nc.S_INJECT_IOCTL]


def _add_hist(hist: Histogram, native: memoryview, at: int, total: int) -> None:
    buckets = native[at : at + nc.NBUCKETS].tolist()
    n = sum(buckets)
    if not n:
        return
    for i, count in enumerate(buckets):
        if count:
            hist.buckets[i] += count
    hist.count += n
    # The core sums the time per reason; elsewhere the buckets' middles stand in.
    hist.total += total or sum(
        c * ((bucket_floor(i) + bucket_floor(i + 1)) // 2) for i, c in enumerate(buckets) if c)
