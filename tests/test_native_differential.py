"""Differential property tests: the native fastpath (kvmpy/native/lapic_fast.c,
vcpu_loop.c) against the Python model (kvmpy/apic, kvmpy/exits.py, kvmpy/vcpu.py).

Two identical sets of 2-4 LocalApics. One set is attached to a ``kvmpy._core.Core`` as
model-only vCPUs (fd -1, no kvm_run, setting NATIVE): each exit goes to the core's
``handle_exit_irqoff`` first and, when it answers NONE, to Python's slow path on the SAME
APICs, as the real loop does (``handle_exit`` under the GIL). The other set is driven
the way Python's own fastpath and slow path drive it (``exits.handle_exit_irqoff``,
``exits.handle_exit``, ``Vcpu._inject_pending_events``), mirrored below per exit.

Hypothesis drives both with the same random exits: ICR writes of every kind (x2APIC MSR
and xAPIC MMIO with ICR-high writes, all delivery modes, physical/logical, shorthands,
broadcast, reserved bits, illegal vectors), SELF_IPI, EOIs (edge, and level after an
I/O APIC-style ``accept_fixed(v, True)``), TPR and CR8 changes, SVR, LDR/DFR, xAPIC ID
writes (renumbering, two APICs given one ID, an ID written back to its index) with IPIs
to the IDs as they are now, IA32_APIC_BASE mode switches, HLT with IF 0/1, the loop top's
injection, and IA32_TSC_DEADLINE writes (armed, disarmed, past, due) with the LVT timer's
modes and the clock moving on. After every step the whole APIC state of both sets must
agree (IRR/ISR/TMR, the shared register words, pending NMI/INIT/SIPI/SMI, ESR, LVTs,
``apic.stats``), each APIC must pass ``check_invariants``, the SETS of kicked vCPUs must
agree (Python: the bus's ``notify``; native: ``core.take_request`` plus the slow path's
notifies), and the core's verdicts must be the ones its contract promises (NONE leaves
no trace; a fixed or lowest-priority IPI with a legal vector is REENTER_GUEST, whatever
the APIC IDs).

One divergence is allowed, and pinned by test_hlt_with_smi_pending_* below: the core's
HLT test ends a halt on any published slow event (R_SLOW_EVENTS), Python's only on INIT
or NMI; with an SMI pending the Python loop's block check wakes at once anyway, except
with IF=0 and a deliverable vector pending.

One sequence is left out because the Python side loses it: a guest MOV to CR8 (no exit
when raised; kvm_run.cr8 shows it at the next exit) followed by an exit that reaches
Python's slow path. Vcpu.after_apic_write writes TPR into kvm_run.cr8 before the loop
top has taken the guest's CR8 as TPR, so the guest's write is lost (QEMU takes run->cr8
into the APIC at every exit, kvm_arch_post_run). The core hands over exits Python's own
fastpath completes (NMI/INIT/SIPI/SMI IPIs, illegal vectors), so with
it the loss is reached more often. Here the guest's CR8 writes reach kvm_run.cr8 just
before a loop top (a kick's exit, which needs no handling).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from kvmpy import _core as nc
from kvmpy.apic import ApicBus, ApicGP, ApicMode, LocalApic
from kvmpy.apic import constants as c
from kvmpy.apic.invariants import check_invariants
from kvmpy.apic.testing import FakeClock

NONE, REENTER, HANDLED = 0, 1, 2
TSC_HZ = 2_000_000_000
# The test's clock starts ~11 days ahead of CLOCK_MONOTONIC: the deadlines the core arms
# on its timer thread (timerfds) never fire during a test, so every kick is a step's.
CLOCK_START = time.monotonic_ns() + 10**15
# The guest TSC line both sides publish (LocalApic tsc_line): TSC_REF at TSC_REF_NS.
TSC_REF, TSC_REF_NS = 123_456_789_012, CLOCK_START - 10**9
TIMER_MODES = (0, 1 << 17, 2 << 17)  # one-shot, periodic, TSC-deadline (LVT bits 18:17)
MSR_EOI = 0x80B
X2_ICR_RESERVED = (1 << 13) | (3 << 16) | (0xFFF << 20)
XAPIC_ICR_LOW_WRITABLE = 0x000CCFFF & ~(1 << 12)
APIC_PAGE = 0x1000
# The register words both sides own alike; Q_IPI_SENT .. Q_SELF_IPI are the core's own
# counters, compared through apic.stats.
SHARED_BYTES = slice(0, (nc.Q_BASE_ADDRESS + 1) * 8)
NATIVE_COUNTERS = range(nc.Q_IPI_SENT, nc.Q_SELF_IPI + 1)


# ---------------------------------------------------------------------- the two sets
@dataclass
class Side:
    """One set of APICs, the bus between them, and what the test plays of the vCPU:
    kvm_run.cr8 as the guest left it, and whether the vCPU waits for a SIPI."""

    apics: list[LocalApic]
    bus: ApicBus
    notified: list[int]
    level_eois: list[int]
    kvm_cr8: list[int]
    waiting: list[bool]
    clock: FakeClock
    core: nc.Core | None = None
    native_stats: list[bytearray] = field(default_factory=list)


def make_side(ids: list[int], native: bool) -> Side:
    clock = FakeClock(TSC_HZ, start_ns=CLOCK_START)
    notified: list[int] = []
    level_eois: list[int] = []
    bus = ApicBus(notified.append)
    bus.eoi_listeners.append(level_eois.append)
    apics = []
    for i, apic_id in enumerate(ids):
        apic = LocalApic(apic_id, bus, bsp=(i == 0), clock_ns=clock.ns,
                         tsc_line=(TSC_REF, TSC_REF_NS), tsc_hz=TSC_HZ)
        bus.add(apic)
        apic.wait_for_sipi = False  # every vCPU has been started
        apics.append(apic)
    n = len(ids)
    side = Side(apics, bus, notified, level_eois, [0] * n, [False] * n, clock)
    if native:
        core = nc.Core(n, 2, 0, nc.SETTING_NATIVE)
        for i, apic in enumerate(apics):
            stats = bytearray(nc.S_NWORDS * 8)
            side.native_stats.append(stats)
            core.attach(i, -1, None, apic.irr, apic.isr, apic.tmr, apic.regs, stats)
        bus.core = core  # as Machine does: tells the core whether IDs are indexes
        side.core = core
    return side


# ------------------------------------------ Python's exit handling, mirrored per exit
def after_apic_write(side: Side, i: int) -> None:
    """Vcpu.after_apic_write: sync_cr8 (kvm_run.cr8 and R_CR8 = TPR[7:4]); no timer."""
    apic = side.apics[i]
    apic._r[nc.R_CR8] = apic.cr8()
    side.kvm_cr8[i] = apic.cr8()


def slow_wrmsr(side: Side, i: int, msr: int, value: int) -> bool:
    """exits.handle_wrmsr for an APIC MSR; False if the guest gets #GP."""
    try:
        side.apics[i].wrmsr(msr, value)
    except ApicGP:
        return False
    after_apic_write(side, i)
    return True


def slow_mmio_write(side: Side, i: int, gpa: int, length: int, value: int) -> None:
    """exits.handle_mmio for a write: the APIC's page in xAPIC mode, else another device."""
    apic = side.apics[i]
    if apic.mode is ApicMode.XAPIC and 0 <= gpa - apic.base_address < APIC_PAGE:
        apic.mmio_write(gpa - apic.base_address, length,
                        value & ((1 << (8 * length)) - 1))
        after_apic_write(side, i)


def python_fast_wrmsr(apic: LocalApic, msr: int, value: int) -> int:
    """exits.handle_exit_irqoff for WRMSR (fastpath on), the ICR/SELF_IPI/EOI cases."""
    if msr == c.MSR_X2APIC_ICR:
        return REENTER if apic.icr_write_x2apic_fast(value) else NONE
    if msr == c.MSR_X2APIC_SELF_IPI:
        return REENTER if apic.self_ipi_fast(value) else NONE
    if msr == MSR_EOI:
        return REENTER if value == 0 and apic.mode is ApicMode.X2APIC and apic.eoi_fast() \
            else NONE
    # The timer MSRs: Python's fastpath tries apic.wrmsr and, on #GP, hands over to the
    # slow path, which counts the #GP a second time (stats["gp"]). Both are modelled as
    # the slow path alone (for IA32_TSC_DEADLINE, the same state; see tsc_deadline).
    return NONE


def python_fast_mmio(apic: LocalApic, gpa: int, length: int, value: int) -> int:
    """exits.handle_exit_irqoff for an MMIO write (fastpath on)."""
    offset = gpa - apic.base_address
    if offset == c.REG_EOI and length == 4 and apic.mode is ApicMode.XAPIC:
        return REENTER if apic.eoi_fast() else NONE
    if offset == c.REG_ICR_LOW and length == 4 and apic.mode is ApicMode.XAPIC:
        return REENTER if apic.icr_write_xapic_fast(value & 0xFFFFFFFF) else NONE
    return NONE


def python_loop_top(side: Side, i: int, ready: bool, if_flag: bool
                    ) -> tuple[list[str], int, int | None]:
    """Vcpu._inject_pending_events (no timer armed, no KVM): CR8 -> TPR, INIT (then the
    vCPU waits for SIPI), NMI, SMI, then the highest deliverable IRR vector or an
    interrupt window. Returns (events taken, vector injected or -1, window or None).
    A vCPU waiting for SIPI runs Machine.poll_sipi instead."""
    apic = side.apics[i]
    events: list[str] = []
    if side.waiting[i]:
        if apic.take_init():
            events.append("init")
        vector = apic.take_sipi()
        if vector is not None:
            events.append(f"sipi {vector:#x}")
            side.waiting[i] = False
        return events, -1, None
    apic.clear_slow_events()
    cr8 = side.kvm_cr8[i]
    if cr8 != apic._r[nc.R_CR8]:
        apic.set_cr8(cr8)
        apic._r[nc.R_CR8] = cr8
    if apic.init_pending and apic.take_init():
        events.append("init")
        side.waiting[i] = True  # Machine.on_init
        after_apic_write(side, i)  # Vcpu.sync_cr8
        apic.slow_events_left()
        return events, -1, None
    if apic.take_nmi():
        events.append("nmi")
    if apic.smi_pending and apic.take_smi():
        events.append("smi")
    apic.slow_events_left()
    vector = apic.pending_vector()
    if vector is None:
        return events, -1, 0
    if ready and if_flag:
        apic.ack(vector)
        return events, vector, 0
    return events, -1, 1


# ---------------------------------------------------------------------- state snapshots
def apic_state(apic: LocalApic) -> dict[str, object]:
    """Everything of one APIC the two sides must agree on."""
    regs = bytearray(apic.regs)
    q = memoryview(regs).cast("Q")
    for word in NATIVE_COUNTERS:
        q[word] = 0
    q.release()
    timer = apic.timer
    return {
        "irr": bytes(apic.irr), "isr": bytes(apic.isr), "tmr": bytes(apic.tmr),
        "regs": bytes(regs),
        "esr": (apic._esr, apic._esr_pending),
        "lvt": tuple(apic.lvt(n) for n in range(c.LVT_COUNT)),
        "nmi": (apic.nmi_pending, apic._nmi_flag, apic._nmi_taken),
        "init": apic.init_pending, "smi": apic.smi_pending,
        "sipi": (apic.sipi_pending, apic.sipi_vector, apic.wait_for_sipi),
        "timer": (timer.mode, timer.initial_count, timer.tdcr, timer.deadline_ns),
        "stats": dict(apic.stats),
    }


def exact_state(apic: LocalApic) -> tuple[bytes, bytes, bytes, bytes, dict[str, int]]:
    """The raw memory and counters: what a NONE verdict must leave exactly as it was."""
    return (bytes(apic.irr), bytes(apic.isr), bytes(apic.tmr), bytes(apic.regs),
            dict(apic.stats))


def describe_diff(a: dict[str, object], b: dict[str, object]) -> str:
    out = []
    for key in a:
        if a[key] != b[key]:
            if key in ("irr", "isr", "tmr"):
                va = [v for v in range(256) if a[key][v]]  # type: ignore[index]
                vb = [v for v in range(256) if b[key][v]]  # type: ignore[index]
                out.append(f"{key}: python {va} native {vb}")
            elif key == "regs":
                wa = memoryview(a[key]).cast("I").tolist()  # type: ignore[arg-type]
                wb = memoryview(b[key]).cast("I").tolist()  # type: ignore[arg-type]
                diffs = [(w, hex(x), hex(y))
                         for w, (x, y) in enumerate(zip(wa, wb, strict=True)) if x != y]
                out.append(f"regs words (index, python, native): {diffs}")
            elif key == "stats":
                sa, sb = Counter(a[key]), Counter(b[key])  # type: ignore[arg-type]
                out.append(f"stats: python-only {dict(sa - sb)} native-only {dict(sb - sa)}")
            else:
                out.append(f"{key}: python {a[key]} native {b[key]}")
    return "; ".join(out)


# ---------------------------------------------------------------------- strategies
def weighted(*choices: tuple[int, object]) -> st.SearchStrategy:
    """One of the choices (values or strategies), in proportion to the weights.
    (sampled_from draws about uniformly; one_of over integer strategies does not, and
    the common cases must dominate for the fastpath to be reached often.)"""
    pool = [option for weight, option in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(
        lambda o: o if isinstance(o, st.SearchStrategy) else st.just(o))


FIXED, LOWEST, SMI, NMI, INIT, SIPI = 0, 1, 2, 4, 5, 6
delivery_modes = weighted((8, FIXED), (5, LOWEST), (1, SMI), (1, 3), (1, NMI), (1, INIT),
                          (1, SIPI), (1, 7))
# A few hot vectors make the same vector meet itself: an edge IPI onto a level TMR bit,
# a lowest-priority focus processor, an IRR bit set twice.
HOT_VECTORS = [0x20, 0x21, 0x30, 0x40, 0x41, 0x80, 0xEF, 0xFF]
vectors = weighted((4, st.sampled_from(HOT_VECTORS)), (4, st.integers(16, 255)),
                   (1, st.integers(0, 15)))
shorthands = weighted((6, 0), (1, 1), (2, 2), (2, 3))
# Destination: ("id", k) is the k-th APIC's ID, ("bcast",) the sender mode's broadcast,
# ("cur", k) the k-th APIC's physical ID now (after xAPIC ID writes), ("raw", value)
# anything (logical masks, cluster IDs, absent IDs, huge values).
dests = weighted(
    (4, st.tuples(st.just("id"), st.integers(0, 3))),
    (3, st.tuples(st.just("cur"), st.integers(0, 3))),
    (2, st.tuples(st.just("bcast"))),
    # A logical destination: cluster (x2APIC ID[19:4], or the xAPIC cluster nibble) and
    # the member bits.
    (3, st.tuples(st.just("logical"), weighted((3, 0), (1, 1), (1, 2)), st.integers(1, 15))),
    (3, st.tuples(st.just("raw"), st.sampled_from(
        [0, 1, 2, 3, 4, 5, 0xF, 0x10, 0x11, 0x12, 0xF0, 0xFE, 0xFF, 0x100, 0x10001, 0x10002,
         0x20001, 0xFFFF, 0xFFFFFFFE]))),
    (1, st.tuples(st.just("raw"), st.integers(0, 0xFFFFFFFF))),
)


@st.composite
def icr_lows(draw: st.DrawFn) -> int:
    """ICR[31:0]: every field, sometimes the busy bit and reserved bits."""
    low = draw(vectors) | draw(delivery_modes) << 8 | draw(shorthands) << 18
    low |= draw(weighted((2, 0), (1, c.ICR_DEST_LOGICAL)))
    low |= draw(weighted((4, 0), (1, c.ICR_LEVEL_ASSERT), (1, c.ICR_TRIGGER_LEVEL),
                         (1, c.ICR_LEVEL_ASSERT | c.ICR_TRIGGER_LEVEL)))
    low |= draw(weighted((3, 0), (1, c.ICR_BUSY)))
    noise = draw(weighted((18, 0), (2, 1 << 13), (1, 1 << 16), (1, 1 << 17), (1, 1 << 20),
                          (1, 1 << 31), (1, 0xFFF00000)))
    return low | noise


# None: the mode the APIC is in (a write that changes nothing but the base).
apic_base_values = weighted(
    (4, None), (1, c.APIC_BASE_EN), (1, c.APIC_BASE_EN | c.APIC_BASE_EXTD), (1, 0),
    (1, c.APIC_BASE_EXTD), (1, c.APIC_BASE_EN | 1), (1, c.APIC_BASE_EN | (1 << 9)))
ids_layouts = weighted(
    (4, st.integers(2, 4).map(lambda n: list(range(n)))),  # kvmpy's numbering
    (1, st.lists(st.sampled_from([0, 1, 2, 3, 5, 7, 15, 16, 17, 33, 255, 257, 300]),
                 min_size=2, max_size=4, unique=True)),
)
# Per APIC: "x" (xAPIC), "x2", "off" (globally disabled). Mostly one mode for all.
mode_layouts = weighted(
    (2, st.just(["x2"] * 4)), (2, st.just(["x"] * 4)),
    (2, st.lists(weighted((2, "x"), (2, "x2"), (1, "off")), min_size=4, max_size=4)),
)
likely = weighted((4, True), (1, False))
unlikely = likely.map(lambda b: not b)


# ---------------------------------------------------------------------- the machine
class NativeVsPython(RuleBasedStateMachine):
    """The same exits through the core (native set) and through Python (python set)."""

    def __init__(self) -> None:
        super().__init__()
        self.py: Side
        self.nat: Side
        self.n = 0
        self.steps: list[str] = []

    @initialize(ids=ids_layouts,
                modes=mode_layouts,
                enable=st.lists(weighted((6, True), (1, False)), min_size=4, max_size=4),
                logical=st.sampled_from(["flat", "cluster", "none"]),
                cr8=st.lists(weighted((4, 0), (1, st.integers(1, 3))), min_size=4,
                             max_size=4))
    def setup(self, ids: list[int], modes: list[str], enable: list[bool],
              logical: str, cr8: list[int]) -> None:
        self.n = len(ids)
        self.ids = ids
        self.py = make_side(ids, native=False)
        self.nat = make_side(ids, native=True)
        for side in (self.py, self.nat):
            for i, apic in enumerate(side.apics):
                if modes[i] == "x2":
                    slow_wrmsr(side, i, c.MSR_APIC_BASE, c.APIC_BASE_EN | c.APIC_BASE_EXTD)
                if enable[i]:
                    self._write_reg(side, i, c.REG_SVR, c.SVR_APIC_ENABLED | 0xFF)
                if logical != "none" and apic.mode is ApicMode.XAPIC:
                    self._write_reg(side, i, c.REG_DFR,
                                    0xFFFFFFFF if logical == "flat" else 0x0FFFFFFF)
                    ldr = 1 << i if logical == "flat" else (i >> 1) << 4 | 1 << (i & 1)
                    self._write_reg(side, i, c.REG_LDR, ldr << 24)
                if modes[i] == "off":
                    slow_wrmsr(side, i, c.MSR_APIC_BASE, 0)
                if apic.mode is not ApicMode.DISABLED:  # a loop top took CR8 as TPR
                    apic.set_cr8(cr8[i])
                after_apic_write(side, i)
            self._clear_kicks(side)
        self.compare("setup")

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _write_reg(side: Side, i: int, offset: int, value: int) -> None:
        apic = side.apics[i]
        if apic.mode is ApicMode.X2APIC:
            slow_wrmsr(side, i, c.X2APIC_MSR_FIRST + (offset >> 4), value)
        else:
            slow_mmio_write(side, i, apic.base_address + offset, 4, value)

    def _clear_kicks(self, side: Side) -> None:
        side.notified.clear()
        side.level_eois.clear()
        if side.core is not None:
            for i in range(self.n):
                side.core.take_request(i)

    def _kicks(self, side: Side) -> set[int]:
        kicked = set(side.notified)
        side.notified.clear()
        if side.core is not None:
            kicked |= {i for i in range(self.n) if side.core.take_request(i)}
        return kicked

    def _resolve(self, dest: tuple, x2: bool) -> int:
        if dest[0] == "id":
            apic_id = self.ids[dest[1] % self.n]
            return apic_id if x2 else apic_id & 0xFF
        if dest[0] == "cur":
            apic = self.nat.apics[dest[1] % self.n]
            apic_id = apic.apic_id if apic.mode is ApicMode.X2APIC else apic.xapic_id
            return apic_id if x2 else apic_id & 0xFF
        if dest[0] == "bcast":
            return 0xFFFFFFFF if x2 else 0xFF
        if dest[0] == "logical":
            cluster, bits = dest[1], dest[2]
            return cluster << 16 | bits if x2 else cluster << 4 | bits
        return dest[1] if x2 else dest[1] & 0xFF

    def compare(self, what: str) -> None:
        """Both sets agree, kicks included; every APIC passes its invariants."""
        self.steps.append(what)
        kp, kn = self._kicks(self.py), self._kicks(self.nat)
        assert kp == kn, f"after {what}: kicked vCPUs python {sorted(kp)} native {sorted(kn)}"
        assert self.py.level_eois == self.nat.level_eois, (
            f"after {what}: level EOIs python {self.py.level_eois} native "
            f"{self.nat.level_eois}")
        self.py.level_eois.clear()
        self.nat.level_eois.clear()
        assert self.py.kvm_cr8 == self.nat.kvm_cr8, f"after {what}: kvm_run.cr8 differs"
        assert self.py.waiting == self.nat.waiting, f"after {what}: wait-for-SIPI differs"
        assert self.py.bus.renumbered == self.nat.bus.renumbered
        for i in range(self.n):
            a, b = apic_state(self.py.apics[i]), apic_state(self.nat.apics[i])
            assert a == b, f"after {what}: APIC {i} differs: {describe_diff(a, b)}"
            check_invariants(self.nat.apics[i])
            # A sender publishes NMI/INIT/SIPI/SMI, then flags it for the core.
            apic = self.nat.apics[i]
            if apic.init_pending or apic.smi_pending or apic.sipi_pending \
                    or (apic._nmi_flag and apic.nmi_pending):
                assert apic._r[nc.R_SLOW_EVENTS], f"after {what}: APIC {i} slow event unflagged"

    def native_exit(self, i: int, fast, slow, what: str) -> int:
        """The core's verdict on an exit; on NONE, check that it left no trace, then run
        Python's slow path on the same APICs (the loop's hand-over)."""
        before = [exact_state(a) for a in self.nat.apics]
        fp = fast()
        assert fp in (NONE, REENTER, HANDLED), f"{what}: verdict {fp}"
        if fp == NONE:
            after = [exact_state(a) for a in self.nat.apics]
            assert after == before, f"{what}: the core answered NONE but changed APIC state"
            requests = [j for j in range(self.n) if self.nat.core.take_request(j)]
            assert not requests, f"{what}: the core answered NONE but kicked {requests}"
            slow()
        return fp

    # -------------------------------------------------------------- exits: ICR
    @rule(src=st.integers(0, 3), low=icr_lows(), dest=dests, wrong_interface=unlikely,
          bit12_high=weighted((4, 0), (1, 1 << 12)),
          write_high=st.booleans(), high_noise=st.integers(0, 0xFFFFFF),
          stray=weighted((4, 0), (1, 0xFFFFFFFF00000000)))
    def icr(self, src: int, low: int, dest: tuple, wrong_interface: bool, bit12_high: int,
            write_high: bool, high_noise: int, stray: int) -> None:
        """An ICR write through the interface of the sender's mode (rarely the other)."""
        i = src % self.n
        if (self.nat.apics[i].mode is ApicMode.X2APIC) != wrong_interface:
            self.x2apic_icr(i, low, dest, bit12_high)
        else:
            self.xapic_icr(i, low, dest, write_high, high_noise, stray)

    # Scenarios: the same exits, in the orders that reach the rarer routing rules.
    @rule(src=st.integers(0, 3), dst=st.integers(0, 3), vector=st.sampled_from(HOT_VECTORS))
    def edge_ipi_onto_level(self, src: int, dst: int, vector: int) -> None:
        """A level-triggered vector pending (TMR set), then an edge IPI of the same vector:
        TMR is cleared (ApicBus: IPIs are edge)."""
        self.accept_fixed(dst, vector, True)
        self.icr(src, vector, ("id", dst % self.n), False, 0, True, 0, 0)

    @rule(src=st.integers(0, 3), holder=st.integers(0, 3),
          vector=st.sampled_from(HOT_VECTORS), focus_off=st.booleans(),
          how=st.sampled_from(["all", "allbut", "bcast", "logical"]))
    def lowest_priority_with_a_focus(self, src: int, holder: int, vector: int,
                                     focus_off: bool, how: str) -> None:
        """One APIC holds the vector (the focus processor, unless its SVR turns focus
        checking off), then a lowest-priority IPI that may reach several APICs."""
        h = holder % self.n
        if not self.py.waiting[h]:
            self._exit_write(h, c.REG_SVR, 0x3FF if focus_off else 0x1FF)
        self.accept_fixed(h, vector, False)
        low = vector | LOWEST << 8
        dest: tuple = ("id", h)
        if how in ("all", "allbut"):
            low |= (2 if how == "all" else 3) << 18
        elif how == "bcast":
            dest = ("bcast",)
        else:
            low |= c.ICR_DEST_LOGICAL
            dest = ("logical", 0, 0xF)
        self.icr(src, low, dest, False, 0, True, 0, 0)

    @rule(src=st.integers(0, 3), cluster=weighted((2, 0), (1, 1), (1, 0xFFFF)),
          bits=st.integers(1, 0xF), dm=st.sampled_from([FIXED, LOWEST]),
          vector=st.sampled_from(HOT_VECTORS))
    def logical_ipi(self, src: int, cluster: int, bits: int, dm: int, vector: int) -> None:
        """A logical IPI: x2APIC cluster (dest[31:16]) and members, or the xAPIC MDA
        (flat: a bit mask; cluster model: cluster nibble and members)."""
        self.icr(src, vector | dm << 8 | c.ICR_DEST_LOGICAL, ("logical", cluster & 0xF
                 if self.nat.apics[src % self.n].mode is not ApicMode.X2APIC else cluster,
                 bits), False, 0, True, 0, 0)

    @rule(src=st.integers(0, 3),
          to=weighted((2, st.tuples(st.just("index"))),
                      (3, st.tuples(st.just("other"), st.integers(0, 3))),
                      (1, st.tuples(st.just("raw"), st.sampled_from([0, 1, 2, 3, 5, 0xFE,
                                                                     0xFF])))))
    def xapic_id_write(self, src: int, to: tuple) -> None:
        """An xAPIC ID write (SDM 10.4.6): back to the APIC's index-numbered ID, another
        APIC's current ID (two APICs with one ID), or a raw value. Through the page, so in
        x2APIC mode it reaches no APIC."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        if to[0] == "index":
            new = self.nat.apics[i].apic_id & 0xFF
        elif to[0] == "other":
            new = self.nat.apics[to[1] % self.n].xapic_id
        else:
            new = to[1]
        self.mmio_write(i, c.REG_ID, 4, new << 24)

    @rule(src=st.integers(0, 3), a=st.integers(0, 3), b=st.integers(0, 3),
          dm=st.sampled_from([FIXED, LOWEST]), vector=st.sampled_from(HOT_VECTORS),
          xapic_icr=st.booleans())
    def aliased_ipi(self, src: int, a: int, b: int, dm: int, vector: int,
                    xapic_icr: bool) -> None:
        """APIC b takes APIC a's xAPIC ID, then a physical IPI to that ID (fixed: both
        take it in xAPIC mode; lowest priority: one of them, ApicBus._physical_target)."""
        self.xapic_id_write(b, ("other", a))
        self.icr(src, vector | dm << 8, ("cur", a), xapic_icr, 0, True, 0, 0)

    def wrmsr_both(self, i: int, msr: int, value: int, what: str) -> tuple[int, int]:
        """A WRMSR exit on both sides: Python's fastpath, else its slow path; the core's,
        else the native side's slow path. The two verdicts (Python's, native)."""
        fp = python_fast_wrmsr(self.py.apics[i], msr, value)
        if fp == NONE:
            slow_wrmsr(self.py, i, msr, value)
        nfp = self.native_exit(i, lambda: self.nat.core.fast_wrmsr(i, msr, value),
                               lambda: slow_wrmsr(self.nat, i, msr, value), what)
        return fp, nfp

    def mmio_both(self, i: int, gpa: int, length: int, value: int,
                  what: str) -> tuple[int, int]:
        """An MMIO write exit on both sides, as wrmsr_both."""
        fp = python_fast_mmio(self.py.apics[i], gpa, length, value)
        if fp == NONE:
            slow_mmio_write(self.py, i, gpa, length, value)
        nfp = self.native_exit(
            i, lambda: self.nat.core.fast_mmio_write(i, gpa, length, value),
            lambda: slow_mmio_write(self.nat, i, gpa, length, value), what)
        return fp, nfp

    def x2apic_icr(self, src: int, low: int, dest: tuple, bit12_high: int) -> None:
        i = src % self.n
        if self.py.waiting[i]:
            return
        value = self._resolve(dest, True) << 32 | low | bit12_high
        what = f"vCPU {i} WRMSR ICR {value:#x}"
        mode = self.nat.apics[i].mode
        fp, nfp = self.wrmsr_both(i, c.MSR_X2APIC_ICR, value, what)
        dm, vector = (low >> 8) & 7, low & 0xFF
        covered = (mode is ApicMode.X2APIC and not value & X2_ICR_RESERVED
                   and dm in (FIXED, LOWEST) and vector >= 16)
        assert nfp == (REENTER if covered else NONE), f"{what}: verdict {nfp}"
        if nfp == REENTER:
            assert fp == REENTER, f"{what}: the core completed what Python hands over"
        self.compare(what)

    def xapic_icr(self, src: int, low: int, dest: tuple, write_high: bool,
                  high_noise: int, stray: int) -> None:
        """ICR high (slow path), then ICR low (the fastpath), as a guest sends in xAPIC."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        if write_high:
            high = self._resolve(dest, False) << 24 | high_noise
            self.mmio_write(i, c.REG_ICR_HIGH, 4, high)
        apic = self.nat.apics[i]
        gpa = apic.base_address + c.REG_ICR_LOW
        value = low | stray  # bytes past the access's length are not the guest's
        what = f"vCPU {i} MMIO ICR low {low:#x} (dest {apic._icr_dest:#x})"
        fp, nfp = self.mmio_both(i, gpa, 4, value, what)
        stored = low & XAPIC_ICR_LOW_WRITABLE
        dm, vector = (stored >> 8) & 7, stored & 0xFF
        covered = apic.mode is ApicMode.XAPIC and dm in (FIXED, LOWEST) and vector >= 16
        assert nfp == (REENTER if covered else NONE), f"{what}: verdict {nfp}"
        self.compare(what)

    @rule(src=st.integers(0, 3),
          value=weighted((10, st.integers(16, 255)), (2, st.integers(0, 15)),
                         (1, st.sampled_from([0x100, 0x1FF, 1 << 32 | 0x40]))))
    def self_ipi(self, src: int, value: int) -> None:
        i = src % self.n
        if self.py.waiting[i]:
            return
        what = f"vCPU {i} WRMSR SELF_IPI {value:#x}"
        mode = self.nat.apics[i].mode
        fp, nfp = self.wrmsr_both(i, c.MSR_X2APIC_SELF_IPI, value, what)
        covered = mode is ApicMode.X2APIC and 16 <= value <= 0xFF
        assert nfp == (REENTER if covered else NONE), f"{what}: verdict {nfp}"
        self.compare(what)

    # -------------------------------------------------------------- exits: EOI
    @rule(src=st.integers(0, 3), wrong_interface=unlikely,
          value=weighted((8, 0), (1, 1), (1, 0x80000000)),
          length=weighted((8, 4), (1, 1), (1, 8)))
    def eoi_rule(self, src: int, wrong_interface: bool, value: int, length: int) -> None:
        """An EOI through the interface of the APIC's mode (rarely the other)."""
        i = src % self.n
        via_msr = (self.nat.apics[i].mode is ApicMode.X2APIC) != wrong_interface
        self.eoi(i, via_msr, value, length)

    def eoi(self, src: int, via_msr: bool, value: int, length: int) -> None:
        i = src % self.n
        if self.py.waiting[i]:
            return
        apic = self.nat.apics[i]
        isrv = apic.isr.rfind(1)
        level = isrv >= 0 and apic.tmr[isrv]
        if via_msr:
            what = f"vCPU {i} WRMSR EOI {value:#x} (ISR top {isrv:#x}, level {level})"
            fp, nfp = self.wrmsr_both(i, MSR_EOI, value, what)
            covered = apic.mode is ApicMode.X2APIC and value == 0
        else:
            gpa = apic.base_address + c.REG_EOI
            what = f"vCPU {i} MMIO EOI len {length} (ISR top {isrv:#x}, level {level})"
            fp, nfp = self.mmio_both(i, gpa, length, value, what)
            covered = apic.mode is ApicMode.XAPIC and length == 4
        covered = covered and isrv >= 0 and not level
        assert nfp == (REENTER if covered else NONE), f"{what}: verdict {nfp}"
        assert nfp == fp, f"{what}: native {nfp}, Python's fastpath {fp}"
        self.compare(what)

    # -------------------------------------------------------------- exits: other writes
    def mmio_write(self, i: int, offset: int, length: int, value: int,
                   at_default_base: bool = False) -> None:
        """An MMIO write the core must hand over (or an EOI/ICR-low one it may not)."""
        base = c.APIC_DEFAULT_BASE if at_default_base else self.nat.apics[i].base_address
        gpa = base + offset
        what = f"vCPU {i} MMIO write {offset:#x} len {length} = {value:#x}"
        _, nfp = self.mmio_both(i, gpa, length, value, what)
        if offset not in (c.REG_EOI, c.REG_ICR_LOW):
            assert nfp == NONE, f"{what}: verdict {nfp}"
        self.compare(what)

    def msr_write(self, i: int, msr: int, value: int) -> None:
        """A WRMSR the core must hand over."""
        what = f"vCPU {i} WRMSR {msr:#x} = {value:#x}"
        slow_wrmsr(self.py, i, msr, value)
        nfp = self.native_exit(i, lambda: self.nat.core.fast_wrmsr(i, msr, value),
                               lambda: slow_wrmsr(self.nat, i, msr, value), what)
        assert nfp == NONE, f"{what}: verdict {nfp}"
        self.compare(what)

    @rule(src=st.integers(0, 3),
          reg=weighted((3, c.REG_TPR), (3, c.REG_SVR), (1, c.REG_LDR), (1, c.REG_DFR),
                       (1, c.REG_ID), (1, c.REG_ESR), (1, c.REG_LVT_ERROR),
                       (1, c.REG_LVT_TIMER), (1, c.REG_TIMER_INITIAL), (1, c.REG_ICR_HIGH),
                       (1, c.REG_PPR), (1, 0x3B0)),
          value=weighted((2, st.integers(0, 0x7F)), (3, st.sampled_from(
              [0x1FF, 0x2FF, 0x3FF, 0x0FF, 0x10000 | 0x40, 0x38, 0x0F000000, 0x01000000,
               0x03000000, 0x0FFFFFFF, 0xFFFFFFFF, 1 << 18 | 0x30])),
              (1, st.integers(0, 0xFFFFFFFF))),
          via_msr=st.booleans(), length=weighted((6, 4), (1, 2)),
          at_default_base=weighted((6, False), (1, True)), keep_id=likely)
    def register_write(self, src: int, reg: int, value: int, via_msr: bool, length: int,
                       at_default_base: bool, keep_id: bool) -> None:
        """TPR, SVR (enable/disable, focus), LDR/DFR, the xAPIC ID (renumbering unless
        ``keep_id``), ESR, LVTs, the timer, ICR high: through the MSR or the page,
        whatever the mode."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        if reg == c.REG_ID and keep_id:
            value = self.nat.apics[i].xapic_id << 24 | value & 0xFFFFFF
        if via_msr:
            self.msr_write(i, c.X2APIC_MSR_FIRST + (reg >> 4), value)
        else:
            self.mmio_write(i, reg, length, value, at_default_base)

    @rule(src=st.integers(0, 3),
          tpr=weighted((2, 0), (1, 0x10), (1, 0x20), (1, 0x2F), (1, 0x38), (1, 0x40),
                       (1, 0x4A), (1, 0x80), (1, 0x8F), (1, 0xEF), (1, st.integers(0, 0xFF))))
    def tpr_write(self, src: int, tpr: int) -> None:
        """TPR through the mode's interface; the values meet the hot vectors' classes,
        low nibble included (PPR = TPR when TPR[7:4] >= ISRV[7:4], SDM 10.8.3.1)."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        self._exit_write(i, c.REG_TPR, tpr)

    @rule(src=st.integers(0, 3),
          svr=weighted((3, 0x1FF), (2, 0x3FF), (1, 0xFF), (1, 0x2FF), (1, 0x13F)))
    def svr_write(self, src: int, svr: int) -> None:
        """SVR: software enable/disable, focus checking on/off (bit 9)."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        self._exit_write(i, c.REG_SVR, svr)

    def _exit_write(self, i: int, offset: int, value: int) -> None:
        """A register write exit through the interface of the APIC's mode."""
        if self.nat.apics[i].mode is ApicMode.X2APIC:
            self.msr_write(i, c.X2APIC_MSR_FIRST + (offset >> 4), value)
        else:
            self.mmio_write(i, offset, 4, value)

    @rule(src=st.integers(0, 3), value=apic_base_values,
          moved=weighted((4, False), (1, True)))
    def apic_base(self, src: int, value: int | None, moved: bool) -> None:
        """IA32_APIC_BASE: mode switches (legal and #GP), a moved xAPIC page."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        if value is None:
            value = self.nat.apics[i].apic_base & (c.APIC_BASE_EN | c.APIC_BASE_EXTD)
        base = 0xFED00000 if moved else c.APIC_DEFAULT_BASE
        self.msr_write(i, c.MSR_APIC_BASE, base | value)

    @rule(src=st.integers(0, 3),
          msr=st.sampled_from([0x808, 0x80F, 0x828, 0x831, 0x838, 0x10, 0xC0000080]),
          value=st.sampled_from([0, 0x20, 0x1FF, 1 << 40]))
    def other_msr(self, src: int, msr: int, value: int) -> None:
        """MSRs the core does not handle: TPR, SVR, ESR, ICR2, the timer's initial count,
        non-APIC MSRs (no APIC effect)."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        what = f"vCPU {i} WRMSR {msr:#x} = {value:#x}"
        apic_msr = msr in (c.MSR_TSC_DEADLINE, c.MSR_APIC_BASE) or 0x800 <= msr <= 0x8FF
        if apic_msr:
            self.msr_write(i, msr, value)
            return
        nfp = self.nat.core.fast_wrmsr(i, msr, value)
        assert nfp == NONE, f"{what}: verdict {nfp}"
        self.compare(what)

    # -------------------------------------------------------------- the timer
    @rule(src=st.integers(0, 3), mode=weighted((4, TIMER_MODES[2]), (1, TIMER_MODES[0]),
                                               (1, TIMER_MODES[1])),
          masked=unlikely, vector=st.sampled_from(HOT_VECTORS))
    def lvt_timer(self, src: int, mode: int, masked: bool, vector: int) -> None:
        """The LVT timer through the mode's interface (slow path): mostly TSC-deadline."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        self._exit_write(i, c.REG_LVT_TIMER, mode | (c.LVT_MASKED if masked else 0) | vector)

    @rule(ns=weighted((3, st.integers(1, 2_000_000)), (1, st.integers(0, 10**9))))
    def advance(self, ns: int) -> None:
        """Time passes (both clocks): an armed deadline may come due."""
        for side in (self.py, self.nat):
            side.clock.advance(ns)
        self.compare(f"{ns} ns later")

    @rule(src=st.integers(0, 3),
          ahead=weighted((6, st.integers(1, 10**10)), (1, st.integers(-10**6, 0)),
                         (1, st.sampled_from([1, 2, 3]))),
          special=weighted((8, None), (1, 0), (1, (1 << 64) - 1), (1, 1)))
    def tsc_deadline(self, src: int, ahead: int, special: int | None) -> None:
        """IA32_TSC_DEADLINE = the TSC now + ``ahead`` ticks (or 0, 1, the maximum). The
        core completes it (REENTER) exactly when the APIC is enabled, its timer in
        TSC-deadline mode, no expiry due, and the deadline 0 or in the future; the
        state (Q_TSC_DEADLINE, Q_TIMER_DEADLINE in `regs`) must be Python's either way."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        apic, now = self.nat.apics[i], self.nat.clock.now
        tsc_now = TSC_REF + (now - TSC_REF_NS) * TSC_HZ // 1_000_000_000
        value = special if special is not None else max(tsc_now + ahead, 0)
        armed = apic.timer_deadline_ns()
        covered = (apic.mode is not ApicMode.DISABLED
                   and apic.timer.mode == c.TIMER_TSC_DEADLINE
                   and not (armed is not None and now >= armed)
                   and (value == 0 or value > tsc_now))
        what = f"vCPU {i} WRMSR TSC_DEADLINE {value:#x} (TSC now {tsc_now:#x})"
        slow_wrmsr(self.py, i, c.MSR_TSC_DEADLINE, value)
        nfp = self.native_exit(
            i, lambda: self.nat.core.fast_wrmsr(i, c.MSR_TSC_DEADLINE, value, now),
            lambda: slow_wrmsr(self.nat, i, c.MSR_TSC_DEADLINE, value), what)
        assert nfp == (REENTER if covered else NONE), f"{what}: verdict {nfp}"
        self.compare(what)

    # -------------------------------------------------------------- CPU-side steps
    @rule(src=st.integers(0, 3), ready=likely, if_flag=likely,
          cr8=weighted((6, None), (2, 0), (2, 1), (1, 2), (1, 3), (1, st.integers(4, 15))))
    def loop_top(self, src: int, ready: bool, if_flag: bool, cr8: int | None) -> None:
        """The loop top: Python's _inject_pending_events; the core's sync_cr8 and
        inject_pending_irq unless an event only Python handles is flagged (RET_EVENTS).

        ``cr8``: the guest wrote CR8 in the run that ended here, with an exit that needs
        no handling (a kick), so kvm_run.cr8 shows it now. (Not across a handed-over
        exit: Vcpu.after_apic_write overwrites kvm_run.cr8 with TPR before the loop top
        reads it, and the guest's write is lost; see the module docstring.)"""
        i = src % self.n
        if cr8 is not None and not self.py.waiting[i]:
            self.py.kvm_cr8[i] = self.nat.kvm_cr8[i] = cr8
        what = f"vCPU {i} loop top ready={ready} IF={if_flag} cr8={self.py.kvm_cr8[i]}"
        py = python_loop_top(self.py, i, ready, if_flag)
        apic = self.nat.apics[i]
        if self.nat.waiting[i] or apic._r[nc.R_SLOW_EVENTS]:
            nat = python_loop_top(self.nat, i, ready, if_flag)
        else:
            got = self.nat.core.inject(i, ready, if_flag, self.nat.kvm_cr8[i])
            assert got is not None, f"{what}: the core refused a legal CR8"
            nat = ([], got[0], got[1])
        assert py == nat, f"{what}: (events, injected, window) python {py} native {nat}"
        self.compare(f"{what} -> {py}")

    @rule(src=st.integers(0, 3), value=weighted((6, 0), (1, 1), (1, 0xFFFFFFFF)),
          length=weighted((6, 4), (1, 1), (1, 2), (1, 8)))
    def take_and_eoi(self, src: int, value: int, length: int) -> None:
        """The guest takes an interrupt and EOIs it: a loop top ready with IF=1, then
        (if a vector was injected) an EOI through the mode's interface, mostly a proper
        one (zero, 4 bytes), else one the core must hand over."""
        i = src % self.n
        self.loop_top(i, True, True, None)
        if self.py.waiting[i] or "], -1," in self.steps[-1]:
            return
        self.eoi(i, self.nat.apics[i].mode is ApicMode.X2APIC, value, length)

    @rule(src=st.integers(0, 3), if_flag=st.booleans())
    def hlt(self, src: int, if_flag: bool) -> None:
        """HLT: the fastpath's verdict (REENTER: a wake-up is already pending)."""
        i = src % self.n
        if self.py.waiting[i]:
            return
        what = f"vCPU {i} HLT IF={if_flag}"
        py = REENTER if self.py.apics[i].halt_ends_at_once(if_flag) else HANDLED
        nfp = self.native_exit(i, lambda: self.nat.core.fast_hlt(i, if_flag), lambda: None,
                               what)
        apic = self.nat.apics[i]
        if nfp != py:
            assert (nfp, py) == (REENTER, HANDLED) and apic.smi_pending, (
                f"{what}: native {nfp}, Python {py}")
        self.compare(what)

    # -------------------------------------------------------------- I/O APIC messages
    @rule(dst=st.integers(0, 3), vector=vectors, level=st.booleans())
    def accept_fixed(self, dst: int, vector: int, level: bool) -> None:
        """An I/O APIC-style message straight into one APIC (sets TMR when level)."""
        i = dst % self.n
        for side in (self.py, self.nat):
            if side.apics[i].accept_fixed(vector, level):
                side.bus.notify(i)
        self.compare(f"accept_fixed({vector:#x}, level={level}) into APIC {i}")

    @rule(vector=vectors, dm=weighted((4, FIXED), (2, LOWEST), (1, SMI), (1, NMI), (1, INIT)),
          dest=dests, logical=st.booleans(), level=st.booleans())
    def ioapic_message(self, vector: int, dm: int, dest: tuple, logical: bool,
                       level: bool) -> None:
        d = self._resolve(dest, False)
        got = [side.bus.deliver_irq(vector, dm, d, logical, level)
               for side in (self.py, self.nat)]
        assert got[0] == got[1]
        self.compare(f"I/O APIC message vector {vector:#x} dm {dm} dest {d:#x} "
                     f"logical={logical} level={level}")

    def teardown(self) -> None:
        """Free the core (and its 0.3 MB of statistics per vCPU) now, not at the
        cycle collector's leisure (APICs and their bus refer to each other)."""
        for side in (getattr(self, "py", None), getattr(self, "nat", None)):
            if side is not None:
                side.bus.core = None
                side.core = None
                side.native_stats.clear()

    @invariant()
    def native_requests_empty(self) -> None:
        """Every kick was collected by the step that made it."""
        if self.n:
            assert not any(self.nat.core.take_request(i) for i in range(self.n))


DEFAULT = settings(
    max_examples=100,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
LONG = settings(DEFAULT, max_examples=3000, stateful_step_count=80, derandomize=False)

TestNativeVsPython = NativeVsPython.TestCase
TestNativeVsPython.settings = DEFAULT


@pytest.mark.slow
def test_native_vs_python_long() -> None:
    """The same machine, 20x the examples, twice the steps, random seeds."""
    run_state_machine_as_test(NativeVsPython, settings=LONG)


# ---------------------------------------------------------------------- pinned cases
def _pair(ids: list[int], x2: bool = True) -> NativeVsPython:
    m = NativeVsPython()
    m.setup(ids=ids, modes=["x2" if x2 else "x"] * 4, enable=[True] * 4, logical="flat",
            cr8=[0] * 4)
    return m


def test_fixed_physical_ipi_is_reentered_and_kicks_only_the_target() -> None:
    m = _pair([0, 1, 2])
    m.x2apic_icr(0, 0x40, ("id", 2), 0)
    assert m.nat.apics[2].irr[0x40] and not m.nat.apics[1].irr[0x40]
    assert m.steps[-1].startswith("vCPU 0 WRMSR ICR")


def test_reserved_bit_icr_is_none_and_gp_on_both_sides() -> None:
    m = _pair([0, 1])
    before = exact_state(m.nat.apics[1])
    assert m.nat.core.fast_wrmsr(0, c.MSR_X2APIC_ICR, 1 << 32 | 1 << 13 | 0x40) == NONE
    assert exact_state(m.nat.apics[1]) == before
    m.x2apic_icr(0, 0x40 | 1 << 13, ("id", 1), 0)
    assert m.nat.apics[0].stats["gp"] == 1 and not m.nat.apics[1].irr[0x40]


def test_renumbered_vm_ipis_stay_on_the_fastpath() -> None:
    """APIC IDs that are not indexes: the core finds the APIC with the ID (REENTER)."""
    m = _pair([0, 5])
    assert m.nat.bus.renumbered
    m.x2apic_icr(0, 0x40, ("id", 1), 0)  # asserts REENTER
    assert m.nat.apics[1].irr[0x40]
    m.x2apic_icr(0, 0x41, ("raw", 1), 0)
    assert m.nat.apics[0].stats["ipi_no_target"] == 1


def test_aliased_xapic_ids_on_the_fastpath() -> None:
    """Two APICs given one xAPIC ID both take a fixed physical IPI to it, on the
    fastpath; a lowest-priority one goes to the APIC at the ID's index first; the ID
    written back to its index ends the alias."""
    m = _pair([0, 1, 2], x2=False)
    m.xapic_icr(2, 0x41, ("id", 1), True, 0, 0)
    assert [a.irr[0x41] for a in m.nat.apics] == [0, 1, 0]
    m.xapic_id_write(0, ("other", 1))
    assert m.nat.bus.renumbered and m.nat.apics[0].xapic_id == 1
    m.xapic_icr(2, 0x42, ("id", 1), True, 0, 0)  # asserts REENTER, compares with Python
    assert [a.irr[0x42] for a in m.nat.apics] == [1, 1, 0]
    m.xapic_icr(2, LOWEST << 8 | 0x43, ("id", 1), True, 0, 0)
    assert [a.irr[0x43] for a in m.nat.apics] == [0, 1, 0]  # _physical_target: index 1
    m.xapic_icr(2, 0x44, ("id", 0), True, 0, 0)
    assert m.nat.apics[2].stats["ipi_no_target"] == 1  # nobody has ID 0 now
    m.xapic_id_write(0, ("index",))
    m.xapic_icr(2, 0x45, ("id", 1), True, 0, 0)
    assert [a.irr[0x45] for a in m.nat.apics] == [0, 1, 0]


@pytest.mark.parametrize("x2", [True, False])
@pytest.mark.parametrize("dm", [SMI, 3, NMI, INIT, SIPI, 7])
def test_other_delivery_modes_are_handed_over(x2: bool, dm: int) -> None:
    """NMI, INIT, SIPI, SMI and the reserved modes: NONE, no trace, Python sends them."""
    m = _pair([0, 1], x2=x2)
    m.icr(0, dm << 8 | 0x41, ("id", 1), False, 0, True, 0, 0)  # asserts NONE


@pytest.mark.parametrize("vector", [0, 15])
def test_self_ipi_with_an_illegal_vector_is_handed_over(vector: int) -> None:
    m = _pair([0, 1])
    m.self_ipi(0, vector)  # asserts NONE
    assert m.nat.apics[0].esr_pending


def test_aliased_id_with_the_alias_in_x2apic_mode() -> None:
    """Mixed modes: an x2APIC-mode APIC matches by its x2APIC ID, not the xAPIC ID it
    had; a globally disabled APIC with the ID takes nothing."""
    m = _pair([0, 1, 2], x2=False)
    m.xapic_id_write(0, ("other", 2))
    m.apic_base(2, c.APIC_BASE_EN | c.APIC_BASE_EXTD, False)
    m.xapic_icr(1, 0x46, ("raw", 2), True, 0, 0)
    assert [a.irr[0x46] for a in m.nat.apics] == [1, 0, 1]
    m.apic_base(2, 0, False)
    m.xapic_icr(1, 0x47, ("raw", 2), True, 0, 0)
    assert [a.irr[0x47] for a in m.nat.apics] == [1, 0, 0]


def test_level_eoi_goes_to_python_and_reaches_the_ioapic() -> None:
    m = _pair([0, 1])
    m.accept_fixed(1, 0x50, True)
    m.loop_top(1, True, True, None)
    assert m.nat.apics[1].isr[0x50] and m.nat.apics[1].tmr[0x50]
    m.eoi(1, True, 0, 4)
    assert not m.nat.apics[1].isr[0x50]
    assert m.nat.apics[1].stats["eoi_level"] == 1


@pytest.mark.parametrize("if_flag", [True, False])
def test_hlt_with_smi_pending(if_flag: bool) -> None:
    """The allowed divergence: an SMI (dropped by kvmpy) pending at a HLT. The core
    re-enters (R_SLOW_EVENTS); Python halts, and its block check wakes at once unless
    IF=0 with a deliverable vector pending. Pinned so a change on either side shows."""
    m = _pair([0, 1])
    for side in (m.py, m.nat):
        side.apics[0].accept_smi()
        side.apics[0].accept_fixed(0x60, False)
    assert m.nat.core.fast_hlt(0, if_flag) == REENTER
    assert m.py.apics[0].halt_ends_at_once(if_flag) is if_flag


def test_fast_eoi_recomputes_ppr_with_the_tpr_low_nibble() -> None:
    """PPR = TPR (all 8 bits) when TPR[7:4] >= ISRV[7:4] (SDM 10.8.3.1): 0x38 in service,
    TPR raised to 0x3A, 0x45 taken and EOI'd by the core leaves PPR 0x3A, not 0x30."""
    for x2 in (True, False):
        m = _pair([0, 1], x2=x2)
        m.accept_fixed(0, 0x38, False)
        m.loop_top(0, True, True, None)
        assert m.nat.apics[0].isr[0x38]
        m.tpr_write(0, 0x3A)
        m.accept_fixed(0, 0x45, False)
        m.loop_top(0, True, True, None)
        assert m.nat.apics[0].isr[0x45]
        m.eoi(0, x2, 0, 4)
        assert m.nat.apics[0].ppr == m.py.apics[0].ppr == 0x3A


@pytest.mark.parametrize("x2", [True, False])
def test_physical_ipi_to_a_globally_disabled_apic_finds_no_target(x2: bool) -> None:
    """A globally disabled APIC is not on the bus (bus.py): no target, nothing rejected."""
    m = _pair([0, 1, 2], x2=x2)
    m.apic_base(1, 0, False)
    assert m.nat.apics[1].mode is ApicMode.DISABLED
    m.icr(0, 0x40, ("id", 1), False, 0, True, 0, 0)
    assert m.nat.apics[0].stats["ipi_no_target"] == 1
    assert "fixed_rejected_disabled" not in m.nat.apics[1].stats


def test_lowest_priority_tie_goes_to_the_lowest_index() -> None:
    """Equal PPRs and no focus processor: the first APIC of the destination set wins, on
    both sides (the default run's draws do not reach this tie after the TSC and alias
    rules joined; scripts/native_mutants.py lp_tie)."""
    m = _pair([0, 1, 2])
    m.x2apic_icr(0, c.ICR_DEST_LOGICAL | LOWEST << 8 | 0x48, ("logical", 0, 0b110), 0)
    assert [a.irr[0x48] for a in m.nat.apics] == [0, 1, 0]


def test_nonzero_x2apic_eoi_write_is_handed_over() -> None:
    """A nonzero write to the x2APIC EOI MSR #GPs (SDM 10.12.1.2): the core hands it to
    Python and the in-service vector stays (scripts/native_mutants.py eoi_nonzero)."""
    m = _pair([0, 1])
    m.accept_fixed(0, 0x50, False)
    m.loop_top(0, True, True, None)
    m.eoi(0, True, 5, 4)  # asserts NONE for a nonzero value
    assert m.nat.apics[0].isr[0x50] and m.nat.apics[0].stats["gp"] == 1


def test_xapic_cluster_logical_ipi_matches_the_cluster_id() -> None:
    """Cluster model (DFR 0x0FFFFFFF): MDA[7:4] must equal the LDR's cluster, and a member
    bit must match (SDM 10.6.2.2; scripts/native_mutants.py cluster)."""
    m = _pair([0, 1, 2], x2=False)
    for i, cluster in ((0, 0), (1, 1), (2, 2)):
        m.mmio_write(i, c.REG_DFR, 4, 0x0FFFFFFF)
        m.mmio_write(i, c.REG_LDR, 4, (cluster << 4 | 0b10) << 24)
    m.xapic_icr(0, c.ICR_DEST_LOGICAL | 0x49, ("raw", 0x12), True, 0, 0)  # asserts REENTER
    assert [a.irr[0x49] for a in m.nat.apics] == [0, 1, 0]
