"""Joining the rings into interrupts: source -> kick / wake -> injection -> EOI.

An interrupt's identity is (target vCPU, vector, injection): every source of a vector
on a target, an IPI send (recorded by its sender before the IRR store) or the target's
own timer putting its vector in IRR, is joined to the FIRST injection of that vector on
that target after it, and that injection to the first EOI of the vector after it (one
vector can be in service only once: a second injection of it waits for the EOI). Two
sources before one injection coalesced in IRR (SDM 10.8.4: one pending bit per vector):
the first is the interrupt's primary source, the others are listed as merged into it,
never counted as interrupts of their own. NMIs (no EOI) are joined send -> KVM_NMI.

What the join cannot see is reported, not guessed: injections with no recorded source
(the ring of their sender wrapped, or a source that is not traced such as the LVT error
interrupt), and sources never injected (still pending when the VM stopped, or lost).
A race the records leave open: a sender's record and its IRR store are two steps; if
the target injects the previous pending bit of the same vector in between (a GIL switch
at exactly that point), the later IPI is joined to the earlier injection and its own
injection shows as unsourced. Senders keeping one IPI in flight per vector never hit it.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from kvmpy.kvm import ioctls as k

from . import recorder as r

DM_NMI = 4
DM_INIT = 5
DM_SIPI = 6
NMI_VECTOR = 2

Record = tuple[int, int, int, int]


@dataclass
class Interrupt:
    """One injected interrupt and the times (ns, trace clock) of the hops it took."""

    id: int
    target: int
    vector: int
    nmi: bool
    source: str  # "ipi", "self", "timer" or "none" (no recorded source)
    sender: int  # sender vCPU index; -1 for a timer or no source
    t_inject: int
    t_send: int | None = None  # the IPI send, or the timer's vector reaching IRR
    send_flags: int = 0
    t_deadline: int | None = None  # timer: the deadline that expired
    t_fire: int | None = None  # timer: the host timer thread firing for it
    fire_tid: str = ""  # the ring that kicked ("vCPU 0", "timer thread")
    t_kick: int | None = None
    kick_how: int = -1
    t_kick_exit: int | None = None  # the target's exit after a signal kick
    kick_exit_reason: int = -1
    t_wake: int | None = None  # a blocked target's wait() returning
    t_entry: int | None = None  # the target's KVM_RUN entry after the injection
    t_first_exit: int | None = None  # the exit that ended that entry
    first_exit_reason: int = -1
    t_eoi: int | None = None
    merged: list[tuple[int, int]] = field(default_factory=list)  # (t_send, sender)

    def to_args(self, zero: int) -> dict[str, object]:
        """For the JSON: times relative to the trace's zero, in ns."""
        d = asdict(self)
        for key, value in list(d.items()):
            if key.startswith("t_") and value is not None:
                d[key] = value - zero
        d["merged"] = [[t - zero, s] for t, s in self.merged]
        return d


@dataclass
class Join:
    """The result of joining every ring."""

    interrupts: list[Interrupt]
    window_ns: int  # records before this time were ignored (some ring had wrapped)
    unsourced: int  # injections with no recorded source inside the window
    truncated: int  # injections whose source may lie before the window
    never_injected: list[tuple[int, int, int, int]]  # (t, target, vector, sender)
    rejected: int  # IPIs to a disabled APIC / with an illegal vector (nothing pends)
    sipi_flows: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (t_send, sender, target, t_start): SIPI send -> the AP leaving wait-for-SIPI


class _Timeline:
    """Records of one kind-filtered stream with their times, for bisecting."""

    def __init__(self, recs: list[Record]) -> None:
        self.recs = recs
        self.times = [x[0] for x in recs]

    def first_after(self, t: int, pred: Callable[[Record], bool]) -> Record | None:
        """The first record at or after ``t`` that ``pred`` accepts."""
        recs = self.recs
        for i in range(bisect.bisect_left(self.times, t), len(recs)):
            if pred(recs[i]):
                return recs[i]
        return None

    def last_before(self, t: int, pred: Callable[[Record], bool]) -> Record | None:
        """The last record at or before ``t`` that ``pred`` accepts."""
        recs = self.recs
        for i in range(bisect.bisect_right(self.times, t) - 1, -1, -1):
            if pred(recs[i]):
                return recs[i]
        return None


def _next(times: list[int], recs: list[Record], t: int, kind: int,
          pred: Callable[[Record], bool] | None = None) -> Record | None:
    """The first record of ``kind`` at or after time ``t``."""
    i = bisect.bisect_left(times, t)
    while i < len(recs):
        rec = recs[i]
        if rec[1] == kind and (pred is None or pred(rec)):
            return rec
        i += 1
    return None


def join(rings: dict[str, list[Record]], vcpu_names: list[str],
         window_ns: int = 0) -> Join:
    """Join ``rings`` (name -> records, oldest first); ``vcpu_names[i]`` is vCPU i's."""
    sources: dict[tuple[int, int], list[tuple[int, str, int, int, int, Record]]] = \
        defaultdict(list)
    # (target, vector) -> [(t, kind, sender, flags, deadline, record)]
    kicks: dict[str, _Timeline] = {}
    rejected = 0
    sipis: list[tuple[int, int, int]] = []
    sender_of = {name: i for i, name in enumerate(vcpu_names)}
    for name, recs in rings.items():
        kicks[name] = _Timeline([x for x in recs if x[1] == r.KICK and x[0] >= window_ns])
        sender = sender_of.get(name, -1)
        for rec in recs:
            t, kind, a, b = rec
            if t < window_ns or kind != r.SEND:
                continue
            vector, dm, flags = b & 0xFF, (b >> 8) & 7, b >> 12
            if dm <= r.DM_LOWEST:
                if flags & (r.SEND_REJECTED | r.SEND_ILLEGAL):
                    rejected += 1
                    continue
                src = "self" if a == sender else "ipi"
                sources[(a, vector)].append((t, src, sender, flags, 0, rec))
            elif dm == DM_NMI:
                sources[(a, -NMI_VECTOR)].append((t, "ipi", sender, flags, 0, rec))
            elif dm == DM_SIPI:
                sipis.append((t, sender, a))
    timer_fires = _Timeline([x for x in rings.get("timer thread", [])
                             if x[1] == r.TIMER_FIRE])
    no_kicks = _Timeline([])
    injections: dict[tuple[int, int], list[Record]] = defaultdict(list)
    eois: dict[tuple[int, int], list[int]] = defaultdict(list)
    per_vcpu: list[tuple[list[int], list[Record]]] = []
    for i, name in enumerate(vcpu_names):
        recs = [x for x in rings.get(name, []) if x[0] >= window_ns]
        per_vcpu.append(([x[0] for x in recs], recs))
        for rec in recs:
            t, kind, a, b = rec
            if kind == r.INJECT:
                injections[(i, -NMI_VECTOR if b else a)].append(rec)
            elif kind == r.EOI:
                eois[(i, a)].append(t)
            elif kind == r.TIMER_IRQ:
                sources[(i, a)].append((t, "timer", -1, 0, b, rec))

    interrupts: list[Interrupt] = []
    never: list[tuple[int, int, int, int]] = []
    unsourced = truncated = 0
    for key in sorted(set(sources) | set(injections)):
        target, vec = key
        srcs = sorted(sources.get(key, []), key=lambda s: s[0])
        injs = injections.get(key, [])
        eoi_times = eois.get((target, vec), [])
        times, recs = per_vcpu[target] if target < len(per_vcpu) else ([], [])
        si = ei = 0
        for n, inj in enumerate(injs):
            t_inj = inj[0]
            pending = []
            while si < len(srcs) and srcs[si][0] < t_inj:
                pending.append(srcs[si])
                si += 1
            it = Interrupt(id=0, target=target, vector=NMI_VECTOR if vec < 0 else vec,
                           nmi=vec < 0, source="none", sender=-1, t_inject=t_inj)
            if pending:
                t_src, kind, sender, flags, deadline, _ = pending[0]
                it.source, it.sender, it.t_send, it.send_flags = kind, sender, t_src, flags
                it.merged = [(p[0], p[2]) for p in pending[1:]]
                if kind == "timer":
                    it.t_deadline = deadline
                    _timer_kick(it, timer_fires, kicks.get("timer thread", no_kicks))
                elif sender >= 0:
                    _sender_kick(it, kicks.get(vcpu_names[sender], no_kicks), target)
                _target_reaction(it, times, recs)
            elif n == 0 and window_ns:
                truncated += 1
            else:
                unsourced += 1
            _after_injection(it, times, recs)
            if not it.nmi:
                while ei < len(eoi_times) and eoi_times[ei] < t_inj:
                    ei += 1
                if ei < len(eoi_times):
                    it.t_eoi = eoi_times[ei]
                    ei += 1
            interrupts.append(it)
        for s in srcs[si:]:
            never.append((s[0], target, NMI_VECTOR if vec < 0 else vec, s[2]))
    interrupts.sort(key=lambda x: x.t_inject)
    for n, it in enumerate(interrupts, 1):
        it.id = n
    sipi_flows = []
    for t, sender, target in sipis:
        if target < len(per_vcpu):
            times, recs = per_vcpu[target]
            start = _next(times, recs, t, r.UNBLOCK, lambda x: x[2] == 1)
            if start is not None:
                sipi_flows.append((t, sender, target, start[0]))
    return Join(interrupts, window_ns, unsourced, truncated, never, rejected, sipi_flows)


def _sender_kick(it: Interrupt, kicks: _Timeline, target: int) -> None:
    """The kick the sender did for this IPI: its first KICK of the target after the send."""
    kick = kicks.first_after(it.t_send or 0, lambda x: x[2] == target)
    if kick is not None and kick[0] <= it.t_inject:
        it.t_kick, it.kick_how = kick[0], kick[3]


def _timer_kick(it: Interrupt, fires: _Timeline, kicks: _Timeline) -> None:
    """The timer thread's firing for this deadline, and the kick that followed it."""
    t_irq = it.t_send or 0
    fire = fires.last_before(t_irq, lambda x: x[2] == it.target and x[3] == it.t_deadline)
    if fire is None:
        return
    it.t_fire, it.fire_tid = fire[0], "timer thread"
    kick = kicks.first_after(fire[0], lambda x: x[2] == it.target)
    if kick is not None and kick[0] <= t_irq:
        it.t_kick, it.kick_how = kick[0], kick[3]


def _target_reaction(it: Interrupt, times: list[int], recs: list[Record]) -> None:
    """What the kick did on the target: the exit it forced, or the wake-up."""
    if it.t_kick is None:
        return
    if it.kick_how == r.KICK_SIGNAL:
        ex = _next(times, recs, it.t_kick, r.EXIT)
        if ex is not None and ex[0] <= it.t_inject:
            it.t_kick_exit, it.kick_exit_reason = ex[0], ex[2]
    elif it.kick_how == r.KICK_WAKE:
        wk = _next(times, recs, it.t_kick, r.WOKE)
        if wk is not None and wk[0] <= it.t_inject:
            it.t_wake = wk[0]


def _after_injection(it: Interrupt, times: list[int], recs: list[Record]) -> None:
    """The entry that delivers the injected interrupt, and the exit that ends it (the
    handler's first exit, if the handler exits at all before it returns)."""
    entry = _next(times, recs, it.t_inject, r.ENTER)
    if entry is None:
        return
    it.t_entry = entry[0]
    ex = _next(times, recs, entry[0], r.EXIT)
    if ex is not None:
        it.t_first_exit, it.first_exit_reason = ex[0], ex[2]


def exit_name(reason: int, detail: int) -> str:
    """A short name for an exit: reason, and what it touched where that is telling."""
    base = k.EXIT_REASON_NAMES.get(reason, f"exit {reason}")
    if reason in (k.KVM_EXIT_X86_WRMSR, k.KVM_EXIT_X86_RDMSR):
        what = MSR_NAMES.get(detail)
        return f"{base} {detail:#x}" + (f" {what}" if what else "")
    if reason == k.KVM_EXIT_IO:
        what = PORT_NAMES.get(detail)
        return f"{base} {detail:#x}" + (f" {what}" if what else "")
    if reason == k.KVM_EXIT_MMIO:
        if detail & ~0xFFF == 0xFEE00000:
            what = XAPIC_NAMES.get(detail & 0xFFF)
            return f"{base} APIC+{detail & 0xFFF:#x}" + (f" {what}" if what else "")
        return f"{base} {detail:#x}"
    return base


MSR_NAMES = {0x1B: "APIC_BASE", 0x6E0: "TSC_DEADLINE", 0x802: "APIC ID", 0x808: "TPR",
             0x80B: "EOI", 0x80F: "SVR", 0x830: "ICR", 0x832: "LVT timer",
             0x838: "TMICT", 0x839: "TMCCT", 0x83E: "TDCR", 0x83F: "SELF_IPI"}
PORT_NAMES = {0x3F8: "serial", 0x3FD: "serial LSR", 0xF4: "debug-exit", 0x510: "fw_cfg",
              0x511: "fw_cfg data"}
XAPIC_NAMES = {0x20: "ID", 0x80: "TPR", 0xB0: "EOI", 0xF0: "SVR", 0x300: "ICR",
               0x310: "ICR2", 0x320: "LVT timer", 0x380: "TMICT", 0x390: "TMCCT"}
