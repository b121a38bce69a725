"""Property tests of the local APIC model: a hostile guest drives 2-4 APICs at random.

A hypothesis ``RuleBasedStateMachine`` writes and reads registers through both paths
(x2APIC MSRs incl. IA32_APIC_BASE and IA32_TSC_DEADLINE; the xAPIC page at any offset
and size), switches modes, sends IPIs of every kind, plays the CPU (pending_vector ->
ack -> EOI by register write, NMI/INIT/SIPI/SMI takes), and moves a fake clock. Next to
the model runs a shadow written from the SDM (Vol. 3A ch. 10), not from the model:
every access is predicted (#GP or not, value read, vectors delivered, errors logged),
and after every step the model must agree with the shadow and pass
``kvmpy.apic.invariants.check_invariants``.

Choices the SDM leaves open follow the model's documented ones (bus.py docstring):
illegal fixed/lowest vectors are not sent; lowest priority goes to the focus
processor, else to a lowest-PPR APIC; duplicate physical IDs deliver to all of them
(lowest priority: to one);
a DFR model other than flat is cluster; TSC_DEADLINE reads 0 outside deadline mode.

``scripts/fuzz_apic_model.py`` runs the same machine for a long time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmpy.apic import ApicBus, ApicGP, ApicMode, LocalApic
from kvmpy.apic.invariants import check_invariants, expected_apr, expected_ppr, x2apic_logical_id
from kvmpy.apic.testing import FakeClock

DIS, XAPIC, X2 = ApicMode.DISABLED, ApicMode.XAPIC, ApicMode.X2APIC
MASK64 = (1 << 64) - 1
MAXPHYADDR = 52
TSC_HZ = 2_000_000_000

# ---- SDM facts, written out here (Vol. 3A Table 10-1, 10-6; Figures 10-8, 10-12) ----
ID, VER, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = (
    0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
)  # fmt: skip
ISR0, TMR0, IRR0, ESR, ICR, ICR2 = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
LVT0, TMICT, TMCCT, TDCR, SELF_IPI = 0x320, 0x380, 0x390, 0x3E0, 0x3F0
LVT_T, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERR = range(6)
MASKED = 1 << 16
DS = 1 << 12  # LVT/ICR delivery status (read-only)
REMOTE_IRR = 1 << 14  # LINT0/1 only (read-only)
LVT_WRITABLE = (
    0xFF | MASKED | 3 << 17,  # timer: vector, mask, mode
    0xFF | 0x700 | MASKED,  # thermal
    0xFF | 0x700 | MASKED,  # perf
    0xFF | 0x700 | 1 << 13 | 1 << 15 | MASKED,  # LINT0: + polarity, trigger
    0xFF | 0x700 | 1 << 13 | 1 << 15 | MASKED,  # LINT1
    0xFF | MASKED,  # error
)
# Read-only LVT bits an x2APIC WRMSR may carry without #GP: delivery status everywhere,
# remote IRR only in LINT0/1 (SDM Figure 10-8; see
# test_x2apic_lvt_bit14_reserved_outside_lint below).
LVT_X2_READ_ONLY = DS | REMOTE_IRR
XAPIC_ICR_FIELDS = 0xFF | 0x700 | 1 << 11 | 1 << 14 | 1 << 15 | 3 << 18
X2_ICR_RESERVED = 1 << 13 | 3 << 16 | 0xFFF << 20
SVR_ENABLE, SVR_FOCUS_OFF = 1 << 8, 1 << 9
ESR_SEND_ILLEGAL, ESR_RECV_ILLEGAL, ESR_ILLEGAL_REG = 1 << 5, 1 << 6, 1 << 7
VERSION = 0x14 | 5 << 16
BASE_BSP, BASE_EXTD, BASE_EN = 1 << 8, 1 << 10, 1 << 11
BASE_RESERVED = (0xFF | 1 << 9 | ~((1 << MAXPHYADDR) - 1)) & MASK64
FIXED, LOWEST, SMI, DM3, NMI, INIT, SIPI, DM7 = range(8)
SH_NONE, SH_SELF, SH_ALL, SH_ALL_BUT = range(4)
LOGICAL, ASSERT, TRIG_LEVEL = 1 << 11, 1 << 14, 1 << 15
MSR_BASE, MSR_DEADLINE = 0x1B, 0x6E0

# xAPIC page (Table 10-1): offset -> writable. Everything else is unimplemented.
XAPIC_REGS: dict[int, bool] = {
    ID: True, VER: False, TPR: True, APR: False, PPR: False, EOI: True, RRD: False,
    LDR: True, DFR: True, SVR: True, ESR: True, ICR: True, ICR2: True,
    TMICT: True, TMCCT: False, TDCR: True,
}  # fmt: skip
for _w in range(8):
    for _base in (ISR0, TMR0, IRR0):
        XAPIC_REGS[_base + 0x10 * _w] = False
for _i in range(6):
    XAPIC_REGS[LVT0 + 0x10 * _i] = True
# x2APIC MSRs (Table 10-6, six LVTs): offset -> (readable, writable, writable bits).
X2_REGS: dict[int, tuple[bool, bool, int]] = {
    ID: (True, False, 0), VER: (True, False, 0), TPR: (True, True, 0xFF),
    PPR: (True, False, 0), EOI: (False, True, 0), LDR: (True, False, 0),
    SVR: (True, True, 0x3FF), ESR: (True, True, 0), ICR: (True, True, 0),
    TMICT: (True, True, 0xFFFFFFFF), TMCCT: (True, False, 0), TDCR: (True, True, 0xB),
    SELF_IPI: (False, True, 0xFF),
}  # fmt: skip
for _w in range(8):
    for _base in (ISR0, TMR0, IRR0):
        X2_REGS[_base + 0x10 * _w] = (True, False, 0)
for _i in range(6):
    X2_REGS[LVT0 + 0x10 * _i] = (
        True, True, LVT_WRITABLE[_i] | (LVT_X2_READ_ONLY if _i in (3, 4) else DS))


def divisor(tdcr: int) -> int:
    """Divide configuration (SDM Figure 10-10): bits 3,1,0 -> 2, 4, ..., 128, 1."""
    v = ((tdcr >> 1) & 4) | (tdcr & 3)
    return 1 if v == 7 else 2 << v


def _pack(vectors: set[int], word: int) -> int:
    return sum(1 << (v - 32 * word) for v in vectors if 32 * word <= v < 32 * word + 32)


@dataclass
class Shadow:
    """What the SDM says one APIC holds, maintained independently of the model."""

    apic_id: int
    bsp: bool
    mode: ApicMode = XAPIC
    base: int = 0xFEE00000
    xapic_id: int = 0
    tpr: int = 0
    ldr: int = 0
    dfr: int = 0xFFFFFFFF
    svr: int = 0xFF
    lvt: list[int] = field(default_factory=lambda: [MASKED] * 6)
    icr_low: int = 0
    icr_dest: int = 0
    esr: int = 0
    esr_pending: int = 0
    tmict: int = 0
    tdcr: int = 0
    armed: bool = False
    deadline: int | None = None  # exact expected expiry when known
    tsc_deadline: int = 0
    irr: set[int] = field(default_factory=set)
    isr: set[int] = field(default_factory=set)
    tmr: set[int] = field(default_factory=set)
    nmi: int = 0
    init: bool = False
    sipi: bool = False
    sipi_vector: int = 0
    wait_sipi: bool = False
    smi: bool = False
    # Conservation accounting of fixed interrupts.
    accepted: int = 0  # new IRR bits
    merged: int = 0  # accepted while already in IRR (architectural merge)
    acked: int = 0
    eoid: int = 0
    dropped_irr: int = 0  # cleared by INIT or global disable (SDM 10.4.7.3, 10.4.3)
    dropped_isr: int = 0

    def __post_init__(self) -> None:
        self.xapic_id = self.apic_id & 0xFF
        self.wait_sipi = not self.bsp

    # ---- derived -----------------------------------------------------------------
    @property
    def sw_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def timer_mode(self) -> int:
        return (self.lvt[LVT_T] >> 17) & 3

    @property
    def ppr(self) -> int:
        return expected_ppr(self.tpr, list(self.isr))

    def pending(self) -> int | None:
        """Vector the CPU may take now (SDM 10.8.3.1: class above PPR class)."""
        if self.mode is DIS or not self.sw_enabled or not self.irr:
            return None
        v = max(self.irr)
        return v if (v >> 4) > (self.ppr >> 4) else None

    # ---- state changes ---------------------------------------------------------------
    def reset_registers(self) -> None:
        """Power-up/INIT register state (SDM 10.4.7.1, 10.4.7.3)."""
        self.dropped_irr += len(self.irr)
        self.dropped_isr += len(self.isr)
        self.irr.clear()
        self.isr.clear()
        self.tmr.clear()
        self.tpr = self.ldr = self.icr_low = self.icr_dest = 0
        self.esr = self.esr_pending = self.tmict = self.tdcr = self.tsc_deadline = 0
        self.dfr, self.svr = 0xFFFFFFFF, 0xFF
        self.lvt = [MASKED] * 6
        self.armed, self.deadline = False, None

    def add_irr(self, vector: int, level: bool) -> None:
        if vector in self.irr:
            self.merged += 1
        else:
            self.accepted += 1
            self.irr.add(vector)
        if level:
            self.tmr.add(vector)
        else:
            self.tmr.discard(vector)

    def record_error(self, bits: int) -> bool:
        """SDM 10.5.3: log in ESR; raise the LVT error interrupt if unmasked."""
        self.esr_pending |= bits
        lvt = self.lvt[LVT_ERR]
        if lvt & MASKED:
            return False
        if (lvt & 0xFF) < 16:
            self.esr_pending |= ESR_RECV_ILLEGAL
            return False
        self.add_irr(lvt & 0xFF, False)
        return True

    def accept_fixed(self, vector: int, level: bool) -> bool:
        if self.mode is DIS or not self.sw_enabled:
            return False
        if vector < 16:
            return self.record_error(ESR_RECV_ILLEGAL)
        self.add_irr(vector, level)
        return True

    def write_base(self, value: int) -> None:
        new = (XAPIC, X2)[bool(value & BASE_EXTD)] if value & BASE_EN else DIS
        self.base = value & ~0xFFF & ((1 << MAXPHYADDR) - 1)
        if new is DIS and self.mode is not DIS:
            self.reset_registers()
            self.xapic_id = self.apic_id & 0xFF
        self.mode = new

    def write_svr(self, value: int) -> None:
        self.svr = value & 0x3FF
        if not self.sw_enabled:
            self.lvt = [v | MASKED for v in self.lvt]

    def write_lvt(self, index: int, value: int) -> None:
        old_mode = self.timer_mode
        value &= LVT_WRITABLE[index]
        if not self.sw_enabled:
            value |= MASKED  # SDM 10.4.7.2
        self.lvt[index] = value
        new_mode = self.timer_mode
        if index != LVT_T or new_mode == old_mode:
            return
        if (new_mode == 2) != (old_mode == 2):  # SDM 10.5.4.1: disarm on the switch
            self.tmict = self.tsc_deadline = 0
            self.armed, self.deadline = False, None
        else:
            self.deadline = None  # count-down continues; exact instant not tracked

    def write_tmict(self, value: int, now: int) -> None:
        if self.timer_mode == 2:
            return  # ignored in TSC-deadline mode (SDM 10.5.4.1)
        self.tmict = value
        self.armed = value != 0
        self.deadline = now + value * divisor(self.tdcr) if value else None

    def write_tdcr(self, value: int) -> None:
        self.tdcr = value & 0xB
        if self.armed and self.timer_mode != 2:
            self.deadline = None

    def write_tsc_deadline(self, value: int, now: int, tsc_now: int) -> None:
        self.tsc_deadline = value
        self.armed = value != 0
        if not value:
            self.deadline = None
        elif value <= tsc_now:
            self.deadline = now
        else:
            self.deadline = now + -(-(value - tsc_now) * 1_000_000_000 // TSC_HZ)

    def current_count(self, now: int) -> int | None:
        """TMCCT if exactly known, else None."""
        if self.timer_mode == 2 or self.tmict == 0 or not self.armed:
            return 0
        if self.deadline is None:
            return None
        div = divisor(self.tdcr)
        period = self.tmict * div
        elapsed = now - (self.deadline - period)
        if self.timer_mode == 1:
            elapsed %= period
        return max(self.tmict - elapsed // div, 0)

    def reg(self, offset: int, now: int) -> int | None:
        """Value of a readable register in the current mode (None: not exactly known)."""
        x2 = self.mode is X2
        if offset == ID:
            return self.apic_id if x2 else self.xapic_id << 24
        if offset == LDR:
            return x2apic_logical_id(self.apic_id) if x2 else self.ldr
        if ISR0 <= offset < ESR:
            word = (offset >> 4) & 7
            arr = self.isr if offset < TMR0 else self.tmr if offset < IRR0 else self.irr
            return _pack(arr, word)
        if LVT0 <= offset <= LVT0 + 0x50:
            return self.lvt[(offset - LVT0) >> 4]
        if offset == ICR:
            return (self.icr_dest << 32 | self.icr_low) if x2 else self.icr_low
        if offset == TMCCT:
            return self.current_count(now)
        fixed = {
            VER: VERSION,
            TPR: self.tpr,
            APR: expected_apr(self.tpr, list(self.irr), list(self.isr)),
            PPR: self.ppr,
            EOI: 0,
            RRD: 0,
            DFR: self.dfr,
            SVR: self.svr,
            ESR: self.esr,
            ICR2: (self.icr_dest & 0xFF) << 24,
            TMICT: self.tmict,
            TDCR: self.tdcr,
        }
        return fixed[offset]


def msr_write_faults(s: Shadow, msr: int, value: int) -> bool:
    """Does WRMSR #GP (SDM 10.4.4, 10.12.1.2-3, 10.12.5, Table 10-6)?"""
    if msr == MSR_BASE:
        if value & BASE_RESERVED:
            return True
        en, extd = bool(value & BASE_EN), bool(value & BASE_EXTD)
        if extd and not en:
            return True
        new = (XAPIC, X2)[extd] if en else DIS
        return (s.mode, new) in {(X2, XAPIC), (DIS, X2)}
    if msr == MSR_DEADLINE:
        return False
    if not 0x800 <= msr <= 0x8FF or s.mode is not X2:
        return True
    offset = (msr - 0x800) << 4
    if offset == ICR:
        return bool(value & X2_ICR_RESERVED)
    spec = X2_REGS.get(offset)
    if spec is None or not spec[1] or value >> 32 or value & ~spec[2]:
        return True
    return offset == LVT0 and (value >> 17) & 3 == 3  # timer mode 11b reserved


def msr_read_faults(s: Shadow, msr: int) -> bool:
    if msr in (MSR_BASE, MSR_DEADLINE):
        return False
    if not 0x800 <= msr <= 0x8FF or s.mode is not X2:
        return True
    spec = X2_REGS.get((msr - 0x800) << 4)
    return spec is None or not spec[0]


def model_state(a: LocalApic) -> tuple:
    """Everything the guest or the VMM can observe of ``a`` (for 'a #GP changes nothing');
    the #GP counter itself is left out."""
    stats = a.stats
    stats.pop("gp", None)
    t = a.timer
    return (
        a.mode, a.base_address, a.xapic_id, a.tpr, a.ppr, a.ldr, a.dfr, a.svr, a.sw_enabled,
        bytes(a.irr), bytes(a.isr), bytes(a.tmr), tuple(a.lvt(i) for i in range(6)),
        a._icr_low, a._icr_dest, a._esr, a.esr_pending,
        t.mode, t.initial_count, t.tdcr, t.start_ns, t.deadline_ns, t.tsc_deadline,
        a.nmi_pending, a.init_pending, a.sipi_pending, a.sipi_vector, a.wait_for_sipi,
        a.smi_pending, sorted(stats.items()),
    )  # fmt: skip


# ---- strategies ---------------------------------------------------------------------
INTERESTING_64 = [
    0, 1, 0xFF, 0x100, 0x1FF, 0x3FF, 0x10FF, 0x4FF, 0xFEE00000, 0xFEE00800, 0xFEE00C00,
    0xFEE00900, 0xFEE00D00, 0xC00, 0x800, 0x400, 0x900, DS, REMOTE_IRR, MASKED,
    MASKED | 0x40, 0x20040, 0x40040, 0x60040, 0x80040, 0xB, 0xF, 0xFFFFFFFF, 1 << 32,
    1 << 63, MASK64, 0xFFFFFFFF00000000, 0x4000_0000_0000_0040, 0x000F_0000_0000_0000,
]  # fmt: skip
values64 = st.one_of(
    st.sampled_from(INTERESTING_64),
    st.integers(0, 0xFF),
    st.integers(0, 63).map(lambda b: 1 << b),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, MASK64),
    st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFF)).map(lambda t: t[0] << 32 | t[1]),
)
values32 = st.one_of(
    st.sampled_from([v for v in INTERESTING_64 if v <= 0xFFFFFFFF]),
    st.integers(0, 0xFF),
    st.integers(0, 31).map(lambda b: 1 << b),
    st.integers(0, 0xFFFFFFFF),
)
KNOWN_MSRS = sorted({0x800 + (off >> 4) for off in list(X2_REGS) + list(XAPIC_REGS)})
msr_indices = st.one_of(
    st.sampled_from(KNOWN_MSRS + [MSR_BASE, MSR_DEADLINE, 0x800, 0x82F, 0x83A, 0x840, 0x8FF]),
    st.integers(0x800, 0x8FF),
    st.sampled_from([MSR_BASE, MSR_DEADLINE]),
    st.integers(0, 0xFFFFFFFF),
)
reg_offsets = st.sampled_from(sorted(set(XAPIC_REGS) | set(X2_REGS)))
mmio_offsets = st.one_of(
    st.sampled_from(sorted(XAPIC_REGS)),
    st.integers(0, 0xFFF),
    st.integers(0, 0xFF).map(lambda r: r << 4),
)
apic_index = st.integers(0, 3)
ID_POOL = [0, 1, 2, 3, 4, 15, 16, 17, 0x20, 0xFE, 0xFF, 0x100, 0x1234]
vectors = st.one_of(st.integers(16, 255), st.integers(0, 255), st.sampled_from([0, 15, 16, 255]))


class ApicMachine(RuleBasedStateMachine):
    """2-4 APICs, a fake clock, and the shadow. TOTALS accumulates across runs."""

    TOTALS: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.apics: list[LocalApic] = []
        self.sh: list[Shadow] = []
        self.notified: list[int] = []
        self.level_eois: list[tuple[int, int]] = []
        self.expected_level_eois: list[tuple[int, int]] = []
        self.clock = FakeClock(TSC_HZ)
        self._caught = 0  # the model's timer catch-ups before the current write

    # ---- setup --------------------------------------------------------------------
    @initialize(
        ids=st.one_of(
            st.integers(2, 4).map(lambda n: list(range(n))),
            st.lists(st.sampled_from(ID_POOL), min_size=2, max_size=4, unique=True),
        ),
        modes=st.lists(st.sampled_from([XAPIC, XAPIC, X2, X2, X2, DIS]), min_size=4, max_size=4),
        enable=st.lists(st.sampled_from([True, True, True, False]), min_size=4, max_size=4),
        logical=st.sampled_from(["none", "flat", "cluster"]),
    )
    def setup(self, ids, modes, enable, logical) -> None:
        bus = ApicBus(self.notified.append)
        for i, apic_id in enumerate(ids):
            a = LocalApic(
                apic_id,
                bus,
                bsp=i == 0,
                clock_ns=self.clock.ns,
                tsc=self.clock.tsc,
                tsc_hz=TSC_HZ,
                maxphyaddr=MAXPHYADDR,
            )
            bus.add(a)
            a.on_level_eoi = lambda v, i=i: self.level_eois.append((i, v))
            self.apics.append(a)
            self.sh.append(Shadow(apic_id, i == 0))
        for i in range(len(ids)):
            if logical == "flat":
                self._mmio_write(i, DFR, 4, 0xFFFFFFFF)
                self._mmio_write(i, LDR, 4, 1 << (24 + i))
            elif logical == "cluster":
                self._mmio_write(i, DFR, 4, 0x0FFFFFFF)
                self._mmio_write(i, LDR, 4, (i // 2) << 28 | 1 << (24 + i % 2))
            if enable[i]:
                self._mmio_write(i, SVR, 4, SVR_ENABLE | 0xFF)
            if modes[i] is X2:
                self._wrmsr(i, MSR_BASE, 0xFEE00000 | BASE_EN | BASE_EXTD)
            elif modes[i] is DIS:
                self._wrmsr(i, MSR_BASE, 0xFEE00000)
        self.TOTALS["cases"] += 1

    def _i(self, index: int) -> int:
        return index % len(self.apics)

    def _step(self, name: str) -> None:
        self.TOTALS["steps"] += 1
        self.TOTALS["step_" + name] += 1

    # ---- checked primitives -----------------------------------------------------------
    def _snapshot(self) -> tuple:
        return (
            [model_state(a) for a in self.apics],
            len(self.notified),
            len(self.level_eois),
        )

    def _assert_unchanged(self, before: tuple, what: str) -> None:
        after = self._snapshot()
        assert after == before, f"{what} raised ApicGP but changed state"

    def _wrmsr(self, i: int, msr: int, value: int) -> None:
        a, s = self.apics[i], self.sh[i]
        faults = msr_write_faults(s, msr, value)
        before = self._snapshot()
        n0 = len(self.notified)
        what = f"APIC {i} ({s.mode.name}) wrmsr({msr:#x}, {value:#x})"
        self._caught = a._stats["timer_caught_up"]
        try:
            a.wrmsr(msr, value)
        except ApicGP:
            assert faults, f"{what} raised #GP; the SDM says it does not"
            self._assert_unchanged(before, what)
            self.TOTALS["gp"] += 1
            return
        assert not faults, f"{what} did not #GP; the SDM says it does"
        notes = self.notified[n0:]
        if msr == MSR_BASE:
            s.write_base(value)
        elif msr == MSR_DEADLINE:
            if s.mode is not DIS and s.timer_mode == 2:
                self._catch_up(i)
                s.write_tsc_deadline(value, self.clock.now, self.clock.tsc())
        else:
            offset = (msr - 0x800) << 4
            if offset == ICR:
                s.icr_low, s.icr_dest = value & 0xFFFFEFFF, value >> 32
                self._ipi(i, value & 0xFFFFFFFF, value >> 32, notes)
                return
            if offset == SELF_IPI:
                notified = s.accept_fixed(value & 0xFF, False)
                assert notes == ([i] if notified else []), f"{what}: notified {notes}"
                self.TOTALS["ipis"] += 1
                return
            self._write_common(i, offset, value)
        assert not notes, f"{what} notified {notes}"

    def _rdmsr(self, i: int, msr: int) -> None:
        a, s = self.apics[i], self.sh[i]
        faults = msr_read_faults(s, msr)
        before = self._snapshot()
        what = f"APIC {i} ({s.mode.name}) rdmsr({msr:#x})"
        try:
            got = a.rdmsr(msr)
        except ApicGP:
            assert faults, f"{what} raised #GP; the SDM says it does not"
            self._assert_unchanged(before, what)
            self.TOTALS["gp"] += 1
            return
        assert not faults, f"{what} did not #GP; the SDM says it does"
        if msr == MSR_BASE:
            want = s.base | (BASE_BSP if s.bsp else 0)
            want |= 0 if s.mode is DIS else BASE_EN
            want |= BASE_EXTD if s.mode is X2 else 0
        elif msr == MSR_DEADLINE:
            want = s.tsc_deadline if s.mode is not DIS and s.timer_mode == 2 else 0
        else:
            want = s.reg((msr - 0x800) << 4, self.clock.now)
            if want is None:
                want = a.timer.current_count(self.clock.now)
                assert 0 <= got <= s.tmict, f"{what} = {got:#x} > initial {s.tmict:#x}"
        assert got == want, f"{what} = {got:#x}, expected {want:#x}"

    def _mmio_write(self, i: int, offset: int, size: int, value: int) -> None:
        s = self.sh[i]
        n0 = len(self.notified)
        self._caught = self.apics[i]._stats["timer_caught_up"]
        self.apics[i].mmio_write(offset, size, value)
        notes = self.notified[n0:]
        what = f"APIC {i} ({s.mode.name}) mmio_write({offset:#x}, {size}, {value:#x})"
        if s.mode is not XAPIC or size != 4 or offset & 0xF:
            pass  # page not decoded, or not an aligned 32-bit access: ignored
        elif offset not in XAPIC_REGS:
            s.record_error(ESR_ILLEGAL_REG)
        elif XAPIC_REGS[offset]:
            value &= 0xFFFFFFFF
            if offset == ICR:
                s.icr_low = value & XAPIC_ICR_FIELDS
                self._ipi(i, s.icr_low, s.icr_dest, notes)
                return
            self._write_common(i, offset, value)
        assert not notes, f"{what} notified {notes}"

    def _mmio_read(self, i: int, offset: int, size: int) -> None:
        s = self.sh[i]
        got = self.apics[i].mmio_read(offset, size)
        what = f"APIC {i} ({s.mode.name}) mmio_read({offset:#x}, {size})"
        mask = (1 << (8 * size)) - 1
        reg = offset & 0xFF0
        if s.mode is not XAPIC:
            want = mask  # not decoded: all ones
        elif reg not in XAPIC_REGS:
            s.record_error(ESR_ILLEGAL_REG)
            want = 0
        elif offset & 0xF >= 4:
            want = 0
        else:
            full = s.reg(reg, self.clock.now)
            if full is None:
                full = self.apics[i].timer.current_count(self.clock.now)
            want = (full >> (8 * (offset & 0xF))) & mask
        assert got == want, f"{what} = {got:#x}, expected {want:#x}"

    def _write_common(self, i: int, offset: int, value: int) -> None:
        """Effect of a valid 32-bit register write, either path (SDM Table 10-1)."""
        s = self.sh[i]
        now = self.clock.now
        if offset in (LVT0, TMICT, TDCR):
            self._catch_up(i)
        if offset == TPR:
            s.tpr = value & 0xFF
        elif offset == EOI:
            self._eoi_shadow(i)
        elif offset == SVR:
            s.write_svr(value)
        elif offset == ESR:
            s.esr, s.esr_pending = s.esr_pending, 0
        elif LVT0 <= offset <= LVT0 + 0x50:
            s.write_lvt((offset - LVT0) >> 4, value)
        elif offset == TMICT:
            s.write_tmict(value, now)
        elif offset == TDCR:
            s.write_tdcr(value)
        elif offset == ID:
            s.xapic_id = value >> 24
        elif offset == LDR:
            s.ldr = value & 0xFF000000
        elif offset == DFR:
            s.dfr = value | 0x0FFFFFFF
        elif offset == ICR2:
            s.icr_dest = value >> 24

    def _catch_up(self, i: int) -> None:
        """A timer-register write first fires an expiry due now (LocalApic's
        _timer_catch_up: KVM's hrtimer would have fired already). Exact when the shadow
        knows the deadline; otherwise the model's count of catch-ups decides."""
        s, now = self.sh[i], self.clock.now
        fired = self.apics[i]._stats["timer_caught_up"] > self._caught
        if s.deadline is not None:
            assert fired == (s.armed and s.deadline <= now), f"APIC {i}: catch-up {fired}"
        elif not s.armed:
            assert not fired, f"APIC {i}: caught up a disarmed timer"
        if fired:
            self.TOTALS["timer_caught_up"] += 1
            self._fire(i, now)

    def _fire(self, i: int, now: int) -> None:
        """The shadow's side of one timer expiry at ``now``."""
        s = self.sh[i]
        if s.timer_mode == 1:
            if s.deadline is not None:
                period = s.tmict * divisor(s.tdcr)
                s.deadline += ((now - s.deadline) // period + 1) * period
        else:
            s.armed, s.deadline = False, None
            if s.timer_mode == 2:
                s.tsc_deadline = 0
        lvt = s.lvt[LVT_T]
        if not lvt & MASKED:
            if lvt & 0xFF < 16:
                s.record_error(ESR_RECV_ILLEGAL)
            else:
                s.add_irr(lvt & 0xFF, False)

    def _eoi_shadow(self, i: int) -> None:
        s = self.sh[i]
        if not s.isr:
            return
        v = max(s.isr)
        s.isr.remove(v)
        s.eoid += 1
        if v in s.tmr:
            self.expected_level_eois.append((i, v))

    # ---- IPI routing oracle (SDM 10.6) -----------------------------------------------
    def _physical_match(self, j: int, dest: int) -> bool:
        t = self.sh[j]
        return dest == (t.apic_id if t.mode is X2 else t.xapic_id)

    def _logical_match(self, j: int, dest: int) -> bool:
        t = self.sh[j]
        if t.mode is X2:
            ldr = x2apic_logical_id(t.apic_id)
            return dest >> 16 == ldr >> 16 and bool(dest & ldr & 0xFFFF)
        lid, mda = t.ldr >> 24, dest & 0xFF
        if t.dfr >> 28 == 0xF:
            return bool(mda & lid)
        return mda >> 4 == lid >> 4 and bool(mda & lid & 0xF)

    def _lowest(self, group: list[int], vector: int, notes: list[int]) -> list[int]:
        """SDM 10.6.2.4: focus processor, else lowest priority, among enabled APICs."""
        eligible = [j for j in group if self.sh[j].sw_enabled]
        if not eligible:
            return []
        chosen = [j for j in notes if j in eligible]
        assert len(chosen) == 1, f"lowest priority among {eligible} notified {notes}"
        focus = [
            j
            for j in eligible
            if not self.sh[j].svr & SVR_FOCUS_OFF
            and (vector in self.sh[j].irr or vector in self.sh[j].isr)
        ]
        if focus:
            assert chosen[0] in focus, f"focus processors {focus}, chose {chosen[0]}"
        else:
            low = min(self.sh[j].ppr for j in eligible)
            assert self.sh[chosen[0]].ppr == low, f"chose {chosen[0]}, not a lowest PPR"
        self.TOTALS["lowest_priority"] += 1
        return chosen

    def _one_of(self, matches: list[int], notes: list[int], dm: int) -> list[int]:
        """Duplicate physical IDs (software-written xAPIC IDs): every one receives
        (SDM 10.6.2.1), a lowest-priority interrupt only one of them."""
        if len(matches) <= 1 or dm != LOWEST:
            return matches
        hit = [j for j in notes if j in matches]
        if hit:
            return hit[:1]
        refusing = [j for j in matches if not self.sh[j].sw_enabled]
        assert dm in (FIXED, LOWEST) and refusing, f"none of {matches} got the IPI"
        return refusing[:1]

    def _ipi(self, src: int, low: int, dest: int, notes: list[int]) -> None:
        s = self.sh[src]
        self.TOTALS["ipis"] += 1
        vector, dm, shorthand = low & 0xFF, (low >> 8) & 7, (low >> 18) & 3
        targets: list[int] = []
        if dm in (FIXED, LOWEST) and vector < 16:
            s.record_error(ESR_SEND_ILLEGAL)  # SDM 10.5.3: illegal vector, not sent
        elif dm == INIT and low & TRIG_LEVEL and not low & ASSERT:
            pass  # INIT level de-assert: no delivery (SDM 10.6.1)
        elif dm in (DM3, DM7):
            pass  # reserved delivery modes in the ICR
        elif shorthand == SH_SELF:
            targets = [src]
        else:
            live = [j for j, t in enumerate(self.sh) if t.mode is not DIS]
            broadcast = dest == (0xFFFFFFFF if s.mode is X2 else 0xFF)
            group: list[int] | None = None
            if shorthand == SH_ALL or (shorthand == SH_NONE and broadcast):
                group = live
            elif shorthand == SH_ALL_BUT:
                group = [j for j in live if j != src]
            elif low & LOGICAL:
                group = [j for j in live if self._logical_match(j, dest)]
            else:
                matches = [j for j in live if self._physical_match(j, dest)]
                targets = self._one_of(matches, notes, dm)
            if group is not None:
                targets = self._lowest(group, vector, notes) if dm == LOWEST else group
        expected = [j for j in targets if self._deliver(j, dm, vector)]
        assert sorted(notes) == sorted(expected), (
            f"IPI {low:#x} -> {dest:#x} from APIC {src}: notified {notes}, expected {expected}"
        )

    def _deliver(self, j: int, dm: int, vector: int) -> bool:
        t = self.sh[j]
        if dm in (FIXED, LOWEST):
            return t.accept_fixed(vector, False)
        if dm == NMI:
            t.nmi += 1
        elif dm == INIT:
            t.init = True
        elif dm == SIPI:
            if t.wait_sipi or t.init:
                t.sipi, t.sipi_vector = True, vector
        else:
            t.smi = True
        return True

    # ---- rules: hostile register traffic ---------------------------------------------
    @rule(i=apic_index, msr=msr_indices, value=values64)
    def msr_write(self, i, msr, value) -> None:
        self._step("msr_write")
        self._wrmsr(self._i(i), msr, value)

    @rule(i=apic_index, msr=msr_indices)
    def msr_read(self, i, msr) -> None:
        self._step("msr_read")
        self._rdmsr(self._i(i), msr)

    @rule(i=apic_index, offset=mmio_offsets, size=st.sampled_from([1, 2, 4, 8]), value=values64)
    def mmio_write(self, i, offset, size, value) -> None:
        self._step("mmio_write")
        self._mmio_write(self._i(i), offset, size, value & ((1 << (8 * size)) - 1))

    @rule(i=apic_index, offset=mmio_offsets, size=st.sampled_from([1, 2, 4, 8]))
    def mmio_read(self, i, offset, size) -> None:
        self._step("mmio_read")
        self._mmio_read(self._i(i), offset, size)

    @rule(i=apic_index, offset=reg_offsets, value=values32)
    def reg_write(self, i, offset, value) -> None:
        """A 32-bit write through whichever interface the APIC's mode decodes."""
        self._step("reg_write")
        i = self._i(i)
        if self.sh[i].mode is X2:
            self._wrmsr(i, 0x800 + (offset >> 4), value)
        else:
            self._mmio_write(i, offset, 4, value)

    @rule(i=apic_index, offset=reg_offsets)
    def reg_read(self, i, offset) -> None:
        self._step("reg_read")
        i = self._i(i)
        if self.sh[i].mode is X2:
            self._rdmsr(i, 0x800 + (offset >> 4))
        else:
            self._mmio_read(i, offset, 4)

    @rule(
        i=apic_index,
        mode=st.sampled_from(["dis", "xapic", "x2apic", "invalid"]),
        bsp=st.booleans(),
        addr=st.sampled_from([0xFEE00000, 0xFEC00000, 0xFFFFF000, 0x000F_FFFF_FFFF_F000]),
        junk=st.one_of(st.just(0), st.sampled_from([1, 0x80, 0x200, 1 << 52, 1 << 63])),
    )
    def apic_base_write(self, i, mode, bsp, addr, junk) -> None:
        """IA32_APIC_BASE transitions, valid and not (SDM 10.12.5, Figure 10-27)."""
        self._step("apic_base")
        bits = {"dis": 0, "xapic": BASE_EN, "x2apic": BASE_EN | BASE_EXTD, "invalid": BASE_EXTD}
        value = addr | bits[mode] | (BASE_BSP if bsp else 0) | junk
        self._wrmsr(self._i(i), MSR_BASE, value)

    @rule(i=apic_index, read_first=st.booleans())
    def esr_latch(self, i, read_first) -> None:
        """The guest's ESR idiom (SDM 10.5.3): write 0 to latch, then read."""
        self._step("esr")
        i = self._i(i)
        if self.sh[i].mode is X2:
            if read_first:
                self._rdmsr(i, 0x828)
            self._wrmsr(i, 0x828, 0)
            self._rdmsr(i, 0x828)
        else:
            if read_first:
                self._mmio_read(i, ESR, 4)
            self._mmio_write(i, ESR, 4, 0)
            self._mmio_read(i, ESR, 4)

    @rule(i=apic_index, vector=st.integers(16, 255), focus_off=st.booleans())
    def software_enable(self, i, vector, focus_off) -> None:
        self._step("sw_enable")
        i = self._i(i)
        value = SVR_ENABLE | vector | (SVR_FOCUS_OFF if focus_off else 0)
        if self.sh[i].mode is X2:
            self._wrmsr(i, 0x80F, value)
        else:
            self._mmio_write(i, SVR, 4, value)

    # ---- rules: IPIs ---------------------------------------------------------------
    @rule(
        i=apic_index,
        vector=st.one_of(st.integers(16, 255), vectors),
        dm=st.sampled_from(
            [FIXED, FIXED, FIXED, LOWEST, LOWEST, LOWEST, SMI, DM3, NMI, INIT, SIPI, DM7]
        ),
        logical=st.booleans(),
        level=st.booleans(),
        trigger=st.booleans(),
        shorthand=st.sampled_from([0, 0, 0, 1, 2, 3]),
        dest_kind=st.sampled_from(["id", "id", "broadcast", "logical", "logical", "random"]),
        dest_sel=st.integers(0, 0xFFFFFFFF),
        reserved=st.one_of(st.just(0), st.integers(0, 0xFFFFFFFF)),
    )
    def send_ipi(self, i, vector, dm, logical, level, trigger, shorthand, dest_kind, dest_sel,
                 reserved) -> None:  # fmt: skip
        """An ICR write through the sender's mode (x2APIC MSR 0x830, or ICR high + low)."""
        self._step("send_ipi")
        i = self._i(i)
        s = self.sh[i]
        low = vector | dm << 8 | shorthand << 18
        low |= (LOGICAL if logical else 0) | (ASSERT if level else 0)
        low |= TRIG_LEVEL if trigger else 0
        x2 = s.mode is X2
        if dest_kind == "id":
            t = self.sh[dest_sel % len(self.sh)]
            dest = t.apic_id if x2 else t.xapic_id
        elif dest_kind == "broadcast":
            dest = 0xFFFFFFFF if x2 else 0xFF
        elif dest_kind == "logical":
            dest = (dest_sel & 0x3_000F) if x2 else dest_sel & 0xFF
        else:
            dest = dest_sel if x2 else dest_sel & 0xFF
        if x2:
            if reserved & 1:  # now and then a reserved bit, which must #GP
                low |= reserved & X2_ICR_RESERVED
            self._wrmsr(i, 0x830, dest << 32 | low)
        else:
            self._mmio_write(i, ICR2, 4, dest << 24 | (reserved & 0xFFFFFF))
            self._mmio_write(i, ICR, 4, low | (reserved & ~XAPIC_ICR_FIELDS & 0xFFFFFFFF))

    @rule(
        i=apic_index,
        j=apic_index,
        vector=st.integers(16, 255),
        lowest=st.booleans(),
        how=st.sampled_from(["physical", "physical", "logical", "all", "all_but", "self"]),
    )
    def send_fixed(self, i, j, vector, lowest, how) -> None:
        """A well-formed fixed or lowest-priority IPI, the common case in a real guest."""
        self._step("send_fixed")
        i, j = self._i(i), self._i(j)
        s, t = self.sh[i], self.sh[j]
        x2 = s.mode is X2
        low = vector | (LOWEST if lowest else FIXED) << 8
        dest = t.apic_id if x2 else t.xapic_id
        if how == "logical":
            low |= LOGICAL
            dest = x2apic_logical_id(t.apic_id) if x2 else t.ldr >> 24
        elif how != "physical":
            low |= {"all": SH_ALL, "all_but": SH_ALL_BUT, "self": SH_SELF}[how] << 18
        if x2:
            self._wrmsr(i, 0x830, dest << 32 | low)
        else:
            self._mmio_write(i, ICR2, 4, dest << 24)
            self._mmio_write(i, ICR, 4, low)

    @rule(i=apic_index, vector=vectors)
    def self_ipi(self, i, vector) -> None:
        self._step("self_ipi")
        self._wrmsr(self._i(i), 0x83F, vector)

    @rule(i=apic_index, vector=vectors, level=st.booleans())
    def external_fixed(self, i, vector, level) -> None:
        """A fixed interrupt from an IOAPIC/MSI (accept_fixed), edge or level."""
        self._step("external_fixed")
        i = self._i(i)
        got = self.apics[i].accept_fixed(vector, level)
        assert bool(got) == self.sh[i].accept_fixed(vector, level), f"accept_fixed({vector:#x})"

    @rule(i=apic_index, kind=st.sampled_from(["nmi", "smi", "init", "sipi"]), vector=vectors)
    def external_event(self, i, kind, vector) -> None:
        self._step("external_event")
        i = self._i(i)
        a = self.apics[i]
        if kind == "nmi":
            a.accept_nmi()
        elif kind == "smi":
            a.accept_smi()
        elif kind == "init":
            a.accept_init()
        else:
            a.accept_sipi(vector)
        self._deliver(i, {"nmi": NMI, "smi": SMI, "init": INIT, "sipi": SIPI}[kind], vector)

    # ---- rules: the CPU side ---------------------------------------------------------
    @rule(i=apic_index)
    def take_interrupt(self, i) -> None:
        """INTA the architectural way: only what pending_vector offers (SDM 10.8.3.1)."""
        self._step("take_interrupt")
        i = self._i(i)
        a, s = self.apics[i], self.sh[i]
        want = s.pending()
        got = a.pending_vector()
        assert got == want, f"APIC {i}: pending_vector {got}, expected {want}"
        if got is not None:
            a.ack(got)
            s.irr.remove(got)
            s.isr.add(got)
            s.acked += 1
            self.TOTALS["acked"] += 1

    @rule(i=apic_index, eois=st.integers(0, 3))
    def service(self, i, eois) -> None:
        """The CPU with interrupts enabled: take every deliverable interrupt (each one
        nests above the last), then return from ``eois`` handlers with an EOI write."""
        self._step("service")
        i = self._i(i)
        for _ in range(eois):
            self.eoi(i, 0)
        for _ in range(16):
            if self.sh[i].pending() is None:
                break
            self.take_interrupt(i)

    @rule(i=apic_index, value=st.sampled_from([0, 0, 1, 0xFFFFFFFF]))
    def eoi(self, i, value) -> None:
        """EOI by register write (x2APIC: only 0 is valid)."""
        self._step("eoi")
        i = self._i(i)
        if self.sh[i].mode is X2:
            self._wrmsr(i, 0x80B, value)
        else:
            self._mmio_write(i, EOI, 4, value)

    @rule(i=apic_index, kind=st.sampled_from(["nmi", "smi", "init", "sipi"]))
    def take_event(self, i, kind) -> None:
        self._step("take_event")
        i = self._i(i)
        a, s = self.apics[i], self.sh[i]
        if kind == "nmi":
            want = s.nmi > 0
            s.nmi -= want
            assert a.take_nmi() == want
        elif kind == "smi":
            want, s.smi = s.smi, False
            assert a.take_smi() == want
        elif kind == "init":
            want = s.init
            if want:  # INIT reset (SDM 10.4.7.3): pending NMIs dropped, APs wait for SIPI
                s.init, s.nmi = False, 0
                s.reset_registers()
                s.wait_sipi = not s.bsp
            assert a.take_init() == want
        else:
            vec = None
            if s.sipi and not s.init:
                if s.wait_sipi:
                    vec = s.sipi_vector
                    s.wait_sipi = False
                s.sipi = False
            assert a.take_sipi() == vec

    @rule(i=apic_index, cr8=st.sampled_from([0, 0, 0, 1, 2, 4, 7, 15, 16, 1 << 63]))
    def write_cr8(self, i, cr8) -> None:
        self._step("cr8")
        i = self._i(i)
        before = self._snapshot()
        try:
            self.apics[i].set_cr8(cr8)
        except ApicGP:
            assert cr8 > 15, f"set_cr8({cr8}) raised #GP"
            self._assert_unchanged(before, f"set_cr8({cr8:#x})")
            return
        assert cr8 <= 15, f"set_cr8({cr8:#x}) did not #GP (SDM 10.8.6.1)"
        self.sh[i].tpr = cr8 << 4
        assert self.apics[i].cr8() == cr8

    # ---- rules: time ---------------------------------------------------------------
    @rule(
        i=apic_index,
        mode=st.sampled_from([0, 1, 2]),
        vector=vectors,
        masked=st.booleans(),
        count=st.integers(1, 5000),
        tdcr=st.sampled_from([0, 1, 2, 3, 8, 9, 0xA, 0xB]),
    )
    def arm_timer(self, i, mode, vector, masked, count, tdcr) -> None:
        """Program the timer the way a guest does: LVT, divide, then count or deadline."""
        self._step("arm_timer")
        i = self._i(i)
        s = self.sh[i]
        lvt = vector | mode << 17 | (MASKED if masked else 0)
        if s.mode is X2:
            self._wrmsr(i, 0x832, lvt)
            self._wrmsr(i, 0x83E, tdcr)
            self._wrmsr(i, 0x838, count)
        else:
            self._mmio_write(i, LVT0, 4, lvt)
            self._mmio_write(i, TDCR, 4, tdcr)
            self._mmio_write(i, TMICT, 4, count)
        self._wrmsr(i, MSR_DEADLINE, self.clock.tsc() + count - 1000)

    @rule(
        ns=st.one_of(st.integers(0, 3000), st.integers(0, 10**6), st.just(-1)),
        which=st.integers(0, 3),
    )
    def advance_clock(self, ns, which) -> None:
        """Move time (ns = -1: to the next deadline of one APIC), then let the VMM run
        timer_expired on every APIC."""
        self._step("advance")
        if ns < 0:
            deadline = self.apics[self._i(which)].timer_deadline_ns()
            ns = max(0, deadline - self.clock.now) if deadline is not None else 1
        self.clock.advance(ns)
        now = self.clock.now
        for i, (a, s) in enumerate(zip(self.apics, self.sh, strict=True)):
            due = s.armed and (s.deadline is None or s.deadline <= now)
            fired = a.timer_expired(now)
            if s.deadline is not None:
                assert fired == due, f"APIC {i} timer_expired({now}) = {fired}, due={due}"
            elif not s.armed:
                assert not fired, f"APIC {i}: timer fired while disarmed"
            if not fired:
                continue
            self.TOTALS["timer_expired"] += 1
            self._fire(i, now)

    # ---- invariants ------------------------------------------------------------------
    @invariant()
    def agrees_with_shadow(self) -> None:
        now = self.clock.now
        assert self.level_eois == self.expected_level_eois, "level-triggered EOI callbacks"
        for i, (a, s) in enumerate(zip(self.apics, self.sh, strict=True)):
            self.TOTALS["invariant_checks"] += 1
            check_invariants(a, architectural_acks=True)
            irr = {v for v in range(256) if a.irr[v]}
            isr = {v for v in range(256) if a.isr[v]}
            lost = len(s.irr - irr) + len(s.isr - isr)
            invented = len(irr - s.irr) + len(isr - s.isr)
            self.TOTALS["lost"] += lost
            self.TOTALS["invented"] += invented
            assert not lost and not invented, (
                f"APIC {i}: IRR {sorted(irr)} ISR {sorted(isr)}, "
                f"delivered IRR {sorted(s.irr)} ISR {sorted(s.isr)}"
            )
            tmr = {v for v in range(256) if a.tmr[v]}
            assert tmr & (irr | isr) == s.tmr & (s.irr | s.isr), f"APIC {i}: TMR {sorted(tmr)}"
            # Conservation: every accepted interrupt is pending, in service or EOI'd.
            assert s.accepted - s.acked - s.dropped_irr == len(s.irr)
            assert s.acked - s.eoid - s.dropped_isr == len(s.isr)
            assert a.mode is s.mode, f"APIC {i}: mode {a.mode}, expected {s.mode}"
            assert a.nmi_pending == (s.nmi > 0), f"APIC {i}: NMI pending"
            assert (a.init_pending, a.smi_pending, a.wait_for_sipi) == (s.init, s.smi, s.wait_sipi)
            assert a.sipi_pending == s.sipi and (not s.sipi or a.sipi_vector == s.sipi_vector)
            assert a.esr_pending == s.esr_pending, f"APIC {i}: ESR log {a.esr_pending:#x}"
            assert (a.timer_deadline_ns() is not None) == s.armed, f"APIC {i}: timer armed"
            if s.armed and s.deadline is not None:
                assert a.timer_deadline_ns() == s.deadline, f"APIC {i}: timer deadline"
            want_events = s.nmi > 0 or s.init or s.smi or (s.sipi and s.wait_sipi)
            want_events = want_events or s.pending() is not None
            assert a.has_pending_events() == want_events, f"APIC {i}: has_pending_events"
            self._check_reads(i, now)

    def _check_reads(self, i: int, now: int) -> None:
        """Every readable register reads what the shadow says (no side effects)."""
        a, s = self.apics[i], self.sh[i]
        if s.mode is DIS:
            return
        for offset in XAPIC_REGS if s.mode is XAPIC else X2_REGS:
            if s.mode is X2 and not X2_REGS[offset][0]:
                continue
            want = s.reg(offset, now)
            if s.mode is X2:
                got = a.rdmsr(0x800 + (offset >> 4))
            else:
                got = a.mmio_read(offset, 4)
            if want is None:
                assert 0 <= got <= s.tmict
                continue
            assert got == want, f"APIC {i} ({s.mode.name}) reg {offset:#x} = {got:#x} != {want:#x}"


FAST = settings(
    max_examples=60,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestApicProperties = ApicMachine.TestCase
TestApicProperties.settings = FAST


# ---- known deviations from the SDM, pinned ------------------------------------------
def test_shadow_predicts_power_up_state():
    """The shadow and the model start alike (guards the oracle itself)."""
    m = ApicMachine()
    m.setup(ids=[0, 1], modes=[XAPIC, X2, XAPIC, XAPIC], enable=[True] * 4, logical="flat")
    m.agrees_with_shadow()
    assert m.sh[1].mode is X2 and m.sh[0].sw_enabled


@pytest.mark.parametrize(
    "msr", [0x832, 0x833, 0x834, 0x837], ids=["timer", "thermal", "perf", "error"]
)
def test_x2apic_lvt_bit14_reserved_outside_lint(msr):
    m = ApicMachine()
    m.setup(ids=[0, 1], modes=[X2, X2, X2, X2], enable=[True] * 4, logical="none")
    with pytest.raises(ApicGP):
        m.apics[0].wrmsr(msr, REMOTE_IRR | 0x40)


@pytest.mark.parametrize("msr", [0x835, 0x836], ids=["lint0", "lint1"])
def test_x2apic_lvt_bit14_allowed_in_lint(msr):
    """Remote IRR is a read-only LINT bit: a write carrying it is accepted and dropped."""
    m = ApicMachine()
    m.setup(ids=[0, 1], modes=[X2, X2, X2, X2], enable=[True] * 4, logical="none")
    m._wrmsr(0, msr, REMOTE_IRR | 0x40)
    assert m.apics[0].rdmsr(msr) == 0x40
    m.agrees_with_shadow()
