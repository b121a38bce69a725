"""The local APIC: one register file behind both the xAPIC MMIO page and the x2APIC
MSRs (as bhyve's vlapic.c), as a pure state machine driven by a clock (as crosvm's
devices/src/irqchip/apic.rs). Intel SDM Vol. 3A ch. 10.

Threading. Register accesses, injection (``pending_vector``/``ack``/``take_*``) and
the timer run on the owning vCPU's thread. Delivery (``accept_*``) may come from any
thread and takes no lock: IRR/ISR/TMR are ``bytearray(256)``, one byte per vector, so
``irr[v] = 1`` is one atomic store under the GIL and the highest pending vector is
``irr.rfind(1)``; NMI/SMI/INIT/SIPI are plain attribute stores. A sender publishes
the pending state first, and only then calls ``bus.notify(index)``, so a target that
re-checks after being notified always sees the new state. The ESR accumulator, the
one multi-field update other threads make, takes a small lock.

One source of truth with the native exit core (kvmpy/native/core.h): the bytes of
IRR/ISR/TMR and the register words the fastpath touches (``regs``: TPR, PPR, mode,
software enable, IDs, LDR/DFR, SVR, ICR, the xAPIC base, the timer deadline, and the
core's own counters) are this object's memory, which the core reads and writes
through buffer views (C11 atomics on its side). The attributes below are properties
over ``regs``; there is no second copy. An NMI/INIT/SIPI/SMI, which only Python
handles, also sets ``R_SLOW_EVENTS`` after it is published, so the core hands the
vCPU back to Python.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy import _core as nc

from . import constants as c
from .counters import AtomicCounter
from .destination import x2apic_ldr
from .errors import ApicGP
from .mode import ApicMode, check_apic_base_write
from .registers import REGISTERS, x2apic_spec
from .timer import ApicTimer

if TYPE_CHECKING:
    from .bus import ApicBus

_ZERO_VECTORS = bytes(256)
_BIT_CHARS = bytes.maketrans(b"\x00\x01", b"01")
_DISABLED = ApicMode.DISABLED
_XAPIC = ApicMode.XAPIC
_X2APIC = ApicMode.X2APIC
_X2APIC_ICR_RESERVED = c.X2APIC_ICR_RESERVED
_MMIO_HOLE = 0xFFFFFFFFFFFFFFFF
_LVT_TIMER_DEADLINE_BIT = c.TIMER_TSC_DEADLINE << c.LVT_TIMER_MODE_SHIFT  # bit 18
_MODES = (ApicMode.DISABLED, ApicMode.XAPIC, ApicMode.X2APIC)
# What LocalApic.accept_fixed returns: nothing pending from it; it set IRR[vector] (its
# sender kicks); IRR[vector] was set already (merged, SDM 10.8.4).
ACCEPT_REJECTED, ACCEPT_SET, ACCEPT_MERGED = 0, 1, 2


def _reg(index: int, doc: str) -> property:
    """A register word in ``regs`` (shared with the native core), as an int."""

    def get(self: LocalApic) -> int:
        return self._r[index]

    def set_(self: LocalApic, value: int) -> None:
        self._r[index] = value

    return property(get, set_, doc=doc)


def _pack32(vectors: bytearray, word: int) -> int:
    """Register view of vectors 32*word .. 32*word+31 (bit i = vector 32*word+i)."""
    chunk = vectors[32 * word : 32 * word + 32]
    return int(chunk[::-1].translate(_BIT_CHARS), 2)


class LocalApic:
    """One local APIC. See the module docstring for the threading contract."""

    tpr = _reg(nc.R_TPR, "Task priority (SDM 10.8.3.1).")
    ppr = _reg(nc.R_PPR, "Processor priority (SDM 10.8.3.1).")
    xapic_id = _reg(nc.R_XAPIC_ID, "The 8-bit xAPIC ID (software-writable, SDM 10.4.6).")
    ldr = _reg(nc.R_LDR, "The xAPIC logical destination register.")
    dfr = _reg(nc.R_DFR, "The xAPIC destination format register.")
    svr = _reg(nc.R_SVR, "Spurious-interrupt vector register (SDM 10.9).")
    _icr_low = _reg(nc.R_ICR_LOW, "ICR[31:0] as last written.")
    _icr_dest = _reg(nc.R_ICR_DEST, "ICR destination: [63:32] (x2APIC), [63:56] (xAPIC).")

    @property
    def mode(self) -> ApicMode:
        """Global mode from IA32_APIC_BASE EN/EXTD (SDM 10.12.1)."""
        return _MODES[self._r[nc.R_MODE]]

    @mode.setter
    def mode(self, value: ApicMode) -> None:
        self._r[nc.R_MODE] = value.value

    @property
    def sw_enabled(self) -> bool:
        """SVR bit 8: software enable (SDM 10.4.7.2)."""
        return bool(self._r[nc.R_SW_ENABLED])

    @sw_enabled.setter
    def sw_enabled(self, value: bool) -> None:
        self._r[nc.R_SW_ENABLED] = 1 if value else 0

    @property
    def base_address(self) -> int:
        """The xAPIC MMIO page's physical address (IA32_APIC_BASE[51:12])."""
        return self._q[nc.Q_BASE_ADDRESS]

    @base_address.setter
    def base_address(self, value: int) -> None:
        self._q[nc.Q_BASE_ADDRESS] = value

    def _slow_event(self) -> None:
        """After publishing an NMI/INIT/SIPI/SMI: tell the native core to hand the vCPU
        to Python (the loop top and the halt re-check R_SLOW_EVENTS)."""
        self._r[nc.R_SLOW_EVENTS] = 1

    def clear_slow_events(self) -> None:
        """Owner, before it looks at the pending NMI/INIT/SIPI/SMI (a sender publishes
        THEN sets the flag, so one left behind the clear is seen by that look)."""
        self._r[nc.R_SLOW_EVENTS] = 0

    def slow_events_left(self) -> None:
        """Owner, after its look: what it could not take yet stays flagged."""
        if self._nmi_flag or self.init_pending or self.smi_pending or self.sipi_pending:
            self._r[nc.R_SLOW_EVENTS] = 1

    def __init__(
        self,
        apic_id: int,
        bus: ApicBus,
        *,
        bsp: bool,
        clock_ns: Callable[[], int],
        tsc: Callable[[], int] | None = None,
        tsc_at: Callable[[int], int] | None = None,
        tsc_line: tuple[int, int] | None = None,
        tsc_hz: int,
        maxphyaddr: int = 52,
        x2apic_supported: bool = True,
        tsc_deadline_supported: bool = True,
        min_periodic_ns: int = 0,
        lint0_extint_at_reset: bool = False,
    ) -> None:
        # The register words shared with the native core (see the module docstring).
        self.regs = bytearray(nc.REGS_BYTES)
        self._r = memoryview(self.regs).cast("I")
        self._q = memoryview(self.regs).cast("Q")
        self.apic_id = apic_id  # initial APIC ID == x2APIC ID (SDM 10.12.5.1)
        self._r[nc.R_APIC_ID] = apic_id
        self.bus = bus
        self.bsp = bsp
        self.clock_ns = clock_ns
        # The TSC at a given clock_ns time: TSC-deadline arming reads the clock once and
        # derives the TSC from that reading (two reads would make the deadline early by
        # whatever delay fell between them).
        self.tsc_at = tsc_at
        self.tsc_hz = tsc_hz
        if tsc_line is not None:
            # (tsc0, t0_ns): the guest TSC read once and when, running at tsc_hz. Published
            # to the core, whose IA32_TSC_DEADLINE fastpath converts with the same line
            # (without it, Q_TSC_HZ stays 0 and the core leaves those writes to Python).
            self._q[nc.Q_TSC_REF], self._q[nc.Q_TSC_REF_NS] = tsc_line
            self._q[nc.Q_TSC_HZ] = tsc_hz
            self.tsc_at = self._tsc_on_line
        if tsc is None and self.tsc_at is None:
            raise ValueError("LocalApic needs tsc, tsc_at or tsc_line")
        self.tsc = tsc if tsc is not None else self._tsc_now
        self.maxphyaddr = maxphyaddr
        # CPUID.1:ECX[21] and [24] as the guest sees them (kvmpy/cpumodel.py). Without
        # x2APIC, IA32_APIC_BASE.EXTD is reserved (SDM 10.12.1); without TSC-deadline,
        # IA32_TSC_DEADLINE does not exist and timer mode 10b is reserved (SDM 10.5.4.1).
        self.x2apic_supported = x2apic_supported
        self.tsc_deadline_supported = tsc_deadline_supported
        self.index = -1  # set by ApicBus.add
        self.x2apic_ldr = x2apic_ldr(apic_id)
        # KVM's KVM_X86_QUIRK_LINT0_REENABLED (kvm_lapic_reset) and QEMU's
        # apic_reset_common: the BSP's LVT LINT0 resets to ExtINT, unmasked, so the
        # 8259's interrupts reach it before any software programs the APIC.
        self.lint0_extint_at_reset = lint0_extint_at_reset
        self._extint_line = False  # the 8259's INTR as last told (set_extint_line)
        self._r[nc.R_X2APIC_LDR] = self.x2apic_ldr
        # Called with the vector on the EOI of a level-triggered interrupt (TMR set):
        # the VMM may forward it to the IOAPIC (SDM 10.8.5). Runs on the owner's thread.
        self.on_level_eoi: Callable[[int], None] | None = None
        # Tracing hooks (kvmpy.tracing), owner's thread: the vector an EOI cleared, and
        # (vector, deadline) when the timer puts its vector in IRR.
        self.on_eoi: Callable[[int], None] | None = None
        self.on_timer_irq: Callable[[int, int], None] | None = None

        self.irr = bytearray(256)
        self.isr = bytearray(256)
        self.tmr = bytearray(256)
        self.timer = ApicTimer(tsc_hz, min_periodic_ns, self.regs)
        self._esr_lock = threading.Lock()
        self._lvt = [c.LVT_MASKED] * c.LVT_COUNT

        # Pending non-vectored events (plain attribute stores; see module docstring).
        # NMIs are counted, not latched in a flag: KVM (kvm_inject_nmi, process_nmi)
        # keeps up to two, one being serviced and one pending behind it, and
        # kvm-unit-tests' "multiple nmi" relies on it. pending = received - taken.
        self._nmi_taken = 0
        # A cheap "maybe an NMI" flag so the vCPU loop need not read the counter on
        # every entry: a sender increments the counter THEN sets it; the owner clears
        # it BEFORE reading the counter, so an NMI is never left behind a clear flag.
        self._nmi_flag = False
        self.ipis_sent = 0  # fixed physical IPIs routed by ApicBus's hot path
        self.ipis_no_target = 0  # ... of which addressed no APIC
        self.smi_pending = False
        self.init_pending = False
        self.sipi_pending = False
        self.sipi_vector = 0
        # Application processors wait for INIT-SIPI at power-up; the BSP runs.
        self.wait_for_sipi = not bsp

        # Owner-thread counters, and counters bumped by delivering threads.
        self._stats: Counter[str] = Counter()
        self._rx_fixed = AtomicCounter()
        self._rx_rejected = AtomicCounter()
        self._rx_illegal = AtomicCounter()
        self._rx_nmi = AtomicCounter()
        self._rx_smi = AtomicCounter()
        self._rx_init = AtomicCounter()
        self._rx_sipi = AtomicCounter()
        self._rx_sipi_ignored = AtomicCounter()
        self._errors = AtomicCounter()

        self.mode = _XAPIC  # power-up: EN=1, EXTD=0 (SDM 10.4.7.1)
        self.base_address = c.APIC_DEFAULT_BASE
        self.xapic_id = apic_id & 0xFF
        self._reset_registers()

    # ================================================================ state resets
    def _reset_registers(self) -> None:
        """Register state after power-up or INIT (SDM 10.4.7.1, 10.4.7.3): IRR/ISR/TMR,
        ICR, LDR, TPR, timer cleared; DFR all ones; LVTs masked; SVR 0xFF (software
        disabled). APIC ID, base and mode are the callers' business."""
        self.irr[:] = _ZERO_VECTORS
        self.isr[:] = _ZERO_VECTORS
        self.tmr[:] = _ZERO_VECTORS
        self.tpr = 0
        self.ppr = 0
        self.ldr = 0
        self.dfr = c.DFR_RESET
        self.svr = 0xFF
        self.sw_enabled = False
        self._icr_low = 0
        self._icr_dest = 0
        with self._esr_lock:
            self._esr = 0
            self._esr_pending = 0
        for i in range(c.LVT_COUNT):
            self._lvt[i] = c.LVT_MASKED
        if self.lint0_extint_at_reset:
            self._lvt[c.LVT_LINT0] = c.DM_EXTINT << 8
        self._sync_extint()
        self.timer.reset()

    # ================================================================ counters
    @property
    def stats(self) -> Counter[str]:
        """Snapshot of all event counters (owner-side and delivery-side)."""
        snap = Counter(self._stats)
        q = self._q
        for name, extra in (
            ("ipi_sent", self.ipis_sent + q[nc.Q_IPI_SENT]),
            ("ipi_no_target", self.ipis_no_target + q[nc.Q_IPI_NO_TARGET]),
            ("injected", q[nc.Q_INJECTED]),
            ("eoi", q[nc.Q_EOI]),
            ("self_ipi", q[nc.Q_SELF_IPI]),
        ):
            if extra:
                snap[name] += extra
        for name, native in (("ipi_received", nc.Q_RX_FIXED),
                             ("fixed_rejected_disabled", nc.Q_RX_REJECTED)):
            if q[native]:
                snap[name] += q[native]
        for name, counter in (
            ("ipi_received", self._rx_fixed),
            ("fixed_rejected_disabled", self._rx_rejected),
            ("illegal_vector_received", self._rx_illegal),
            ("nmi_received", self._rx_nmi),
            ("smi_received", self._rx_smi),
            ("init_received", self._rx_init),
            ("sipi_received", self._rx_sipi),
            ("sipi_ignored", self._rx_sipi_ignored),
            ("esr_errors", self._errors),
        ):
            value = counter.value
            if value:
                snap[name] += value
        if self.timer.missed_periods:
            snap["timer_missed_periods"] = self.timer.missed_periods
        if self.timer.clamped:
            snap["timer_period_clamped"] = self.timer.clamped
        return snap

    # ================================================================ IA32_APIC_BASE
    @property
    def apic_base(self) -> int:
        """IA32_APIC_BASE as RDMSR returns it (SDM 10.4.4, Figure 10-5)."""
        value = self.base_address
        if self.bsp:
            value |= c.APIC_BASE_BSP
        if self.mode is not _DISABLED:
            value |= c.APIC_BASE_EN
        if self.mode is _X2APIC:
            value |= c.APIC_BASE_EXTD
        return value

    def _write_apic_base(self, value: int) -> None:
        new = check_apic_base_write(
            self.mode, value, maxphyaddr=self.maxphyaddr, x2apic_supported=self.x2apic_supported
        )
        self.base_address = value & ~0xFFF & ((1 << self.maxphyaddr) - 1)
        old = self.mode
        if new is old:
            return
        self._stats["mode_" + new.name.lower()] += 1
        if new is _DISABLED:
            # SDM 10.4.3: disabling loses the APIC state (back to 10.4.7.1).
            self._reset_registers()
            self.xapic_id = self.apic_id & 0xFF
        self.mode = new
        self._sync_extint()  # a globally disabled APIC takes the 8259's INTR
        # xAPIC -> x2APIC (SDM 10.12.5.1): the ID reads as the x2APIC ID and the LDR is
        # derived from it (both computed on read); DFR and ICR high vanish.

    # ================================================================ MSR path
    def rdmsr(self, msr: int) -> int:
        """RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC MSR; raises ApicGP."""
        if msr == c.MSR_APIC_BASE:
            return self.apic_base
        if msr == c.MSR_TSC_DEADLINE:
            if not self.tsc_deadline_supported:
                self._stats["gp"] += 1
                raise ApicGP("IA32_TSC_DEADLINE without CPUID TSC-deadline (SDM Vol. 4 2-2)")
            if self.mode is _DISABLED or self.timer.mode != c.TIMER_TSC_DEADLINE:
                return 0
            return self.timer.tsc_deadline
        if not c.X2APIC_MSR_FIRST <= msr <= c.X2APIC_MSR_LAST:
            self._stats["gp"] += 1
            raise ApicGP(f"MSR {msr:#x} is not an APIC MSR")
        if self.mode is not _X2APIC:
            self._stats["gp"] += 1
            raise ApicGP(f"x2APIC MSR {msr:#x} read outside x2APIC mode (SDM 10.12.2)")
        spec = x2apic_spec(msr)
        if spec is None or not spec.x2_readable:
            self._stats["gp"] += 1
            raise ApicGP(f"x2APIC MSR {msr:#x} is not readable (SDM Table 10-6)")
        offset = (msr - c.X2APIC_MSR_FIRST) << 4
        if offset == c.REG_ICR_LOW:
            return (self._icr_dest << 32) | self._icr_low
        return self._read_reg(offset)

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR; raises ApicGP before changing anything (SDM 10.12.1.3)."""
        if msr == c.MSR_APIC_BASE:
            try:
                self._write_apic_base(value)
            except ApicGP:
                self._stats["gp"] += 1
                raise
            return
        if msr == c.MSR_TSC_DEADLINE:
            if not self.tsc_deadline_supported:
                self._stats["gp"] += 1
                raise ApicGP("IA32_TSC_DEADLINE without CPUID TSC-deadline (SDM Vol. 4 2-2)")
            # SDM 10.5.4.1: ignored unless the timer is in TSC-deadline mode.
            if self.mode is _DISABLED or self.timer.mode != c.TIMER_TSC_DEADLINE:
                self._stats["tsc_deadline_ignored"] += 1
                return
            now = self.clock_ns()
            self._timer_catch_up(now)
            tsc_now = self.tsc_at(now) if self.tsc_at is not None else self.tsc()
            self.timer.set_tsc_deadline(value, now, tsc_now)
            return
        if not c.X2APIC_MSR_FIRST <= msr <= c.X2APIC_MSR_LAST:
            self._stats["gp"] += 1
            raise ApicGP(f"MSR {msr:#x} is not an APIC MSR")
        if msr == c.MSR_X2APIC_ICR:
            if not self.icr_write_x2apic_fast(value):
                self._stats["gp"] += 1
                raise ApicGP("x2APIC ICR: reserved bit set or not in x2APIC mode")
            return
        if self.mode is not _X2APIC:
            self._stats["gp"] += 1
            raise ApicGP(f"x2APIC MSR {msr:#x} written outside x2APIC mode (SDM 10.12.2)")
        spec = x2apic_spec(msr)
        if spec is None or not spec.x2_writable:
            self._stats["gp"] += 1
            raise ApicGP(f"x2APIC MSR {msr:#x} is not writable (SDM Table 10-6)")
        if value >> 32 or value & spec.x2_reserved:
            self._stats["gp"] += 1
            raise ApicGP(f"x2APIC MSR {msr:#x}: reserved bits in {value:#x} (SDM 10.12.1.3)")
        offset = (msr - c.X2APIC_MSR_FIRST) << 4
        if offset == c.REG_LVT_TIMER and (value & c.LVT_TIMER_MODE_MASK) == c.LVT_TIMER_MODE_MASK:
            self._stats["gp"] += 1
            raise ApicGP("LVT timer mode 11b is reserved (SDM 10.5.1)")
        if offset == c.REG_LVT_TIMER and not self.tsc_deadline_supported \
                and value & _LVT_TIMER_DEADLINE_BIT:
            self._stats["gp"] += 1
            raise ApicGP("LVT timer mode 10b is reserved without CPUID TSC-deadline "
                         "(SDM 10.5.4.1)")
        if offset == c.REG_SELF_IPI:
            self.self_ipi_fast(value)
            return
        self._write_reg(offset, value)

    # ================================================================ MMIO path
    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` of the xAPIC page.

        Outside xAPIC mode the page is not decoded and reads return all ones (as an
        unclaimed bus; SDM 10.12.2: in x2APIC mode MMIO behaves as a globally disabled
        xAPIC; KVM's LAPIC_MMIO_HOLE quirk does the same). Unimplemented registers read
        0 and set ESR bit 7 (SDM 10.5.3); bytes 4..15 of a 16-byte slot read 0.
        """
        if self.mode is not _XAPIC:
            self._stats["mmio_outside_xapic"] += 1
            return _MMIO_HOLE & ((1 << (8 * size)) - 1)
        reg = offset & 0xFF0
        spec = REGISTERS.get(reg)
        if spec is None or not spec.in_xapic:
            self._record_error(c.ESR_ILLEGAL_REGISTER)
            return 0
        byte = offset & 0xF
        if byte >= 4:
            return 0
        value = 0 if reg == c.REG_EOI else self._read_reg(reg)
        return (value >> (8 * byte)) & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write to the xAPIC page. Only aligned 32-bit writes have an effect (SDM 10.4.1:
        registers are 32-bit, 16-byte aligned); reserved bits are ignored, never #GP;
        writes to read-only registers are ignored; writes outside xAPIC mode do nothing."""
        if self.mode is not _XAPIC:
            self._stats["mmio_outside_xapic"] += 1
            return
        if size != 4 or offset & 0xF:
            self._stats["mmio_write_ignored"] += 1
            return
        spec = REGISTERS.get(offset)
        if spec is None or not spec.in_xapic:
            self._record_error(c.ESR_ILLEGAL_REGISTER)
            return
        if not spec.xapic_writable:
            self._stats["mmio_write_ignored"] += 1
            return
        value &= 0xFFFFFFFF
        if offset == c.REG_ICR_LOW:
            self.icr_write_xapic_fast(value)
            return
        self._write_reg(offset, value)

    # ================================================================ register file
    def _read_reg(self, offset: int) -> int:
        """32-bit value of the register at ``offset`` in the current mode (x2APIC ICR is
        handled by rdmsr)."""
        x2 = self.mode is _X2APIC
        if offset == c.REG_ID:
            return self.apic_id if x2 else self.xapic_id << 24
        if offset == c.REG_VERSION:
            return c.APIC_VERSION
        if offset == c.REG_TPR:
            return self.tpr
        if offset == c.REG_APR:
            return self.apr()
        if offset == c.REG_PPR:
            return self.ppr
        if offset == c.REG_LDR:
            return self.x2apic_ldr if x2 else self.ldr
        if offset == c.REG_DFR:
            return self.dfr
        if offset == c.REG_SVR:
            return self.svr
        if c.REG_ISR0 <= offset < c.REG_ESR:
            word = (offset >> 4) & 7
            if offset < c.REG_TMR0:
                return _pack32(self.isr, word)
            if offset < c.REG_IRR0:
                return _pack32(self.tmr, word)
            return _pack32(self.irr, word)
        if offset == c.REG_ESR:
            return self._esr
        if offset == c.REG_ICR_LOW:
            return self._icr_low
        if offset == c.REG_ICR_HIGH:
            return (self._icr_dest & 0xFF) << 24
        if c.REG_LVT_TIMER <= offset <= c.REG_LVT_ERROR:
            return self._lvt[(offset - c.REG_LVT_TIMER) >> 4]
        if offset == c.REG_TIMER_INITIAL:
            return self.timer.initial_count
        if offset == c.REG_TIMER_CURRENT:
            return self.timer.current_count(self.clock_ns())
        if offset == c.REG_TIMER_DIVIDE:
            return self.timer.tdcr
        return 0  # RRD (remote read is not supported: always invalid) and write-only

    def _write_reg(self, offset: int, value: int) -> None:
        """Apply an already-validated 32-bit write (both modes). Reserved bits are
        dropped here, which is the xAPIC semantics; x2APIC writes were checked."""
        if offset == c.REG_TPR:
            self.tpr = value & 0xFF
            self._update_ppr()
        elif offset == c.REG_EOI:
            self.eoi()
        elif offset == c.REG_SVR:
            self._write_svr(value)
        elif c.REG_LVT_TIMER <= offset <= c.REG_LVT_ERROR:
            self._write_lvt((offset - c.REG_LVT_TIMER) >> 4, value)
        elif offset == c.REG_TIMER_INITIAL:
            now = self.clock_ns()
            self._timer_catch_up(now)
            self.timer.set_initial_count(value, now)
        elif offset == c.REG_TIMER_DIVIDE:
            now = self.clock_ns()
            self._timer_catch_up(now)
            self.timer.set_divide(value, now)
        elif offset == c.REG_ESR:
            self._latch_esr()
        elif offset == c.REG_ICR_HIGH:
            self._icr_dest = value >> 24
        elif offset == c.REG_ID:
            self.xapic_id = value >> 24  # xAPIC ID is software-writable (SDM 10.4.6)
            if self.xapic_id != self.apic_id & 0xFF:
                self.bus.renumbered = True  # IDs may alias: see ApicBus.send_ipi
        elif offset == c.REG_LDR:
            self.ldr = value & 0xFF000000
        elif offset == c.REG_DFR:
            self.dfr = value | 0x0FFFFFFF  # bits 27:0 are reserved, read as ones

    def _write_svr(self, value: int) -> None:
        """SVR write (SDM 10.9, 10.4.7.2): clearing bit 8 software-disables the APIC
        and masks every LVT entry."""
        self.svr = value & c.SVR_WRITABLE
        enabled = bool(value & c.SVR_APIC_ENABLED)
        if not enabled:
            for i in range(c.LVT_COUNT):
                self._lvt[i] |= c.LVT_MASKED
            self._sync_extint()
        if enabled != self.sw_enabled:
            self._stats["sw_enable" if enabled else "sw_disable"] += 1
        self.sw_enabled = enabled

    def _write_lvt(self, index: int, value: int) -> None:
        """LVT write (SDM 10.5.1): the mask bit cannot be cleared while the APIC is
        software-disabled (SDM 10.4.7.2)."""
        value &= c.LVT_WRITABLE[index]
        if not self.sw_enabled:
            value |= c.LVT_MASKED
        if index == c.LVT_TIMER and not self.tsc_deadline_supported:
            # Mode bit 18 is reserved without TSC-deadline: an xAPIC write drops it
            # (KVM's timer_mode_mask), x2APIC writes with it #GP'd in wrmsr.
            value &= ~_LVT_TIMER_DEADLINE_BIT
        if index != c.LVT_TIMER:
            self._lvt[index] = value
            if index == c.LVT_LINT0:
                self._sync_extint()
            return
        now = self.clock_ns()
        self._timer_catch_up(now)  # under the old LVT: vector, mask and mode
        self._lvt[index] = value
        mode = (value & c.LVT_TIMER_MODE_MASK) >> c.LVT_TIMER_MODE_SHIFT
        self.timer.set_mode(mode, now)

    def lvt(self, index: int) -> int:
        """Current value of LVT entry ``index`` (LVT_TIMER .. LVT_ERROR)."""
        return self._lvt[index]

    def set_extint_line(self, level: bool) -> None:
        """The 8259's INTR went to `level` (any thread): R_EXTINT tells the native core
        whether an ExtINT is there for this CPU (vcpu_loop.c hands it to Python)."""
        self._extint_line = level
        self._sync_extint()

    def _sync_extint(self) -> None:
        """R_EXTINT = INTR up and taken (after LINT0, SVR, mode changes and resets)."""
        line = getattr(self, "_extint_line", False)  # _reset_registers runs in __init__
        self._r[nc.R_EXTINT] = 1 if line and self.accepts_pic_interrupts() else 0

    def accepts_pic_interrupts(self) -> bool:
        """Does the 8259's INTR reach this CPU? KVM's kvm_apic_accept_pic_intr: when the
        APIC is globally disabled (SDM 10.4.3: LINT0 is then the INTR pin), or LVT LINT0
        is unmasked with delivery mode ExtINT (SDM 10.5.1). Like KVM and QEMU, the
        software-enable bit is not consulted."""
        if self.mode is _DISABLED:
            return True
        lint0 = self._lvt[c.LVT_LINT0]
        return not lint0 & c.LVT_MASKED and (lint0 >> 8) & 7 == c.DM_EXTINT

    # ================================================================ ESR
    def _latch_esr(self) -> None:
        """ESR write (SDM 10.5.3): the readable ESR becomes the errors logged since the
        previous write, and the log starts over."""
        with self._esr_lock:
            self._esr = self._esr_pending
            self._esr_pending = 0

    def _record_error(self, bits: int) -> bool:
        """Log an APIC error and raise the LVT error interrupt if unmasked (SDM 10.5.3).
        May run on any thread. True if an interrupt became pending."""
        with self._esr_lock:
            self._esr_pending |= bits
        self._errors.inc()
        if bits & c.ESR_RECV_ILLEGAL_VECTOR:
            self._rx_illegal.inc()
        lvt = self._lvt[c.LVT_ERROR]
        if lvt & c.LVT_MASKED:
            return False
        vector = lvt & c.LVT_VECTOR
        if vector < 16:
            # An illegal error vector is itself a receive-illegal error; no recursion.
            with self._esr_lock:
                self._esr_pending |= c.ESR_RECV_ILLEGAL_VECTOR
            return False
        self.tmr[vector] = 0
        self.irr[vector] = 1
        return True

    @property
    def esr_pending(self) -> int:
        """Errors logged since the last ESR write (not yet visible to the guest)."""
        return self._esr_pending

    # ================================================================ ICR / IPIs
    def icr_write_x2apic_fast(self, value: int) -> bool:
        """x2APIC ICR write (MSR 0x830), upstream ``kvm_x2apic_icr_write_fast`` contract:
        False, with no side effect, if not in x2APIC mode or a reserved bit (13, 17:16,
        31:20) is set; otherwise send the IPI, store ICR (bit 12 dropped), return True."""
        if self.mode is not _X2APIC or value & _X2APIC_ICR_RESERVED:
            return False
        low = value & 0xFFFFEFFF
        dest = (value >> 32) & 0xFFFFFFFF
        self.bus.send_ipi(self, low, dest)
        self._icr_low = low
        self._icr_dest = dest
        return True

    def icr_write_xapic_fast(self, value32: int) -> bool:
        """xAPIC write to ICR low (0x300): False (nothing done) outside xAPIC mode; else
        store ICR low (reserved bits ignored), send to the destination held in ICR high
        bits 31:24 (SDM 10.6.1), return True."""
        if self.mode is not _XAPIC:
            return False
        low = value32 & c.XAPIC_ICR_LOW_WRITABLE
        self.bus.send_ipi(self, low, self._icr_dest)
        self._icr_low = low
        return True

    def self_ipi_fast(self, value: int) -> bool:
        """SELF IPI MSR 0x83F (SDM 10.12.11): fixed, edge, to self. False (nothing done)
        outside x2APIC mode or if bits 31:8 are set. An illegal vector is reported as a
        receive error (ESR bit 6), as for any locally generated interrupt."""
        if self.mode is not _X2APIC or value & ~0xFF:
            return False
        self._stats["self_ipi"] += 1
        self._stats["ipi_sent"] += 1
        if self.bus.tracer is not None:
            self.bus.tracer.send(self, c.DM_FIXED, value)
        if self.accept_fixed(value, False):
            self.bus.notify(self.index)
        return True

    # ================================================================ delivery (any thread)
    def accept_fixed(self, vector: int, level_triggered: bool) -> int:
        """Accept a fixed (or lowest-priority, once arbitrated) interrupt (SDM 10.8.1).

        Rejected when the APIC is disabled, globally or by SVR (SDM 10.4.7.2). A vector
        below 16 sets ESR bit 6 and no IRR bit (SDM 10.5.3). TMR is written before IRR,
        so the owner never sees the IRR bit with a stale trigger mode. Returns
        ACCEPT_REJECTED (0: nothing became pending), ACCEPT_SET (this interrupt set
        IRR[vector], or the LVT error interrupt's) or ACCEPT_MERGED (IRR[vector] was set
        already: one pending interrupt per vector, SDM 10.8.4), read and set in one
        atomic step (``irr_test_and_set``): truthy whenever an interrupt is pending.
        """
        if not self.sw_enabled or self.mode is _DISABLED:
            self._rx_rejected.inc()
            return ACCEPT_REJECTED
        if vector < 16:
            return ACCEPT_SET if self._record_error(c.ESR_RECV_ILLEGAL_VECTOR) \
                else ACCEPT_REJECTED
        self.tmr[vector] = 1 if level_triggered else 0
        was_set = self.irr_test_and_set(vector)
        self._rx_fixed.inc()
        return ACCEPT_MERGED if was_set else ACCEPT_SET

    def irr_test_and_set(self, vector: int) -> bool:
        """IRR[vector] = 1; True if it was set already. With the native core attached
        (``bus.core``, as Machine does) it is the core's one atomic exchange
        (lapic_fast.c lapic_irr_test_and_set, acq_rel): the owner takes IRR bytes in C
        without the GIL (lapic_ack), so a read, then a store here could take a byte the
        owner has just acknowledged for a pending one. Without a core (the pure model)
        no other thread acknowledges, and the read and the store are enough."""
        core = self.bus.core
        if core is not None:
            return core.irr_test_and_set(self.index, vector)
        was_set = self.irr[vector]
        self.irr[vector] = 1
        return was_set == 1

    def accept_nmi(self) -> None:
        """NMI message (SDM 10.6.1): bypasses IRR/ISR; accepted even if SVR-disabled."""
        self._rx_nmi.inc()
        self._nmi_flag = True
        self._slow_event()

    @property
    def nmi_pending(self) -> bool:
        return self._rx_nmi.value > self._nmi_taken

    def accept_smi(self) -> None:
        """SMI message: latched as a pending flag (no SMM is modelled)."""
        self.smi_pending = True
        self._rx_smi.inc()
        self._slow_event()

    def accept_init(self) -> None:
        """INIT message (SDM 10.6.1, 10.4.7.3); the owner acts on it in take_init."""
        self.init_pending = True
        self._rx_init.inc()
        self._slow_event()

    def accept_sipi(self, vector: int) -> None:
        """Start-up IPI (SDM 10.4.4.1, 8.4.4): latched only by a processor in (or on its
        way into, INIT pending) the wait-for-SIPI state; otherwise ignored."""
        if not (self.wait_for_sipi or self.init_pending):
            self._rx_sipi_ignored.inc()
            return
        self.sipi_vector = vector & 0xFF
        self.sipi_pending = True
        self._rx_sipi.inc()
        self._slow_event()

    # ================================================================ injection (owner)
    def has_pending_events(self) -> bool:
        """Cheap: anything that should wake a halted vCPU."""
        if self.nmi_pending or self.init_pending or self.smi_pending:
            return True
        if self.sipi_pending and self.wait_for_sipi:
            return True
        return self.pending_vector() is not None

    def halt_ends_at_once(self, if_flag: bool) -> bool:
        """Cheap, for the HLT fastpath: would a HLT executed now end at once? An NMI or
        INIT ends it; a maskable interrupt only if IF=1 (SDM Vol. 2A, HLT). False means
        "go and block", where the full check runs again."""
        if self.init_pending or (self._nmi_flag and self.nmi_pending):
            return True
        return if_flag and self.pending_vector() is not None

    def pending_vector(self) -> int | None:
        """Highest IRR vector deliverable now: its priority class (vector[7:4]) must be
        above PPR[7:4] (SDM 10.8.3.1), and the APIC software-enabled."""
        vector = self.irr.rfind(1)
        if vector < 0 or (vector >> 4) <= (self.ppr >> 4) or not self.sw_enabled:
            return None
        return vector

    def ack(self, vector: int) -> None:
        """The CPU accepted ``vector`` (INTA): IRR -> ISR, update PPR (SDM 10.8.4)."""
        self.irr[vector] = 0
        self.isr[vector] = 1
        self._update_ppr()
        self._stats["injected"] += 1

    def eoi(self) -> None:
        """EOI (SDM 10.8.5): clear the highest ISR bit and update PPR. If that vector's
        TMR bit is set it was level-triggered: count it and call ``on_level_eoi``."""
        vector = self.isr.rfind(1)
        if vector < 0:
            self._stats["eoi_without_isr"] += 1
            return
        self._end_of_interrupt(vector)
        if self.tmr[vector]:
            self._stats["eoi_level"] += 1
            if self.on_level_eoi is not None:
                self.on_level_eoi(vector)

    def eoi_fast(self) -> bool:
        """The EOI fastpath (a zero write to x2APIC EOI or xAPIC EOI, the caller checks
        the value): EOI an edge-triggered vector and return True; False, with no side
        effect, when the EOI must take the slow path: not enabled, or the highest ISR
        vector is level-triggered (TMR set: the EOI is broadcast to the I/O APICs,
        SDM 10.8.5), or no vector is in service (counted there)."""
        vector = self.isr.rfind(1)
        if vector < 0 or self.tmr[vector] or self.mode is _DISABLED:
            return False
        self._end_of_interrupt(vector)
        return True

    def _end_of_interrupt(self, vector: int) -> None:
        """Both EOI paths: clear ISR bit ``vector``, update PPR, count, trace."""
        self.isr[vector] = 0
        self._update_ppr()
        self._stats["eoi"] += 1
        if self.on_eoi is not None:
            self.on_eoi(vector)

    def take_nmi(self) -> bool:
        """Consume one pending NMI (the VMM injects each with KVM_NMI, and KVM itself
        collapses what is beyond one in service plus one pending)."""
        if not self._nmi_flag:
            return False
        self._nmi_flag = False
        received = self._rx_nmi.value
        if received > self._nmi_taken:
            self._nmi_taken += 1
            if self._nmi_taken < received:
                self._nmi_flag = True
            return True
        return False

    def take_smi(self) -> bool:
        """Consume a pending SMI."""
        if self.smi_pending:
            self.smi_pending = False
            return True
        return False

    def take_init(self) -> bool:
        """Consume a pending INIT and perform the APIC side of INIT reset (SDM 10.4.7.3:
        registers as at power-up except the APIC ID; mode and base kept). The VMM then
        resets the vCPU: the BSP restarts at the reset vector, an AP enters
        wait-for-SIPI (``wait_for_sipi`` becomes True), as KVM's kvm_apic_accept_events.
        A pending NMI is dropped; a SIPI that arrived behind the INIT is kept."""
        if not self.init_pending:
            return False
        self.init_pending = False
        self._nmi_taken = self._rx_nmi.value  # pending NMIs are dropped
        self._reset_registers()
        self.wait_for_sipi = not self.bsp
        self._stats["init"] += 1
        return True

    def take_sipi(self) -> int | None:
        """Consume a pending SIPI if in wait-for-SIPI: returns its vector (the AP starts
        at vector << 12) and leaves the wait state. A SIPI with no INIT behind it and no
        wait state is stale and dropped; with an INIT pending, take_init comes first."""
        if not self.sipi_pending or self.init_pending:
            return None  # nothing, or an INIT to process first
        if self.wait_for_sipi:
            self.sipi_pending = False
            self.wait_for_sipi = False
            self._stats["sipi"] += 1
            return self.sipi_vector
        self.sipi_pending = False
        return None

    def set_cr8(self, cr8: int) -> None:
        """MOV to CR8 (SDM 10.8.6.1): TPR[7:4] = CR8[3:0], TPR[3:0] = 0. Bits 63:4 are
        reserved: #GP."""
        if cr8 & ~0xF:
            self._stats["gp"] += 1
            raise ApicGP(f"CR8 {cr8:#x}: reserved bits")
        self.tpr = cr8 << 4
        self._update_ppr()

    def cr8(self) -> int:
        """MOV from CR8: TPR[7:4]."""
        return self.tpr >> 4

    # ================================================================ priorities
    def _update_ppr(self) -> None:
        """PPR (SDM 10.8.3.1): TPR if TPR[7:4] >= ISRV[7:4], else ISRV[7:4] << 4."""
        isrv = self.isr.rfind(1)
        tpr = self.tpr
        if isrv < 0 or (tpr & 0xF0) >= (isrv & 0xF0):
            self.ppr = tpr
        else:
            self.ppr = isrv & 0xF0

    def apr(self) -> int:
        """Arbitration priority (SDM 10.6.2.4, Figure 10-15): TPR if TPR[7:4] >= IRRV[7:4]
        and TPR[7:4] > ISRV[7:4], else the highest of the three classes."""
        irrv = max(self.irr.rfind(1), 0)
        isrv = max(self.isr.rfind(1), 0)
        tpr = self.tpr
        if (tpr & 0xF0) >= (irrv & 0xF0) and (tpr & 0xF0) > (isrv & 0xF0):
            return tpr
        return max(tpr & 0xF0, isrv & 0xF0, irrv & 0xF0)

    # ================================================================ timer
    def _tsc_on_line(self, now_ns: int) -> int:
        """The guest TSC at ``now_ns`` on the published line (kvmpy/native/lapic_fast.c
        lapic_tsc_deadline_fast computes the same)."""
        q = self._q
        return q[nc.Q_TSC_REF] + (now_ns - q[nc.Q_TSC_REF_NS]) * self.tsc_hz // 1_000_000_000

    def _tsc_now(self) -> int:
        return self.tsc_at(self.clock_ns())  # tsc_at: set, as __init__ checked

    def timer_deadline_ns(self) -> int | None:
        """Absolute clock_ns time of the next timer expiry, or None."""
        return self.timer.deadline_ns

    def _timer_catch_up(self, now_ns: int) -> None:
        """Before a write to a timer register (LVT timer, initial count, divide,
        IA32_TSC_DEADLINE): an expiry due at ``now_ns`` that the VMM has not processed
        yet happens first, under the old settings. In KVM the hrtimer has fired by then
        (apic_timer_fn); without this, a host stall of the vCPU across the deadline
        would decide the outcome: a one-shot count-down that reached 0 and is then
        switched to periodic would restart from the initial count instead of staying
        at 0 (apic_get_tmcct), and the expired count-down's interrupt would be lost."""
        deadline = self.timer.deadline_ns
        if deadline is not None and now_ns >= deadline:
            self._stats["timer_caught_up"] += 1
            self.timer_expired(now_ns)

    def timer_expired(self, now_ns: int) -> bool:
        """If the timer is due at ``now_ns``: set the LVT timer vector in IRR unless the
        entry is masked (a masked timer still counts, SDM 10.5.1), rearm a periodic
        timer, and return True. The caller wakes the owner vCPU if needed."""
        deadline = self.timer.deadline_ns if self.on_timer_irq is not None else 0
        if not self.timer.expire(now_ns):
            return False
        lvt = self._lvt[c.LVT_TIMER]
        if lvt & c.LVT_MASKED:
            self._stats["timer_masked"] += 1
            return True
        self._stats["timer_fired"] += 1
        vector = lvt & c.LVT_VECTOR
        if vector < 16:
            self._record_error(c.ESR_RECV_ILLEGAL_VECTOR)
        else:
            self.tmr[vector] = 0
            self.irr[vector] = 1
            if self.on_timer_irq is not None:
                self.on_timer_irq(vector, deadline or 0)
        return True

    def __repr__(self) -> str:
        return f"LocalApic(id={self.apic_id}, index={self.index}, mode={self.mode.name})"
