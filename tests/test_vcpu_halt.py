"""The halted vCPU as Python sleeps it (HLT with --fastpath python/off, or IF=0): the
core's futex token, halt polling and its adaptive window (KVM's kvm_vcpu_halt /
grow_halt_poll_ns / shrink_halt_poll_ns), with a fake machine and model-only vCPUs
in a real native core."""

from __future__ import annotations

import mmap
import threading
import time

from kvmpy import _core
from kvmpy import vcpu as vcpu_module
from kvmpy.apic.testing import make_system
from kvmpy.kvm import run as kr
from kvmpy.kvm.run import RunView
from kvmpy.trace import ExitStats
from kvmpy.vcpu import Vcpu, VcpuMode, VcpuState


class _Fd:
    fd = -1  # a model-only vCPU in the core: no KVM

    def __init__(self) -> None:
        self.mapping = mmap.mmap(-1, 4096)
        self.view = RunView(self.mapping)


class _Machine:
    def __init__(self, halt_poll_max_ns: int, may_poll: bool = True) -> None:
        self.stopping = False
        self.halt_poll_max_ns = halt_poll_max_ns
        self._may_poll = may_poll
        self.blocked = 0
        self.exit_lock = threading.Lock()

    def may_poll(self) -> bool:
        return self._may_poll

    def note_blocked(self, vcpu: object, blocked: bool) -> None:
        self.blocked += 1 if blocked else -1


def halted_vcpus(n: int, max_ns: int, *, may_poll: bool = True) -> list[Vcpu]:
    """`n` halted model vCPUs in one native core; with may_poll False the core counts
    no host CPU, so no vCPU may poll."""
    system = make_system(max(n, 2), x2apic=True)
    machine = _Machine(max_ns, may_poll)
    core = _core.Core(n, 2 if may_poll else 0, max_ns)
    vcpus = []
    for i in range(n):
        vcpu = Vcpu(machine, i, _Fd(), system[i],  # type: ignore[arg-type]
                    fastpath="python", stats=ExitStats(False))
        vcpu.attach_core(core)
        vcpu.view.u8[kr.IF_FLAG] = 1
        vcpu.state = VcpuState.HALTED
        vcpus.append(vcpu)
    return vcpus


def halted_vcpu(max_ns: int, *, may_poll: bool = True) -> Vcpu:
    return halted_vcpus(1, max_ns, may_poll=may_poll)[0]


# ---------------------------------------------------------------- halt polling


def _deliver_later(vcpu: Vcpu, delay_s: float, vector: int = 0x40) -> threading.Thread:
    """Another thread publishes a fixed interrupt and kicks, as ApicBus does."""

    def send() -> None:
        time.sleep(delay_s)
        assert vcpu.apic.accept_fixed(vector, False)
        vcpu.kick()

    th = threading.Thread(target=send)
    th.start()
    return th


def test_a_wakeup_inside_the_window_ends_the_halt_without_sleeping():
    vcpu = halted_vcpu(2_000_000_000)
    vcpu.halt_poll_ns = 2_000_000_000  # 2 s window: the send lands inside it
    modes = []
    th = _deliver_later(vcpu, 0.02)
    orig = vcpu._wakeup_pending

    def spy() -> bool:
        modes.append(vcpu.mode)
        return orig()

    vcpu._wakeup_pending = spy  # type: ignore[method-assign]
    vcpu._block_until_runnable()
    th.join()
    assert vcpu.state is VcpuState.RUNNABLE and vcpu.mode is VcpuMode.OUTSIDE_GUEST
    assert vcpu.stats.halt_poll_success == 1 and vcpu.stats.halt_slept == 0
    assert set(modes) == {VcpuMode.POLLING}  # never BLOCKED: the kick only set a flag
    assert vcpu.machine.blocked == 0


def test_polling_off_or_not_allowed_sleeps_and_the_kick_wakes_it():
    for vcpu in (halted_vcpu(0), halted_vcpu(200_000, may_poll=False)):
        vcpu.halt_poll_ns = 200_000 if vcpu.machine.halt_poll_max_ns else 0
        th = _deliver_later(vcpu, 0.02)
        vcpu._block_until_runnable()
        th.join()
        assert vcpu.state is VcpuState.RUNNABLE
        assert vcpu.stats.halt_poll_success == 0 and vcpu.stats.halt_slept == 1


def test_the_window_grows_after_short_halts_and_shrinks_after_long_ones():
    """The core's adapt_halt_poll, KVM's kvm_vcpu_halt with grow 2, grow_start 10 us,
    shrink 2, maximum 200 us: grow from 0 to grow_start, double, cap at the maximum;
    halve after a halt longer than the maximum, and below grow_start turn off. A halt
    that ended inside the window leaves it (KVM: halt_ns <= halt_poll_ns)."""
    core = halted_vcpus(2, 200_000)[0].core
    grow = [core.adapt_halt_poll(0, 190_000) for _ in range(6)]
    assert grow == [10_000, 20_000, 40_000, 80_000, 160_000, 200_000]
    assert core.adapt_halt_poll(0, 150_000) == 200_000  # inside the window: unchanged
    assert core.adapt_halt_poll(0, 200_000) == 200_000  # == the window: unchanged
    assert core.adapt_halt_poll(0, 1_000_000) == 100_000  # longer than the maximum
    core.halt_poll_ns(0, 150_000)
    assert core.adapt_halt_poll(0, 180_000) == 200_000  # 300 us, capped
    shrink = [core.adapt_halt_poll(0, 1_000_000) for _ in range(6)]
    assert shrink == [100_000, 50_000, 25_000, 12_500, 0, 0]  # 6,250 < grow_start: off
    assert core.adapt_halt_poll(0, 200_000) == 0  # == the maximum: neither rule
    assert core.adapt_halt_poll(0, 5_000) == 10_000  # a short halt opens it again
    core.halt_poll_ns(0, 40_000)
    assert core.adapt_halt_poll(0, 30_000) == 40_000  # inside the window (no poll ran)
    assert core.halt_poll_ns(1) == 0, "per vCPU"
    off = halted_vcpu(0).core
    off.halt_poll_ns(0, 40_000)
    assert off.adapt_halt_poll(0, 1_000) == 0  # no maximum: KVM sets the window to 0


def test_pythons_halt_adapts_the_window_through_the_core():
    """A halt Python sleeps (IF=0, --fastpath python/off) grows the core's window: the
    one implementation (vcpu_loop.c adapt_halt_poll), not a copy in vcpu.py."""
    vcpu = halted_vcpu(200_000)
    assert not hasattr(vcpu, "_adapt_halt_poll")
    th = _deliver_later(vcpu, 0.0)
    vcpu._block_until_runnable()  # window 0: no poll, it sleeps
    th.join()
    assert vcpu.stats.halt_slept == 1
    # The sleep lasted under 200 us (grow to 10 us) or longer (window 0 stays 0).
    assert vcpu.halt_poll_ns in (0, 10_000)
    vcpu.apic.ack(0x40)
    vcpu.apic.eoi()
    vcpu.state = VcpuState.HALTED
    vcpu.halt_poll_ns = 20_000
    th = _deliver_later(vcpu, 0.05)  # 50 ms: longer than the maximum
    vcpu._block_until_runnable()
    th.join()
    assert vcpu.halt_poll_ns == 10_000, "shrunk by 2 after a long halt"


def test_with_polling_off_the_window_never_opens():
    vcpu = halted_vcpu(0)
    th = _deliver_later(vcpu, 0.0)
    vcpu._block_until_runnable()
    th.join()
    assert vcpu.stats.halt_slept == 1 and vcpu.halt_poll_ns == 0


# ---------------------------------------------------------------- posted kicks


def _sleeping(vcpu: Vcpu) -> None:
    """Put `vcpu` in the core's BLOCKED mode, as its thread's sleep_begin does."""
    vcpu.core.sleep_begin(vcpu.index)
    vcpu.core.wake_clear(vcpu.index)


def test_a_kick_from_a_vcpu_thread_is_posted_and_sent_at_its_entry():
    sender, target = halted_vcpus(2, 0)
    _sleeping(target)
    done = []

    def woken() -> bool:
        return target.core.wait(target.index, 0)  # a token there: wait returns at once

    def on_sender_thread() -> None:
        vcpu_module._this_thread.vcpu = sender
        target.kick()
        done.append(woken())
        sender.send_posted_kicks()
        done.append(woken())

    th = threading.Thread(target=on_sender_thread)
    th.start()
    th.join()
    assert target.core.take_request(target.index)
    assert done == [False, True]


def test_a_kick_from_another_thread_wakes_at_once():
    (target,) = halted_vcpus(1, 0)
    _sleeping(target)
    th = threading.Thread(target=target.kick)  # e.g. the timer thread: no vCPU of its own
    th.start()
    th.join()
    assert target.core.wait(target.index, 0)


def test_posted_kicks_are_sent_before_the_poster_sleeps():
    sender, target = halted_vcpus(2, 0)
    _sleeping(target)
    vcpu_module._this_thread.vcpu = sender
    try:
        target.kick()  # posted on the sender (this thread plays its thread)
    finally:
        vcpu_module._this_thread.vcpu = None
    assert not target.core.wait(target.index, 0)
    th = _deliver_later(sender, 0.01)  # something to wake the sender itself
    sender._block_until_runnable()
    th.join()
    assert target.core.wait(target.index, 0)
