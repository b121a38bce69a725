"""The I/O APIC (Intel 82093AA) as a pure state machine, delivering through ``ApicBus``.

Modelled on QEMU's hw/intc/ioapic.c (version 0x20, with the EOI register) and KVM's
arch/x86/kvm/ioapic.c (the input-line model). No KVM in here: the VMM maps the MMIO
window, drives the input pins with ``set_irq(pin, level)`` and forwards the local APICs'
EOI broadcasts (``ApicBus.broadcast_eoi`` calls ``eoi``, wired by the constructor).

Registers (82093AA datasheet section 3): IOREGSEL at +0x00 selects, IOWIN at +0x10
reads and writes the selected 32-bit register; +0x40 is the EOI register of version
0x20 (QEMU's ioapic_mem_write). Index 0 is the ID (bits 27:24 writable), 1 the version
(0x20, 24 entries: 0x00170020, read-only), 2 the arbitration ID (reads as the ID,
read-only), 0x10 + 2n / 0x11 + 2n the low / high half of redirection entry n.

Choices, each as QEMU or KVM make them (the datasheet leaves them open):
- the window is decoded modulo 0x100 over a 0x1000-byte region (QEMU); IOREGSEL is an
  8-bit register any access size can read or write; IOWIN and EOI take 32-bit accesses
  only, other sizes read 0 and write nothing (QEMU);
- an index with no register (3-0xF, 0x40-0xFF) reads 0 and ignores writes (QEMU; KVM
  reads all ones for a redirection index beyond 23);
- reserved bits of a redirection entry (55:17) are stored and read back, with no effect
  (QEMU and KVM); delivery status (12) and remote IRR (14) are read-only, delivery
  status always reads 0 (delivery is instantaneous); writing an entry as edge-triggered
  clears its remote IRR (QEMU's ioapic_fix_edge_remote_irr, KVM);
- polarity (bit 13) is stored but not applied: devices drive the asserted state, as in
  QEMU and KVM;
- the destination is the 8-bit field 63:56 (xAPIC style, as KVM: no extended ID);
  0xFF is a broadcast to every local APIC, x2APIC ones included (KVM's kvm_apic_mda);
- an input pin is a wire (KVM's ioapic->irr): an edge-triggered entry delivers on a 0->1
  transition of an unmasked pin, a masked edge is lost (datasheet; QEMU, KVM); a level
  entry delivers while the pin is asserted, unmasked and remote IRR is clear, so an
  assertion during service is coalesced (remote IRR) and a still-asserted pin is
  delivered again on the EOI, on unmasking, or on rewriting the entry (KVM);
- remote IRR is set when a level-triggered fixed or lowest-priority message was
  accepted by at least one local APIC (KVM's ioapic_service with a delivery count);
  a message nobody accepts leaves it clear, so an EOI that can never come cannot wedge
  the pin;
- NMI, SMI and INIT are edge-triggered whatever the trigger bit says (datasheet, Table
  "Delivery Mode"); delivery modes 011 and 110 are reserved and ExtINT (111) needs an
  8259A, which kvmpy has not: these messages are counted and dropped;
- illegal vectors (0-15) in a fixed or lowest-priority message are refused by the
  receiving APIC as any received illegal vector is (ESR bit 6, SDM 10.5.3);
- EOI: a broadcast or EOI-register write of vector V clears remote IRR of every
  level-triggered entry with vector V (QEMU's ioapic_eoi_broadcast; the EOI register's
  bits 31:8 are ignored); a pin still asserted is re-delivered at once, except after
  10000 successive re-deliveries with no deassertion: then the next one is deferred by
  10 ms (KVM's and QEMU's SUCCESSIVE_IRQ_MAX_COUNT storm rule), so a guest that never
  quiets its device still makes progress. ``defer(ns)`` asks the VMM to call
  ``service_deferred()`` that much later.

Threading: every entry point takes the device's lock (vCPU threads, device threads and
the host timer may all drive it); ``defer`` is called after the lock is released. The
lock is innermost: delivery only stores into local APICs and calls ``bus.notify``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from .bus import ApicBus
from .constants import DM_EXTINT, DM_FIXED, DM_INIT, DM_LOWEST, DM_NMI, DM_SMI

IOAPIC_DEFAULT_BASE = 0xFEC0_0000
IOAPIC_MMIO_SIZE = 0x1000  # decoded modulo IOAPIC_DECODE (QEMU's region size)
IOAPIC_DECODE = 0x100

# Window offsets.
IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40

# Indirect register indexes.
REG_ID = 0x00
REG_VERSION = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10

NUM_PINS = 24
IOAPIC_VERSION = 0x20
VERSION_VALUE = IOAPIC_VERSION | ((NUM_PINS - 1) << 16)
ID_SHIFT = 24
ID_MASK = 0xF

# Redirection entry fields (82093AA section 3.2.4).
RTE_VECTOR = 0xFF
RTE_DM_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_TRIGGER_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_DEST_SHIFT = 56
RTE_READ_ONLY = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR
RTE_RESET = RTE_MASKED  # every entry masked at reset (QEMU's ioapic_reset_common, KVM)

# Delivery modes an entry may not use: 011 and 110 are reserved, ExtINT needs a PIC.
_VECTORED = (DM_FIXED, DM_LOWEST)
_EVENTS = (DM_SMI, DM_NMI, DM_INIT)

SUCCESSIVE_IRQ_MAX_COUNT = 10_000  # KVM's IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT, QEMU's same
STORM_DELAY_NS = 10_000_000  # HZ / 100 in KVM, NANOSECONDS_PER_SECOND / 100 in QEMU

_MASK32 = 0xFFFF_FFFF


class IoApic:
    """One I/O APIC with 24 pins on ``bus``. A bus Device: ``read``/``write`` take
    offsets into the MMIO window. See the module docstring for every choice."""

    def __init__(
        self,
        bus: ApicBus,
        *,
        defer: Callable[[int], None] | None = None,
        storm_limit: int = SUCCESSIVE_IRQ_MAX_COUNT,
        name: str = "ioapic",
    ) -> None:
        self.name = name
        self.storm_limit = storm_limit
        self.bus = bus
        self.defer = defer
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.id = 0
        self.ioregsel = 0
        self.redirection = [RTE_RESET] * NUM_PINS
        self.lines = 0  # bit n: pin n asserted (KVM's ioapic->irr)
        self._successive = [0] * NUM_PINS  # re-deliveries on EOI with no deassertion
        self._deferred = 0  # pins whose storm-delayed re-delivery is due
        self._defer_pending = False
        bus.eoi_listeners.append(self.eoi)

    def reset(self) -> None:
        """Power-up state: ID 0, IOREGSEL 0, every entry masked, lines as they are."""
        with self._lock:
            self.id = 0
            self.ioregsel = 0
            self.redirection = [RTE_RESET] * NUM_PINS
            self._successive = [0] * NUM_PINS
            self._deferred = 0

    # ------------------------------------------------------------------ MMIO window
    def read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` into the window."""
        offset &= IOAPIC_DECODE - 1
        with self._lock:
            if offset == IOREGSEL:
                return self.ioregsel
            if offset == IOWIN and size == 4:
                return self._read_indirect(self.ioregsel)
            self.stats["mmio_read_ignored"] += 1
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``offset`` into the window."""
        offset &= IOAPIC_DECODE - 1
        schedule = False
        with self._lock:
            if offset == IOREGSEL:
                self.ioregsel = value & 0xFF
            elif offset == IOWIN and size == 4:
                self._write_indirect(self.ioregsel, value & _MASK32)
            elif offset == IOEOI and size == 4:
                self.stats["eoi_register"] += 1
                schedule = self._eoi_locked(value & RTE_VECTOR)
            else:
                self.stats["mmio_write_ignored"] += 1
        if schedule:
            self._schedule()

    def read_register(self, index: int) -> int:
        """The indirect register ``index`` as IOWIN would read it (no side effect)."""
        with self._lock:
            return self._read_indirect(index & 0xFF)

    def _read_indirect(self, index: int) -> int:
        if index == REG_ID or index == REG_ARB:
            return self.id << ID_SHIFT
        if index == REG_VERSION:
            return VERSION_VALUE
        pin = (index - REG_REDTBL) >> 1
        if 0 <= pin < NUM_PINS:
            entry = self.redirection[pin]
            return (entry >> 32) if index & 1 else entry & _MASK32
        self.stats["index_out_of_range"] += 1
        return 0

    def _write_indirect(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.id = (value >> ID_SHIFT) & ID_MASK
            return
        if index == REG_VERSION or index == REG_ARB:
            self.stats["read_only_write"] += 1
            return
        pin = (index - REG_REDTBL) >> 1
        if not 0 <= pin < NUM_PINS:
            self.stats["index_out_of_range"] += 1
            return
        old = self.redirection[pin]
        if index & 1:
            new = (old & _MASK32) | (value << 32)
        else:
            new = (old & ~_MASK32) | value
        new = (new & ~RTE_READ_ONLY) | (old & RTE_REMOTE_IRR)
        if not new & RTE_TRIGGER_LEVEL:
            new &= ~RTE_REMOTE_IRR
        self.redirection[pin] = new
        self._successive[pin] = 0
        # A level pin asserted while masked (or while its last message found nobody) is
        # delivered now (KVM's ioapic_write_indirect; QEMU's ioapic_service).
        if not self._edge(new) and self.lines >> pin & 1:
            self._service(pin)

    # ------------------------------------------------------------------ input pins
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` to ``level`` (asserted or not). Pins outside 0-23 are
        counted and ignored."""
        if not 0 <= pin < NUM_PINS:
            self.stats["bad_pin"] += 1
            return
        bit = 1 << pin
        with self._lock:
            if not level:
                self.lines &= ~bit
                self._successive[pin] = 0
                return
            old = self.lines
            self.lines = old | bit
            entry = self.redirection[pin]
            if self._edge(entry) and old & bit:
                self.stats["edge_while_asserted"] += 1  # no 0->1 transition: no edge
                return
            self._service(pin)

    @staticmethod
    def _edge(entry: int) -> bool:
        """Edge semantics: the trigger bit says edge, or the delivery mode is one the
        datasheet always treats as edge (NMI, SMI, INIT, ExtINT, the reserved ones)."""
        return not entry & RTE_TRIGGER_LEVEL or (entry >> RTE_DM_SHIFT) & 7 not in _VECTORED

    def _service(self, pin: int) -> None:
        """Send pin's message if the entry lets it (KVM's ioapic_service)."""
        entry = self.redirection[pin]
        if entry & RTE_MASKED:
            self.stats["masked"] += 1
            return
        dm = (entry >> RTE_DM_SHIFT) & 7
        level = bool(entry & RTE_TRIGGER_LEVEL) and dm in _VECTORED
        if level and entry & RTE_REMOTE_IRR:
            self.stats["coalesced"] += 1
            return
        if dm not in _VECTORED and dm not in _EVENTS:
            self.stats["extint_dropped" if dm == DM_EXTINT else "reserved_dm_dropped"] += 1
            return
        accepted = self.bus.deliver_irq(
            entry & RTE_VECTOR, dm, entry >> RTE_DEST_SHIFT,
            bool(entry & RTE_DEST_LOGICAL), level,
        )
        if not accepted:
            self.stats["not_accepted"] += 1
            return
        self.stats["delivered"] += 1
        if level:
            self.redirection[pin] = entry | RTE_REMOTE_IRR

    # ------------------------------------------------------------------ EOI
    def eoi(self, vector: int) -> None:
        """EOI broadcast of a level-triggered ``vector`` from a local APIC."""
        with self._lock:
            self.stats["eoi_broadcast"] += 1
            schedule = self._eoi_locked(vector)
        if schedule:
            self._schedule()

    def _eoi_locked(self, vector: int) -> bool:
        """Clear remote IRR of the level entries with ``vector``, re-deliver a pin still
        asserted (QEMU's ioapic_eoi_broadcast). True if a deferral must be scheduled."""
        schedule = False
        redirection = self.redirection
        for pin in range(NUM_PINS):
            entry = redirection[pin]
            if entry & RTE_VECTOR != vector or not entry & RTE_TRIGGER_LEVEL \
                    or not entry & RTE_REMOTE_IRR:
                continue
            redirection[pin] = entry & ~RTE_REMOTE_IRR
            self.stats["remote_irr_cleared"] += 1
            if entry & RTE_MASKED or not self.lines >> pin & 1:
                self._successive[pin] = 0
                continue
            self._successive[pin] += 1
            if self._successive[pin] >= self.storm_limit:
                self._successive[pin] = 0
                self._deferred |= 1 << pin
                self.stats["storm_deferred"] += 1
                if not self._defer_pending:
                    self._defer_pending = True
                    schedule = True
            else:
                self._service(pin)
        return schedule

    def _schedule(self) -> None:
        if self.defer is not None:
            self.defer(STORM_DELAY_NS)

    def service_deferred(self) -> None:
        """The storm delay has passed: deliver the deferred pins that still want it."""
        with self._lock:
            pins, self._deferred = self._deferred, 0
            self._defer_pending = False
            for pin in range(NUM_PINS):
                if pins >> pin & 1 and self.lines >> pin & 1:
                    self._service(pin)

    @property
    def deferred(self) -> bool:
        """A storm-delayed re-delivery is waiting for ``service_deferred``."""
        return bool(self._deferred)

    def remote_irr(self, pin: int) -> bool:
        return bool(self.redirection[pin] & RTE_REMOTE_IRR)

    def __repr__(self) -> str:
        return f"IoApic(id={self.id}, lines={self.lines:#08x})"
