"""Property tests of the I/O APIC model: a hostile guest and hostile devices at random.

A hypothesis ``RuleBasedStateMachine`` pokes the MMIO window at any offset of the 4 KiB
region with any size and value (IOREGSEL, IOWIN, the EOI register, holes), writes
redirection entries with every field random (vectors below 16, every delivery mode,
reserved bits, out-of-range indexes), drives the 24 pins and some that do not exist,
broadcasts EOIs, makes the bus accept 0, 1 or 2 times, and runs the storm deferral
with a low limit so storms happen. Beside the model runs a shadow written from the
82093AA datasheet and the choices in ioapic.py's docstring, not from the model: every
read value and every message sent to the bus is predicted. After every step the model
must agree with the shadow and pass ``check_ioapic_invariants``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmpy.apic.invariants import check_ioapic_invariants
from kvmpy.apic.ioapic import IoApic

PINS = 24
STORM = 3  # successive re-deliveries before the deferral (10000 in the VMM)
MASKED, REMOTE, LEVEL, LOGICAL, DS = 1 << 16, 1 << 14, 1 << 15, 1 << 11, 1 << 12
FIXED, LOWEST, SMI, NMI, INIT = 0, 1, 2, 4, 5


@dataclass
class FakeBus:
    """What the I/O APIC needs of ApicBus: EOI listeners and deliver_irq."""

    accept: int = 1
    sent: list[tuple[int, int, int, bool, bool]] = field(default_factory=list)
    eoi_listeners: list = field(default_factory=list)

    def deliver_irq(self, vector: int, dm: int, dest: int, logical: bool, level: bool) -> int:
        self.sent.append((vector, dm, dest, logical, level))
        return self.accept


class Shadow:
    """The datasheet's I/O APIC with kvmpy's documented choices."""

    def __init__(self) -> None:
        self.sel = 0
        self.id = 0
        self.rte = [MASKED] * PINS
        self.lines = [False] * PINS
        self.successive = [0] * PINS
        self.deferred: set[int] = set()
        self.defer_armed = False
        self.sent: list[tuple[int, int, int, bool, bool]] = []
        self.defer_calls = 0

    @staticmethod
    def vectored(e: int) -> bool:
        return (e >> 8) & 7 in (FIXED, LOWEST)

    def level_semantics(self, e: int) -> bool:
        return bool(e & LEVEL) and self.vectored(e)

    def service(self, pin: int, accept: int) -> None:
        e = self.rte[pin]
        if e & MASKED:
            return
        level = self.level_semantics(e)
        if level and e & REMOTE:
            return
        dm = (e >> 8) & 7
        if dm not in (FIXED, LOWEST, SMI, NMI, INIT):
            return
        self.sent.append((e & 0xFF, dm, e >> 56, bool(e & LOGICAL), level))
        if level and accept:
            self.rte[pin] = e | REMOTE

    def read_index(self, index: int) -> int:
        if index in (0, 2):
            return self.id << 24
        if index == 1:
            return 0x00170020
        if 0x10 <= index < 0x10 + 2 * PINS:
            e = self.rte[(index - 0x10) >> 1]
            return e >> 32 if index & 1 else e & 0xFFFFFFFF
        return 0

    def write_index(self, index: int, value: int, accept: int) -> None:
        if index == 0:
            self.id = (value >> 24) & 0xF
            return
        if not 0x10 <= index < 0x10 + 2 * PINS:
            return
        pin = (index - 0x10) >> 1
        old = self.rte[pin]
        new = (old & 0xFFFFFFFF) | value << 32 if index & 1 else (old >> 32) << 32 | value
        new = new & ~(DS | REMOTE) | (old & REMOTE)
        if not new & LEVEL:
            new &= ~REMOTE
        self.rte[pin] = new
        self.successive[pin] = 0
        if self.level_semantics(new) and self.lines[pin]:
            self.service(pin, accept)

    def set_irq(self, pin: int, level: bool, accept: int) -> None:
        if not 0 <= pin < PINS:
            return
        if not level:
            self.lines[pin] = False
            self.successive[pin] = 0
            return
        was = self.lines[pin]
        self.lines[pin] = True
        if not self.level_semantics(self.rte[pin]) and was:
            return
        self.service(pin, accept)

    def eoi(self, vector: int, accept: int) -> None:
        for pin in range(PINS):
            e = self.rte[pin]
            if e & 0xFF != vector or not e & LEVEL or not e & REMOTE:
                continue
            self.rte[pin] = e & ~REMOTE
            if e & MASKED or not self.lines[pin]:
                self.successive[pin] = 0
                continue
            self.successive[pin] += 1
            if self.successive[pin] >= STORM:
                self.successive[pin] = 0
                self.deferred.add(pin)
                if not self.defer_armed:
                    self.defer_armed = True
                    self.defer_calls += 1
            else:
                self.service(pin, accept)

    def service_deferred(self, accept: int) -> None:
        pins, self.deferred = self.deferred, set()
        self.defer_armed = False
        for pin in sorted(pins):
            if self.lines[pin]:
                self.service(pin, accept)

    def mmio_read(self, offset: int, size: int) -> int:
        off = offset & 0xFF
        if off == 0:
            return self.sel
        if off == 0x10 and size == 4:
            return self.read_index(self.sel)
        return 0

    def mmio_write(self, offset: int, size: int, value: int, accept: int) -> None:
        off = offset & 0xFF
        if off == 0:
            self.sel = value & 0xFF
        elif off == 0x10 and size == 4:
            self.write_index(self.sel, value & 0xFFFFFFFF, accept)
        elif off == 0x40 and size == 4:
            self.eoi(value & 0xFF, accept)


SIZES = st.sampled_from([1, 2, 4, 8])
# Offsets: the registers, their aliases, holes, anywhere in the 4 KiB region.
OFFSETS = st.one_of(
    st.sampled_from([0x00, 0x10, 0x40, 0x100, 0x110, 0x140, 0xF10, 0x04, 0x20, 0x3C]),
    st.integers(0, 0xFFF),
)
INDEXES = st.one_of(
    st.integers(0, 2),
    st.integers(0x10, 0x10 + 2 * PINS - 1),
    st.integers(0, 0xFF),
)
VECTORS = st.one_of(st.integers(0x20, 0x2F), st.integers(0, 0xFF))
PINS_ANY = st.one_of(st.integers(0, 3), st.integers(-2, PINS + 2))
FEW_PINS = st.integers(0, 3)
DMS = st.one_of(st.sampled_from([FIXED, LOWEST]), st.integers(0, 7))
MASK = st.sampled_from([False, False, True])


class IoApicMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bus = FakeBus()
        self.defer_calls: list[int] = []
        self.io = IoApic(self.bus, defer=self.defer_calls.append, storm_limit=STORM)
        self.sh = Shadow()

    # ---- the guest -------------------------------------------------------------
    @rule(offset=OFFSETS, size=SIZES, value=st.integers(0, (1 << 64) - 1))
    def mmio_write(self, offset: int, size: int, value: int) -> None:
        value &= (1 << (8 * size)) - 1
        self.io.write(offset, size, value)
        self.sh.mmio_write(offset, size, value, self.bus.accept)

    @rule(offset=OFFSETS, size=SIZES)
    def mmio_read(self, offset: int, size: int) -> None:
        assert self.io.read(offset, size) == self.sh.mmio_read(offset, size), (offset, size)

    @rule(index=INDEXES, value=st.integers(0, 0xFFFFFFFF))
    def reg_write(self, index: int, value: int) -> None:
        self.mmio_write(0, 4, index)
        self.mmio_write(0x10, 4, value)

    @rule(pin=FEW_PINS, vector=VECTORS, dm=DMS, logical=st.booleans(),
          level=st.booleans(), masked=MASK, dest=st.sampled_from([0, 1, 0xFF, 0x0D]),
          reserved=st.integers(0, (1 << 39) - 1), high_first=st.booleans())
    def program(self, pin: int, vector: int, dm: int, logical: bool, level: bool,
                masked: bool, dest: int, reserved: int, high_first: bool) -> None:
        e = (vector | dm << 8 | logical << 11 | level << 15 | masked << 16 | reserved << 17
             | dest << 56)
        halves = [(0x11 + 2 * pin, e >> 32), (0x10 + 2 * pin, e & 0xFFFFFFFF)]
        for index, value in halves if high_first else halves[::-1]:
            self.reg_write(index, value)

    @rule(pin=FEW_PINS, dm=DMS, level=st.booleans(), masked=MASK)
    def modify(self, pin: int, dm: int, level: bool, masked: bool) -> None:
        """Rewrite the low half with new delivery mode, trigger and mask, keeping the
        rest as read back (what a guest changing one field does)."""
        self.reg_read(0x10 + 2 * pin)
        low = self.io.read(0x10, 4)
        low = low & ~(0x700 | LEVEL | MASKED) | dm << 8 | level << 15 | masked << 16
        self.reg_write(0x10 + 2 * pin, low)

    @rule(index=INDEXES)
    def reg_read(self, index: int) -> None:
        self.mmio_write(0, 1, index)
        self.mmio_read(0x10, 4)

    @rule(data=st.data())
    def eoi_register(self, data: st.DataObject) -> None:
        vector = data.draw(self._programmed_vector())
        self.mmio_write(0x40, 4, vector | data.draw(st.integers(0, 0xFFFFFF)) << 8)

    # ---- local APICs and devices -------------------------------------------------
    def _programmed_vector(self) -> st.SearchStrategy[int]:
        return st.one_of(st.sampled_from([e & 0xFF for e in self.sh.rte]), VECTORS)

    @rule(data=st.data())
    def eoi_broadcast(self, data: st.DataObject) -> None:
        vector = data.draw(self._programmed_vector())
        for listener in self.bus.eoi_listeners:
            listener(vector)
        self.sh.eoi(vector, self.bus.accept)

    @rule(pin=PINS_ANY, level=st.booleans())
    def set_irq(self, pin: int, level: bool) -> None:
        self.io.set_irq(pin, level)
        self.sh.set_irq(pin, level, self.bus.accept)

    @rule(pin=FEW_PINS, times=st.integers(1, 8))
    def level_storm(self, pin: int, times: int) -> None:
        """A device that never deasserts and a guest that EOIs every time."""
        for _ in range(times):
            self.set_irq(pin, True)
            self.eoi_broadcast_vector(self.sh.rte[pin] & 0xFF)

    def eoi_broadcast_vector(self, vector: int) -> None:
        for listener in self.bus.eoi_listeners:
            listener(vector)
        self.sh.eoi(vector, self.bus.accept)

    @rule(accept=st.sampled_from([0, 1, 2]))
    def set_acceptance(self, accept: int) -> None:
        self.bus.accept = accept

    @rule()
    def deferred_timer(self) -> None:
        self.io.service_deferred()
        self.sh.service_deferred(self.bus.accept)

    # ---- checks ------------------------------------------------------------------
    @invariant()
    def agrees_with_shadow(self) -> None:
        assert self.bus.sent == self.sh.sent
        assert len(self.defer_calls) == self.sh.defer_calls
        assert self.io.ioregsel == self.sh.sel
        assert self.io.lines == sum(1 << p for p in range(PINS) if self.sh.lines[p])
        assert self.io.redirection == self.sh.rte
        assert self.io.deferred == bool(self.sh.deferred)
        check_ioapic_invariants(self.io)

    @invariant()
    def coverage_events(self) -> None:
        """Shown by --hypothesis-show-statistics: how often the interesting states occur."""
        if not currently_in_test_context():
            return
        if any(e & REMOTE for e in self.sh.rte):
            event("some remote IRR set")
        if self.sh.deferred:
            event("storm deferred")


TestIoApicProperties = IoApicMachine.TestCase
TestIoApicProperties.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_shadow_and_model_start_alike() -> None:
    m = IoApicMachine()
    m.agrees_with_shadow()
    assert m.io.redirection == [MASKED] * PINS


def test_storm_reaches_the_deferral() -> None:
    """Guards the oracle: the storm rule does defer (the machine would not notice a
    shadow and a model that both never defer)."""
    m = IoApicMachine()
    m.program(pin=1, vector=0x30, dm=FIXED, logical=False, level=True, masked=False,
              dest=0, reserved=0, high_first=True)
    m.level_storm(pin=1, times=STORM + 1)
    m.agrees_with_shadow()
    assert m.defer_calls and m.io.deferred
    m.deferred_timer()
    m.agrees_with_shadow()
    assert not m.io.deferred and m.bus.sent[-1][0] == 0x30
