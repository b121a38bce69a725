"""The native exit core's primitives (kvmpy/native/kick.c, module.c), on model-only vCPUs
and with threads: the kick in each vCPU mode, posted kicks, stop, polling and blocking
with their timeouts, the busy count, the binding's errors, and the shared layout.

A model-only vCPU (fd -1, no kvm_run) never enters a guest, so it is OUTSIDE_GUEST
unless a test puts it to sleep (sleep_begin: BLOCKED) or to poll (poll_begin: POLLING).
IN_GUEST needs a real KVM_RUN: the tests marked `kvm` run a one-instruction real-mode
loop (`jmp $`) in the core's loop on a thread.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import RealModeGuest

from kvmpy import _core as nc
from kvmpy.apic import (
    DM_FIXED,
    DM_LOWEST,
    ICR_DEST_LOGICAL,
    MSR_X2APIC_SELF_IPI,
    SH_ALL_BUT,
    ApicBus,
    LocalApic,
)
from kvmpy.apic.constants import REG_SVR
from kvmpy.apic.destination import x2apic_ldr
from kvmpy.apic.lapic import ACCEPT_MERGED, ACCEPT_REJECTED, ACCEPT_SET
from kvmpy.apic.testing import ApicSystem, FakeClock, make_system, send, write_reg
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import structs
from kvmpy.trace import MAX_REASON, NBUCKETS

BOUND_S = 5.0  # generous: the machine is shared and loaded; a lost wake-up is forever


def buffers() -> dict[str, bytearray]:
    return {"irr": bytearray(256), "isr": bytearray(256), "tmr": bytearray(256),
            "regs": bytearray(nc.REGS_BYTES), "stats": bytearray(nc.S_NWORDS * 8)}


def attach_model(core: nc.Core, i: int) -> dict[str, bytearray]:
    b = buffers()
    core.attach(i, -1, None, b["irr"], b["isr"], b["tmr"], b["regs"], b["stats"])
    return b


def model_core(n: int, host_cpus: int = 2, **kw: int
               ) -> tuple[nc.Core, list[memoryview]]:
    """A Core of n attached model-only vCPUs, and each one's stats as uint64 words."""
    core = nc.Core(n, host_cpus, **kw)
    stats = [memoryview(attach_model(core, i)["stats"]).cast("Q") for i in range(n)]
    return core, stats


def in_futex_wait(thread: threading.Thread) -> bool:
    """Is `thread` inside a futex system call (the core's wait) right now?"""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            return f.read().split()[0] == "202"  # SYS_futex on x86-64
    except (OSError, IndexError):
        return False


def wait_until(cond: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + BOUND_S
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.0005)


class Worker(threading.Thread):
    """A daemon thread running `body`, keeping its result or exception."""

    def __init__(self, body: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.body = body
        self.result: object = None
        self.error: BaseException | None = None
        self.done_at = 0.0

    def run(self) -> None:
        try:
            self.result = self.body()
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc
        self.done_at = time.monotonic()

    def finish(self) -> object:
        self.join(BOUND_S)
        assert not self.is_alive(), "the thread did not return (a lost wake-up?)"
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------- layout
def test_layout_constants_agree_with_python() -> None:
    """core.h's layout, as kvmpy/apic/lapic.py, kvmpy/vcpu.py and kvmpy/trace.py use it."""
    assert nc.REGS_BYTES == nc.Q_NWORDS * 8
    # The u32 words (R_*) end before the first u64 word Python or the core uses.
    assert nc.R_NWORDS * 4 <= nc.Q_BASE_ADDRESS * 8
    q_words = [nc.Q_BASE_ADDRESS, nc.Q_IPI_SENT, nc.Q_IPI_NO_TARGET, nc.Q_RX_FIXED,
               nc.Q_RX_REJECTED, nc.Q_INJECTED, nc.Q_EOI, nc.Q_SELF_IPI, nc.Q_TIMER_DEADLINE,
               nc.Q_TSC_DEADLINE, nc.Q_TSC_HZ, nc.Q_TSC_REF, nc.Q_TSC_REF_NS]
    assert len(set(q_words)) == len(q_words) and max(q_words) < nc.Q_NWORDS
    r_words = [nc.R_TPR, nc.R_PPR, nc.R_MODE, nc.R_SW_ENABLED, nc.R_APIC_ID, nc.R_XAPIC_ID,
               nc.R_LDR, nc.R_DFR, nc.R_X2APIC_LDR, nc.R_SVR, nc.R_ICR_LOW, nc.R_ICR_DEST,
               nc.R_SLOW_EVENTS, nc.R_CR8, nc.R_EXTINT, nc.R_TIMER_MODE]
    assert sorted(r_words) == list(range(nc.R_NWORDS))
    # Statistics: the per-reason arrays and the scalars fit below the histograms, the
    # histograms are trace.py's, and the buffer Vcpu allocates is S_NWORDS words.
    assert nc.MAX_REASON == MAX_REASON and nc.NBUCKETS == NBUCKETS
    assert nc.S_FAST == nc.S_COUNT + MAX_REASON and nc.S_FAST_TOTAL == nc.S_FAST + MAX_REASON
    scalars = [nc.S_ICR_FAST, nc.S_HALT_POLL_OK, nc.S_HALT_SLEPT, nc.S_KICK_SIGNALS,
               nc.S_KICK_WAKES, nc.S_HANDED_OVER, nc.S_RECORD_TIME]
    assert min(scalars) >= nc.S_FAST_TOTAL + MAX_REASON and max(scalars) < nc.S_HIST
    assert nc.S_ICR_HIST == nc.S_HIST + MAX_REASON * NBUCKETS
    assert nc.S_KICK_HIST == nc.S_ICR_HIST + NBUCKETS
    assert nc.S_WAKE_HIST == nc.S_KICK_HIST + NBUCKETS
    assert nc.S_NWORDS == nc.S_WAKE_HIST + NBUCKETS
    # kvm_run: the kernel's struct (its head is what kvmpy/kvm/structs.py maps; the
    # offsets are tests/test_kvm_abi.py's business) fits the page KVM maps.
    assert ctypes.sizeof(structs.KvmRun) <= nc.KVM_RUN_SIZE <= 4096
    # Modes and settings as vcpu.py's enums name them.
    from kvmpy.vcpu import FastpathSetting, VcpuMode

    assert [m.value for m in VcpuMode] == [nc.OUTSIDE_GUEST, nc.IN_GUEST, nc.BLOCKED,
                                           nc.POLLING]
    assert [s.value for s in FastpathSetting] == [nc.SETTING_OFF, nc.SETTING_PYTHON,
                                                  nc.SETTING_NATIVE]


def test_local_apic_properties_are_the_cores_words() -> None:
    """Each LocalApic register property reads and writes its word of `regs`."""
    clock = FakeClock()
    apic = LocalApic(3, ApicBus(lambda i: None), bsp=False, clock_ns=clock.ns,
                     tsc=clock.tsc, tsc_hz=clock.tsc_hz)
    assert len(apic.regs) == nc.REGS_BYTES
    r = memoryview(apic.regs).cast("I")
    q = memoryview(apic.regs).cast("Q")
    assert r[nc.R_APIC_ID] == 3 and r[nc.R_XAPIC_ID] == 3
    assert r[nc.R_X2APIC_LDR] == apic.x2apic_ldr == 1 << 3
    assert q[nc.Q_BASE_ADDRESS] == apic.base_address == 0xFEE00000
    for name, word, value in (("tpr", nc.R_TPR, 0x50), ("ppr", nc.R_PPR, 0x60),
                              ("xapic_id", nc.R_XAPIC_ID, 9), ("ldr", nc.R_LDR, 1 << 24),
                              ("dfr", nc.R_DFR, 0x0FFFFFFF), ("svr", nc.R_SVR, 0x1FF),
                              ("_icr_low", nc.R_ICR_LOW, 0x4041),
                              ("_icr_dest", nc.R_ICR_DEST, 7)):
        setattr(apic, name, value)
        assert r[word] == value, name
        r[word] = value + 1
        assert getattr(apic, name) == value + 1, name
    apic.sw_enabled = True
    assert r[nc.R_SW_ENABLED] == 1
    r[nc.R_MODE] = 2
    assert apic.mode.name == "X2APIC"
    apic.accept_nmi()
    assert r[nc.R_SLOW_EVENTS] == 1


# ---------------------------------------------------------------------- binding errors
def test_core_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="vCPU count"):
        nc.Core(0, 2)
    with pytest.raises(ValueError, match="vCPU count"):
        nc.Core(100_000, 2)
    with pytest.raises(ValueError, match="setting"):
        nc.Core(2, 2, 0, 7)


def test_attach_errors_are_clear_and_release_the_buffers() -> None:
    core = nc.Core(2, 2)
    b = buffers()
    with pytest.raises(IndexError, match="out of range"):
        core.attach(2, -1, None, b["irr"], b["isr"], b["tmr"], b["regs"], b["stats"])
    with pytest.raises(IndexError, match="out of range"):
        core.attach(-1, -1, None, b["irr"], b["isr"], b["tmr"], b["regs"], b["stats"])
    short = {"irr": bytearray(255), "regs": bytearray(nc.REGS_BYTES - 8),
             "stats": bytearray(nc.S_NWORDS * 8 - 8)}
    for name, buf in short.items():
        args = dict(b, **{name: buf})
        with pytest.raises(ValueError, match=f"{name}: .* bytes, need"):
            core.attach(0, -1, None, args["irr"], args["isr"], args["tmr"], args["regs"],
                        args["stats"])
    with pytest.raises(ValueError, match="kvm_run: 100 bytes, need"):
        core.attach(0, -1, bytearray(100), b["irr"], b["isr"], b["tmr"], b["regs"],
                    b["stats"])
    with pytest.raises((TypeError, BufferError)):
        core.attach(0, -1, None, bytes(256), b["isr"], b["tmr"], b["regs"], b["stats"])
    # Every failed attach released what it had taken: the buffers can be resized again.
    for buf in (*b.values(), *short.values()):
        buf.append(0)
        del buf[-1]
    # The slot stays usable, and a successful attach keeps the buffers exported.
    core.attach(0, -1, None, b["irr"], b["isr"], b["tmr"], b["regs"], b["stats"])
    with pytest.raises(BufferError):
        b["irr"].append(0)
    with pytest.raises(ValueError, match="already attached"):
        core.attach(0, -1, None, *buffers().values())
    del core
    gc.collect()
    b["irr"].append(0)  # the Core's views died with it


def test_calls_on_a_missing_or_model_vcpu_are_refused() -> None:
    core = nc.Core(2, 2)
    attach_model(core, 0)
    for call in (lambda: core.fast_wrmsr(1, 0x830, 0x40), lambda: core.fast_hlt(1, True),
                 lambda: core.fast_mmio_write(1, 0xFEE00300, 4, 0x40),
                 lambda: core.inject(1, True, True, 0), lambda: core.run(1),
                 lambda: core.wake(1), lambda: core.sleep_begin(1)):
        with pytest.raises(ValueError, match="vCPU 1 is not attached"):
            call()
    with pytest.raises(ValueError, match="model-only vCPU cannot run"):
        core.run(0)
    for call in (lambda: core.kick(2, -1), lambda: core.kick(0, 5), lambda: core.mode(9),
                 lambda: core.take_request(-3), lambda: core.poll(4, 0),
                 lambda: core.wait(4, 0), lambda: core.halt_poll_ns(2)):
        with pytest.raises(IndexError, match="out of range"):
            call()


def test_stop_and_kicks_with_an_unattached_vcpu_do_not_crash() -> None:
    """An unattached slot has no statistics buffer: a wake-up must not touch it
    (core.stop() used to dereference NULL there)."""
    core = nc.Core(3, 2)
    attach_model(core, 1)
    core.kick(0, -1)
    core.kick(2, 1)
    core.send_posted_kicks(1)
    core.stop()
    assert core.take_request(0) and core.take_request(1) and core.take_request(2)


# ---------------------------------------------------------------------- settings
def test_fastpath_acts_only_with_the_native_setting() -> None:
    """PYTHON and OFF: every fast_* answers NONE and changes nothing; NATIVE acts."""
    core = nc.Core(2, 2, setting=nc.SETTING_PYTHON)
    bufs = [attach_model(core, i) for i in range(2)]
    for b, apic_id in zip(bufs, (0, 1), strict=True):
        r = memoryview(b["regs"]).cast("I")
        r[nc.R_MODE], r[nc.R_SW_ENABLED], r[nc.R_APIC_ID] = 2, 1, apic_id
    bufs[0]["isr"][0x30] = 1
    snapshot = [bytes(b["irr"] + b["isr"] + b["regs"]) for b in bufs]
    for setting in (nc.SETTING_PYTHON, nc.SETTING_OFF):
        core.set(setting=setting)
        assert core.fast_wrmsr(0, 0x830, 1 << 32 | 0x40) == 0
        assert core.fast_wrmsr(0, 0x83F, 0x40) == 0
        assert core.fast_wrmsr(0, 0x80B, 0) == 0
        assert core.fast_hlt(0, True) == 0
        assert [bytes(b["irr"] + b["isr"] + b["regs"]) for b in bufs] == snapshot
        assert not core.take_request(1)
    core.set(setting=nc.SETTING_NATIVE)
    assert core.fast_wrmsr(0, 0x830, 1 << 32 | 0x40) == 1  # REENTER_GUEST
    assert bufs[1]["irr"][0x40] and core.take_request(1)
    assert core.fast_wrmsr(0, 0x80B, 0) == 1 and not bufs[0]["isr"][0x30]
    # Two APICs with ID 1 (raw words; the bus refuses duplicate x2APIC IDs, but the core
    # routes by the words). Numbered by index, APIC 1 takes the IPI; renumbered, every
    # APIC with the ID does (bus.py), still on the fastpath.
    memoryview(bufs[0]["regs"]).cast("I")[nc.R_APIC_ID] = 1
    assert core.fast_wrmsr(0, 0x830, 1 << 32 | 0x41) == 1
    assert bufs[1]["irr"][0x41] and not bufs[0]["irr"][0x41]
    core.set(renumbered=1)
    assert core.fast_wrmsr(0, 0x830, 1 << 32 | 0x42) == 1
    assert bufs[1]["irr"][0x42] and bufs[0]["irr"][0x42]


def test_inject_refuses_a_cr8_with_reserved_bits_without_side_effect() -> None:
    b = buffers()
    core2 = nc.Core(1, 2)
    core2.attach(0, -1, None, b["irr"], b["isr"], b["tmr"], b["regs"], b["stats"])
    r = memoryview(b["regs"]).cast("I")
    r[nc.R_MODE], r[nc.R_SW_ENABLED] = 1, 1
    b["irr"][0x80] = 1
    before = bytes(b["irr"] + b["isr"] + b["regs"])
    assert core2.inject(0, True, True, 0x10) is None
    assert bytes(b["irr"] + b["isr"] + b["regs"]) == before
    assert core2.inject(0, True, True, 9) == (-1, 0)  # TPR 0x90 masks 0x80: no window
    assert r[nc.R_TPR] == 0x90 and r[nc.R_PPR] == 0x90 and r[nc.R_CR8] == 9
    assert core2.inject(0, False, True, 7) == (-1, 1)  # not ready: a window
    assert core2.inject(0, True, True, 7) == (0x80, 0)
    assert b["isr"][0x80] and not b["irr"][0x80] and r[nc.R_PPR] == 0x80


def test_halt_poll_ns_is_per_vcpu() -> None:
    core, _ = model_core(2)
    assert core.halt_poll_ns(0) == 0
    assert core.halt_poll_ns(1, 40_000) == 40_000
    assert core.halt_poll_ns(1) == 40_000 and core.halt_poll_ns(0) == 0


# ---------------------------------------------------------------------- the kick
def test_kick_outside_guest_only_sets_the_request() -> None:
    core, stats = model_core(2)
    assert core.mode(1) == nc.OUTSIDE_GUEST
    core.kick(1, -1)
    core.kick(1, 0)  # from a vCPU's exit handling: nothing to post either
    core.send_posted_kicks(0)
    assert core.take_request(1) and not core.take_request(1)
    assert not core.take_request(0)
    assert core.wait(1, 0) is False  # no wake token was left
    assert stats[1][nc.S_KICK_SIGNALS] == stats[1][nc.S_KICK_WAKES] == 0
    assert core.mode(1) == nc.OUTSIDE_GUEST


def test_kick_of_a_poller_is_seen_by_its_poll_and_sends_nothing() -> None:
    core, stats = model_core(2)
    published = threading.Event()  # the event a sender publishes before the kick

    def poller() -> tuple[bool, float]:
        core.poll_begin(1)
        try:
            # The protocol: POLLING and request cleared, re-check the events, poll.
            while not published.is_set():
                if not core.poll(1, time.monotonic_ns() + int(BOUND_S * 1e9)):
                    return False, time.monotonic()
            return True, time.monotonic()
        finally:
            core.poll_end(1)

    t = Worker(poller)
    t.start()
    wait_until(lambda: core.mode(1) == nc.POLLING, "POLLING")
    published.set()
    kicked_at = time.monotonic()
    core.kick(1, -1)
    seen, at = t.finish()  # type: ignore[misc]
    assert seen and at - kicked_at < BOUND_S
    assert stats[1][nc.S_KICK_SIGNALS] == stats[1][nc.S_KICK_WAKES] == 0
    assert core.mode(1) == nc.OUTSIDE_GUEST


def sleeper(core: nc.Core, i: int, timeout_ns: int = -1) -> Worker:
    """A thread sleeping as Vcpu._sleep_until_runnable does, until it sees a request
    (its 'event') or the core stops. Returns (True if it saw the request, woken)."""

    def body() -> tuple[bool, bool]:
        core.sleep_begin(i)
        try:
            woken = False
            while True:
                core.wake_clear(i)  # drop a stale token, then re-check the event
                if core.take_request(i):
                    return True, woken
                woken = core.wait(i, timeout_ns)
                if not woken and timeout_ns >= 0:
                    return False, woken
        finally:
            core.sleep_end(i)

    t = Worker(body)
    t.start()
    wait_until(lambda: core.mode(i) == nc.BLOCKED and in_futex_wait(t), "asleep in wait")
    return t


def test_kick_of_a_blocked_vcpu_leaves_a_token_and_wakes_its_wait() -> None:
    core, stats = model_core(2)
    t = sleeper(core, 1)
    assert core.busy() == 1
    kicked_at = time.monotonic()
    core.kick(1, -1)
    saw, woken = t.finish()  # type: ignore[misc]
    assert saw and woken and t.done_at - kicked_at < BOUND_S
    assert stats[1][nc.S_KICK_WAKES] == 1 and stats[1][nc.S_KICK_SIGNALS] == 0
    assert core.mode(1) == nc.OUTSIDE_GUEST and core.busy() == 2


def test_posted_wake_is_sent_only_by_send_posted_kicks() -> None:
    core, stats = model_core(2)
    core.sleep_begin(1)  # vCPU 1 blocked (no thread needed: the token is the state)
    core.wake_clear(1)
    core.kick(1, 0)  # posted by vCPU 0's exit handling
    assert core.take_request(1)  # the request is immediate ...
    assert stats[1][nc.S_KICK_WAKES] == 0 and core.wait(1, 0) is False  # ... the wake not
    core.send_posted_kicks(1)  # another vCPU's posts are not vCPU 0's
    assert core.wait(1, 0) is False
    core.send_posted_kicks(0)
    assert stats[1][nc.S_KICK_WAKES] == 1 and core.wait(1, 0) is True
    core.wake_clear(1)
    core.send_posted_kicks(0)  # sent once
    assert stats[1][nc.S_KICK_WAKES] == 1 and core.wait(1, 0) is False
    core.sleep_end(1)


def test_posted_wake_reaches_a_sleeping_thread() -> None:
    core, stats = model_core(3)
    t = sleeper(core, 2)
    core.kick(2, 0)
    time.sleep(0.05)
    assert t.is_alive() and in_futex_wait(t), "woken before the posted wake-up was sent"
    core.send_posted_kicks(0)
    saw, woken = t.finish()  # type: ignore[misc]
    assert saw and woken and stats[2][nc.S_KICK_WAKES] == 1


def test_stop_wakes_sleepers_and_pollers() -> None:
    core, _ = model_core(3)
    blocked = sleeper(core, 1)

    def poll() -> bool:
        core.poll_begin(2)
        try:
            return core.poll(2, time.monotonic_ns() + 60 * 10**9)
        finally:
            core.poll_end(2)

    polling = Worker(poll)
    polling.start()
    wait_until(lambda: core.mode(2) == nc.POLLING, "a poller")
    core.stop()
    assert blocked.finish() == (True, True)  # stop kicks: request + token
    # A poller sees the stop's request (or, between checks, the stopping flag), long
    # before its 60 s end: finish() allows BOUND_S.
    assert polling.finish() in (True, False)


def test_poll_and_wait_time_out() -> None:
    """On threads, so that a timeout that does not work fails instead of hanging."""
    core, _ = model_core(1)

    def timed(call: Callable[[], bool]) -> tuple[bool, int]:
        t = Worker(lambda: (call(), time.monotonic_ns()))
        t0 = time.monotonic_ns()
        t.start()
        got, t1 = t.finish()  # type: ignore[misc]
        return got, t1 - t0

    got, ns = timed(lambda: core.poll(0, time.monotonic_ns() + 20_000_000))
    assert got is False and ns >= 19_000_000
    got, _ = timed(lambda: core.poll(0, time.monotonic_ns() - 1))  # already past
    assert got is False
    got, ns = timed(lambda: core.wait(0, 20_000_000))
    assert got is False and ns >= 19_000_000
    core.wake(0)  # a token left before the wait: returns at once
    got, _ = timed(lambda: core.wait(0, -1))
    assert got is True


def test_busy_counts_the_threads_not_asleep_and_gates_polling() -> None:
    core, _ = model_core(3, host_cpus=2)
    assert core.busy() == 3 and core.may_poll(0) is False  # 3 busy > 2 host CPUs
    core.sleep_begin(2)
    assert core.busy() == 2 and core.may_poll(0) is True
    core.sleep_begin(1)
    assert core.busy() == 1
    core.sleep_end(1)
    core.sleep_end(2)
    assert core.busy() == 3 and core.may_poll(1) is False
    small, _ = model_core(2, host_cpus=2)
    assert small.may_poll(0) is True


# ---------------------------------------------------------------------- TSC deadline
MSR_TSC_DEADLINE = 0x6E0
TIMER_TSC_DEADLINE = 2  # LVT timer mode 10b


def tsc_deadline_mode(regs: bytearray) -> None:
    """An xAPIC with its timer in TSC-deadline mode, and a guest TSC equal to
    CLOCK_MONOTONIC in ns (the line tsc0 0 at 0, 1 GHz)."""
    r, q = memoryview(regs).cast("I"), memoryview(regs).cast("Q")
    r[nc.R_MODE], r[nc.R_SW_ENABLED], r[nc.R_TIMER_MODE] = 1, 1, TIMER_TSC_DEADLINE
    q[nc.Q_TSC_HZ], q[nc.Q_TSC_REF], q[nc.Q_TSC_REF_NS] = 10**9, 0, 0


def timer_threads() -> int:
    """The core's timer threads alive in this process (timer.c names them)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "kvmpy-ctimer"
        except OSError:
            pass  # a thread that just ended
    return count


def test_tsc_deadline_write_kicks_a_sleeper_at_its_deadline_not_before() -> None:
    core = nc.Core(1, 2)
    b = attach_model(core, 0)
    stats = memoryview(b["stats"]).cast("Q")
    regs = b["regs"]
    tsc_deadline_mode(regs)
    q = memoryview(regs).cast("Q")
    t = sleeper(core, 0)
    deadline = time.monotonic_ns() + 50_000_000
    assert core.fast_wrmsr(0, MSR_TSC_DEADLINE, deadline) == 1  # REENTER_GUEST
    assert q[nc.Q_TSC_DEADLINE] == deadline and q[nc.Q_TIMER_DEADLINE] == deadline
    saw, woken = t.finish()  # type: ignore[misc]
    assert saw and woken, "the timer thread's kick did not come"
    assert t.done_at >= deadline / 1e9, "woken before the deadline"
    # The kicker counts its wake-up after the futex wake: it may count after we woke.
    wait_until(lambda: stats[nc.S_KICK_WAKES] == 1, "the timer thread's wake-up counted")
    core.stop()


def test_tsc_deadline_zero_disarms_the_timer_thread() -> None:
    core = nc.Core(1, 2)
    b = attach_model(core, 0)
    tsc_deadline_mode(b["regs"])
    q = memoryview(b["regs"]).cast("Q")
    t = sleeper(core, 0, timeout_ns=150_000_000)
    assert core.fast_wrmsr(0, MSR_TSC_DEADLINE, time.monotonic_ns() + 30_000_000) == 1
    assert core.fast_wrmsr(0, MSR_TSC_DEADLINE, 0) == 1
    assert q[nc.Q_TSC_DEADLINE] == 0 and q[nc.Q_TIMER_DEADLINE] == 0
    assert t.finish() == (False, False), "a disarmed deadline kicked"
    assert memoryview(b["stats"]).cast("Q")[nc.S_KICK_WAKES] == 0
    core.stop()


def test_tsc_deadline_writes_the_core_leaves_to_python_change_nothing() -> None:
    """Outside TSC-deadline mode, APIC disabled, no published TSC line, an expiry due,
    a deadline already passed or beyond the ns word: NONE, and nothing written."""
    core = nc.Core(1, 2)
    b = attach_model(core, 0)
    regs = b["regs"]
    r, q = memoryview(regs).cast("I"), memoryview(regs).cast("Q")
    now = time.monotonic_ns()

    def none_without_a_trace(value: int) -> None:
        before = bytes(regs)
        assert core.fast_wrmsr(0, MSR_TSC_DEADLINE, value, now) == 0
        assert bytes(regs) == before and not core.take_request(0)

    for word, value in ((nc.R_TIMER_MODE, 0), (nc.R_TIMER_MODE, 1), (nc.R_MODE, 0)):
        tsc_deadline_mode(regs)
        r[word] = value
        none_without_a_trace(now + 10**9)
    tsc_deadline_mode(regs)
    q[nc.Q_TSC_HZ] = 0
    none_without_a_trace(now + 10**9)
    tsc_deadline_mode(regs)
    none_without_a_trace(now)  # the TSC now: already passed, fires at once in Python
    none_without_a_trace(1)
    q[nc.Q_TSC_HZ] = 1  # 1 Hz: 2**63 ticks are 2**63 s, past the uint64 ns word
    none_without_a_trace(1 << 63)
    tsc_deadline_mode(regs)
    q[nc.Q_TIMER_DEADLINE] = now  # an expiry due: Python's catch-up fires it first
    none_without_a_trace(now + 10**9)
    q[nc.Q_TIMER_DEADLINE] = now + 1  # not due yet: replaced
    assert core.fast_wrmsr(0, MSR_TSC_DEADLINE, now + 10**9, now) == 1
    assert q[nc.Q_TIMER_DEADLINE] == now + 10**9
    core.stop()


def test_tsc_deadline_beyond_the_ns_word_is_kept_by_python() -> None:
    """The write the core hands over as too far away: the model keeps it at the last
    uint64 ns instead of failing to store it (a guest's 0xFFFF... at a low TSC rate)."""
    from kvmpy.apic import constants as c

    clock = FakeClock(tsc_hz=1_000_000)
    apic = LocalApic(0, ApicBus(lambda i: None), bsp=True, clock_ns=clock.ns,
                     tsc_line=(0, 0), tsc_hz=clock.tsc_hz)
    apic.mmio_write(c.REG_SVR, 4, 0x1FF)
    apic.mmio_write(c.REG_LVT_TIMER, 4, 2 << 17 | 0x40)
    core = nc.Core(1, 2)
    core.attach(0, -1, None, apic.irr, apic.isr, apic.tmr, apic.regs,
                bytearray(nc.S_NWORDS * 8))
    assert core.fast_wrmsr(0, MSR_TSC_DEADLINE, (1 << 64) - 1, clock.now) == 0
    apic.wrmsr(MSR_TSC_DEADLINE, (1 << 64) - 1)
    assert apic.rdmsr(MSR_TSC_DEADLINE) == (1 << 64) - 1
    assert apic.timer_deadline_ns() == (1 << 64) - 1
    core.stop()


def test_timer_thread_starts_with_the_first_vcpu_and_is_joined_by_stop_and_dealloc() -> None:
    base = timer_threads()
    core = nc.Core(2, 2)
    assert timer_threads() == base  # none before a vCPU is attached
    attach_model(core, 0)
    attach_model(core, 1)
    assert timer_threads() == base + 1  # one per VM
    started = time.monotonic()
    core.stop()
    assert timer_threads() == base, "stop() returned with the timer thread alive"
    assert time.monotonic() - started < BOUND_S
    core.stop()  # idempotent
    other = nc.Core(1, 2)
    b = attach_model(other, 0)
    tsc_deadline_mode(b["regs"])
    other.fast_wrmsr(0, MSR_TSC_DEADLINE, time.monotonic_ns() + 10**12)  # armed, far off
    assert timer_threads() == base + 1
    del other
    gc.collect()
    assert timer_threads() == base, "dealloc left the timer thread running"


# ---------------------------------------------------------------------- IN_GUEST (KVM)
JMP_SELF = bytes([0xEB, 0xFE])  # jmp $ (real mode)
CODE_GPA = 0x1000


class SpinningVcpu:
    """A real vCPU running `jmp $` in the core's loop on a thread (slot 0 of a Core of
    two; slot 1 is a model vCPU that posts kicks)."""

    def __init__(self) -> None:
        self.guest = RealModeGuest({CODE_GPA: JMP_SELF}, rip=CODE_GPA)
        self.fd = self.guest.fd
        self.core = nc.Core(2, 2)
        b = buffers()
        self.core_regs = b["regs"]
        self.stats = memoryview(b["stats"]).cast("Q")
        self.regs = memoryview(b["regs"]).cast("Q")
        self.core.attach(0, self.fd.fd, self.fd.mapping, b["irr"], b["isr"], b["tmr"],
                         b["regs"], b["stats"])
        self.model = attach_model(self.core, 1)
        self.thread = Worker(lambda: self.core.run(0))

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.core.mode(0) == nc.IN_GUEST, "IN_GUEST")

    def close(self) -> None:
        self.core.stop()
        if self.thread.is_alive():
            self.thread.join(BOUND_S)
        self.stats.release()
        self.regs.release()
        del self.core
        gc.collect()
        self.guest.close()


@pytest.fixture
def spinning() -> Iterator[SpinningVcpu]:
    vcpu = SpinningVcpu()
    try:
        vcpu.start()
        yield vcpu
    finally:
        vcpu.close()


@pytest.mark.kvm
def test_kick_in_guest_signals_it_out_of_kvm_run(spinning: SpinningVcpu) -> None:
    core, stats = spinning.core, spinning.stats
    intr = nc.S_COUNT + k.KVM_EXIT_INTR
    before = stats[intr]
    core.kick(0, -1)  # not a vCPU thread: the signal goes at once
    # The core re-enters at once (REENTER_GUEST): a fastpath exit, not one for Python.
    wait_until(lambda: stats[nc.S_FAST + k.KVM_EXIT_INTR] > before, "the EINTR exit")
    assert stats[nc.S_KICK_SIGNALS] == 1 and stats[nc.S_HANDED_OVER] == 0
    wait_until(lambda: core.mode(0) == nc.IN_GUEST, "back in the guest")


@pytest.mark.kvm
def test_posted_signal_is_sent_only_by_send_posted_kicks(spinning: SpinningVcpu) -> None:
    core, stats = spinning.core, spinning.stats
    intr = nc.S_COUNT + k.KVM_EXIT_INTR
    core.kick(0, 1)  # posted by vCPU 1's exit handling
    time.sleep(0.05)
    assert stats[nc.S_KICK_SIGNALS] == 0 and stats[intr] == 0
    assert core.mode(0) == nc.IN_GUEST
    core.send_posted_kicks(1)
    wait_until(lambda: stats[intr] >= 1, "the posted signal's EINTR exit")
    assert stats[nc.S_KICK_SIGNALS] == 1


@pytest.mark.kvm
def test_posted_signal_is_dropped_when_the_target_left_the_guest(
        spinning: SpinningVcpu) -> None:
    core, stats = spinning.core, spinning.stats
    core.kick(0, 1)  # posted while vCPU 0 is IN_GUEST
    core.stop()  # vCPU 0 leaves the core (the stop's own kick signals it once)
    assert spinning.thread.finish()[0] == nc.RET_STOP  # type: ignore[index]
    assert core.mode(0) == nc.OUTSIDE_GUEST
    signals = stats[nc.S_KICK_SIGNALS]
    core.send_posted_kicks(1)
    assert stats[nc.S_KICK_SIGNALS] == signals  # nothing sent to a vCPU out of the guest


@pytest.mark.kvm
def test_a_timer_due_on_entry_goes_back_to_python_unless_python_just_expired_one() -> None:
    """vcpu_enter_guest's first pass. A timer that fell due after Python looked (its
    kick may have been cleared with `request`) goes back at once, before any KVM_RUN: a
    guest that makes no exit (`jmp $`; the apic_timer guest's busy wait) would never
    get its interrupt. Only one Python just expired (timer_expired) waits for one
    entry, the 1 ns periodic storm's guard; a kick then ends that entry."""
    vcpu = SpinningVcpu()
    try:
        core, stats = vcpu.core, vcpu.stats
        entries = lambda: sum(stats[nc.S_COUNT : nc.S_COUNT + MAX_REASON])  # noqa: E731
        vcpu.regs[nc.Q_TIMER_DEADLINE] = time.monotonic_ns() - 1
        first = Worker(lambda: core.run(0))
        first.start()
        assert first.finish()[0] == nc.RET_EVENTS  # type: ignore[index]
        assert entries() == 0
        guarded = Worker(lambda: core.run(0, True))
        guarded.start()
        wait_until(lambda: core.mode(0) == nc.IN_GUEST, "one entry with the due timer")
        core.kick(0, -1)
        assert guarded.finish()[0] == nc.RET_EVENTS  # type: ignore[index]
        assert entries() == stats[nc.S_COUNT + k.KVM_EXIT_INTR] == 1
    finally:
        vcpu.close()


# ------------------------------------------- IRR test-and-set for Python's senders
def _apics(with_core: bool) -> tuple[ApicSystem, nc.Core | None]:
    """Three x2APICs; with_core: on a Core as Machine wires them (every vCPU attached
    with its LocalApic's memory, then bus.core), so Python's senders use its exchange."""
    system = make_system(3, x2apic=True)
    if not with_core:
        return system, None
    core = nc.Core(3, 2)
    for i, apic in enumerate(system.apics):
        core.attach(i, -1, None, apic.irr, apic.isr, apic.tmr, apic.regs,
                    bytearray(nc.S_NWORDS * 8))
    system.bus.core = core
    return system, core


def test_irr_test_and_set_is_one_exchange_on_the_apics_own_byte() -> None:
    system, core = _apics(True)
    irr = system[1].irr
    assert core.irr_test_and_set(1, 0x40) is False and irr[0x40] == 1
    assert core.irr_test_and_set(1, 0x40) is True and irr[0x40] == 1
    assert irr.count(1) == 1 and not system[0].irr.count(1) and not system[2].irr.count(1)
    assert core.inject(1, True, True, 0) == (0x40, 0)  # the C's INTA takes the byte
    assert irr[0x40] == 0 and system[1].isr[0x40] == 1
    assert core.irr_test_and_set(1, 0x40) is False  # pending again, behind the ISR bit
    with pytest.raises(ValueError, match="vector 256"):
        core.irr_test_and_set(1, 256)
    with pytest.raises(ValueError, match="not attached"):
        nc.Core(1, 2).irr_test_and_set(0, 0x40)


@pytest.mark.parametrize("with_core", [False, True], ids=["pure model", "core attached"])
def test_accept_fixed_says_set_then_merged_on_either_path(with_core: bool) -> None:
    """The return value and the IRR byte are the same through the core's exchange and
    through the pure model's read-then-store."""
    system, core = _apics(with_core)
    apic = system[1]
    assert apic.accept_fixed(0x40, False) == ACCEPT_SET and apic.irr[0x40] == 1
    assert apic.accept_fixed(0x40, True) == ACCEPT_MERGED and apic.irr[0x40] == 1
    assert apic.tmr[0x40] == 1  # the merged one's trigger mode, written before IRR
    assert apic.irr.count(1) == 1
    if core is None:
        apic.ack(0x40)
    else:
        assert core.inject(1, True, True, 0) == (0x40, 0)
    assert apic.accept_fixed(0x40, False) == ACCEPT_SET
    assert apic.irr[0x40] == 1 and apic.isr[0x40] == 1
    write_reg(apic, REG_SVR, 0xFF)  # software-disabled: rejected, IRR untouched
    assert apic.accept_fixed(0x41, False) == ACCEPT_REJECTED and apic.irr[0x41] == 0
    assert apic.stats["ipi_received"] == 3


class _RecordingCore:
    """A Core that records Python's calls of irr_test_and_set (and passes them on)."""

    def __init__(self, core: nc.Core) -> None:
        self.core = core
        self.calls: list[tuple[int, int]] = []

    def set(self, **kw: int) -> None:
        self.core.set(**kw)

    def irr_test_and_set(self, index: int, vector: int) -> bool:
        self.calls.append((index, vector))
        return self.core.irr_test_and_set(index, vector)


def test_pythons_fixed_deliveries_set_irr_through_the_core() -> None:
    """Every route by which Python sets IRR for a fixed interrupt: the ICR's hot route,
    the general route (shorthand, logical, lowest priority), SELF IPI and an I/O APIC
    message, each through the core's exchange; the kick follows as before."""
    system, core = _apics(True)
    rec = _RecordingCore(core)
    system.bus.core = rec
    send(system[0], 0x40, 1)  # physical fixed: the hot route
    send(system[0], SH_ALL_BUT << 18 | 0x41, 0)  # vCPUs 1 and 2
    send(system[0], ICR_DEST_LOGICAL | 0x42, x2apic_ldr(2))
    send(system[0], DM_LOWEST << 8 | 0x43, 0xFFFFFFFF)
    system[2].wrmsr(MSR_X2APIC_SELF_IPI, 0x44)
    system.bus.deliver_irq(0x45, DM_FIXED, 1, False, True)
    send(system[0], 0x40, 1)  # merges
    assert rec.calls == [(1, 0x40), (1, 0x41), (2, 0x41), (2, 0x42), (0, 0x43), (2, 0x44),
                         (1, 0x45), (1, 0x40)]
    assert system.notified == [1, 1, 2, 2, 0, 2, 1, 1]
    assert system[1].irr.count(1) == 3 and system[1].tmr[0x45] == 1
def test_tsc_deadline_takes_a_vcpu_in_the_guest_to_python_at_its_deadline() -> None:
    """The whole chain in a real KVM_RUN: the fastpath arms, the timer thread signals the
    vCPU out of the guest at the deadline, and the loop top hands the due timer to Python
    (RET_EVENTS), not before the deadline."""
    vcpu = SpinningVcpu()
    try:
        regs = memoryview(vcpu.core_regs).cast("Q")
        tsc_deadline_mode(vcpu.core_regs)
        deadline = time.monotonic_ns() + 100_000_000
        # Before the vCPU's thread starts: the owner-only words are still this thread's.
        assert vcpu.core.fast_wrmsr(0, MSR_TSC_DEADLINE, deadline) == 1
        assert regs[nc.Q_TIMER_DEADLINE] == deadline
        vcpu.start()
        ret = vcpu.thread.finish()
        assert ret[0] == nc.RET_EVENTS, ret  # type: ignore[index]
        assert vcpu.thread.done_at >= deadline / 1e9, "handed over before the deadline"
        # counted after pthread_kill: the vCPU may have left before the count
        wait_until(lambda: vcpu.stats[nc.S_KICK_SIGNALS] == 1, "the signal counted")
        assert vcpu.stats[nc.S_FAST + k.KVM_EXIT_INTR] >= 1
    finally:
        vcpu.close()
