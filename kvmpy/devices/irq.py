"""Interrupt lines from devices to the interrupt controller: GSIs with shared sources.

A device gets an ``IrqLine`` (``router.line(gsi)``) and drives it with ``set(level)``.
Several lines may share one GSI: the GSI's level is the OR of its sources, as KVM's
``irq_states`` bitmap per pin (__kvm_irq_line_state). Every ``set`` is forwarded to the
sink with the OR'd level, even when it did not change, as KVM's kvm_set_irq does: a
level-triggered I/O APIC pin that is asserted again retries a delivery nobody took.

The sink is the userspace I/O APIC's ``set_irq(pin, level)``, or KVM_IRQ_LINE with the
in-kernel irqchip. ISA IRQ n is GSI n except IRQ 0, which is GSI 2: the interrupt
source override every PC firmware describes, and QEMU's ioapic_set_irq mapping
(``isa_gsi``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

NUM_GSIS = 24
ISA_IRQS = 16


def isa_gsi(irq: int) -> int:
    """The GSI of ISA IRQ ``irq`` (0 -> 2, the PIT's override; else the same number)."""
    return 2 if irq == 0 else irq


class IrqRouter:
    """GSI lines 0..``count``-1 into ``sink(gsi, level)``."""

    def __init__(self, sink: Callable[[int, bool], None], count: int = NUM_GSIS) -> None:
        self.sink = sink
        self.count = count
        self._states = [0] * count  # per GSI: bit s set = source s asserts it
        self._sources = 0
        self._lock = threading.Lock()

    def new_source(self) -> int:
        """A fresh source id (KVM's kvm_request_irq_source_id)."""
        with self._lock:
            source = self._sources
            self._sources += 1
            return source

    def set_irq(self, gsi: int, level: bool, source: int = 0) -> bool:
        """Source ``source`` drives ``gsi`` to ``level``; False (nothing done) for a GSI
        out of range."""
        if not 0 <= gsi < self.count:
            return False
        bit = 1 << source
        with self._lock:
            if level:
                self._states[gsi] |= bit
            else:
                self._states[gsi] &= ~bit
            # The sink runs under the lock, so two sources' updates reach it in the
            # order their levels were computed (the sink never calls back here).
            self.sink(gsi, self._states[gsi] != 0)
        return True

    def level(self, gsi: int) -> bool:
        """The OR of every source's level on ``gsi``."""
        return bool(self._states[gsi])

    def line(self, gsi: int) -> IrqLine:
        """A new line driving ``gsi`` with its own source id."""
        if not 0 <= gsi < self.count:
            raise ValueError(f"GSI {gsi} out of range 0..{self.count - 1}")
        return IrqLine(self, gsi, self.new_source())


class IrqLine:
    """One device's output wired to one GSI."""

    __slots__ = ("router", "gsi", "source")

    def __init__(self, router: IrqRouter, gsi: int, source: int) -> None:
        self.router = router
        self.gsi = gsi
        self.source = source

    def set(self, level: bool) -> None:
        self.router.set_irq(self.gsi, level, self.source)

    def pulse(self) -> None:
        """An edge: assert, then deassert."""
        self.set(True)
        self.set(False)

    def __repr__(self) -> str:
        return f"IrqLine(gsi={self.gsi}, source={self.source})"
