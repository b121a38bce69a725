"""The kick protocol (DESIGN.md "Delivering an interrupt to another vCPU"), checked three
ways:

1. `kvmpy.kick_model` enumerates every interleaving of the target vCPU thread with one or
   two senders and checks that no published interrupt is left pending while the target
   sleeps in KVM_RUN or in wait(). Mutations (one step removed or moved) must make it
   find a losing interleaving, so the check can fail.
2. The model's steps quote kvmpy's source; the quotes must still be there, in order.
3. The real `Vcpu.run_loop` / `kick` / `_block_until_runnable`, driven on this thread with
   a fake KVM fd, replay the critical interleavings (four bugs found this way are fixed).
"""

from __future__ import annotations

import importlib
import inspect
import mmap
import threading
from dataclasses import replace

import pytest

import kvmpy.machine as machine_module
import kvmpy.vcpu as vcpu_module
from kvmpy import kick_model as km
from kvmpy.apic import DM_FIXED, DM_INIT, DM_SIPI, ICR_LEVEL_ASSERT, MSR_X2APIC_ICR
from kvmpy.apic.testing import ApicSystem, make_system
from kvmpy.kvm import run as kr
from kvmpy.kvm.run import RunView
from kvmpy.trace import ExitStats
from kvmpy.vcpu import Vcpu, VcpuMode, VcpuState

EINTR = 4
BASE = km.Config()

# ---------------------------------------------------------------- 1. the model check

PASSING = {
    "one sender": BASE,
    "two senders, same priority class": replace(BASE, senders=(0x40, 0x41)),
    "two senders, with the injection fix": replace(
        BASE, senders=(0x40, 0x50), ready_cleared_after_interrupt=True),
}


@pytest.mark.parametrize("cfg", PASSING.values(), ids=PASSING.keys())
def test_no_interleaving_loses_an_interrupt(cfg):
    res = km.check(cfg)
    print(f"\n{cfg.senders}: {res.interleavings} interleavings, {res.states} states, "
          f"{res.transitions} transitions, {res.terminal_states} final states")
    assert res.ok, "\n".join(map(str, res.violations))
    assert res.terminal_states > 1 and res.interleavings > 1_000_000  # a real search


def test_two_priority_classes_no_interrupt_is_overwritten():
    cfg = replace(BASE, senders=(0x40, 0x50),
                  ready_cleared_after_interrupt=_inject_clears_ready_flag())
    res = km.check(cfg, stop_early=True)
    assert res.ok, "\n".join(map(str, res.violations))


def _inject_clears_ready_flag() -> bool:
    """Does the real injection mark kvm_run's ready flag used after KVM_INTERRUPT?"""
    source = inspect.getsource(Vcpu._inject_pending_events)
    return "u8[kr.READY_FOR_INJECTION] = 0" in source


# One step removed or moved, and the kind of failure the checker must then find.
MUTATIONS = {
    "no re-check of request_event after mode = IN_GUEST": (
        replace(BASE, recheck=False), "lost interrupt"),
    "re-check before publishing mode = IN_GUEST": (
        replace(BASE, mode_in_guest_before_recheck=False), "lost interrupt"),
    "request_event cleared after the injection instead of before": (
        replace(BASE, clear_request_before_inject=False), "lost interrupt"),
    "sender does not write immediate_exit": (
        replace(BASE, write_immediate_exit=False), "lost interrupt"),
    "sender does not signal": (replace(BASE, send_signal=False), "lost interrupt"),
    "sender reads mode BEFORE publishing": (
        replace(BASE, read_mode_after_publish=False), "lost interrupt"),
    "sender sets request_event before publishing the IRR bit": (
        replace(BASE, publish_before_request=False), "lost interrupt"),
    "sender does not wake a BLOCKED target": (
        replace(BASE, wake_blocked=False), "lost interrupt"),
    "halted target waits before checking for pending events": (
        replace(BASE, check_before_wait=False), "lost interrupt"),
    "poller re-checks before clearing request_event": (
        replace(BASE, poll_clear_before_check=False), "lost interrupt"),
    "poller does not re-check pending events after mode = POLLING": (
        replace(BASE, poll_recheck=False), "lost interrupt"),
    "stale immediate_exit cleared after the re-check instead of at the loop top": (
        replace(BASE, stale_ie_clear="late"), "lost interrupt"),
    "target never clears immediate_exit (neither after EINTR nor at the loop top)": (
        replace(BASE, clear_immediate_exit=False, stale_ie_clear="never"), "livelock"),
}


@pytest.mark.parametrize(("cfg", "kind"), MUTATIONS.values(), ids=MUTATIONS.keys())
def test_each_step_is_needed(cfg, kind):
    res = km.check(cfg, stop_early=True)
    assert not res.ok, "the mutated protocol passed: the check cannot see this step"
    assert kind in {v.kind for v in res.violations}
    trace = res.violations[0].trace
    assert any(t == "target" for t, _ in trace) and any(t == "s0" for t, _ in trace)


def test_counterexample_for_the_missing_recheck_is_the_textbook_race():
    """Sender reads OUTSIDE_GUEST just before the target publishes IN_GUEST."""
    res = km.check(replace(BASE, recheck=False), stop_early=True)
    trace = [f"{t}.{label}" for t, label in res.violations[0].trace]
    assert trace.index("s0.publish") > trace.index("target.inject_read")
    assert trace.index("s0.read_mode") < len(trace) - 1 - trace[::-1].index("target.in_guest")


# ---------------------------------------------------------------- 2. the quotes are real


def _function(where: str):
    module, qualname = where.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _model_steps() -> list[km.Step]:
    model = km.Model(replace(BASE, senders=(0x40,)))
    return [step for prog in model.threads.values() for step in prog]


def test_model_steps_quote_the_source_in_order():
    """Each function's quoted statements appear in its source in the model's order."""
    by_function: dict[str, list[str]] = {}
    for step in _model_steps():
        if step.where is not None:
            by_function.setdefault(step.where[0], []).append(step.where[1])
    assert len(by_function) >= 6
    for where, quotes in by_function.items():
        source = inspect.getsource(_function(where))
        at = 0
        for quote in quotes:
            found = source.find(quote, at)
            assert found >= 0, f"{where}: {quote!r} not found (after offset {at})"
            at = found + len(quote)


CALL_ORDER = [  # statements the model's step order relies on, in source order
    ("kvmpy.vcpu:Vcpu.run_loop", [
        "u8[kr.IMMEDIATE_EXIT] = 0", "self.request_event = False",
        "self._inject_pending_events()",
        "self.mode = VcpuMode.IN_GUEST", "if self.request_event or machine.stopping",
        "exit = self.run()", "fp = handle_exit_irqoff(self, exit)"]),
    ("kvmpy.vcpu:Vcpu.run", [
        "ret = self.fd.run()", "self.mode = VcpuMode.OUTSIDE_GUEST", "if ret < 0:",
        "self.view.u8[kr.IMMEDIATE_EXIT] = 0"]),
    ("kvmpy.apic.bus:ApicBus._deliver", [
        "target.accept_fixed(vector, False)", "self.notify(target.index)"]),
    ("kvmpy.apic.lapic:LocalApic.accept_fixed", ["self.irr[vector] = 1"]),
    ("kvmpy.machine:Machine._notify_vcpu", ["self.vcpus[index].kick()"]),
    ("kvmpy.vcpu:Vcpu.kick", [
        "self.request_event = True", "mode = self.mode", "if mode == VcpuMode.IN_GUEST:",
        "self.view.u8[kr.IMMEDIATE_EXIT] = 1", "self.signal_kick()",
        "elif mode == VcpuMode.BLOCKED:", "self.wake.set()"]),
    ("kvmpy.vcpu:Vcpu.signal_kick", ["signal.pthread_kill"]),
    ("kvmpy.vcpu:Vcpu.send_posted_kicks", ["if target.mode == VcpuMode.IN_GUEST:",
                                           "target.signal_kick()"]),
    # A posted kick is sent before the poster's own KVM_RUN and before it sleeps.
    ("kvmpy.vcpu:Vcpu.run_loop", ["self.send_posted_kicks()", "exit = self.run()"]),
    ("kvmpy.vcpu:Vcpu._block_until_runnable", ["self.send_posted_kicks()",
                                                "self.wake.clear()"]),
]


@pytest.mark.parametrize(("where", "quotes"), CALL_ORDER, ids=[w for w, _ in CALL_ORDER])
def test_real_code_keeps_the_order_the_model_assumes(where, quotes):
    source = inspect.getsource(_function(where))
    positions = [source.find(q) for q in quotes]
    assert -1 not in positions, dict(zip(quotes, positions, strict=True))
    assert positions == sorted(positions)


# ---------------------------------------------------------------- 3. the real code


class _Timers:
    def arm(self, vcpu: object, deadline: int) -> None:
        pass


class LoopMachine:
    """What Vcpu.run_loop needs of a Machine; INIT/SIPI handling is the real Machine's."""

    def __init__(self) -> None:
        self.stopping = False
        self.exit_lock = threading.Lock()
        self.timers = _Timers()
        self.vcpus: list[Vcpu] = []
        self.halt_poll_max_ns = 0  # the replays below sleep; tests/test_vcpu_halt.py polls
        self.acpi = None  # no ACPI: poll_sipi has no S3 resume to look for

    def may_poll(self) -> bool:
        return False

    on_init = machine_module.Machine.on_init
    poll_sipi = machine_module.Machine.poll_sipi
    _notify_vcpu = machine_module.Machine._notify_vcpu

    def note_blocked(self, vcpu: Vcpu, blocked: bool) -> None:
        pass


class FakeKvmFd:
    """A vCPU fd that behaves like KVM without an in-kernel irqchip: one queued
    interrupt slot that KVM_INTERRUPT overwrites, immediate_exit checked at entry, and
    `on_entry(fd)` deciding what the guest does (return 0 for an exit, -EINTR for a
    kick). Records what the guest received."""

    def __init__(self, on_entry) -> None:
        self.mapping = mmap.mmap(-1, 4096)
        self.view = RunView(self.mapping)
        self.on_entry = on_entry
        self.queued: int | None = None
        self.overwritten: list[int] = []
        self.received: list[int] = []
        self.entries = 0
        self.immediate_exits = 0
        self._exit(ready=True)

    def _exit(self, *, ready: bool) -> None:
        u8 = self.view.u8
        u8[kr.READY_FOR_INJECTION] = int(ready)
        u8[kr.IF_FLAG] = 1

    def interrupt(self, vector: int) -> None:
        if self.queued is not None:
            self.overwritten.append(self.queued)
        self.queued = vector

    def nmi(self) -> None:
        pass

    def run(self) -> int:
        self.entries += 1
        if self.view.u8[kr.IMMEDIATE_EXIT]:
            self.immediate_exits += 1
            self._exit(ready=self.queued is None)
            return -EINTR
        if self.queued is not None:
            self.received.append(self.queued)
            self.queued = None
        ret = self.on_entry(self)
        self._exit(ready=self.queued is None)
        return ret


def make_target(system: ApicSystem, index: int, fd: FakeKvmFd) -> tuple[Vcpu, LoopMachine]:
    machine = LoopMachine()
    vcpus = [Vcpu(machine, i, fd if i == index else FakeKvmFd(lambda f: 0),  # type: ignore
                  system[i], fastpath=True, stats=ExitStats(False))
             for i in range(len(system.apics))]
    machine.vcpus = vcpus
    system.bus.notify = machine._notify_vcpu
    return vcpus[index], machine


def send_fixed(system: ApicSystem, vector: int, dest: int) -> None:
    system[0].wrmsr(MSR_X2APIC_ICR, (dest << 32) | (DM_FIXED << 8) | vector)


def stop_after(n: int):
    """on_entry: let the guest spin (a kick gets it out) and stop the VM at entry n."""
    def on_entry(fd: FakeKvmFd) -> int:
        if fd.entries >= n:
            fd.machine.stopping = True
        return -EINTR
    return on_entry


def test_kick_acts_on_the_mode_it_reads(monkeypatch):
    """Vcpu.kick, as the model's sender: IN_GUEST -> immediate_exit and a signal,
    BLOCKED -> wake, OUTSIDE -> only request_event."""
    sent: list[int] = []
    monkeypatch.setattr(vcpu_module.signal, "pthread_kill",
                        lambda ident, sig: sent.append(ident))
    fd = FakeKvmFd(lambda f: 0)
    system = make_system(2, x2apic=True)
    vcpu, _ = make_target(system, 1, fd)
    vcpu.thread_ident = threading.get_ident() + 1  # "another thread"
    for mode, want_ie, want_signal, want_wake in [
        (VcpuMode.OUTSIDE_GUEST, 0, 0, False),
        (VcpuMode.IN_GUEST, 1, 1, False),
        (VcpuMode.BLOCKED, 0, 0, True),
    ]:
        sent.clear()
        vcpu.view.u8[kr.IMMEDIATE_EXIT] = 0
        vcpu.wake.clear()
        vcpu.request_event = False
        vcpu.mode = mode
        send_fixed(system, 0x40, 1)
        assert vcpu.request_event
        assert vcpu.view.u8[kr.IMMEDIATE_EXIT] == want_ie, mode
        assert sent == [vcpu.thread_ident] * want_signal, mode
        assert vcpu.wake.is_set() == want_wake, mode


def test_ipi_published_after_the_injection_read_is_injected_before_entry():
    """The race the re-check exists for, on the real run loop: the sender publishes right
    after the target read IRR and sees OUTSIDE_GUEST, so it does not kick; the target's
    re-check after `mode = IN_GUEST` must catch it before KVM_RUN."""
    system = make_system(2, x2apic=True)
    fd = FakeKvmFd(stop_after(1))
    vcpu, machine = make_target(system, 1, fd)
    fd.machine = machine
    real_pending = system[1].pending_vector
    calls = []

    def pending_vector_then_send():
        vector = real_pending()
        if not calls:
            calls.append(vector)
            assert vcpu.mode is VcpuMode.OUTSIDE_GUEST
            send_fixed(system, 0x40, 1)  # another thread, between read and IN_GUEST
        return vector

    system[1].pending_vector = pending_vector_then_send
    vcpu.run_loop()
    assert calls == [None]
    assert fd.received == [0x40], "the IPI was not injected at the first entry"
    assert not system[1].irr[0x40]


def test_ipi_sent_between_recheck_and_kvm_run_exits_at_once():
    """Sender sees IN_GUEST before the target is inside KVM_RUN (its signal would be
    lost): immediate_exit makes KVM_RUN return EINTR, the loop clears it and injects."""
    system = make_system(2, x2apic=True)

    def on_entry(fd: FakeKvmFd) -> int:
        if fd.entries >= 2:
            fd.machine.stopping = True
        return -EINTR

    fd = FakeKvmFd(on_entry)
    vcpu, machine = make_target(system, 1, fd)
    fd.machine = machine
    real_run = fd.run

    def run_after_a_send() -> int:
        if fd.entries == 0:
            assert vcpu.mode is VcpuMode.IN_GUEST
            send_fixed(system, 0x40, 1)  # pthread_kill skipped: same thread
        return real_run()

    fd.run = run_after_a_send
    vcpu.run_loop()
    assert fd.immediate_exits == 1
    assert fd.received == [0x40]
    assert vcpu.view.u8[kr.IMMEDIATE_EXIT] == 0


@pytest.mark.parametrize("send_while_blocked", [False, True], ids=["before", "while-blocked"])
def test_halted_target_wakes_for_an_ipi(send_while_blocked):
    """A sender that sees BLOCKED sets `wake`; one that saw OUTSIDE_GUEST relies on the
    target's check after `mode = BLOCKED`. Both on the real _block_until_runnable."""
    system = make_system(2, x2apic=True)
    vcpu, _ = make_target(system, 1, FakeKvmFd(lambda f: 0))
    vcpu.state = VcpuState.HALTED
    if not send_while_blocked:
        send_fixed(system, 0x40, 1)
    else:
        real_wait = vcpu.wake.wait

        def wait_after_a_send(timeout=None):
            assert vcpu.mode is VcpuMode.BLOCKED
            send_fixed(system, 0x40, 1)
            assert vcpu.wake.is_set()
            return real_wait(0)

        vcpu.wake.wait = wait_after_a_send  # type: ignore[method-assign]
    vcpu._block_until_runnable()
    assert vcpu.state is VcpuState.RUNNABLE
    assert vcpu.mode is VcpuMode.OUTSIDE_GUEST


def test_real_loop_never_queues_a_second_interrupt_over_the_first():
    system = make_system(2, x2apic=True)
    fd = FakeKvmFd(stop_after(1))
    vcpu, machine = make_target(system, 1, fd)
    fd.machine = machine
    send_fixed(system, 0x40, 1)
    real_interrupt = fd.interrupt

    def interrupt_then_send(vector: int) -> None:
        real_interrupt(vector)
        if vector == 0x40:
            send_fixed(system, 0x50, 1)  # another thread, before the target's re-check

    fd.interrupt = interrupt_then_send
    vcpu.run_loop()
    assert fd.overwritten == [], "KVM_INTERRUPT overwrote a queued, already-acked vector"
    assert fd.received[:1] == [0x40]


def _ap_with_init_and_sipi_pending() -> tuple[ApicSystem, Vcpu, LoopMachine, FakeKvmFd]:
    """A running AP (started earlier) to which the BSP sent INIT and then SIPI 0x12, both
    before the AP's thread got around to its loop top (two back-to-back ICR writes)."""
    system = make_system(2, x2apic=True)
    fd = FakeKvmFd(stop_after(1))
    vcpu, machine = make_target(system, 1, fd)
    fd.machine = machine
    system[1].wait_for_sipi = False  # this AP is running
    system[0].wrmsr(MSR_X2APIC_ICR, (1 << 32) | (DM_INIT << 8) | ICR_LEVEL_ASSERT)
    system[0].wrmsr(MSR_X2APIC_ICR, (1 << 32) | (DM_SIPI << 8) | 0x12)
    assert system[1].init_pending and system[1].sipi_pending
    return system, vcpu, machine, fd


def test_sipi_right_behind_init_starts_the_ap(monkeypatch):
    system, vcpu, machine, fd = _ap_with_init_and_sipi_pending()
    started: list[int] = []
    monkeypatch.setattr(machine_module, "setup_real_mode_sipi",
                        lambda vcpu_fd, vector: started.append(vector))
    vcpu._inject_pending_events()  # the loop top after the kick
    assert vcpu.state is VcpuState.WAIT_FOR_SIPI
    machine.poll_sipi(vcpu)  # what _block_until_runnable does next
    assert started == [0x12]
    assert vcpu.state is VcpuState.RUNNABLE


def test_no_guest_entry_after_init():
    system, vcpu, machine, fd = _ap_with_init_and_sipi_pending()
    states: list[VcpuState] = []

    def on_entry(f: FakeKvmFd) -> int:
        states.append(vcpu.state)
        machine.stopping = True
        return -EINTR

    fd.on_entry = on_entry
    machine.poll_sipi = lambda v: setattr(v, "state", VcpuState.RUNNABLE)  # type: ignore
    vcpu.run_loop()
    assert VcpuState.WAIT_FOR_SIPI not in states


@pytest.mark.parametrize(("nmi", "irr", "if_flag", "wakes"), [
    (False, True, 1, True),
    (False, True, 0, False),  # HLT with IF=0: a maskable interrupt does not wake it
    (True, False, 0, True),
    (True, False, 1, True),
    (True, True, 1, True),
    # IF=0, a deliverable IRR vector and an NMI: the NMI must wake `cli; hlt`.
    pytest.param(True, True, 0, True),
])
def test_halted_vcpu_wakeup_condition(nmi, irr, if_flag, wakes):
    system = make_system(2, x2apic=True)
    fd = FakeKvmFd(lambda f: 0)
    vcpu, _ = make_target(system, 1, fd)
    vcpu.state = VcpuState.HALTED
    vcpu.view.u8[kr.IF_FLAG] = if_flag
    if irr:
        system[1].accept_fixed(0x40, False)
    if nmi:
        system[1].accept_nmi()
    assert vcpu._wakeup_pending() is wakes
