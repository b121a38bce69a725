"""An explicit-state model of the kick protocol, checked over every interleaving.

The threads are modelled step by step, one shared load or store per step (CPython runs
them one at a time under the GIL, so memory is sequentially consistent), as
kvmpy/vcpu.py and kvmpy/apic/ do them. Every step names the function and quotes the
statement it models (`Step.where`); tests/test_kick_model.py checks that the quotes are
still in the source, in the model's order.

Target vCPU thread (`Vcpu.run_loop`, `_inject_pending_events`, `run`,
`_block_until_runnable`), with KVM's side of KVM_RUN (kvm_arch_vcpu_ioctl_run):

    loop_top      if self.state is not VcpuState.RUNNABLE: -> block_clear
    top_clear_ie  self.view.u8[kr.IMMEDIATE_EXIT] = 0   (a kick that came while the vCPU
                  was out of KVM_RUN: its request is picked up below, so the flag is stale)
    clear_request self.request_event = False
    inject_read   vector = apic.pending_vector()        (IRR, above PPR)
    inject_ack    if READY_FOR_INJECTION and IF_FLAG: apic.ack(vector);
                  self.fd.interrupt(vector)             (KVM holds ONE queued interrupt)
    in_guest      self.mode = VcpuMode.IN_GUEST
    recheck       if self.request_event ...: self.mode = OUTSIDE_GUEST; continue
    syscall       ret = self.fd.run()                   (from here a signal is pending
                                                         in the kernel, not lost)
    kvm_entry     KVM: if (kvm_run->immediate_exit) return -EINTR
    guest         takes the queued interrupt and EOIs (a WRMSR exit), or spins until a
                  signal (-EINTR), or executes HLT, or makes one other exit
    mode_outside  self.mode = VcpuMode.OUTSIDE_GUEST
    clear_ie      if ret < 0: self.view.u8[kr.IMMEDIATE_EXIT] = 0   (then the fastpath
                  returns REENTER_GUEST for KVM_EXIT_INTR: back to loop_top)
    dispatch      handle_exit(): EOI clears the highest ISR bit; HLT sets HALTED
    block_clear   self.wake.clear()
    poll_choice   halt polling on or off (`machine.may_poll()` and the window): both
    poll_mode     self.mode = VcpuMode.POLLING                    (_poll_halt)
    poll_clear    self.request_event = False
    poll_check    if self._wakeup_pending(): state = RUNNABLE; return
    poll_watch    while not self.request_event: spin, or the window ends (both explored)
    poll_end      finally: self.mode = VcpuMode.OUTSIDE_GUEST; then sleep:
    block_mode    self.mode = VcpuMode.BLOCKED                    (_sleep_until_runnable)
    block_check   elif self._wakeup_pending(): state = RUNNABLE; finally mode = OUTSIDE
    block_wait    self.wake.wait(timeout); self.wake.clear(); back to block_check

Sender thread (`ApicBus._deliver` -> `LocalApic.accept_fixed` -> `notify` ->
`Machine._notify_vcpu` -> `Vcpu.kick`):

    publish       self.irr[vector] = 1
    request       self.request_event = True
    read_mode     mode = self.mode
    act           IN_GUEST: write_ie (immediate_exit = 1) then signal (pthread_kill:
                  lost unless the target is inside the KVM_RUN syscall);
                  BLOCKED: wake (self.wake.set()); POLLING: nothing (the poller
                  watches request_event). A sender that is a vCPU thread posts the
                  signal or wake and sends it at its own next entry
                  (`send_posted_kicks`): a later step of the same sender, which the
                  search already places anywhere after read_mode. A posted signal is
                  dropped if the target is no longer IN_GUEST by then (it left KVM_RUN
                  after the request was published, so its loop top sees the request).

The guest is always interruptible (IF=1, TPR 0) and each sender sends one fixed IPI.
KVM writes `ready_for_interrupt_injection` (queued slot empty) on every return from
KVM_RUN, immediate EINTR included. `Config` turns single steps off or reorders them, so
the tests can show that each one is needed (a mutated protocol loses an interrupt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OUTSIDE = "OUTSIDE_GUEST"
IN_GUEST = "IN_GUEST"
BLOCKED = "BLOCKED"
POLLING = "POLLING"
RUNNABLE = "RUNNABLE"
HALTED = "HALTED"

WAIT = object()  # the step cannot run now (the thread sleeps)

State = dict  # variable name -> hashable value; frozen into a sorted tuple for the search
Action = Callable[[State], "str | None | object | tuple[str, ...]"]


@dataclass(frozen=True)
class Step:
    """One atomic step. `action` mutates the state and returns None (fall through to
    the next step of the program), a label to jump to, WAIT (not enabled now), or a
    tuple of labels (a nondeterministic choice; the action must then change nothing)."""

    label: str
    where: tuple[str, str] | None  # ("module:Class.function", quoted statement) or KVM
    action: Action


@dataclass(frozen=True)
class Config:
    """The protocol as kvmpy implements it (defaults), or a mutation of it."""

    senders: tuple[int, ...] = (0x40,)  # one vector per sender thread
    guest_exits: int = 1  # voluntary guest exits (I/O, ...) per execution
    # target side
    clear_request_before_inject: bool = True
    mode_in_guest_before_recheck: bool = True
    recheck: bool = True
    clear_immediate_exit: bool = True
    # where a stale immediate_exit is cleared before entry: "top" (the loop top, before
    # request_event is cleared), "late" (after the re-check: a mutation), or "never"
    stale_ie_clear: str = "top"
    check_before_wait: bool = True
    halt_polling: bool = True  # explore halts that poll first (and ones that do not)
    poll_clear_before_check: bool = True
    poll_recheck: bool = True
    ready_cleared_after_interrupt: bool = False  # the fix for the double KVM_INTERRUPT
    # sender side
    publish_before_request: bool = True
    read_mode_after_publish: bool = True
    write_immediate_exit: bool = True
    send_signal: bool = True
    signal_only_if_in_guest: bool = True  # the posted signal re-reads the mode
    wake_blocked: bool = True


def _pending_vector(s: State) -> int | None:
    """LocalApic.pending_vector with TPR 0: highest IRR vector whose class beats PPR."""
    if not s["irr"]:
        return None
    vector = max(s["irr"])
    ppr_class = max(s["isr"]) >> 4 if s["isr"] else 0
    return vector if vector >> 4 > ppr_class else None


def _kvm_exit(s: State, *, eintr: bool) -> None:
    """What KVM does on every return from KVM_RUN (post_kvm_run_save)."""
    s["in_kernel"] = False
    s["signal"] = False  # a pending kick signal is delivered to the no-op handler
    s["ready"] = s["queued"] is None
    s["eintr"] = eintr


V = "kvmpy.vcpu:Vcpu"


def target_program(cfg: Config) -> list[Step]:
    """The vCPU thread's steps (see the module docstring)."""

    def loop_top(s: State):
        return None if s["vstate"] == RUNNABLE else "block_clear"

    def top_clear_ie(s: State):
        s["immediate_exit"] = 0

    def clear_request(s: State):
        s["request_event"] = False

    def inject_read(s: State):
        s["vec"] = _pending_vector(s)
        return None if s["vec"] is not None else "inject_done"

    def inject_ack(s: State):
        if not s["ready"]:
            return "inject_done"  # request_interrupt_window = 1: KVM exits when it can
        vector = s["vec"]
        s["irr"] = s["irr"] - {vector}
        s["isr"] = s["isr"] | {vector}
        if s["queued"] is not None:  # KVM_INTERRUPT without irqchip overwrites the slot
            s["overwritten"] = s["overwritten"] | {s["queued"]}
        s["queued"] = vector
        if cfg.ready_cleared_after_interrupt:
            s["ready"] = False
        return None

    def inject_done(s: State):
        s["vec"] = None

    def in_guest(s: State):
        s["mode"] = IN_GUEST

    def recheck(s: State):
        return "bail_out" if s["request_event"] else "syscall"

    def bail_out(s: State):
        s["mode"] = OUTSIDE
        return "loop_top"

    def syscall(s: State):
        if cfg.stale_ie_clear == "late":
            s["immediate_exit"] = 0  # the mutation: cleared after the re-check
        s["in_kernel"] = True

    def kvm_entry(s: State):
        if s["immediate_exit"]:
            _kvm_exit(s, eintr=True)
            return "mode_outside"
        return None

    def guest(s: State):
        if s["signal"]:
            _kvm_exit(s, eintr=True)
            return "mode_outside"
        if s["queued"] is not None:
            s["received"] = s["received"] | {s["queued"]}
            s["queued"] = None
            s["exit"] = "EOI"
            _kvm_exit(s, eintr=False)
            return "mode_outside"
        if s["budget"]:
            return ("guest_spin", "guest_hlt", "guest_other_exit")
        return ("guest_spin", "guest_hlt")

    def guest_spin(s: State):
        if not s["signal"]:
            return WAIT
        _kvm_exit(s, eintr=True)
        return "mode_outside"

    def guest_hlt(s: State):
        s["exit"] = "HLT"
        _kvm_exit(s, eintr=False)
        return "mode_outside"

    def guest_other_exit(s: State):
        s["budget"] -= 1
        s["exit"] = "IO"
        _kvm_exit(s, eintr=False)
        return "mode_outside"

    def mode_outside(s: State):
        s["mode"] = OUTSIDE
        return "clear_ie" if s["eintr"] else "dispatch"

    def clear_ie(s: State):
        if cfg.clear_immediate_exit:
            s["immediate_exit"] = 0
        s["eintr"] = False
        return "loop_top"  # KVM_EXIT_INTR: the fastpath says REENTER_GUEST

    def dispatch(s: State):
        if s["exit"] == "EOI" and s["isr"]:
            s["isr"] = s["isr"] - {max(s["isr"])}
        elif s["exit"] == "HLT":
            s["vstate"] = HALTED
        s["exit"] = None
        return "loop_top"

    def block_clear(s: State):
        s["wake"] = False
        return None if cfg.halt_polling else "block_mode"

    def poll_choice(s: State):
        return ("poll_mode", "block_mode")

    def poll_mode(s: State):
        s["mode"] = POLLING
        return None if cfg.poll_clear_before_check else "poll_check"

    def poll_clear(s: State):
        s["request_event"] = False
        return None if cfg.poll_clear_before_check else "poll_watch"

    def poll_check(s: State):
        if cfg.poll_recheck and _pending_vector(s) is not None:
            s["vstate"] = RUNNABLE
            s["mode"] = OUTSIDE
            return "loop_top"
        return None if cfg.poll_clear_before_check else "poll_clear"

    def poll_watch(s: State):
        if s["request_event"]:
            return "poll_again"
        return ("poll_spin", "poll_end")

    def poll_spin(s: State):
        return "poll_again" if s["request_event"] else WAIT

    def poll_again(s: State):
        if not cfg.poll_recheck and _pending_vector(s) is not None:
            s["vstate"] = RUNNABLE  # without the re-check, only a request ends the poll
            s["mode"] = OUTSIDE
            return "loop_top"
        return "poll_clear" if cfg.poll_clear_before_check else "poll_check"

    def poll_end(s: State):
        s["mode"] = OUTSIDE

    def block_mode(s: State):
        s["mode"] = BLOCKED
        return None if cfg.check_before_wait else "block_wait"

    def block_check(s: State):
        return "block_runnable" if _pending_vector(s) is not None else "block_wait"

    def block_runnable(s: State):
        s["vstate"] = RUNNABLE
        return "block_leave"

    def block_wait(s: State):
        return None if s["wake"] else WAIT

    def block_reclear(s: State):
        s["wake"] = False
        return "block_check"

    def block_leave(s: State):
        s["mode"] = OUTSIDE
        return "loop_top"

    run_loop = f"{V}.run_loop"
    inject = f"{V}._inject_pending_events"
    run = f"{V}.run"
    block = f"{V}._block_until_runnable"
    poll = f"{V}._poll_halt"
    sleep = f"{V}._sleep_until_runnable"
    kvm = None
    clear = Step("clear_request", (run_loop, "self.request_event = False"), clear_request)
    reads = [
        Step("inject_read", (inject, "vector = apic.pending_vector()"), inject_read),
        Step("inject_ack", (inject, "apic.ack(vector)"), inject_ack),
        Step("inject_done", None, inject_done),
    ]
    publish = Step("in_guest", (run_loop, "self.mode = VcpuMode.IN_GUEST"), in_guest)
    check = Step("recheck", (run_loop, "if self.request_event or machine.stopping"), recheck)
    steps = [Step("loop_top", (run_loop, "if self.state is not VcpuState.RUNNABLE:"), loop_top)]
    if cfg.stale_ie_clear == "top":
        steps.append(Step("top_clear_ie", (run_loop, "u8[kr.IMMEDIATE_EXIT] = 0"),
                          top_clear_ie))
    steps += [clear, *reads] if cfg.clear_request_before_inject else [*reads, clear]
    if not cfg.recheck:
        steps += [publish, Step("recheck", None, lambda s: "syscall")]
    elif cfg.mode_in_guest_before_recheck:
        steps += [publish, check]
    else:
        steps += [Step("recheck", check.where, lambda s: "bail_out" if s["request_event"]
                       else "in_guest"), Step("in_guest", publish.where,
                                              lambda s: (in_guest(s), "syscall")[1])]
    steps += [
        Step("bail_out", (run_loop, "self.mode = VcpuMode.OUTSIDE_GUEST"), bail_out),
        Step("syscall", (run, "ret = self.fd.run()"), syscall),
        Step("kvm_entry", kvm, kvm_entry),
        Step("guest", kvm, guest),
        Step("guest_spin", kvm, guest_spin),
        Step("guest_hlt", kvm, guest_hlt),
        Step("guest_other_exit", kvm, guest_other_exit),
        Step("mode_outside", (run, "self.mode = VcpuMode.OUTSIDE_GUEST"), mode_outside),
        Step("clear_ie", (run, "self.view.u8[kr.IMMEDIATE_EXIT] = 0"), clear_ie),
        Step("dispatch", (run_loop, "handle_exit(self, exit, fp)"), dispatch),
        Step("block_clear", (block, "self.wake.clear()"), block_clear),
        Step("poll_choice", (block, "machine.may_poll()"), poll_choice),
        Step("poll_mode", (poll, "self.mode = VcpuMode.POLLING"), poll_mode),
        Step("poll_clear", (poll, "self.request_event = False"), poll_clear),
        Step("poll_check", (poll, "if self._wakeup_pending():"), poll_check),
        Step("poll_watch", (poll, "while not self.request_event:"), poll_watch),
        Step("poll_spin", None, poll_spin),
        Step("poll_again", None, poll_again),
        Step("poll_end", (poll, "self.mode = VcpuMode.OUTSIDE_GUEST"), poll_end),
        Step("block_mode", (sleep, "self.mode = VcpuMode.BLOCKED"), block_mode),
        Step("block_check", (sleep, "elif self._wakeup_pending():"), block_check),
        Step("block_runnable", (sleep, "self.state = VcpuState.RUNNABLE"), block_runnable),
        Step("block_wait", (sleep, "self.wake.wait(timeout)"), block_wait),
        Step("block_reclear", (sleep, "self.wake.clear()"), block_reclear),
        Step("block_leave", (sleep, "self.mode = VcpuMode.OUTSIDE_GUEST"), block_leave),
    ]
    return steps


def sender_program(cfg: Config, me: str, vector: int) -> list[Step]:
    """One sender's steps: deliver a fixed IPI of `vector` to the target, then kick."""
    seen = f"seen:{me}"

    def publish(s: State):
        s["irr"] = s["irr"] | {vector}

    def request(s: State):
        s["request_event"] = True

    def read_mode(s: State):
        s[seen] = s["mode"]

    def act(s: State):
        if s[seen] == IN_GUEST:
            return "write_ie"
        if s[seen] == BLOCKED:
            return "wake"
        return "done"

    def write_ie(s: State):
        if cfg.write_immediate_exit:
            s["immediate_exit"] = 1

    def send_signal(s: State):
        if cfg.signal_only_if_in_guest and s["mode"] != IN_GUEST:
            return "done"  # it left KVM_RUN since: its loop top sees the request
        if cfg.send_signal and s["in_kernel"]:
            s["signal"] = True  # otherwise the handler runs in userspace: no effect
        return "done"

    def wake(s: State):
        if cfg.wake_blocked:
            s["wake"] = True

    def done(s: State):
        return WAIT

    kick = f"{V}.kick"
    p = Step("publish", ("kvmpy.apic.lapic:LocalApic.accept_fixed", "self.irr[vector] = 1"),
             publish)
    r = Step("request", (kick, "self.request_event = True"), request)
    m = Step("read_mode", (kick, "mode = self.mode"), read_mode)
    first = [p, r] if cfg.publish_before_request else [r, p]
    first = [*first, m] if cfg.read_mode_after_publish else [m, *first]
    return [
        *first,
        Step("act", (kick, "if mode == VcpuMode.IN_GUEST:"), act),
        Step("write_ie", (kick, "self.view.u8[kr.IMMEDIATE_EXIT] = 1"), write_ie),
        Step("signal", (f"{V}.send_posted_kicks", "if target.mode == VcpuMode.IN_GUEST:"),
             send_signal),
        Step("wake", (kick, "self.wake.set()"), wake),
        Step("done", None, done),
    ]


@dataclass
class Violation:
    """A reachable bad outcome and the interleaving that reaches it."""

    kind: str  # "lost interrupt", "overwritten interrupt", "livelock", "deadlock"
    state: dict
    trace: list[tuple[str, str]]  # (thread, step label) in execution order

    def __str__(self) -> str:
        steps = " ".join(f"{t}.{label}" for t, label in self.trace)
        return f"{self.kind}: {steps}"


@dataclass
class Result:
    """Outcome of `check`: counts, and the first violations found."""

    states: int = 0
    transitions: int = 0
    terminal_states: int = 0
    interleavings: int = 0  # complete executions (paths from start to a final state)
    violations: list[Violation] = field(default_factory=list)
    violation_count: int = 0

    @property
    def ok(self) -> bool:
        return self.violation_count == 0


class Model:
    """The target and its senders as programs over one shared state."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.threads: dict[str, list[Step]] = {"target": target_program(cfg)}
        for i, vector in enumerate(cfg.senders):
            self.threads[f"s{i}"] = sender_program(cfg, f"s{i}", vector)
        self.index = {
            name: {step.label: i for i, step in enumerate(prog)}
            for name, prog in self.threads.items()
        }

    def initial(self) -> State:
        s: State = {
            "irr": frozenset(), "isr": frozenset(), "received": frozenset(),
            "overwritten": frozenset(), "request_event": False, "mode": OUTSIDE,
            "immediate_exit": 0, "wake": False, "in_kernel": False, "signal": False,
            "ready": True, "queued": None, "vstate": RUNNABLE, "vec": None,
            "exit": None, "eintr": False, "budget": self.cfg.guest_exits,
        }
        for name in self.threads:
            s[f"pc:{name}"] = 0
            if name != "target":
                s[f"seen:{name}"] = None
        return s

    def label(self, s: State, thread: str) -> str:
        return self.threads[thread][s[f"pc:{thread}"]].label

    def successors(self, s: State) -> list[tuple[str, str, State]]:
        """Every (thread, step label, next state) one step away."""
        out = []
        for name, prog in self.threads.items():
            pc = s[f"pc:{name}"]
            step = prog[pc]
            s2 = dict(s)
            result = step.action(s2)
            if result is WAIT:
                continue
            targets = result if isinstance(result, tuple) else (result,)
            for target in targets:
                s3 = s2 if len(targets) == 1 else dict(s2)
                s3[f"pc:{name}"] = pc + 1 if target is None else self.index[name][target]
                out.append((name, step.label, s3))
        return out

    def final_problem(self, s: State) -> str | None:
        """At a state where nothing can move: is the outcome wrong?"""
        parked = self.label(s, "target") in ("guest_spin", "block_wait", "poll_spin")
        if not parked or any(self.label(s, t) != "done" for t in self.threads if t != "target"):
            return "deadlock"
        if s["overwritten"]:
            return "overwritten interrupt"
        if s["irr"]:
            return "lost interrupt"
        return None


def _key(s: State) -> tuple:
    return tuple(sorted(s.items()))


class _Stop(Exception):
    pass


def check(cfg: Config, *, keep: int = 3, stop_early: bool = False) -> Result:
    """Explore every interleaving of `cfg`'s threads (depth-first, states memoised) and
    check that every final state has consumed every published interrupt. With
    `stop_early`, return at the first violation (the counts are then partial)."""
    model = Model(cfg)
    res = Result()
    paths: dict[tuple, int] = {}
    on_stack: set[tuple] = set()
    trace: list[tuple[str, str]] = []

    def report(kind: str, s: State) -> None:
        res.violation_count += 1
        if len(res.violations) < keep:
            res.violations.append(Violation(kind, dict(s), list(trace)))
        if stop_early:
            raise _Stop

    def visit(s: State) -> int:
        key = _key(s)
        if key in paths:
            return paths[key]
        if key in on_stack:
            report("livelock", s)  # the target can loop forever without progress
            return 0
        on_stack.add(key)
        res.states += 1
        succ = model.successors(s)
        if not succ:
            res.terminal_states += 1
            problem = model.final_problem(s)
            if problem:
                report(problem, s)
            count = 1
        else:
            count = 0
            for thread, label, s2 in succ:
                res.transitions += 1
                trace.append((thread, label))
                count += visit(s2)
                trace.pop()
        on_stack.discard(key)
        paths[key] = count
        return count

    try:
        res.interleavings = visit(model.initial())
    except _Stop:
        pass
    return res
