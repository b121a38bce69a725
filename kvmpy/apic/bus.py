"""IPI routing between the local APICs of one VM (SDM 10.6).

``send_ipi`` decodes an ICR value, finds the destination APICs and delivers into
each: it publishes the pending state in the target (``accept_*``) and only then
calls ``notify(index)``, where the VMM kicks or wakes that vCPU. It allocates
nothing, so it can run on the vCPU fastpath.

Choices where the SDM leaves room (each documented in the function that makes it):
- lowest priority: focus processor first (one with the vector already in IRR or
  ISR, unless SVR focus checking is disabled), else the lowest PPR among the
  matching software-enabled APICs, ties to the lowest bus index;
- the trigger mode of a fixed/lowest IPI is ignored (SDM 10.6.1: it only means
  something for INIT level de-assert), so IPIs are always edge (TMR cleared);
- invalid shorthand/delivery-mode combinations of SDM Table 10-3 are delivered
  anyway (Linux sends NMIs with the all-including-self shorthand), as KVM does;
- delivery modes 011 and 111 are reserved in the ICR: dropped and counted;
- delivery mode 001 from an x2APIC ICR (marked reserved in the SDM x2APIC figure) is
  lowest priority, as in KVM;
- globally disabled APICs (IA32_APIC_BASE.EN=0) are not on the bus: they match no
  destination;
- a physical destination that software made ambiguous (two xAPIC-mode APICs given one
  ID through the writable ID register) reaches every APIC with that ID, as each
  compares the destination with its own ID (SDM 10.6.2.1; KVM without its 32-bit
  x2APIC-ID quirk); a lowest-priority one goes to the first of them.

The bus also carries I/O APIC messages (``deliver_irq``, KVM's kvm_irq_delivery_to_apic
with no source APIC) and the local APICs' EOI broadcasts for level-triggered vectors
back to the I/O APICs (``broadcast_eoi`` -> ``eoi_listeners``, SDM 10.8.5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .constants import (
    DM_EXTINT,
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_RESERVED3,
    DM_SIPI,
    DM_SMI,
    ESR_SEND_ILLEGAL_VECTOR,
    ICR_DEST_LOGICAL,
    ICR_DM_MASK,
    ICR_LEVEL_ASSERT,
    ICR_SH_MASK,
    ICR_TRIGGER_LEVEL,
    SH_ALL_BUT,
    SH_NONE,
    SH_SELF,
    SVR_FOCUS_DISABLED,
)
from .destination import is_broadcast, match_logical, match_physical
from .lapic import LocalApic
from .mode import ApicMode

if TYPE_CHECKING:
    from kvmpy.tracing.recorder import Tracer

_DISABLED = ApicMode.DISABLED
_X2APIC = ApicMode.X2APIC
# ICR bits that send an IPI off the hot route: a delivery mode other than fixed, logical
# destination mode, a shorthand.
_GENERAL_ROUTE_BITS = ICR_DM_MASK | ICR_DEST_LOGICAL | ICR_SH_MASK


class ApicBus:
    """All local APICs of one VM, and IPI routing (SDM 10.6): destination matching,
    shorthands, broadcast, lowest priority."""

    def __init__(self, notify: Callable[[int], None]) -> None:
        self.notify = notify
        self.apics: list[LocalApic] = []
        # Set (for good) once an APIC's ID is not its index (kvmpy's numbering): added
        # so, or software moved an xAPIC ID. From then on physical IPIs take the general
        # route, which finds every APIC with the destination ID, aliases included.
        self._renumbered = False
        # The native exit core (kvmpy._core.Core) of the VM, if any: told when IDs stop
        # being indexes, so its fastpath routes physical IPIs as the general route does.
        self.core = None
        # kvmpy.tracing.Tracer, or None: told of each IPI before it is published.
        self.tracer: Tracer | None = None
        # Called with the vector of every EOI of a level-triggered interrupt (the I/O
        # APICs' EOI input); runs on the EOI-ing vCPU's thread.
        self.eoi_listeners: list[Callable[[int], None]] = []

    @property
    def renumbered(self) -> bool:
        return self._renumbered

    @renumbered.setter
    def renumbered(self, value: bool) -> None:
        self._renumbered = value
        if self.core is not None:
            self.core.set(renumbered=int(value))

    @property
    def core(self) -> object:
        return self._core

    @core.setter
    def core(self, core: object) -> None:
        self._core = core
        if core is not None:
            core.set(renumbered=int(self._renumbered))

    def add(self, apic: LocalApic) -> None:
        """Attach ``apic``; its ``index`` becomes its position in ``apics``."""
        if apic.bus is not self:
            raise ValueError(f"{apic!r} was created for another bus")
        if apic.index >= 0:
            raise ValueError(f"{apic!r} is already on a bus")
        if any(other.apic_id == apic.apic_id for other in self.apics):
            raise ValueError(f"duplicate APIC ID {apic.apic_id}")
        apic.index = len(self.apics)
        self.apics.append(apic)
        if apic.apic_id != apic.index:
            self.renumbered = True
        if apic.on_level_eoi is None:
            apic.on_level_eoi = self.broadcast_eoi

    def broadcast_eoi(self, vector: int) -> None:
        """A local APIC EOI'd level-triggered ``vector``: tell every I/O APIC (SDM 10.8.5;
        the version register offers no EOI-broadcast suppression)."""
        for listener in self.eoi_listeners:
            listener(vector)

    # ------------------------------------------------------------------ routing
    def send_ipi(self, source: LocalApic, icr_low: int, dest: int) -> None:
        """Send the interrupt described by ICR low ``icr_low`` to destination ``dest``
        (ICR[63:32] in x2APIC mode, ICR[63:56] in xAPIC mode). Runs on the source's
        thread; never raises for a guest-controlled value."""
        # The hot case first: a fixed IPI with a legal vector, physical destination, no
        # shorthand, to the APIC whose ID is its index (kvmpy's numbering). No Counter,
        # no scan; anything else (or an APIC whose ID software changed) goes the general
        # way below.
        if not icr_low & _GENERAL_ROUTE_BITS and icr_low & 0xF0 and not self.renumbered:
            apics = self.apics
            if dest < len(apics):
                target = apics[dest]
                mode = target.mode
                if mode is not _DISABLED and dest == (
                        target.apic_id if mode is _X2APIC else target.xapic_id):
                    source.ipis_sent += 1
                    if self.tracer is not None:
                        self.tracer.send(target, DM_FIXED, icr_low & 0xFF)
                    if target.accept_fixed(icr_low & 0xFF, False):
                        self.notify(target.index)
                    return
            elif 0xFF < dest != 0xFFFF_FFFF:
                # No APIC has this ID: x2APIC IDs are the indexes, xAPIC IDs are 8 bits.
                source.ipis_sent += 1
                source.ipis_no_target += 1
                return
        stats = source._stats
        stats["ipi_sent"] += 1
        vector = icr_low & 0xFF
        dm = (icr_low >> 8) & 7
        if dm <= DM_LOWEST and vector < 16:
            # SDM 10.5.3: the sender logs "send illegal vector"; nothing is sent.
            stats["illegal_vector_sent"] += 1
            source._record_error(ESR_SEND_ILLEGAL_VECTOR)
            return
        if dm == DM_INIT and icr_low & ICR_TRIGGER_LEVEL and not icr_low & ICR_LEVEL_ASSERT:
            # INIT level de-assert (SDM 10.6.1): only synchronises arbitration IDs on
            # P6-era parts; no delivery.
            stats["init_deassert"] += 1
            return
        if dm == DM_RESERVED3 or dm == DM_EXTINT:
            stats["ipi_reserved_delivery_mode"] += 1
            return
        shorthand = (icr_low >> 18) & 3
        if shorthand == SH_SELF:
            self._deliver(source, dm, vector)
            return
        logical = icr_low & ICR_DEST_LOGICAL
        broadcast = shorthand != SH_NONE or is_broadcast(dest, source.mode)
        if not broadcast and not logical:
            if self.renumbered and dm != DM_LOWEST:
                hit = False
                for target in self.apics:
                    if target.mode is not _DISABLED and match_physical(target, dest):
                        hit = True
                        self._deliver(target, dm, vector)
                if not hit:
                    stats["ipi_no_target"] += 1
                return
            target = self._physical_target(dest)
            if target is None:
                stats["ipi_no_target"] += 1
            else:
                self._deliver(target, dm, vector)
            return
        skip = source if shorthand == SH_ALL_BUT else None
        if dm == DM_LOWEST:
            target = self._lowest_priority(vector, dest, broadcast, skip)
            if target is None:
                stats["ipi_no_target"] += 1
            else:
                self._deliver(target, dm, vector)
            return
        for target in self.apics:
            if target is skip or target.mode is _DISABLED:
                continue
            if broadcast or match_logical(target, dest):
                self._deliver(target, dm, vector)

    def _physical_target(self, dest: int) -> LocalApic | None:
        """The APIC with physical ID ``dest`` (SDM 10.6.2.1). kvmpy numbers APICs by
        index, so ``apics[dest]`` is tried first; a software-changed xAPIC ID falls
        back to a scan, and the first match wins (see send_ipi for aliased IDs)."""
        apics = self.apics
        if dest < len(apics):
            target = apics[dest]
            if target.mode is not _DISABLED and match_physical(target, dest):
                return target
        for target in apics:
            if target.mode is not _DISABLED and match_physical(target, dest):
                return target
        return None

    def _lowest_priority(
        self, vector: int, dest: int, broadcast: bool, skip: LocalApic | None
    ) -> LocalApic | None:
        """Lowest-priority arbitration (SDM 10.6.2.4) among the matching APICs that can
        accept the interrupt (software-enabled). The focus processor (vector already in
        its IRR or ISR, focus checking enabled: SVR bit 9 clear) wins outright; else the
        lowest PPR, ties to the lowest index."""
        best: LocalApic | None = None
        for target in self.apics:
            if target is skip or target.mode is _DISABLED or not target.sw_enabled:
                continue
            if not broadcast and not match_logical(target, dest):
                continue
            if not target.svr & SVR_FOCUS_DISABLED and (target.irr[vector] or target.isr[vector]):
                return target
            if best is None or target.ppr < best.ppr:
                best = target
        return best

    def _deliver(self, target: LocalApic, dm: int, vector: int) -> None:
        """Publish the event in ``target``, then notify (the order the kick relies on)."""
        if self.tracer is not None:
            self.tracer.send(target, dm, vector)
        if dm == DM_FIXED or dm == DM_LOWEST:
            if not target.accept_fixed(vector, False):
                return
        elif dm == DM_NMI:
            target.accept_nmi()
        elif dm == DM_INIT:
            target.accept_init()
        elif dm == DM_SIPI:
            target.accept_sipi(vector)
        else:
            target.accept_smi()
        self.notify(target.index)

    # ------------------------------------------------------------------ I/O APIC messages
    def deliver_irq(self, vector: int, dm: int, dest: int, logical: bool, level: bool) -> int:
        """Deliver an I/O APIC message (KVM's kvm_irq_delivery_to_apic with no source):
        delivery mode ``dm`` (fixed, lowest priority, SMI, NMI or INIT; the caller drops
        the others), 8-bit destination ``dest`` in physical or ``logical`` mode, trigger
        ``level`` (sets the TMR bit of a fixed/lowest vector, SDM 10.8.4).

        Matching is per target as for IPIs, except that 0xFF addresses every APIC, x2APIC
        ones too (KVM's kvm_apic_mda). Lowest priority arbitrates among the matching
        APICs as ``_lowest_priority``. Returns how many APICs accepted the message: a
        fixed/lowest vector refused (APIC software-disabled, or vector 0-15, which logs
        ESR bit 6 as any received illegal vector) does not count."""
        broadcast = dest == 0xFF
        if dm == DM_LOWEST:
            if broadcast or logical:
                target = self._lowest_priority(vector, dest, broadcast, None)
            else:
                target = self._physical_target(dest)
            if target is None:
                return 0
            return self._accept_irq(target, DM_FIXED, vector, level)
        accepted = 0
        for target in self.apics:
            if target.mode is _DISABLED:
                continue
            if broadcast or (match_logical(target, dest) if logical
                             else match_physical(target, dest)):
                accepted += self._accept_irq(target, dm, vector, level)
        return accepted

    def _accept_irq(self, target: LocalApic, dm: int, vector: int, level: bool) -> int:
        """Publish one I/O APIC message in ``target``, notify it; 1 if accepted."""
        if dm == DM_FIXED or dm == DM_LOWEST:
            if target.accept_fixed(vector, level):
                self.notify(target.index)
                return 1 if vector >= 16 else 0  # else only the LVT error interrupt
            return 0
        if dm == DM_NMI:
            target.accept_nmi()
        elif dm == DM_INIT:
            target.accept_init()
        elif dm == DM_SMI:
            target.accept_smi()
        else:
            return 0
        self.notify(target.index)
        return 1
