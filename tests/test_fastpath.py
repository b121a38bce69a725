"""The exit fastpath (`handle_exit_irqoff`) and the slow dispatch (`handle_exit`), with a
fake vCPU around real local APICs: the `kvm_x2apic_icr_write_fast` contract (reserved
bits first, no side effect on failure, #GP from the slow path), every delivery mode and
destination form, SELF_IPI, the xAPIC ICR MMIO write, fastpath on vs off, the
`Fastpath` enum, and the rule that no vCPU-wide exit reason exists (DESIGN.md rules 1-6)."""

from __future__ import annotations

import ast
import inspect
import mmap
import textwrap

import pytest

from kvmpy import vcpu as vcpu_module
from kvmpy.apic import (
    APIC_DEFAULT_BASE,
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_SIPI,
    DM_SMI,
    ICR_DEST_LOGICAL,
    ICR_LEVEL_ASSERT,
    ICR_TRIGGER_LEVEL,
    MSR_TSC_DEADLINE,
    MSR_X2APIC_ICR,
    MSR_X2APIC_SELF_IPI,
    SH_ALL,
    SH_ALL_BUT,
    SH_NONE,
    SH_SELF,
    X2APIC_ICR_RESERVED,
)
from kvmpy.apic import constants as c
from kvmpy.apic.testing import ApicSystem, make_system
from kvmpy.exits import Fastpath, handle_exit, handle_exit_irqoff
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.kvm.run import RunView
from kvmpy.trace import ExitStats
from kvmpy.vcpu import Exit, Vcpu

V = 0x61
NCPUS = 4
MSR_X2APIC_ICR2 = 0x831
MSR_X2APIC_DFR = 0x80E
MSR_X2APIC_LVT_TIMER = 0x832
XAPIC_ICR = APIC_DEFAULT_BASE + 0x300
RESERVED_BITS = [13, 16, 17, *range(20, 32)]


# ---------------------------------------------------------------- fakes


class TrapLock:
    """A lock that fails the test if anyone enters it while `armed`."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = 0

    def _enter(self) -> None:
        if self.armed:
            pytest.fail("the fastpath took machine.exit_lock")
        self.entered += 1

    def acquire(self, *args: object) -> bool:
        self._enter()
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> TrapLock:
        self._enter()
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class RecordingBus:
    """A device bus that records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def write(self, addr: int, size: int, value: int) -> None:
        self.writes.append((addr, size, value))

    def read(self, addr: int, size: int) -> int:
        self.reads.append((addr, size))
        return 0


class FakeMachine:
    def __init__(self) -> None:
        self.exit_lock = TrapLock()
        self.pio_bus = RecordingBus()
        self.mmio_bus = RecordingBus()
        self.crashes: list[str] = []
        self.stops: list[tuple[int, str]] = []

    def guest_crash(self, vcpu: object, what: str) -> None:
        self.crashes.append(what)

    def stop(self, status: int, message: str) -> None:
        self.stops.append((status, message))


class FakeVcpu:
    """The attributes exits.py uses, around a real LocalApic and a real RunView."""

    def __init__(self, system: ApicSystem, index: int = 0, *, fastpath: bool = True) -> None:
        self.apic = system[index]
        self.index = index
        self.fastpath_enabled = fastpath
        self.mapping = mmap.mmap(-1, 4096)
        self.view = RunView(self.mapping)
        self.stats = ExitStats(False)
        self.machine = FakeMachine()
        self.timer_syncs = 0
        self.base_changes = 0
        self.halts = 0

    def sync_timer(self) -> None:
        self.timer_syncs += 1

    def after_apic_write(self) -> None:
        self.timer_syncs += 1

    def apic_base_changed(self) -> None:
        self.base_changes += 1

    def halt(self) -> None:
        self.halts += 1

    def wakeup_pending_at_hlt(self) -> bool:
        return self.apic.halt_ends_at_once(bool(self.view.u8[kr.IF_FLAG]))


def fast(vcpu: FakeVcpu, exit: Exit) -> Fastpath:
    """handle_exit_irqoff with the exit lock armed to fail, and its result type checked."""
    lock = vcpu.machine.exit_lock
    lock.armed = True
    try:
        result = handle_exit_irqoff(vcpu, exit)
    finally:
        lock.armed = False
    assert type(result) is Fastpath, f"fastpath returned {result!r}"
    return result


def run_exit(vcpu: FakeVcpu, exit: Exit) -> Fastpath:
    """What Vcpu.run_loop does with one exit: fastpath, then the slow path if needed."""
    fp = fast(vcpu, exit)
    if fp is not Fastpath.REENTER_GUEST:
        with vcpu.machine.exit_lock:
            handle_exit(vcpu, exit, fp)
    return fp


def wrmsr(index: int, value: int) -> Exit:
    return Exit((k.KVM_EXIT_X86_WRMSR, index, value, 0))


def mmio_write(vcpu: FakeVcpu, addr: int, size: int, value: int) -> Exit:
    vcpu.view.u8[kr.MMIO_DATA : kr.MMIO_DATA + 8] = value.to_bytes(8, "little")
    return Exit((k.KVM_EXIT_MMIO, addr, size, 1))


def icr(dm: int = DM_FIXED, vector: int = V, sh: int = SH_NONE, *, dest: int = 0,
        logical: bool = False, extra: int = 0) -> int:
    return (dest << 32) | vector | (dm << 8) | (sh << 18) | (ICR_DEST_LOGICAL if logical else 0) \
        | extra


def snapshot(system: ApicSystem) -> list[tuple]:
    """Everything a delivery can change in each APIC."""
    return [
        (bytes(a.irr), a.nmi_pending, a.init_pending, a.sipi_pending, a.sipi_vector,
         a.smi_pending)
        for a in system.apics
    ]


def expected(system: ApicSystem, events: dict[int, tuple[str, int]]) -> list[tuple]:
    """`snapshot` of `system` after delivering `events` ({index: (kind, vector)})."""
    out = []
    for i, (irr, nmi, init, sipi, sipi_vector, smi) in enumerate(snapshot(system)):
        irr = bytearray(irr)
        kind, vector = events.get(i, ("", 0))
        if kind == "fixed":
            irr[vector] = 1
        nmi = nmi or kind == "nmi"
        init = init or kind == "init"
        smi = smi or kind == "smi"
        if kind == "sipi":
            sipi, sipi_vector = True, vector
        out.append((bytes(irr), nmi, init, sipi, sipi_vector, smi))
    return out


def each(indices: object, kind: str, vector: int = V) -> dict[int, tuple[str, int]]:
    return {i: (kind, vector) for i in indices}  # type: ignore[attr-defined]


# The x2APIC ICR writes of APIC 0 to APICs 0-3 (x2APIC IDs 0-3, all in logical cluster 0
# with logical bits 1 << ID), and where each must land.
ALL, OTHERS = range(NCPUS), range(1, NCPUS)
ICR_CASES = [
    ("fixed physical", icr(dest=1), each([1], "fixed")),
    ("fixed physical to self", icr(dest=0), each([0], "fixed")),
    ("fixed, level assert (delivered edge)",
     icr(dest=3, extra=ICR_TRIGGER_LEVEL | ICR_LEVEL_ASSERT), each([3], "fixed")),
    ("fixed, delivery-status bit 12 set", icr(dest=2, extra=1 << 12), each([2], "fixed")),
    ("lowest physical", icr(DM_LOWEST, dest=2), each([2], "fixed")),
    ("NMI physical", icr(DM_NMI, 0, dest=1), each([1], "nmi", 0)),
    ("INIT physical", icr(DM_INIT, 0, dest=2, extra=ICR_LEVEL_ASSERT), each([2], "init", 0)),
    ("SIPI physical", icr(DM_SIPI, 0x9A, dest=3), each([3], "sipi", 0x9A)),
    ("SMI physical", icr(DM_SMI, 0, dest=1), each([1], "smi", 0)),
    ("fixed logical", icr(dest=0b1010, logical=True), each([1, 3], "fixed")),
    ("lowest logical (PPR tie: lowest index)", icr(DM_LOWEST, dest=0b1100, logical=True),
     each([2], "fixed")),
    ("NMI logical", icr(DM_NMI, 0, dest=0b0110, logical=True), each([1, 2], "nmi", 0)),
    ("INIT logical", icr(DM_INIT, 0, dest=0b1000, logical=True, extra=ICR_LEVEL_ASSERT),
     each([3], "init", 0)),
    ("SIPI logical", icr(DM_SIPI, 0x12, dest=0b0010, logical=True), each([1], "sipi", 0x12)),
    ("SMI logical", icr(DM_SMI, 0, dest=0b1001, logical=True), each([0, 3], "smi", 0)),
    ("logical, empty cluster", icr(dest=(1 << 16) | 1, logical=True), {}),
    ("physical, no such APIC", icr(dest=7), {}),
    ("shorthand self", icr(sh=SH_SELF, dest=3), each([0], "fixed")),
    ("shorthand all", icr(sh=SH_ALL), each(ALL, "fixed")),
    ("shorthand all-but", icr(sh=SH_ALL_BUT), each(OTHERS, "fixed")),
    ("shorthand all-but, lowest", icr(DM_LOWEST, sh=SH_ALL_BUT), each([1], "fixed")),
    ("shorthand all-but, NMI", icr(DM_NMI, 0, sh=SH_ALL_BUT), each(OTHERS, "nmi", 0)),
    ("shorthand all-but, INIT", icr(DM_INIT, 0, sh=SH_ALL_BUT, extra=ICR_LEVEL_ASSERT),
     each(OTHERS, "init", 0)),
    ("shorthand all-but, SIPI", icr(DM_SIPI, 0x10, sh=SH_ALL_BUT), each(OTHERS, "sipi", 0x10)),
    ("shorthand all, SMI", icr(DM_SMI, 0, sh=SH_ALL), each(ALL, "smi", 0)),
    ("broadcast physical", icr(dest=0xFFFF_FFFF), each(ALL, "fixed")),
    ("broadcast logical", icr(dest=0xFFFF_FFFF, logical=True), each(ALL, "fixed")),
    ("broadcast NMI", icr(DM_NMI, 0, dest=0xFFFF_FFFF), each(ALL, "nmi", 0)),
    ("broadcast lowest (PPR tie: lowest index)", icr(DM_LOWEST, dest=0xFFFF_FFFF),
     each([0], "fixed")),
]
CASE_IDS = [name for name, _, _ in ICR_CASES]
VALID_ICRS = [value for _, value, _ in ICR_CASES]


def x2apic_vcpu(*, fastpath: bool = True) -> tuple[ApicSystem, FakeVcpu]:
    system = make_system(NCPUS, x2apic=True)
    return system, FakeVcpu(system, 0, fastpath=fastpath)


# ---------------------------------------------------------------- x2APIC ICR, valid writes


@pytest.mark.parametrize(("name", "value", "events"), ICR_CASES, ids=CASE_IDS)
def test_valid_x2apic_icr_write_is_handled_on_the_fastpath(name, value, events):
    system, vcpu = x2apic_vcpu()
    want = expected(system, events)
    assert fast(vcpu, wrmsr(MSR_X2APIC_ICR, value)) is Fastpath.REENTER_GUEST
    assert snapshot(system) == want
    assert sorted(set(system.notified)) == sorted(events)
    assert system[0].rdmsr(MSR_X2APIC_ICR) == value & ~(1 << 12)
    assert vcpu.view.u8[kr.MSR_ERROR] == 0
    assert vcpu.machine.exit_lock.entered == 0


@pytest.mark.parametrize("value", VALID_ICRS, ids=CASE_IDS)
def test_fastpath_off_delivers_the_same_ipi_on_the_slow_path(value):
    fast_sys, fast_vcpu = x2apic_vcpu(fastpath=True)
    slow_sys, slow_vcpu = x2apic_vcpu(fastpath=False)
    exit = wrmsr(MSR_X2APIC_ICR, value)
    assert run_exit(fast_vcpu, exit) is Fastpath.REENTER_GUEST
    assert run_exit(slow_vcpu, exit) is Fastpath.NONE
    assert slow_vcpu.machine.exit_lock.entered == 1  # the slow path ran under the lock
    assert snapshot(slow_sys) == snapshot(fast_sys)
    assert slow_sys.notified == fast_sys.notified
    assert slow_sys[0].rdmsr(MSR_X2APIC_ICR) == fast_sys[0].rdmsr(MSR_X2APIC_ICR)
    assert slow_vcpu.view.u8[kr.MSR_ERROR] == 0


# ---------------------------------------------------------------- reserved bits: #GP


@pytest.mark.parametrize("bit", RESERVED_BITS)
@pytest.mark.parametrize("base", [icr(dest=1), icr(DM_NMI, 0, sh=SH_ALL_BUT),
                                  icr(dest=0xFFFF_FFFF), icr(DM_SIPI, 0x20, dest=2)],
                         ids=["fixed", "nmi-all-but", "broadcast", "sipi"])
def test_reserved_icr_bit_falls_back_with_no_side_effect_then_gp(bit, base):
    assert X2APIC_ICR_RESERVED & (1 << bit)
    system, vcpu = x2apic_vcpu()
    previous = icr(dest=2, vector=0x77)
    system[0].wrmsr(MSR_X2APIC_ICR, previous)
    system.notified.clear()
    before, stats_before = snapshot(system), [a.stats for a in system.apics]

    exit = wrmsr(MSR_X2APIC_ICR, base | (1 << bit))
    assert fast(vcpu, exit) is Fastpath.NONE
    assert snapshot(system) == before
    assert [a.stats for a in system.apics] == stats_before
    assert system.notified == []
    assert system[0].rdmsr(MSR_X2APIC_ICR) == previous
    assert vcpu.view.u8[kr.MSR_ERROR] == 0

    handle_exit(vcpu, exit, Fastpath.NONE)
    assert vcpu.view.u8[kr.MSR_ERROR] == 1
    assert snapshot(system) == before
    assert system.notified == []
    assert system[0].rdmsr(MSR_X2APIC_ICR) == previous


def test_icr_write_outside_x2apic_mode_is_gp():
    system = make_system(2, x2apic=False)
    vcpu = FakeVcpu(system, 0)
    exit = wrmsr(MSR_X2APIC_ICR, icr(dest=1))
    assert fast(vcpu, exit) is Fastpath.NONE
    handle_exit(vcpu, exit, Fastpath.NONE)
    assert vcpu.view.u8[kr.MSR_ERROR] == 1
    assert not system[1].irr[V] and system.notified == []


@pytest.mark.parametrize("msr", [MSR_X2APIC_ICR2, MSR_X2APIC_DFR], ids=["ICR2", "DFR"])
@pytest.mark.parametrize("value", [0, 1, 0xFFFF_FFFF])
def test_icr2_and_dfr_writes_gp_on_the_slow_path(msr, value):
    system, vcpu = x2apic_vcpu()
    before = snapshot(system)
    exit = wrmsr(msr, value)
    assert fast(vcpu, exit) is Fastpath.NONE
    handle_exit(vcpu, exit, Fastpath.NONE)
    assert vcpu.view.u8[kr.MSR_ERROR] == 1
    assert snapshot(system) == before and system.notified == []


# ---------------------------------------------------------------- SELF_IPI, TSC deadline


@pytest.mark.parametrize("vector", [0x20, V, 0xFF])
def test_self_ipi_on_the_fastpath(vector):
    system, vcpu = x2apic_vcpu()
    want = expected(system, {0: ("fixed", vector)})
    assert fast(vcpu, wrmsr(MSR_X2APIC_SELF_IPI, vector)) is Fastpath.REENTER_GUEST
    assert snapshot(system) == want
    assert system.notified == [0]


@pytest.mark.parametrize("value", [0x100, 1 << 31, (1 << 32) | V])
def test_self_ipi_reserved_bits_fall_back_and_gp(value):
    system, vcpu = x2apic_vcpu()
    before = snapshot(system)
    exit = wrmsr(MSR_X2APIC_SELF_IPI, value)
    assert fast(vcpu, exit) is Fastpath.NONE
    assert snapshot(system) == before and system.notified == []
    handle_exit(vcpu, exit, Fastpath.NONE)
    assert vcpu.view.u8[kr.MSR_ERROR] == 1
    assert snapshot(system) == before and system.notified == []


def test_tsc_deadline_write_on_the_fastpath_arms_the_timer():
    system, vcpu = x2apic_vcpu()
    system[0].wrmsr(MSR_X2APIC_LVT_TIMER, c.TIMER_TSC_DEADLINE << c.LVT_TIMER_MODE_SHIFT | 0xEC)
    deadline = system.clock.tsc() + 1_000_000
    assert fast(vcpu, wrmsr(MSR_TSC_DEADLINE, deadline)) is Fastpath.REENTER_GUEST
    assert system[0].rdmsr(MSR_TSC_DEADLINE) == deadline
    assert vcpu.timer_syncs == 1


@pytest.mark.parametrize("msr, value, read_back", [
    (0x838, 123_456, 123_456),  # initial count: starts the count-down
    (0x83E, 0xB, 0xB),  # divide configuration: divide by 1
    (0x832, 1 << 17 | 0x40, 1 << 17 | 0x40),  # LVT timer: periodic, vector 0x40
])
def test_timer_register_writes_take_the_fastpath(msr: int, value: int, read_back: int):
    system, vcpu = x2apic_vcpu()
    assert fast(vcpu, wrmsr(msr, value)) is Fastpath.REENTER_GUEST
    assert system[0].rdmsr(msr) == read_back
    assert vcpu.timer_syncs == 1


@pytest.mark.parametrize("msr, value", [
    (0x838, 1 << 32),  # upper half of a 32-bit register is reserved
    (0x832, 1 << 14),  # remote IRR: reserved outside LINT0/1
    (0x83E, 1 << 4),  # divide configuration bit 4 is reserved
])
def test_timer_register_write_that_would_gp_falls_back_with_no_side_effect(msr: int,
                                                                            value: int):
    system, vcpu = x2apic_vcpu()
    before = system[0].rdmsr(msr)
    assert fast(vcpu, wrmsr(msr, value)) is Fastpath.NONE
    assert system[0].rdmsr(msr) == before and vcpu.timer_syncs == 0


# ---------------------------------------------------------------- xAPIC ICR MMIO write


def xapic_vcpu(*, fastpath: bool = True) -> tuple[ApicSystem, FakeVcpu]:
    system = make_system(NCPUS, x2apic=False)
    vcpu = FakeVcpu(system, 0, fastpath=fastpath)
    system[0].mmio_write(c.REG_ICR_HIGH, 4, 2 << 24)  # destination: xAPIC ID 2
    return system, vcpu


@pytest.mark.parametrize("low", [V, DM_NMI << 8, (DM_FIXED << 8) | V | (SH_ALL_BUT << 18)],
                         ids=["fixed", "nmi", "all-but"])
def test_xapic_icr_mmio_write_takes_the_fastpath_in_xapic_mode(low):
    fast_sys, vcpu = xapic_vcpu()
    slow_sys, slow_vcpu = xapic_vcpu(fastpath=False)
    assert fast(vcpu, mmio_write(vcpu, XAPIC_ICR, 4, low)) is Fastpath.REENTER_GUEST
    assert fast_sys.notified, "the IPI went nowhere"
    assert run_exit(slow_vcpu, mmio_write(slow_vcpu, XAPIC_ICR, 4, low)) is Fastpath.NONE
    assert snapshot(slow_sys) == snapshot(fast_sys)
    assert slow_sys.notified == fast_sys.notified
    assert vcpu.machine.mmio_bus.writes == [] == slow_vcpu.machine.mmio_bus.writes


def test_xapic_icr_mmio_write_sends_to_icr_high_destination():
    system, vcpu = xapic_vcpu()
    want = expected(system, {2: ("fixed", V)})
    assert fast(vcpu, mmio_write(vcpu, XAPIC_ICR, 4, V)) is Fastpath.REENTER_GUEST
    assert snapshot(system) == want
    assert system.notified == [2]


def test_xapic_icr_mmio_write_is_not_fast_in_x2apic_mode():
    system, vcpu = x2apic_vcpu()
    before = snapshot(system)
    exit = mmio_write(vcpu, XAPIC_ICR, 4, V | (SH_ALL << 18))
    assert fast(vcpu, exit) is Fastpath.NONE
    assert snapshot(system) == before and system.notified == []
    handle_exit(vcpu, exit, Fastpath.NONE)
    # x2APIC mode: the xAPIC page is not decoded, the write goes to the MMIO bus.
    assert vcpu.machine.mmio_bus.writes == [(XAPIC_ICR, 4, V | (SH_ALL << 18))]
    assert snapshot(system) == before and system.notified == []


@pytest.mark.parametrize(("addr", "size", "is_write"), [
    (XAPIC_ICR, 4, 0),  # a read
    (XAPIC_ICR, 2, 1),  # not a 32-bit access
    (XAPIC_ICR + 0x10, 4, 1),  # ICR high
    (XAPIC_ICR + 0x1000, 4, 1),  # outside the APIC page
])
def test_other_mmio_exits_are_not_fast(addr, size, is_write):
    system, vcpu = xapic_vcpu()
    vcpu.view.u8[kr.MMIO_DATA : kr.MMIO_DATA + 4] = V.to_bytes(4, "little")
    assert fast(vcpu, Exit((k.KVM_EXIT_MMIO, addr, size, is_write))) is Fastpath.NONE
    assert system.notified == []


@pytest.mark.parametrize("exit", [
    wrmsr(MSR_X2APIC_ICR, icr(dest=1)),
    wrmsr(MSR_X2APIC_SELF_IPI, V),
    Exit((k.KVM_EXIT_MMIO, XAPIC_ICR, 4, 1)),
], ids=["x2apic-icr", "self-ipi", "xapic-icr"])
def test_fastpath_disabled_handles_nothing(exit):
    for x2apic in (True, False):
        system = make_system(2, x2apic=x2apic)
        vcpu = FakeVcpu(system, 0, fastpath=False)
        vcpu.view.u8[kr.MMIO_DATA : kr.MMIO_DATA + 4] = V.to_bytes(4, "little")
        assert fast(vcpu, exit) is Fastpath.NONE
        assert system.notified == []


# ---------------------------------------------------------------- the Fastpath contract


def test_fastpath_enum_is_exactly_upstreams_fastpath_t():
    assert set(Fastpath.__members__) == {"NONE", "REENTER_GUEST", "EXIT_HANDLED"}
    assert not issubclass(Fastpath, int), "a Fastpath must not be usable as an int"


OTHER_EXITS = [
    Exit((k.KVM_EXIT_HLT, 0, 0, 0)),
    Exit((k.KVM_EXIT_IO, 0x3F8, 1, k.KVM_EXIT_IO_OUT)),
    Exit((k.KVM_EXIT_IRQ_WINDOW_OPEN, 0, 0, 0)),
    Exit((k.KVM_EXIT_INTR, 0, 0, 0)),
    Exit((k.KVM_EXIT_SHUTDOWN, 0, 0, 0)),
    Exit((k.KVM_EXIT_X86_RDMSR, MSR_X2APIC_ICR, 0, 0)),
    wrmsr(0x80B, 0),  # EOI: slow path
    wrmsr(0x1B, APIC_DEFAULT_BASE | c.APIC_BASE_EN | c.APIC_BASE_EXTD),
    wrmsr(0xC000_0080, 0),  # not an APIC MSR
    wrmsr(MSR_X2APIC_ICR, icr(dest=1, extra=1 << 13)),
    *(wrmsr(MSR_X2APIC_ICR, value) for value in VALID_ICRS),
]


@pytest.mark.parametrize("fastpath", [True, False])
@pytest.mark.parametrize("exit", OTHER_EXITS, ids=repr)
def test_fastpath_always_returns_a_fastpath_member(exit, fastpath):
    system, vcpu = x2apic_vcpu(fastpath=fastpath)
    result = fast(vcpu, exit)  # checks type(result) is Fastpath and the lock
    assert not isinstance(result, (int, bool))


def test_kick_exit_reenters_and_the_loop_top_picks_up_the_request():
    system, vcpu = x2apic_vcpu()
    assert fast(vcpu, Exit((k.KVM_EXIT_INTR, 0, 0, 0))) is Fastpath.REENTER_GUEST


@pytest.mark.parametrize("fp", [Fastpath.REENTER_GUEST, Fastpath.EXIT_HANDLED])
def test_handle_exit_does_not_dispatch_what_the_fastpath_handled(fp):
    system, vcpu = x2apic_vcpu()
    handle_exit(vcpu, Exit((k.KVM_EXIT_HLT, 0, 0, 0)), fp)
    handle_exit(vcpu, wrmsr(MSR_X2APIC_ICR2, 0), fp)
    assert vcpu.halts == 0 and vcpu.view.u8[kr.MSR_ERROR] == 0
    handle_exit(vcpu, Exit((k.KVM_EXIT_HLT, 0, 0, 0)), Fastpath.NONE)
    assert vcpu.halts == 1


# ---------------------------------------------------------------- no vCPU-wide exit reason


def _vcpu_attribute_names() -> set[str]:
    """Every attribute the Vcpu class defines or assigns to `self` anywhere in it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Vcpu)))
    names = set(vars(Vcpu))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr":
            pytest.fail("Vcpu sets attributes dynamically: check them by hand")
    return names


def test_vcpu_keeps_no_exit_reason():
    names = _vcpu_attribute_names()
    assert "mode" in names and "setting" in names  # the scan does see attributes
    suspicious = {n for n in names if "exit" in n.lower() or "reason" in n.lower()}
    assert suspicious == set()


def test_the_native_vcpu_keeps_no_exit_reason():
    """The core's struct vcpu has no exit field: run() fills a `struct exit` on the
    caller's stack (kvmpy/native/core.h)."""
    import re
    from pathlib import Path

    header = (Path(vcpu_module.__file__).parent / "native" / "core.h").read_text()
    body = re.search(r"struct vcpu \{(.*?)\n\};", header, re.S)
    assert body is not None and "int index;" in body.group(1)
    fields = re.findall(r"\b(\w+)(?:\[\w+\])?;", body.group(1))
    assert "mode" in fields and "request" in fields
    assert [f for f in fields if "exit" in f or "reason" in f] == []


class _FakeCore:
    """The core's run(): one exit, as vcpu_enter_guest hands it back."""

    def __init__(self, result: tuple) -> None:
        self.result = result
        self.timer_expired: list[bool] = []

    def run(self, index: int, timer_expired: bool = False) -> tuple:
        self.timer_expired.append(timer_expired)
        return self.result


def test_vcpu_run_returns_the_exit_and_stores_nothing():
    system = make_system(1, x2apic=True)
    fd = type("Fd", (), {"view": None, "fd": -1})()
    vcpu = Vcpu(FakeMachine(), 0, fd, system[0], fastpath=True,  # type: ignore[arg-type]
                stats=ExitStats(False))
    vcpu.core = _FakeCore((0, k.KVM_EXIT_X86_WRMSR, MSR_X2APIC_ICR, icr(dest=0), 0, 0, 123))
    before = dict(vars(vcpu))
    exit, fp, t_exit = vcpu.run()
    assert exit == (k.KVM_EXIT_X86_WRMSR, MSR_X2APIC_ICR, icr(dest=0), 0)
    assert isinstance(exit, tuple) and fp is Fastpath.NONE and t_exit == 123
    assert dict(vars(vcpu)) == before, "run() stored something on the vCPU"
    vcpu.core = _FakeCore((1, 0, 0, 0, 0, 0, 0))  # RET_EVENTS: nothing for Python's dispatch
    assert vcpu.run() is None


def test_vcpu_run_tells_the_core_when_python_expired_the_timer():
    """Only a timer Python expired since the last call may wait for one entry in the
    core (vcpu_enter_guest's storm guard); any other due timer comes back at once."""
    system = make_system(1, x2apic=True)
    apic = system[0]
    fd = type("Fd", (), {"view": None, "fd": -1})()
    vcpu = Vcpu(FakeMachine(), 0, fd, apic, fastpath=True,  # type: ignore[arg-type]
                stats=ExitStats(False))
    vcpu.core = core = _FakeCore((1, 0, 0, 0, 0, 0, 0))
    apic.wrmsr(c.X2APIC_MSR_FIRST + (c.REG_LVT_TIMER >> 4), 0x60 | 1 << 17)  # periodic
    apic.wrmsr(c.X2APIC_MSR_FIRST + (c.REG_TIMER_DIVIDE >> 4), 0xB)  # by 1: 1 ns a count
    apic.wrmsr(c.X2APIC_MSR_FIRST + (c.REG_TIMER_INITIAL >> 4), 1000)
    vcpu.run()
    assert apic.timer_expired(system.clock.advance(1000))
    vcpu.run()
    vcpu.run()
    assert apic.timer_expired(system.clock.advance(5000))  # and its missed periods
    assert not apic.timer_expired(system.clock.now)
    vcpu.run()
    assert core.timer_expired == [False, True, False, True]


# ---------------------------------------------------------------- EOI and HLT fastpaths


def _in_service(apic, vector: int, *, level: bool = False) -> None:
    """Make ``vector`` pending, then accepted by the CPU (IRR -> ISR)."""
    assert apic.accept_fixed(vector, level)
    assert apic.pending_vector() == vector
    apic.ack(vector)


def test_x2apic_eoi_of_an_edge_vector_completes_on_the_fastpath():
    system, vcpu = x2apic_vcpu()
    apic = system[0]
    _in_service(apic, 0x50)
    _in_service(apic, 0x60)  # nested: EOI clears the highest ISR bit first
    assert apic.ppr == 0x60
    assert fast(vcpu, wrmsr(0x80B, 0)) is Fastpath.REENTER_GUEST
    assert not apic.isr[0x60] and apic.isr[0x50] and apic.ppr == 0x50
    assert run_exit(vcpu, wrmsr(0x80B, 0)) is Fastpath.REENTER_GUEST
    assert apic.isr.rfind(1) < 0 and apic.ppr == 0


def test_x2apic_eoi_that_would_gp_or_is_level_goes_to_the_slow_path_untouched():
    system, vcpu = x2apic_vcpu()
    apic = system[0]
    _in_service(apic, 0x50)
    assert fast(vcpu, wrmsr(0x80B, 1)) is Fastpath.NONE  # nonzero EOI: #GP
    assert apic.isr[0x50]
    run_exit(vcpu, wrmsr(0x80B, 1))
    assert vcpu.view.u8[kr.MSR_ERROR] == 1 and apic.isr[0x50]
    levels: list[int] = []
    apic.on_level_eoi = levels.append
    _in_service(apic, 0x70, level=True)
    assert fast(vcpu, wrmsr(0x80B, 0)) is Fastpath.NONE  # TMR set: broadcast on the slow path
    assert apic.isr[0x70] and levels == []
    assert run_exit(vcpu, wrmsr(0x80B, 0)) is Fastpath.NONE
    assert not apic.isr[0x70] and levels == [0x70]


def test_eoi_with_nothing_in_service_and_with_the_fastpath_off_is_not_fast():
    system, vcpu = x2apic_vcpu()
    assert fast(vcpu, wrmsr(0x80B, 0)) is Fastpath.NONE
    system, vcpu = x2apic_vcpu(fastpath=False)
    _in_service(system[0], 0x50)
    assert fast(vcpu, wrmsr(0x80B, 0)) is Fastpath.NONE and system[0].isr[0x50]


def test_xapic_mmio_eoi_completes_on_the_fastpath():
    system, vcpu = xapic_vcpu()
    apic = system[0]
    _in_service(apic, 0x41)
    exit = mmio_write(vcpu, c.APIC_DEFAULT_BASE + 0xB0, 4, 0)
    assert fast(vcpu, exit) is Fastpath.REENTER_GUEST
    assert not apic.isr[0x41]
    _in_service(apic, 0x41)
    narrow = mmio_write(vcpu, c.APIC_DEFAULT_BASE + 0xB0, 2, 0)  # not a 32-bit access
    assert fast(vcpu, narrow) is Fastpath.NONE and apic.isr[0x41]


HLT = Exit((k.KVM_EXIT_HLT, 0, 0, 0))


@pytest.mark.parametrize(("if_flag", "event", "expected"), [
    (1, "irq", Fastpath.REENTER_GUEST),
    (0, "irq", Fastpath.EXIT_HANDLED),  # cli; hlt: a maskable interrupt does not end it
    (0, "nmi", Fastpath.REENTER_GUEST),
    (1, None, Fastpath.EXIT_HANDLED),
])
def test_hlt_fastpath_reenters_only_when_the_halt_is_already_over(if_flag, event, expected):
    system, vcpu = x2apic_vcpu()
    apic = system[0]
    vcpu.view.u8[kr.IF_FLAG] = if_flag
    if event == "irq":
        apic.accept_fixed(0x40, False)
    elif event == "nmi":
        apic.accept_nmi()
    assert run_exit(vcpu, HLT) is expected
    assert vcpu.halts == (expected is Fastpath.EXIT_HANDLED)
    assert apic.irr[0x40] == (event == "irq")  # the fastpath injects nothing itself


def test_hlt_with_the_fastpath_off_halts_through_the_dispatch():
    system, vcpu = x2apic_vcpu(fastpath=False)
    vcpu.view.u8[kr.IF_FLAG] = 1
    system[0].accept_fixed(0x40, False)
    assert fast(vcpu, HLT) is Fastpath.NONE
    assert run_exit(vcpu, HLT) is Fastpath.NONE and vcpu.halts == 1


def test_an_nmi_dropped_by_init_does_not_end_a_later_halt():
    system, vcpu = x2apic_vcpu()
    apic = system[0]
    apic.accept_nmi()
    apic.accept_init()
    assert apic.take_init()  # INIT drops the pending NMI (SDM 10.4.7.3)
    vcpu.view.u8[kr.IF_FLAG] = 0
    assert not apic.halt_ends_at_once(False)
    assert run_exit(vcpu, HLT) is Fastpath.EXIT_HANDLED and vcpu.halts == 1
