"""The trace recorder: one preallocated ring of fixed-size records per thread.

Every record is four slots, (time, kind, a, b), in a list of ``capacity * 4`` slots
allocated once; ``Ring.rec`` writes one record by index and advances, wrapping over the
oldest record, so a run of any length holds at most the last ``capacity`` events of
each thread and never allocates beyond the Python ints the clock and the arguments
already are (a slot holds a reference to them until it is overwritten). A list, not an
``array('q')``: CPython 3.11 specialises list stores, and an array store costs ~150 ns
more here, four times per record. Each ring has ONE writer, the thread it belongs to: a
vCPU thread writes its own ring, and an event that concerns another vCPU (an IPI send,
a kick) is written by the SENDER into the sender's ring with the target's index. So no
ring takes a lock (the "other" ring, for threads kvmpy does not own, is the exception).
Rings are read only after the VM has stopped (``kvmpy.tracing.export``).

Clock: ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every thread; it is also
the clock of the APIC timer deadlines and of kvmpy's guest-TSC extrapolation, so timer
deadlines and guest TSC values map onto the same time axis). ``time.perf_counter_ns``
is the same clock on Linux (both report clock_gettime(CLOCK_MONOTONIC)).

Record kinds and their (a, b):

=========== ============================ ==========================================
kind        a                            b
=========== ============================ ==========================================
RUN         exit reason | detail << 8    the time KVM_RUN was entered (one record per
                                                    KVM_RUN; ``records()`` gives it back
                                                    as ENTER at that time, then EXIT)
ENTER       0                            0          (KVM_RUN is about to be called)
EXIT        exit reason                  detail: MSR index / port / MMIO address / 0
DONE        exit reason                  path: Fastpath value (1 fast, 0 slow, 2 ...)
INJECT      vector                       1 for an NMI (KVM_NMI), 0 for KVM_INTERRUPT
EOI         vector (the ISR bit cleared) 0
TIMER_IRQ   LVT timer vector             the deadline (ns) that expired
BLOCK       1 halted, 2 wait-for-SIPI    0
WOKE        1 the wake event was set     0          (wait() returned)
UNBLOCK     1 runnable, 2 still SIPI     0
SEND        target vCPU index            vector | dm << 8 | flags << 12 (SEND_*)
KICK        target vCPU index            how: KICK_NONE / KICK_SIGNAL / KICK_WAKE / KICK_SELF
TIMER_FIRE  target vCPU index            the deadline (ns) it was armed for
SIGNAL      signal number                0          (the kick handler ran, main thread)
=========== ============================ ==========================================
"""

from __future__ import annotations

import heapq
import signal
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from kvmpy.apic.mode import ApicMode

if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmpy.apic import LocalApic

CLOCK_NAME = "CLOCK_MONOTONIC (time.monotonic_ns)"
now_ns = time.monotonic_ns  # the trace clock, for code that stamps beside the rings
_clock = now_ns

FIELDS = 4
DEFAULT_EVENTS = 1 << 17  # per thread: 4 MiB of slots per vCPU (+ the ints), ~65k exits
MIN_EVENTS = 16
MAX_EVENTS = 1 << 24
CONSOLE_LINES = 4096  # serial console lines kept (the last ones), each cut at LINE_MAX
LINE_MAX = 240

ENTER = 1
EXIT = 2
DONE = 3
INJECT = 4
EOI = 5
TIMER_IRQ = 6
BLOCK = 7
WOKE = 8
UNBLOCK = 9
SEND = 10
KICK = 11
TIMER_FIRE = 12
SIGNAL = 13
RUN = 14

KIND_NAMES = {
    ENTER: "enter", EXIT: "exit", DONE: "done", INJECT: "inject", EOI: "eoi",
    TIMER_IRQ: "timer_irq", BLOCK: "block", WOKE: "woke", UNBLOCK: "unblock",
    SEND: "send", KICK: "kick", TIMER_FIRE: "timer_fire", SIGNAL: "signal", RUN: "run",
}

# SEND flags (b >> 12): what the sender saw in the target when it published the IPI.
SEND_COALESCED = 1  # the vector's IRR bit was already set: this IPI merges into it
SEND_REJECTED = 2  # the target APIC was disabled (globally or by SVR): nothing pends
SEND_ILLEGAL = 4  # vector < 16 for a fixed / lowest-priority IPI (an ESR error instead)

# KICK how (b)
KICK_NONE = 0  # the target was outside the guest: request_event is all it needs
KICK_SIGNAL = 1  # in the guest: immediate_exit + pthread_kill
KICK_WAKE = 2  # blocked (halted / wait-for-SIPI): its wake event set
KICK_SELF = 3  # in the guest, but the caller is the target itself: immediate_exit only

# Delivery modes (ICR bits 10:8), as in apic/constants.py.
DM_FIXED = 0
DM_LOWEST = 1
_DISABLED = ApicMode.DISABLED


class Ring:
    """The last ``capacity`` events of one thread. Only that thread calls ``rec``."""

    __slots__ = ("name", "capacity", "buf", "count", "_j", "_end", "tracer", "index",
                 "native", "native_count")

    def __init__(self, name: str, capacity: int, tracer: Tracer | None = None,
                 index: int = -1) -> None:
        if not MIN_EVENTS <= capacity <= MAX_EVENTS:
            raise ValueError(f"trace ring capacity must be between {MIN_EVENTS} and "
                             f"{MAX_EVENTS} events, got {capacity}")
        self.name = name
        self.capacity = capacity
        self.buf: list[int] = [0] * (FIELDS * capacity)
        self.count = 0  # events ever recorded (the ring holds min(count, capacity))
        self._j = 0  # slot of the next record
        self._end = FIELDS * capacity
        self.tracer = tracer
        self.index = index  # the vCPU index for a vCPU's ring, else -1
        # A vCPU's records written by the native core (kvmpy/native: RUN, DONE of the
        # fastpath, INJECT, EOI, SEND, KICK, BLOCK/WOKE/UNBLOCK of its halts), in the
        # same four-int64 format: a buffer the core writes, and the count it reached
        # (read when the vCPU thread ends). records() merges the two by time.
        self.native: bytearray | None = None
        self.native_count = 0

    def rec(self, kind: int, a: int, b: int) -> None:
        """Record one event now. Hot: four stores by index, no allocation, no lock."""
        j = self._j
        buf = self.buf
        buf[j] = _clock()
        buf[j + 1] = kind
        buf[j + 2] = a
        buf[j + 3] = b
        j += FIELDS
        self._j = j if j != self._end else 0
        self.count += 1

    @property
    def dropped(self) -> int:
        """Events overwritten by newer ones (in either ring)."""
        lost = max(0, self.count - self.capacity)
        if self.native is not None:
            lost += max(0, self.native_count - len(self.native) // (FIELDS * 8))
        return lost

    @property
    def nbytes(self) -> int:
        """Bytes of the slot list itself (the ints it refers to come and go)."""
        return sys.getsizeof(self.buf)

    def ran(self, t_enter: int, exit: tuple[int, int, int, int]) -> None:
        """One KVM_RUN: entered at ``t_enter``, returned ``exit`` now (one record where
        ENTER and EXIT would take two: the hot path pays one call per KVM_RUN)."""
        self.rec(RUN, exit[0] | exit[1] << 8, t_enter)

    @property
    def total(self) -> int:
        """Events recorded, by Python and by the native core."""
        return self.count + self.native_count

    def records(self) -> list[tuple[int, int, int, int]]:
        """The retained events, oldest first, RUN records given back as ENTER then EXIT
        (call when the writer has stopped). The native core's records of this vCPU are
        merged in by time (one thread wrote both, so each list is in time order)."""
        out = _unroll(self.buf, self.count, self.capacity, self._j)
        if self.native is not None and self.native_count:
            cap = len(self.native) // (FIELDS * 8)
            start = (self.native_count % cap) * FIELDS if self.native_count > cap else 0
            native = _unroll(memoryview(self.native).cast("q").tolist(), self.native_count,
                             cap, start)
            # One window for both: where a ring wrapped, what the other kept from before
            # its oldest record would look like a gap in it.
            since = min((r[0] for r in out), default=0) if self.count > self.capacity else 0
            if self.native_count > cap and native:
                since = max(since, native[0][0])
            out = [r for r in heapq.merge(out, native, key=lambda r: r[0]) if r[0] >= since]
        return out

    # ------------------------------------------------------------ hooks on a vCPU ring

    def kicked(self, mode: int) -> None:
        """Vcpu.kick() of this ring's vCPU, called on the KICKING thread with the mode it
        read: recorded in the caller's ring (a vCPU, the timer thread, main)."""
        tracer = self.tracer
        ring = tracer.ring_here()
        if mode == 1:  # VcpuMode.IN_GUEST
            how = KICK_SELF if ring is self else KICK_SIGNAL
        elif mode == 2:  # VcpuMode.BLOCKED
            how = KICK_WAKE
        else:
            how = KICK_NONE
        ring.rec(KICK, self.index, how)

    def eoi(self, vector: int) -> None:
        """LocalApic.on_eoi: the EOI cleared ISR bit ``vector`` (owner thread)."""
        self.rec(EOI, vector, 0)

    def timer_irq(self, vector: int, deadline_ns: int) -> None:
        """LocalApic.on_timer_irq: the timer expired and set ``vector`` in IRR."""
        self.rec(TIMER_IRQ, vector, deadline_ns)


def _unroll(buf: list[int], count: int, capacity: int,
            start: int) -> list[tuple[int, int, int, int]]:
    """The records of a ring buffer, oldest first (``start``: the slot of the oldest
    when it has wrapped), RUN records as ENTER then EXIT."""
    n = min(count, capacity)
    start = start if count > capacity else 0
    out = []
    for i in range(n):
        j = ((start // FIELDS + i) % capacity) * FIELDS
        t, kind, a, b = buf[j], buf[j + 1], buf[j + 2], buf[j + 3]
        if kind == RUN:
            out.append((b, ENTER, 0, 0))
            out.append((t, EXIT, a & 0xFF, a >> 8))
        else:
            out.append((t, kind, a, b))
    return out


class LockedRing(Ring):
    """A ring any thread may write (for threads kvmpy does not own): takes a lock."""

    __slots__ = ("_lock",)

    def __init__(self, name: str, capacity: int, tracer: Tracer | None = None) -> None:
        super().__init__(name, capacity, tracer)
        self._lock = threading.Lock()

    def rec(self, kind: int, a: int, b: int) -> None:
        with self._lock:
            Ring.rec(self, kind, a, b)


class Tracer:
    """The rings of one VM: one per vCPU, the timer thread, the main thread, others.

    ``ring_here()`` finds the calling thread's ring by thread id (cached), so hooks that
    run on whatever thread sends (IPIs, kicks) write into the sender's own ring.
    """

    def __init__(self, vcpus: int, events: int = DEFAULT_EVENTS) -> None:
        self.events = events
        self.vcpu_rings = [Ring(f"vCPU {i}", events, self, i) for i in range(vcpus)]
        self.timer_ring = Ring("timer thread", events, self)
        self.main_ring = Ring("main thread", events, self)
        self.other_ring = LockedRing("other threads", events, self)
        self._by_ident: dict[int, Ring] = {}
        self._idents: dict[int, Ring] = {}  # registered threads, resolved on first use
        # Finds the ring of a thread not registered yet (set by probes.attach).
        self.resolver: Callable[[int], Ring | None] | None = None
        self.started_ns = _clock()
        self.meta: dict[str, object] = {"clock": CLOCK_NAME}
        # Serial console lines, (time the newline was written, text): bounded.
        self.console: deque[tuple[int, str]] = deque(maxlen=CONSOLE_LINES)
        self.console_lines = 0

    @property
    def rings(self) -> list[Ring]:
        return [*self.vcpu_rings, self.timer_ring, self.main_ring, self.other_ring]

    @property
    def slots(self) -> int:
        """Record slots held by every ring together (constant for a tracer's life)."""
        return sum(len(r.buf) for r in self.rings)

    def register_thread(self, ident: int, ring: Ring) -> None:
        self._idents[ident] = ring
        self._by_ident[ident] = ring

    def ring_here(self) -> Ring:
        """The calling thread's ring."""
        ident = threading.get_ident()
        ring = self._by_ident.get(ident)
        if ring is None:
            ring = self._resolve(ident)
        return ring

    def _resolve(self, ident: int) -> Ring:
        ring = self._idents.get(ident)
        if ring is None:
            ring = self.resolver(ident) if self.resolver is not None else None
        if ring is None:
            ring = self.main_ring if ident == threading.main_thread().ident \
                else self.other_ring
        self._by_ident[ident] = ring
        return ring

    # ------------------------------------------------------------ cross-thread hooks

    def send(self, target: LocalApic, dm: int, vector: int) -> None:
        """ApicBus: an IPI of delivery mode ``dm`` is about to be published in
        ``target`` (called BEFORE the IRR store, so its time precedes the injection's).
        The flags say what the target's state makes of it."""
        flags = 0
        if dm <= DM_LOWEST:
            if not target.sw_enabled or target.mode is _DISABLED:
                flags = SEND_REJECTED
            elif vector < 16:
                flags = SEND_ILLEGAL
            elif target.irr[vector]:
                flags = SEND_COALESCED
        self.ring_here().rec(SEND, target.index, vector | dm << 8 | flags << 12)

    def timer_fire(self, index: int, deadline_ns: int) -> None:
        """TimerService: the host timer for vCPU ``index`` is due; it kicks next."""
        self.ring_here().rec(TIMER_FIRE, index, deadline_ns)

    def signal_handler(self, signum: int, frame: object) -> None:
        """The kick signal's Python handler while tracing (runs on the main thread)."""
        self.main_ring.rec(SIGNAL, signum, 0)

    def install_signal_probe(self, signum: int) -> None:
        """Replace the kick signal's no-op handler by one that records when CPython runs
        it on the main thread (call on the main thread; the next Machine.start puts the
        plain handler back)."""
        signal.signal(signum, self.signal_handler)

    def console_line(self, text: str) -> None:
        """A line the guest wrote to the serial console (any thread; deque is atomic)."""
        self.console_lines += 1
        self.console.append((_clock(), text[:LINE_MAX]))

    # ------------------------------------------------------------ accounting

    def summary(self) -> dict[str, int]:
        return {"events": sum(r.total for r in self.rings),
                "dropped": sum(r.dropped for r in self.rings),
                "slots": self.slots}
