"""One host timer thread per VM for the local APIC timers.

A vCPU arms `(deadline, vcpu)`; when the deadline passes the thread kicks the vCPU,
whose own thread then calls `apic.timer_expired()` (the APIC state has one owner). No
thread per vCPU, no spinning: the thread sleeps on a condition until the earliest
deadline. A halted vCPU does not need it (it sleeps with the deadline as its timeout),
but arming is harmless then. A device arms a `TimerCallback` the same way; its
function runs on the timer thread (it must not wait for a vCPU).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvmpy.tracing.recorder import Tracer

class Kickable(Protocol):
    """What a timer fires: a vCPU, or a TimerCallback."""

    index: int

    def kick(self) -> None: ...


class TimerCallback:
    """A device's timer target: firing it calls ``fn`` on the timer thread."""

    __slots__ = ("fn", "index")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.index = -1 - id(self)  # unique, and never a vCPU index

    def kick(self) -> None:
        self.fn()


class TimerService:
    """Kicks vCPUs at absolute `time.monotonic_ns()` deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Kickable]] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.fired = 0
        self.tracer: Tracer | None = None  # kvmpy.tracing: each firing is recorded

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvmpy-timers", daemon=True)
        self._thread.start()

    def arm(self, vcpu: Kickable, deadline_ns: int) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (deadline_ns, self._seq, vcpu))
            if len(self._heap) > 4 * 1024:
                # Stale entries from rearming: the latest arm per vCPU is the live one.
                latest: dict[int, tuple[int, int, Kickable]] = {}
                for entry in self._heap:
                    prev = latest.get(entry[2].index)
                    if prev is None or entry[1] > prev[1]:
                        latest[entry[2].index] = entry
                self._heap = list(latest.values())
                heapq.heapify(self._heap)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, vcpu = self._heap[0]
                now = time.monotonic_ns()
                if deadline > now:
                    self._cond.wait((deadline - now) / 1e9)
                    continue
                heapq.heappop(self._heap)
                self.fired += 1
                if self.tracer is not None and vcpu.index >= 0:  # a vCPU, not a device
                    self.tracer.timer_fire(vcpu.index, deadline)
                vcpu.kick()
