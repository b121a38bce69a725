"""IRQ 0 from the 8254: a host timer at each rising edge of OUT0 pulses an interrupt line.

QEMU's i8254 (pit_irq_timer_update) raises IRQ 0 at OUT0's edges; on a PC that is ISA
IRQ 0, i.e. I/O APIC pin 2 (the interrupt source override; ``isa_gsi(0)``). As QEMU
with kvm-unit-tests' ``-global kvm-pit.lost_tick_policy=discard``, ticks the host could
not deliver in time are dropped, not replayed: the next edge is computed from the time
the tick actually ran. Edges come at most every ``min_period_ns`` (1 ms, a HZ=1000
tick): a guest that programs a faster rate gets its edges coalesced, so a hostile guest
cannot make the host timer thread spin.

``reschedule`` runs whenever the guest reprograms channel 0 (Pit8254's
``on_channel0_change``, on a vCPU thread) and after each tick (on the timer thread).
It reads the PIT without a lock: a read racing a reprogramming yields at worst one
misplaced edge, and the reprogramming reschedules anyway.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmpy.devices.irq import IrqLine
from kvmpy.devices.pit import Pit8254

MIN_PERIOD_NS = 1_000_000


class PitIrq0:
    """Pulses ``line`` at OUT0's rising edges; ``arm(deadline_ns)`` must make the VMM
    call ``tick()`` at (or after) ``deadline_ns`` on the ``clock_ns`` timeline."""

    def __init__(self, pit: Pit8254, line: IrqLine, arm: Callable[[int], None],
                 clock_ns: Callable[[], int], min_period_ns: int = MIN_PERIOD_NS) -> None:
        self.pit = pit
        self.line = line
        self.arm = arm
        self.clock_ns = clock_ns
        self.min_period_ns = min_period_ns
        self.deadline: int | None = None
        self._last_edge = -min_period_ns
        self.edges = 0
        self.stale = 0

    def reschedule(self) -> None:
        """Arm the timer for OUT0's next rising edge (none in a finished one-shot)."""
        edge = self.pit.next_irq0_ns()
        if edge is None:
            self.deadline = None
            return
        edge = max(edge, self._last_edge + self.min_period_ns)
        self.deadline = edge
        self.arm(edge)

    def tick(self) -> None:
        """The timer fired: pulse the line if an edge is due, then arm the next one.
        A timer armed before a reprogramming that moved the edge later is ignored."""
        deadline = self.deadline
        now = self.clock_ns()
        if deadline is None or now < deadline:
            self.stale += 1
            return
        self._last_edge = now
        self.edges += 1
        self.line.pulse()
        self.reschedule()
