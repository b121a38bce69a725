"""An explicit-state model of the native core's kick protocol, checked over every
interleaving.

The protocol lives in C (kvmpy/native): kick.c (kvm_vcpu_kick, send_posted_kicks,
kick_signal, kick_wake, kvm_vcpu_poll, kvm_vcpu_block_wait), vcpu_loop.c (the loop top
of vcpu_enter_guest, run, handle_exit_irqoff's HLT, vcpu_halt_in_core) and module.c
(Core_stop, and the primitives of Python's halt: poll_begin/poll/poll_end,
sleep_begin/wake_clear/wait/sleep_end). Each thread is modelled step by step, one
shared access per step; every step that models C names the file and function and
quotes the statement (`Step.where`), and tests/test_kick_model.py checks that the
quotes are still in kvmpy/native/*.c, in the model's order.

Memory model. The search interleaves whole steps: it assumes every access it models is
sequentially consistent (SC). What the C gives, and why that amounts to SC here:
 - `mode`, `request`, `stopping`: every store is memory_order_seq_cst, and so is every
   load the protocol decides on (the kick's read of mode, send_posted_kicks' re-read,
   the re-check of request and stopping after IN_GUEST, halt_over's stopping, as
   kick.c states at each access). C11 7.17.3 puts all seq_cst operations in one
   total order S consistent with each thread's program order, so these accesses are
   exactly interleaved steps; this is the Dekker pair of kick.c's header ("of 'sender
   reads mode' and 'target re-checks request', seq_cst makes at least one see the
   other's store"). The other loads only wait or leave early, and a stale value there
   just means "later": kvm_vcpu_poll's acquire spin on request and relaxed look at
   stopping (poll_spin waits until the store is seen), the loop top's acquire
   stopping (the seq_cst re-check decides).
 - `wake`: the clears are seq_cst, the token is a release store (kick_wake), the
   waiter's loads are acquire, and FUTEX_WAIT compares it in the kernel. The protocol
   reasons about the token through its modification order only (a token stored
   before the clear is dropped, one after it is seen by FUTEX_WAIT), which C11
   coherence gives for any atomic object.
 - The data the protocol publishes are not in S: the IRR bytes (release store by the
   sender, memrchr read by the target), `immediate_exit` (relaxed), kvm_run's flags.
   The model interleaves them too, which the code gets from x86-64, kvmpy's only
   architecture, not from C11 alone: gcc emits each seq_cst store as `xchg` (or
   `mov; mfence`), a full barrier (SDM Vol. 3A 9.2.2: loads and stores are not
   reordered with locked instructions, which have one total order; stores are not
   reordered with stores, loads not with loads), and the one reordering x86 allows, a
   load passing an earlier plain store, never crosses a step the protocol relies on:
   each such store is followed by a seq_cst store before the thread's next load that
   matters (sender: IRR byte, then request = 1; target: immediate_exit = 0, then
   request = 0; the IRR ack, then mode = IN_GUEST; kick_wake: the token, then
   FUTEX_WAKE, which orders it: kernel/futex/waitwake.c). tests/test_kick_model.py
   checks the xchg in the built core. Under C11 alone, the target's plain IRR read
   after its seq_cst clear of request (or of the token) could miss the IRR store of a
   sender whose request = 1 that clear overwrote (the store-buffering shape): portable
   C would need atomic_thread_fence(memory_order_seq_cst) before those reads.
 - Python's steps run under the GIL, whose hand-offs are full barriers; its stores to
   shared memory are followed by a core call that makes a seq_cst store (core.kick),
   as the C sender's are; accept_fixed's IRR byte is itself a locked xchg
   (core.irr_test_and_set; through the bytearray only without a core).
 - The kernel's parts are atomic steps: FUTEX_WAIT compares the token and queues in
   one step relative to FUTEX_WAKE (futex(2)); pthread_kill makes a signal pending
   that KVM_RUN turns into -EINTR (KVM checks signal_pending before each guest entry
   and kicks a vCPU in guest mode); KVM_RUN returns -EINTR at once when
   `immediate_exit` is set at entry. A signal sent while the target is not inside
   KVM_RUN is assumed lost (its no-op handler may run before the ioctl).

Target vCPU thread, the core (vcpu_enter_guest, run, handle_exit_irqoff,
vcpu_halt_in_core), with KVM's side of KVM_RUN and the Python loop around it:

    loop_top      if stopping: return RET_STOP (Python's loop then ends: `exited`)
    top_clear_ie  immediate_exit = 0 (a kick that came while outside KVM_RUN: its
                  request is picked up below, so the flag is stale)
    clear_request request = 0
    inject_read   vector = lapic_pending_vector(v)   (IRR above PPR)
    inject_ack    if ready_for_interrupt_injection && if_flag: lapic_ack; kvm_queue_interrupt
                  (KVM_INTERRUPT, or kvm_run.s.regs.events set by the next KVM_RUN);
                  ready_for_interrupt_injection = 0 (KVM holds ONE queued interrupt)
    in_guest      mode = IN_GUEST
    recheck_request, recheck_stop: if request || stopping: bail_out (mode = OUTSIDE,
                  continue)
    syscall       ioctl(KVM_RUN) (from here a signal is pending in the kernel)
    kvm_entry     KVM: immediate_exit set -> -EINTR
    guest         takes the queued interrupt and EOIs (an exit the fastpath
                  completes), or spins until a signal (-EINTR), or executes HLT, or
                  makes one exit for Python (I/O)
    mode_outside  mode = OUTSIDE_GUEST; EINTR: clear_ie (immediate_exit = 0)
    fastpath      handle_exit_irqoff: EINTR and EOI re-enter; HLT: native (below) or
                  handed to Python (--fastpath python/off: both explored)
    hlt_check     lapic_halt_ends_at_once (IRR) -> re-enter; else vcpu_halt_in_core:
    poll_choice   poll first or not (halt_poll_ns, may_poll): both explored
    poll_mode     mode = POLLING; then per pass:
    poll_clear    request = 0
    poll_check    halt_over (IRR, stop) -> poll_ok: mode = OUTSIDE, loop top
    poll_watch    kvm_vcpu_poll: spin until request (poll_got: next pass) or stop, or
                  the window ends (poll_end: mode = OUTSIDE)
    block_mode    mode = BLOCKED; then per pass:
    block_clear   wake = 0
    block_check   halt_over -> block_leave: mode = OUTSIDE, loop top
    block_token   kvm_vcpu_block_wait: a token there -> next pass
    futex_wait    FUTEX_WAIT(wake, 0): sleeps unless the token came (futex_sleep
                  until a FUTEX_WAKE; then the next pass)

Python's halt (vcpu.py _block_until_runnable, _poll_halt, _sleep_until_runnable) on
the core's primitives (module.c), for a HLT the core handed over:

    py_hlt        handle_exit_irqoff's HLT: pending -> re-enter; else state = HALTED
    py_loop_top   run_loop: `while not machine.stopping`, then halted -> block;
                  runnable -> inject_* (_inject_pending_events), py_to_core (core.run)
    py_poll_*     poll_begin (mode = POLLING, request = 0); per pass: stopping?,
                  _wakeup_pending(), poll (kvm_vcpu_poll; a request seen is cleared);
                  poll_end (mode = OUTSIDE)
    py_sleep_*    sleep_begin (mode = BLOCKED); per pass: stopping? (the `while`
                  condition), wake_clear (wake = 0), _wakeup_pending(), wait
                  (kvm_vcpu_block_wait); sleep_end. CPython may switch threads between
                  the condition and wake_clear (the loop's backward jump checks the
                  eval breaker): Config.py_sleep_stop "before_clear" is the code as
                  written, whose stop can be missed; "after_clear" checks it after
                  wake_clear

Sender threads (lapic_fast.c deliver_fixed -> kick.c kvm_vcpu_kick; Python's senders
do the same through ApicBus._deliver and Vcpu.kick -> core.kick):

    publish       irr[vector] = 1 (release)
    request       request = 1
    read_mode     mode
    act           IN_GUEST: write_ie (immediate_exit = 1), then signal; BLOCKED:
                  wake_token (wake = 1), then futex_wake; POLLING, OUTSIDE: nothing
    A vCPU's exit handling (a `posted` sender) sends the signal or wake-up at its own
    next entry or sleep (send_posted_kicks): a later step of the same sender, which
    the search places anywhere after read_mode; a posted signal re-reads the mode
    and is dropped unless the target is IN_GUEST.

The stopper (module.c Core_stop, after Machine.stop set machine.stopping; one flag
here): stopping = 1, then kvm_vcpu_kick and kick_wake of the target.

The guest is always interruptible (IF=1, TPR 0); each sender sends one fixed IPI.
KVM writes `ready_for_interrupt_injection` (queued slot empty) on every return from
KVM_RUN, an immediate EINTR included. `Config` turns single steps off or reorders them,
so the tests can show that each one is needed.
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

WAIT = object()  # the step cannot run now (the thread sleeps or spins)

State = dict  # variable name -> hashable value
Action = Callable[[State], "str | None | object | tuple[str, ...]"]

# Where the target thread may stay forever: in the guest, spinning in a poll, asleep.
PARKED = frozenset({"guest_spin", "poll_spin", "futex_sleep", "py_poll_spin",
                    "py_futex_sleep"})


@dataclass(frozen=True)
class Step:
    """One atomic step. `action` mutates the state and returns None (fall through to
    the next step of the program), a label to jump to, WAIT (not enabled now), or a
    tuple of labels (a nondeterministic choice; the action must then change nothing)."""

    label: str
    where: tuple[str, str] | None  # ("kvmpy/native/FILE.c:function", quoted statement)
    action: Action
    # Touches only its own thread's variables: it commutes with every other thread's
    # steps, so the search runs it at once instead of interleaving it (a sound
    # partial-order reduction; a local step never parks nor ends a thread).
    local: bool = False


@dataclass(frozen=True)
class Config:
    """The protocol as the core implements it (defaults), or a mutation of it."""

    senders: tuple[int, ...] = (0x40,)  # one vector per sender thread
    posted: tuple[bool, ...] = ()  # per sender: a vCPU's exit handling (posts its kicks)
    stop: bool = False  # add the stopper (Core_stop); then the target must leave
    guest_exits: int = 1  # exits to Python (I/O, ...) per execution
    halt_polling: bool = True  # explore halts that poll first (and ones that do not)
    python_halt: bool = True  # explore HLTs handed to Python (--fastpath python/off)
    # the core's loop top (vcpu_enter_guest)
    # where a stale immediate_exit is cleared: "top" (before request = 0), "late"
    # (after the re-check: a mutation) or "never"
    stale_ie_clear: str = "top"
    clear_ie_after_eintr: bool = True
    clear_request_before_inject: bool = True
    mode_in_guest_before_recheck: bool = True
    recheck: bool = True
    ready_cleared_after_interrupt: bool = True
    # the core's halt (vcpu_halt_in_core)
    poll_clear: str = "before"  # request = 0 "before" / "after" the re-check, "never"
    poll_recheck: bool = True  # halt_over right after the clear (not only after a request)
    block_mode_before_recheck: bool = True
    wake_clear: str = "before"  # wake = 0 "before" / "after" the re-check, "never"
    block_recheck: bool = True
    futex_compares: bool = True  # FUTEX_WAIT sleeps only if the token is still 0
    halt_checks_stop: bool = True
    # Python's halt on the core's primitives (vcpu.py, module.c)
    py_poll_clears_request: bool = True  # Core_poll clears the request it saw
    py_wake_clear_before_recheck: bool = True
    # Where _sleep_until_runnable checks `machine.stopping`: "before_clear" (as
    # written: the loop's condition, then wake_clear; CPython may switch threads at
    # the loop's backward jump in between) or "after_clear" (wake_clear, then the
    # check)
    py_sleep_stop: str = "before_clear"
    # the sender (kvm_vcpu_kick, kick_wake)
    publish_before_request: bool = True
    read_mode_after_request: bool = True
    write_immediate_exit: bool = True
    send_signal: bool = True
    wake_blocked: bool = True
    token_before_futex_wake: bool = True
    # the stopper (Core_stop)
    stopping_before_kicks: bool = True


def _pending_vector(s: State) -> int | None:
    """lapic_pending_vector with TPR 0: highest IRR vector whose class beats PPR."""
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


LOOP = "kvmpy/native/vcpu_loop.c"
KICK = "kvmpy/native/kick.c"
MODULE = "kvmpy/native/module.c"
LAPIC = "kvmpy/native/lapic_fast.c"

ENTER = f"{LOOP}:vcpu_enter_guest"
INJECT = f"{LOOP}:inject_pending_irq"
RUN = f"{LOOP}:run"
IRQOFF = f"{LOOP}:handle_exit_irqoff"
HALT = f"{LOOP}:vcpu_halt_in_core"
POLL = f"{KICK}:kvm_vcpu_poll"
BLOCK = f"{KICK}:kvm_vcpu_block_wait"
OUTSIDE_STORE = "atomic_store_explicit(&v->mode, OUTSIDE_GUEST, memory_order_seq_cst);"
REQUEST_CLEAR = "atomic_store_explicit(&v->request, 0, memory_order_seq_cst);"
POLL_SPIN = "while (!atomic_load_explicit(&v->request, memory_order_acquire)) {"
TOKEN_LOAD = "if (atomic_load_explicit(&v->wake, memory_order_acquire))"
FUTEX_WAIT = "syscall(SYS_futex, &v->wake, FUTEX_WAIT_PRIVATE, 0, tp, NULL, 0);"


def target_program(cfg: Config) -> list[Step]:  # noqa: C901 - one closure per step
    """The vCPU thread's steps (see the module docstring)."""

    def go(label: str) -> Action:
        return lambda s: label

    # ---- the core's loop top: vcpu_enter_guest
    def loop_top(s: State):
        return "exited" if s["stopping"] else None

    def top_clear_ie(s: State):
        s["immediate_exit"] = 0

    def clear_request(s: State):
        s["request"] = 0

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
        return "py_to_core" if s["in_python"] else None

    def in_guest(s: State):
        s["mode"] = IN_GUEST

    def recheck_request(s: State):
        return "bail_out" if s["request"] else None

    def recheck_stop(s: State):
        return "bail_out" if s["stopping"] else "syscall"

    def bail_out(s: State):
        s["mode"] = OUTSIDE
        return "loop_top"

    # ---- run(): KVM_RUN, with KVM's side
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
        if s["eintr"]:
            s["exit"] = "INTR"
            return None
        return "fastpath"

    def clear_ie(s: State):
        if cfg.clear_ie_after_eintr:
            s["immediate_exit"] = 0
        s["eintr"] = False

    # ---- handle_exit_irqoff
    def fastpath(s: State):
        exit, s["exit"] = s["exit"], None
        if exit == "INTR":
            return "loop_top"
        if exit == "EOI":  # lapic_eoi_fast
            s["isr"] = s["isr"] - {max(s["isr"])}
            return "loop_top"
        if exit == "IO":
            return "py_dispatch"
        return ("hlt_check", "py_hlt") if cfg.python_halt else "hlt_check"

    def hlt_check(s: State):
        return "loop_top" if _pending_vector(s) is not None else None

    # ---- vcpu_halt_in_core: poll
    def poll_choice(s: State):
        return ("poll_mode", "block_mode") if cfg.halt_polling else "block_mode"

    def poll_mode(s: State):
        s["mode"] = POLLING
        return None if cfg.poll_clear == "before" else "poll_check"

    def poll_clear(s: State):
        if cfg.poll_clear != "never":
            s["request"] = 0
        return None if cfg.poll_clear == "before" else "poll_watch"

    def halt_over(s: State) -> bool:
        return _pending_vector(s) is not None or (cfg.halt_checks_stop and s["stopping"])

    def poll_check(s: State):
        if cfg.poll_recheck or s["poll_got"]:
            s["poll_got"] = False
            if halt_over(s):
                return "poll_ok"
        return "poll_watch" if cfg.poll_clear == "before" else "poll_clear"

    def poll_ok(s: State):
        s["mode"] = OUTSIDE
        return "loop_top"

    def poll_watch(s: State):
        if s["request"]:
            return "poll_got"
        return ("poll_spin", "poll_end")

    def poll_spin(s: State):
        if s["request"]:
            return "poll_got"
        return "poll_end" if s["stopping"] else WAIT

    def poll_got(s: State):
        if not cfg.poll_recheck:
            s["poll_got"] = True  # the mutation re-checks only after a request
        return "poll_clear" if cfg.poll_clear == "before" else "poll_check"

    def poll_end(s: State):
        s["mode"] = OUTSIDE

    # ---- vcpu_halt_in_core: block
    def block_mode(s: State):
        if cfg.block_mode_before_recheck:
            s["mode"] = BLOCKED

    def block_clear(s: State):
        if cfg.wake_clear == "before":
            s["wake"] = 0
        return None

    def block_check(s: State):
        if cfg.block_recheck and halt_over(s):
            return "block_leave"
        return None

    def block_clear_late(s: State):
        if cfg.wake_clear == "after":
            s["wake"] = 0  # the mutation: the token dropped after the re-check
        return "block_token" if cfg.block_mode_before_recheck else None

    def block_mode_late(s: State):
        s["mode"] = BLOCKED

    def block_token(s: State):
        return "block_clear" if s["wake"] else None

    def futex_wait(s: State):
        if cfg.futex_compares and s["wake"]:
            return "block_clear"  # EAGAIN
        s["futex_waiting"] = True

    def futex_sleep(s: State):
        return WAIT if s["futex_waiting"] else "block_clear"

    def block_leave(s: State):
        s["mode"] = OUTSIDE
        return "loop_top"

    # ---- Python: the exit's dispatch, run_loop, _block_until_runnable
    def py_dispatch(s: State):
        s["in_python"] = True
        return "py_loop_top"

    def py_hlt(s: State):
        s["in_python"] = True
        if _pending_vector(s) is None:
            s["vstate"] = HALTED
        return "py_loop_top"

    def py_loop_top(s: State):
        if s["stopping"]:
            return "exited"
        if s["vstate"] == HALTED:
            return ("py_poll_mode", "py_sleep_begin") if cfg.halt_polling else "py_sleep_begin"
        return "inject_read"  # _inject_pending_events, then core.run

    def py_to_core(s: State):
        s["in_python"] = False
        return "loop_top"

    def py_poll_mode(s: State):
        s["mode"] = POLLING

    def py_poll_clear(s: State):
        s["request"] = 0

    def py_poll_stop(s: State):
        return "py_poll_end" if s["stopping"] else None

    def py_poll_check(s: State):
        if _pending_vector(s) is not None:
            s["vstate"] = RUNNABLE
            return "py_poll_end"
        return None

    def py_poll_watch(s: State):
        if s["request"]:
            return "py_poll_got"
        return ("py_poll_spin", "py_poll_end")

    def py_poll_spin(s: State):
        if s["request"]:
            return "py_poll_got"
        return "py_poll_end" if s["stopping"] else WAIT

    def py_poll_got(s: State):
        if cfg.py_poll_clears_request:
            s["request"] = 0
        return "py_poll_stop"

    def py_poll_end(s: State):
        s["mode"] = OUTSIDE
        return "py_loop_top" if s["vstate"] == RUNNABLE else None

    def py_sleep_begin(s: State):
        s["mode"] = BLOCKED
        return "py_wake_clear" if cfg.py_sleep_stop == "after_clear" else None

    def py_sleep_stop(s: State):
        if s["stopping"]:
            return "py_sleep_end"
        return None if cfg.py_sleep_stop == "before_clear" else "py_sleep_check"

    def py_wake_clear(s: State):
        if cfg.py_wake_clear_before_recheck:
            s["wake"] = 0
        return "py_sleep_stop" if cfg.py_sleep_stop == "after_clear" else None

    def py_sleep_check(s: State):
        if _pending_vector(s) is not None:
            s["vstate"] = RUNNABLE
            return "py_sleep_end"
        return None

    def py_wake_clear_late(s: State):
        if not cfg.py_wake_clear_before_recheck:
            s["wake"] = 0  # the mutation: the token dropped after the re-check

    def py_token(s: State):
        return "py_sleep_again" if s["wake"] else None

    def py_futex_wait(s: State):
        if s["wake"]:
            return "py_sleep_again"
        s["futex_waiting"] = True

    def py_futex_sleep(s: State):
        return WAIT if s["futex_waiting"] else None

    def py_sleep_again(s: State):
        return "py_wake_clear" if cfg.py_sleep_stop == "after_clear" else "py_sleep_stop"

    def py_sleep_end(s: State):
        s["mode"] = OUTSIDE
        return "py_loop_top"

    def exited(s: State):
        return WAIT

    def poll_clear_step() -> Step:
        return Step("poll_clear", (HALT, REQUEST_CLEAR), poll_clear)

    def poll_check_step() -> Step:
        return Step("poll_check", (HALT, "if (halt_over(v)) {"), poll_check)

    poll_pass = [poll_clear_step(), poll_check_step()]
    if cfg.poll_clear != "before":
        poll_pass.reverse()
    publish = Step("in_guest", (ENTER, "atomic_store_explicit(&v->mode, IN_GUEST, "
                                       "memory_order_seq_cst);"), in_guest)
    checks = [
        Step("recheck_request", (ENTER, "if (atomic_load_explicit(&v->request, "
                                        "memory_order_seq_cst) ||"), recheck_request),
        Step("recheck_stop", (ENTER, "atomic_load_explicit(&vm->stopping, "
                                     "memory_order_seq_cst))"), recheck_stop),
    ]
    if not cfg.recheck:
        checks = [Step("recheck_request", None, go("syscall")),
                  Step("recheck_stop", None, go("syscall"))]
    clear = Step("clear_request", (ENTER, REQUEST_CLEAR), clear_request)
    inject = [
        Step("inject_read", (INJECT, "int vector = lapic_pending_vector(v);"), inject_read),
        Step("inject_ack", (INJECT, "lapic_ack(v, vector);"), inject_ack),
        Step("inject_done", None, inject_done, local=True),
    ]
    steps = [
        Step("loop_top", (ENTER, "if (atomic_load_explicit(&vm->stopping, "
                                 "memory_order_acquire))"), loop_top),
    ]
    if cfg.stale_ie_clear == "top":
        steps.append(Step("top_clear_ie", (ENTER, "atomic_store_explicit((_Atomic uint8_t *)"
                                                  "&kr->immediate_exit, 0,"), top_clear_ie))
    steps += [clear, *inject] if cfg.clear_request_before_inject else [*inject, clear]
    if cfg.mode_in_guest_before_recheck:
        steps += [publish, *checks]
    else:
        steps += [*checks[:1], Step("recheck_stop", checks[1].where,
                                    lambda s: "bail_out" if s["stopping"] else None),
                  Step("in_guest", publish.where, lambda s: (in_guest(s), "syscall")[1])]
    steps += [
        Step("bail_out", (ENTER, OUTSIDE_STORE), bail_out),
        Step("syscall", (RUN, "int ret = ioctl(v->fd, KVM_RUN, 0);"), syscall),
        Step("kvm_entry", None, kvm_entry),
        Step("guest", None, guest),
        Step("guest_spin", None, guest_spin),
        Step("guest_hlt", None, guest_hlt),
        Step("guest_other_exit", None, guest_other_exit),
        Step("mode_outside", (RUN, OUTSIDE_STORE), mode_outside),
        Step("clear_ie", (RUN, "atomic_store_explicit((_Atomic uint8_t *)&kr->immediate_exit,"
                               " 0,"), clear_ie),
        Step("fastpath", (IRQOFF, "switch (exit->reason) {"), fastpath, local=True),
        Step("hlt_check", (IRQOFF, "if (lapic_halt_ends_at_once(v, v->run->if_flag))"),
             hlt_check),
        Step("poll_choice", (HALT, "if (poll_ns && kvm_vcpu_may_poll(v)) {"), poll_choice,
             local=True),
        Step("poll_mode", (HALT, "atomic_store_explicit(&v->mode, POLLING, "
                                 "memory_order_seq_cst);"), poll_mode),
        *poll_pass,
        Step("poll_ok", (HALT, OUTSIDE_STORE), poll_ok),
        Step("poll_watch", (POLL, POLL_SPIN), poll_watch),
        Step("poll_spin", None, poll_spin),
        Step("poll_got", None, poll_got, local=True),
        Step("poll_end", (HALT, OUTSIDE_STORE), poll_end),
        Step("block_mode", (HALT, "atomic_store_explicit(&v->mode, BLOCKED, "
                                  "memory_order_seq_cst);"), block_mode),
        Step("block_clear", (HALT, "atomic_store_explicit(&v->wake, 0, "
                                   "memory_order_seq_cst);"), block_clear),
        Step("block_check", (HALT, "if (halt_over(v))"), block_check),
        Step("block_clear_late", None, block_clear_late, local=cfg.wake_clear != "after"),
        Step("block_mode_late", None, block_mode_late),
        Step("block_token", (BLOCK, TOKEN_LOAD), block_token),
        Step("futex_wait", (BLOCK, FUTEX_WAIT), futex_wait),
        Step("futex_sleep", None, futex_sleep),
        Step("block_leave", (HALT, OUTSIDE_STORE), block_leave),
        # Python's side: quoted by the C primitives it calls (module.c)
        Step("py_dispatch", None, py_dispatch, local=True),
        Step("py_hlt", None, py_hlt),
        Step("py_loop_top", None, py_loop_top),
        Step("py_to_core", None, py_to_core, local=True),
        Step("py_poll_mode", (f"{MODULE}:Core_poll_begin", "atomic_store_explicit(&v->mode, "
                              "POLLING, memory_order_seq_cst);"), py_poll_mode),
        Step("py_poll_clear", (f"{MODULE}:Core_poll_begin", REQUEST_CLEAR), py_poll_clear),
        Step("py_poll_stop", None, py_poll_stop),
        Step("py_poll_check", None, py_poll_check),
        Step("py_poll_watch", (f"{MODULE}:Core_poll", "got = kvm_vcpu_poll(&s->v, end);"),
             py_poll_watch),
        Step("py_poll_spin", None, py_poll_spin),
        Step("py_poll_got", (f"{MODULE}:Core_poll", "atomic_store_explicit(&s->v.request, 0,"
                             " memory_order_seq_cst);"), py_poll_got),
        Step("py_poll_end", (f"{MODULE}:Core_poll_end", OUTSIDE_STORE), py_poll_end),
        Step("py_sleep_begin", (f"{MODULE}:Core_sleep_begin", "atomic_store_explicit("
                                "&v->mode, BLOCKED, memory_order_seq_cst);"), py_sleep_begin),
        Step("py_sleep_stop", None, py_sleep_stop),
        Step("py_wake_clear", (f"{MODULE}:Core_wake_clear", "atomic_store_explicit(&v->wake,"
                               " 0, memory_order_seq_cst);"), py_wake_clear),
        Step("py_sleep_check", None, py_sleep_check),
        Step("py_wake_clear_late", None, py_wake_clear_late,
             local=cfg.py_wake_clear_before_recheck),
        Step("py_token", (BLOCK, TOKEN_LOAD), py_token),
        Step("py_futex_wait", (BLOCK, FUTEX_WAIT), py_futex_wait),
        Step("py_futex_sleep", None, py_futex_sleep),
        Step("py_sleep_again", None, py_sleep_again, local=True),
        Step("py_sleep_end", (f"{MODULE}:Core_sleep_end", OUTSIDE_STORE), py_sleep_end),
        Step("exited", None, exited),
    ]
    return steps


def sender_program(cfg: Config, me: str, vector: int | None, posted: bool) -> list[Step]:
    """One sender's steps: publish a fixed IPI of `vector` to the target, then kick it
    (kvm_vcpu_kick). `vector` None: the stopper (Core_stop)."""
    seen = f"seen:{me}"
    stopper = vector is None

    def publish(s: State):
        s["irr"] = s["irr"] | {vector}

    def set_stopping(s: State):
        s["stopping"] = 1

    def request(s: State):
        s["request"] = 1

    def read_mode(s: State):
        s[seen] = s["mode"]

    def act(s: State):
        if s[seen] == IN_GUEST:
            return "write_ie"
        if s[seen] == BLOCKED:
            return "wake_token" if cfg.token_before_futex_wake else "futex_wake_early"
        return "kicked"

    def write_ie(s: State):
        if cfg.write_immediate_exit:
            s["immediate_exit"] = 1

    def signal(s: State):
        if posted and s["mode"] != IN_GUEST:
            return "kicked"  # it left KVM_RUN since: its loop top sees the request
        if cfg.send_signal and s["in_kernel"]:
            s["signal"] = True  # otherwise the handler runs in userspace: no effect
        return "kicked"

    def futex_wake_early(s: State):
        if cfg.wake_blocked:
            s["futex_waiting"] = False

    def wake_token(s: State):
        if cfg.wake_blocked:
            s["wake"] = 1
        return None if cfg.token_before_futex_wake else "kicked"

    def futex_wake(s: State):
        if cfg.wake_blocked:
            s["futex_waiting"] = False

    def kicked(s: State):
        return None if stopper else "done"

    def stop_token(s: State):
        s["wake"] = 1

    def stop_futex_wake(s: State):
        s["futex_waiting"] = False
        return "done" if cfg.stopping_before_kicks else None

    def done(s: State):
        return WAIT

    kick = f"{KICK}:kvm_vcpu_kick"
    wake = f"{KICK}:kick_wake"
    core_stop = f"{MODULE}:Core_stop"
    signal_where = (f"{KICK}:send_posted_kicks", "if (atomic_load_explicit(&t->mode, "
                    "memory_order_seq_cst) == IN_GUEST)") if posted \
        else (kick, "kick_signal(target);")
    r = Step("request", (kick, "atomic_store_explicit(&target->request, 1, "
                               "memory_order_seq_cst);"), request)
    m = Step("read_mode", (kick, "int mode = atomic_load_explicit(&target->mode, "
                                 "memory_order_seq_cst);"), read_mode)
    if stopper:
        first = [Step("stop_flag", (core_stop, "atomic_store_explicit(&self->vm.stopping, 1, "
                                               "memory_order_seq_cst);"), set_stopping)]
        first = [*first, r, m] if cfg.stopping_before_kicks else [r, m]
    else:
        p = Step("publish", (f"{LAPIC}:deliver_fixed", "atomic_store_explicit((_Atomic "
                             "uint8_t *)&a->irr[vector], 1, memory_order_release);"), publish)
        first = [p, r] if cfg.publish_before_request else [r, p]
        first = [*first, m] if cfg.read_mode_after_request else [m, *first]
    steps = [
        *first,
        Step("act", (kick, "if (mode == IN_GUEST) {"), act, local=True),
        Step("write_ie", (kick, "atomic_store_explicit((_Atomic uint8_t *)&target->run->"
                                "immediate_exit, 1,"), write_ie),
        Step("signal", signal_where, signal),
        Step("futex_wake_early", None, futex_wake_early),
        Step("wake_token", (wake, "atomic_store_explicit(&t->wake, 1, memory_order_release);"),
             wake_token),
        Step("futex_wake", (wake, "syscall(SYS_futex, &t->wake, FUTEX_WAKE_PRIVATE, 1, "
                                  "NULL, NULL, 0);"), futex_wake),
        Step("kicked", None, kicked, local=True),
    ]
    if stopper:
        steps += [
            Step("stop_token", (wake, "atomic_store_explicit(&t->wake, 1, "
                                      "memory_order_release);"), stop_token),
            Step("stop_futex_wake", (wake, "syscall(SYS_futex, &t->wake, FUTEX_WAKE_PRIVATE,"
                                           " 1, NULL, NULL, 0);"), stop_futex_wake),
            Step("stop_flag_late", None, lambda s: (set_stopping(s), "done")[1]),
        ]
    steps.append(Step("done", None, done))
    return steps


@dataclass
class Violation:
    """A reachable bad outcome and the interleaving that reaches it."""

    kind: str  # "lost interrupt", "overwritten interrupt", "missed stop", "livelock", ...
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
            posted = cfg.posted[i] if i < len(cfg.posted) else False
            self.threads[f"s{i}"] = sender_program(cfg, f"s{i}", vector, posted)
        if cfg.stop:
            self.threads["stop"] = sender_program(cfg, "stop", None, False)
        self.index = {
            name: {step.label: i for i, step in enumerate(prog)}
            for name, prog in self.threads.items()
        }
        for name, labels in self.index.items():
            assert len(labels) == len(self.threads[name]), f"{name}: duplicate labels"

    def initial(self) -> State:
        s: State = {
            "irr": frozenset(), "isr": frozenset(), "received": frozenset(),
            "overwritten": frozenset(), "request": 0, "mode": OUTSIDE,
            "immediate_exit": 0, "wake": 0, "futex_waiting": False, "in_kernel": False,
            "signal": False, "ready": True, "queued": None, "vstate": RUNNABLE,
            "in_python": False, "vec": None, "exit": None, "eintr": False,
            "poll_got": False, "stopping": 0, "budget": self.cfg.guest_exits,
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
        threads = self.threads.items()
        for name, prog in threads:
            if prog[s[f"pc:{name}"]].local:
                threads = ((name, prog),)  # run it alone (see Step.local)
                break
        for name, prog in threads:
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
        where = self.label(s, "target")
        if any(self.label(s, t) != "done" for t in self.threads if t != "target"):
            return "deadlock"
        if self.cfg.stop:
            return None if where == "exited" else "missed stop"
        if where not in PARKED:
            return "deadlock"
        if s["overwritten"]:
            return "overwritten interrupt"
        if s["irr"]:
            return "lost interrupt"
        return None


class _Stop(Exception):
    pass


def check(cfg: Config, *, keep: int = 3, stop_early: bool = False) -> Result:
    """Explore every interleaving of `cfg`'s threads (depth-first, states memoised) and
    check every final state: no published interrupt left pending while the target
    sleeps or spins, none overwritten, the target gone after a stop; a cycle (the
    target looping forever without progress) is a livelock. With `stop_early`, return
    at the first violation (the counts are then partial)."""
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
        key = tuple(s.values())  # every state has the same keys, in the same order
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
