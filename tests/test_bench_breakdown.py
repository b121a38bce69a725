"""`kvmpy bench ipi --breakdown`: cutting round trips out of trace rings and perf output
(synthetic timelines whose answer is known), and one real traced run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmpy.bench import breakdown as bd
from kvmpy.kvm import ioctls as k
from kvmpy.tracing import recorder as tr

WRMSR = k.KVM_EXIT_X86_WRMSR


def _kvmpy_timeline(round_trips: int, *, awake_every: int = 0):
    """Sender and target rings for `round_trips` vmexit_ipi_halt round trips, 1000 ns
    per step, with known hop lengths (us): icr 2, wake 10, unblock 3, inject 4,
    guest 50, then the sender resumes 30 after the EOI exit."""
    sender: list[tuple[int, int, int, int]] = []
    target: list[tuple[int, int, int, int]] = []
    t = 0
    for i in range(round_trips + 1):
        awake = awake_every and i % awake_every == 1
        sender.append((t, tr.EXIT, WRMSR, bd.MSR_ICR))
        sender.append((t + 1_000, tr.SEND, bd.TARGET, bd.VEC_CALL))
        sender.append((t + 2_000, tr.KICK, bd.TARGET, tr.KICK_NONE if awake else tr.KICK_WAKE))
        sender.append((t + 2_500, tr.DONE, WRMSR, 1))
        sender.append((t + 3_000, tr.ENTER, 0, 0))
        target.append((t + 12_000, tr.WOKE, 1, 0))
        target.append((t + 13_000, tr.UNBLOCK, 1, 0))
        target.append((t + 15_000, tr.INJECT, bd.VEC_CALL, 0))
        target.append((t + 19_000, tr.ENTER, 0, 0))
        target.append((t + 69_000, tr.EXIT, WRMSR, bd.MSR_EOI))
        target.append((t + 70_000, tr.EOI, bd.VEC_CALL, 0))
        target.append((t + 71_000, tr.ENTER, 0, 0))
        target.append((t + 80_000, tr.EXIT, k.KVM_EXIT_HLT, 0))
        target.append((t + 82_000, tr.BLOCK, 1, 0))
        t += 99_000  # the next ICR exit: 30 us after the EOI exit
    return sender, target


def test_kvmpy_round_trips_add_up_and_match_the_timeline():
    sender, target = _kvmpy_timeline(5)
    trips, awake = bd.kvmpy_round_trips(sender, target)
    assert awake == [] and len(trips) == 5
    for trip in trips:
        assert trip["icr exit"] == 2_000 and trip["wake"] == 10_000
        assert trip["unblock"] == 3_000 and trip["inject+entry"] == 4_000
        assert trip["guest handler"] == 50_000 and trip["sender resumes"] == 30_000
        assert trip["eoi exit"] == 2_000 and trip["guest iret+hlt"] == 9_000
        assert trip["hlt exit to sleep"] == 2_000 and trip["sender exit rest"] == 1_000
        critical = sum(v for h, v in trip.items() if h in bd.KVMPY_HOPS)
        assert critical == trip["round trip"] == 99_000


def test_round_trips_to_an_awake_target_are_their_own_class():
    sender, target = _kvmpy_timeline(6, awake_every=2)
    asleep, awake = bd.kvmpy_round_trips(sender, target)
    assert len(asleep) == 3 and len(awake) == 3
    for trip in awake:
        assert "wake" not in trip and "unblock" not in trip
        assert trip["target busy"] == 13_000  # kick -> injection, in one hop
        assert sum(v for h, v in trip.items() if h in bd.KVMPY_HOPS) == trip["round trip"]


def test_perf_splits_the_wake_into_futex_scheduler_and_python():
    sender, target = _kvmpy_timeline(2)
    tid = 4242
    perf = []
    for i in range(3):
        base = i * 99_000
        perf.append(bd.PerfEvent(1, base + 5_000, "sched:sched_wakeup",
                                 f"comm=python3 pid={tid} prio=120 target_cpu=001"))
        perf.append(bd.PerfEvent(0, base + 9_000, "sched:sched_switch",
                                 f"prev_comm=swapper/1 prev_pid=0 ==> next_comm=python3 "
                                 f"next_pid={tid} next_prio=120"))
    trips, _ = bd.kvmpy_round_trips(sender, target, perf, tid)
    assert len(trips) == 2
    for trip in trips:
        assert "wake" not in trip
        assert (trip["wake: futex"], trip["wake: scheduler"], trip["wake: to Python"]) == \
            (3_000, 4_000, 3_000)


PERF_TEXT = """\
   101  1000.000000000:        kvm:kvm_apic_ipi: dst 1 vec 84 (Fixed|physical|assert|edge|dst)
   101  1000.000001000: kvm:kvm_apic_accept_irq: apicid 1 vec 84 (Fixed|edge)
   101  1000.000002000:      sched:sched_wakeup: comm=python3 pid=102 prio=120 target_cpu=001
     0  1000.000007000:      sched:sched_switch: prev_comm=swapper/1 prev_pid=0 ==> \
next_comm=python3 next_pid=102 next_prio=120
   102  1000.000009000:     kvm:kvm_vcpu_wakeup: wait time 66004 ns, polling valid
   102  1000.000012000:             kvm:kvm_eoi: apicid 1 vector 84
   101  1000.000080000:        kvm:kvm_apic_ipi: dst 1 vec 84 (Fixed|physical|assert|edge|dst)
   101  1000.000080500: kvm:kvm_apic_accept_irq: apicid 1 vec 84 (Fixed|edge)
   102  1000.000081000:     kvm:kvm_vcpu_wakeup: wait time 1000 ns, polling valid
   102  1000.000083000:             kvm:kvm_eoi: apicid 1 vector 84
   101  1000.000150000:        kvm:kvm_apic_ipi: dst 1 vec 84 (Fixed|physical|assert|edge|dst)
"""


def test_kernel_round_trips_from_perf_script_output():
    events = bd.parse_perf_script(PERF_TEXT)
    assert len(events) == 11 and events[0].t == 1000 * 10**9 and events[3].tid == 0
    slept_trips, polled = bd.kernel_round_trips(events, 101, 102)
    assert len(slept_trips) == 1 and len(polled) == 1
    (slept,), (caught,) = slept_trips, polled
    trips = [slept, caught]
    assert slept == {"icr -> accept": 1_000, "accept -> wakeup": 1_000,
                     "wake: scheduler": 5_000, "halt exit": 2_000, "guest handler": 3_000,
                     "sender resumes": 68_000, "round trip": 80_000}
    assert "accept -> wakeup" not in caught and "wake: scheduler" not in caught
    assert caught["halt exit"] == 500 and caught["round trip"] == 70_000
    for trip in trips:
        assert sum(v for h, v in trip.items() if h != "round trip") == trip["round trip"]


def test_report_and_plot(tmp_path):
    sender, target = _kvmpy_timeline(4)
    result = bd.BreakdownResult("kvm_pvm", "")
    cb = result.configs["kvmpy-fast"] = bd.ConfigBreakdown("kvmpy-fast")
    cb.add(bd.HALTED, bd.kvmpy_round_trips(sender, target)[0])
    slept, polled = bd.kernel_round_trips(bd.parse_perf_script(PERF_TEXT), 101, 102)
    kern = result.configs["kernel"] = bd.ConfigBreakdown("kernel")
    kern.add(bd.SLEPT, slept)
    kern.add(bd.POLLED, polled)
    import io

    out = io.StringIO()
    bd.print_breakdown(result, file=out)
    text = out.getvalue()
    assert "kvmpy-fast" in text and "guest handler" in text and "99.0" in text
    assert "caught by halt polling" in text and "1 of 2 round trips" in text
    png = tmp_path / "b.png"
    bd.plot_breakdown(result, str(png))
    assert png.stat().st_size > 1000


@pytest.mark.kvm
def test_breakdown_of_a_real_run_is_consistent():
    r = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "ipi", "--breakdown", "--no-perf",
         "--configs", "kvmpy-fast", "kvmpy-slow", "--n", "40", "--rounds", "1", "--json"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    for name in ("kvmpy-fast", "kvmpy-slow"):
        cfg = data["configs"][name]
        # 2 x 40 round trips; the ring's first and last may be cut off
        assert cfg["round_trips"] >= 70 and not cfg["failures"]
        for trip in (t for trips in cfg["round_trips_ns"].values() for t in trips):
            assert sum(v for h, v in trip.items() if h in bd.KVMPY_HOPS) == trip["round trip"]
            assert trip["guest handler"] > 0 and trip["icr exit"] > 0
        assert len(cfg["guest_round_trip_ns"]) == 40
