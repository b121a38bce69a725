"""The hostile-guest fuzzer (guest/fuzz.c, kvmpy/fuzz.py), short version.

Six seeds of 300 random operations on 2 vCPUs: kvmpy must not raise, hang, leak a thread
or a file descriptor, or lose a counted IPI, and every guest must reach its end. The
long run is `python -m kvmpy.fuzz --seeds 1-200 --ops 2000 --cpus 2 4 --jobs 2`.
"""

from __future__ import annotations

import threading

import pytest

from kvmpy.fuzz import FuzzResult, Summary, main, parse_seeds, run_fuzz

pytestmark = pytest.mark.kvm

SEEDS = range(1, 7)
MODES = {1: "mixed", 2: "xapic", 3: "x2apic", 4: "mixed", 5: "xapic", 6: "x2apic"}


@pytest.fixture(scope="module")
def results() -> list[FuzzResult]:
    threads = threading.active_count()
    out = [run_fuzz(seed, ops=300, cpus=2, mode=MODES[seed], timeout=60) for seed in SEEDS]
    assert threading.active_count() == threads
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_each_seed_runs_to_the_end_without_a_host_finding(
        results: list[FuzzResult], seed: int) -> None:
    r = results[seed - 1]
    assert r.seed == seed
    assert r.status == 1, (r.message, r.output[-2000:])
    assert "fuzz: done" in r.output
    assert not r.hang and not r.host_exception, (r.message, r.host_errors)
    assert r.delivery_failures == 0
    assert r.threads_left == 0 and r.fds_grown == 0
    assert r.counters["lost"] == 0 and r.counters["invented"] == 0
    assert r.counters["ops"] == 300
    # Every counted IPI sent came back exactly once.
    assert r.counters["tokens_received"] == r.counters["tokens_expected"]


def test_the_fuzzer_really_exercised_kvmpy(results: list[FuzzResult]) -> None:
    s = Summary.of(results)
    assert s.runs == 6 and s.operations == 6 * 300
    assert s.gp > 0 and s.interrupts > 0 and s.nmi > 0
    assert s.tokens > 0
    for reason in ("MMIO", "IO", "X86_WRMSR", "X86_RDMSR"):
        assert s.exits[reason] > 0, s.exits
    assert len(s.exits) >= 5
    assert s.unclaimed_pio > 0 and s.unclaimed_mmio > 0
    assert s.icr_fast > 0 and s.icr_slow > 0  # valid ICR writes, and refused ones (#GP)
    # Mode switches through IA32_APIC_BASE, in both directions.
    for event in ("mode_disabled", "mode_xapic", "mode_x2apic", "gp", "timer_fired"):
        assert s.apic_events[event] > 0, s.apic_events
    assert s.must_fail is False
    # The I/O APIC: window, entries and lines fuzzed, every oracle held (ioapic_bad is in
    # the guest's exit status too), and lines met programmed entries.
    assert s.ioapic_ops > 0 and all(r.counters["ioapic_bad"] == 0 for r in results)
    for event in ("index_out_of_range", "eoi_register", "mmio_write_ignored"):
        assert s.ioapic_events[event] > 0, s.ioapic_events
    assert s.ioapic_events["delivered"] + s.ioapic_events["masked"] > 0, s.ioapic_events
    # Every interrupt kvmpy injected reached a guest handler, none more (the guest adds
    # up its counts after every CPU turned interrupts off for good: nothing in flight).
    assert s.interrupts == s.apic_events["injected"] == s.injected
    assert s.in_flight == 0 and s.injection_mismatch == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_every_injection_reached_a_handler_of_that_vcpu(
        results: list[FuzzResult], seed: int) -> None:
    r = results[seed - 1]
    assert r.counters["closed"] == 1 and r.counters["close_timeouts"] == 0
    assert len(r.injected) == len(r.in_flight) == len(r.handled) == 2
    assert sum(r.handled) == r.counters["interrupts"]
    # per vCPU: injected == handled + in flight at the stop, and nothing in flight
    assert r.injected == r.handled and r.in_flight == (0, 0), r
    assert r.injection_mismatch == 0 and r.ok


@pytest.mark.parametrize("fastpath", ["native", "python", "off"])
def test_injected_equals_handled_on_four_vcpus_under_each_setting(fastpath: str) -> None:
    for seed in (1, 2):
        r = run_fuzz(seed, ops=600, cpus=4, mode="mixed", timeout=60, fastpath=fastpath)
        assert r.finished, (r.message, r.output[-2000:])
        assert r.fastpath == fastpath and f"--fastpath {fastpath}" in r.repro()
        assert r.counters["closed"] == 3
        assert sum(r.injected) > 0
        assert r.injected == tuple(h + f for h, f in zip(r.handled, r.in_flight, strict=True))
        assert r.injection_mismatch == 0 and r.ok


def _result(injected: tuple[int, ...], handled: dict[str, int], in_flight: tuple[int, ...],
            status: int = 1, output: str = "fuzz: handled\nfuzz: done\n") -> FuzzResult:
    return FuzzResult(seed=1, ops=10, cpus=len(injected), mode="mixed", status=status,
                      message="", counters=dict(handled), injected=injected,
                      in_flight=in_flight, output=output)


def test_injection_accounting_counts_what_kvm_held_at_the_stop() -> None:
    # vCPU 1: 3 injected, 2 handled, 1 still queued in KVM at the stop: accounted for.
    r = _result((5, 3), {"apic0": 5, "apic1": 2}, (0, 1))
    assert r.handled == (5, 2) and r.injection_mismatch == 0 and r.ok
    # The same without the queued one: an interrupt injected that no handler saw.
    lost = _result((5, 3), {"apic0": 5, "apic1": 2}, (0, 0))
    assert lost.injection_mismatch == 1 and not lost.ok
    # A handler count kvmpy never injected (a double delivery) is a mismatch too, and
    # per vCPU: a surplus on one vCPU does not cancel a deficit on another.
    moved = _result((5, 3), {"apic0": 6, "apic1": 2}, (0, 0))
    assert moved.injection_mismatch == 2
    s = Summary.of([r, lost])
    assert s.injected == 16 and s.in_flight == 1 and s.injection_mismatch == 1
    assert s.must_fail and s.failed == [lost]
    # A guest that reported a failure still printed final counts: compared.
    failed = _result((5, 3), {"apic0": 5, "apic1": 2}, (0, 0), status=3,
                     output="fuzz: handled\nfuzz: FAILED\n")
    assert failed.guest_failure and failed.injection_mismatch == 1
    # A guest that did not get that far has no final counts: not compared.
    hung = _result((5, 3), {}, (0, 1), status=8, output="")
    assert hung.injection_mismatch == 0
    assert Summary.of([hung]).injected == 0


def test_parse_seeds() -> None:
    assert parse_seeds("1-3,7, 9-10") == [1, 2, 3, 7, 9, 10]
    assert parse_seeds("5") == [5]


def test_the_command_line_runs_seeds_in_children_and_prints_the_table(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--seeds", "11-12", "--ops", "200", "--cpus", "2", "--jobs", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "operations fuzzed (total)" in out and "400" in out
    assert "hangs (must be 0)" in out and "X86_WRMSR" in out


def test_aps_reset_by_init_and_restarted_by_sipi_mid_run() -> None:
    threads = threading.active_count()
    # enough ops that the BSP reaches a reset while the APs still run (they may finish first)
    r = run_fuzz(3, ops=2000, cpus=3, mode="mixed", timeout=60, initsipi=True)
    assert r.status == 1 and "fuzz: done" in r.output, (r.message, r.output[-2000:])
    assert r.ok, (r.message, r.host_errors)
    assert r.counters["resets"] > 0 and r.counters["restart_timeouts"] == 0
    assert r.apic_events["init_received"] > 2  # more than the two of the SMP bring-up
    assert r.counters["tokens_received"] == r.counters["tokens_expected"]
    assert threading.active_count() == threads
