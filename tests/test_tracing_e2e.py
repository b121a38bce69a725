"""`kvmpy run --trace` on real guests: the JSON validates against the trace-event format,
every interrupt the guest counted has a complete flow (send -> injection -> EOI) and
nothing else is invented, and the rings stay bounded over a long run."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
from collections import defaultdict
from pathlib import Path

import pytest

from kvmpy.bench.floor import DEBUG_EXIT_STATUS, guest_image
from kvmpy.guestbuild import build_guest
from kvmpy.machine import Machine, MachineConfig
from kvmpy.tracing import export, probes, schema
from kvmpy.tracing import recorder as r

pytestmark = pytest.mark.kvm

GUEST_OK = (0 << 1) | 1  # the guest wrote 0 to the debug-exit port


def kvmpy_run(image: str | Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "kvmpy", "run", str(image), *args],
                          capture_output=True, text=True, timeout=180, env=env)


COUNT_RE = re.compile(r"^trace_ipi: cpu (\d+) vector (0x[0-9a-f]+) received (\d+) sent (\d+)$",
                      re.M)


def traced_run(tmp_path: Path, *args: str, append: str = "n=20 timer=5"
               ) -> tuple[dict[str, object], dict[tuple[int, int], int], str]:
    out = tmp_path / "trace.json"
    res = kvmpy_run(build_guest("trace_ipi"), "--cpus", "2", "--append", append,
                    "--trace", str(out), *args)
    assert res.returncode == GUEST_OK, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    counts = {(int(cpu), int(vec, 16)): int(got)
              for cpu, vec, got, sent in COUNT_RE.findall(res.stdout) if got == sent}
    assert len(counts) == 3, res.stdout
    return json.loads(out.read_text()), counts, res.stderr


def flows_of(trace: dict[str, object]) -> dict[object, list[dict[str, object]]]:
    by_id: dict[object, list[dict[str, object]]] = defaultdict(list)
    for ev in trace["traceEvents"]:
        if ev["ph"] in ("s", "t", "f"):
            by_id[(ev["cat"], ev["id"])].append(ev)
    return by_id


def test_traced_ipi_run_every_counted_interrupt_has_a_complete_flow(tmp_path: Path) -> None:
    trace, counts, stderr = traced_run(tmp_path)
    assert schema.validate(trace) == []
    other = trace["otherData"]
    assert f"{other['interrupts']} interrupts" in stderr
    # Nothing invented, nothing unexplained: the guest's own total is the trace's.
    assert other["interrupts"] == sum(counts.values())
    assert other["unsourced_injections"] == other["never_injected"] == 0
    assert other["events_dropped"] == 0
    irqs = [e["args"] for e in trace["traceEvents"] if e.get("cat") == "irq"]
    complete: dict[tuple[int, int], int] = defaultdict(int)
    for it in irqs:
        if it["t_send"] is not None and it["t_eoi"] is not None:
            assert it["t_send"] < it["t_inject"] < it["t_eoi"]
            complete[(it["target"], it["vector"])] += 1
        assert it["merged"] == []  # the guest keeps one IPI in flight: none coalesce
    assert dict(complete) == counts
    # The arrows themselves: one flow per IPI, from the sender's track (vCPU 0 = tid 1)
    # to the EOI on the target's (vCPU 1 = tid 2), through the injection.
    eoi_us = {round(it["t_eoi"] / 1000, 3) for it in irqs if it["t_eoi"] is not None}
    per_vector: dict[str, int] = defaultdict(int)
    for (cat, _fid), evs in flows_of(trace).items():
        if not cat.startswith("irq."):
            continue  # the SIPI flows of the bring-up
        s, f = evs[0], evs[-1]
        assert s["ph"] == "s" and f["ph"] == "f" and f["ts"] in eoi_us
        if s["tid"] == 1 and f["tid"] == 2:
            per_vector[s["name"]] += 1
    assert per_vector == {"irq 0x50": counts[(1, 0x50)], "irq 0x51": counts[(1, 0x51)]}
    sources = {(it["vector"], it["source"]) for it in irqs}
    assert sources == {(0x50, "ipi"), (0x51, "ipi"), (0x52, "timer")}
    # Halted phase: woken through the wake event; polling phase: kicked by a signal.
    assert any(it["t_wake"] is not None for it in irqs if it["vector"] == 0x50)
    assert any(it["t_kick_exit"] is not None for it in irqs if it["vector"] == 0x51)


def test_trace_has_the_tracks_and_guest_tsc_beside_console_lines(tmp_path: Path) -> None:
    trace, _, _ = traced_run(tmp_path, append="n=3 timer=2")
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"vCPU 0", "vCPU 1", "timer thread", "main thread", "serial console"} <= names
    cats = {e.get("cat") for e in events if e["ph"] == "X" and e["tid"] in (1, 2)}
    assert {"guest", "exit.fast", "exit.slow", "loop", "blocked"} <= cats
    slices = {e["name"] for e in events if e["ph"] == "X"}
    assert {"wait for SIPI", "halted", "X86_WRMSR 0x830 ICR (fast)"} <= slices
    assert any(e["ph"] == "b" and e["cat"] == "kick" for e in events)
    assert any(e.get("cat") == "sipi" for e in events)  # INIT-SIPI-SIPI bring-up
    phases = [e["args"] for e in events if e.get("cat") == "console" and "guest_tsc" in e["args"]]
    assert len(phases) == 3
    for p in phases:
        # The guest read its TSC, then printed the line: the line's newline comes after
        # the time the TSC maps to (kvmpy's extrapolation of KVM's TSC), not before.
        assert 0 <= p["printed_after_tsc_us"] < 2_000_000, p


def test_no_fastpath_trace_names_the_icr_exits_slow(tmp_path: Path) -> None:
    trace, counts, _ = traced_run(tmp_path, "--no-fastpath", append="n=3 timer=1")
    assert schema.validate(trace) == []
    slices = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert "X86_WRMSR 0x830 ICR (slow)" in slices
    assert "X86_WRMSR 0x830 ICR (fast)" not in slices
    assert trace["otherData"]["interrupts"] == sum(counts.values())


def test_small_ring_wraps_and_the_trace_still_validates(tmp_path: Path) -> None:
    trace, counts, stderr = traced_run(tmp_path, "--trace-events", "64", append="n=10 timer=2")
    assert schema.validate(trace) == []
    other = trace["otherData"]
    assert other["events_dropped"] > 0 and "oldest overwritten" in stderr
    assert other["events_per_ring"] == 64
    per_tid: dict[int, int] = defaultdict(int)
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and e["tid"] in (1, 2):
            per_tid[e["tid"]] += 1
    # a RUN record is two slices; a vCPU has a Python ring and a native one of 64 each
    assert 0 < max(per_tid.values()) <= 2 * 2 * 64
    # What the window holds is joined; what fell out of it is not counted as lost.
    assert other["interrupts"] <= sum(counts.values())
    assert other["never_injected"] == 0


def test_kernel_irqchip_trace_has_vcpu_states_only(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    res = kvmpy_run(build_guest("hello"), "--irqchip", "kernel", "--trace", str(out))
    assert res.returncode & 1, res.stderr  # the guest's debug-exit write ended it
    trace = json.loads(out.read_text())
    assert schema.validate(trace) == []
    assert trace["otherData"]["interrupts"] == 0 and trace["otherData"]["irqchip"] == "kernel"
    assert any(e["ph"] == "X" and e["cat"] == "guest" for e in trace["traceEvents"])


def _traced_floor_run(n: int, events: int) -> tuple[r.Tracer, int, int]:
    """The floor guest's n ICR exits, traced into rings of ``events``; returns the
    tracer, its slot count before the run, and the bytes that lines of recorder.py
    still hold after it (tracemalloc)."""
    config = MachineConfig(cpus=1, memory=4 << 20, serial=io.BytesIO())
    with Machine(config) as machine:
        machine.load(guest_image(n), flat=True)
        tracer = probes.attach(machine, events)
        slots = tracer.slots
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        result = machine.run(timeout=120)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        assert result.status == DEBUG_EXIT_STATUS, result.message
    recorder = [tracemalloc.Filter(True, r.__file__)]
    held = sum(s.size_diff for s in after.filter_traces(recorder).compare_to(
        before.filter_traces(recorder), "filename"))
    return tracer, slots, held


def test_long_run_rings_stay_bounded_and_memory_does_not_grow() -> None:
    """4k then 20k ICR exits (~8k, ~40k events) through 256-event rings: the slot count
    never changes, and what the recorder still holds after the run (the ints of the last
    256 events) is the same for both lengths; a leak of one int per event would add
    ~1 MB between them."""
    short, _, held_short = _traced_floor_run(4_000, 256)
    tracer, slots, held = _traced_floor_run(20_000, 256)
    ring = tracer.vcpu_rings[0]
    # RUN + DONE per exit, written by the native core into its own bounded ring
    assert ring.native_count >= 2 * 20_000
    assert ring.dropped == ring.native_count - 256 + max(0, ring.count - 256)
    assert tracer.slots == slots == short.slots
    assert abs(held - held_short) < 2048 and held < 64 * 1024, (held_short, held)
    trace = export.build(tracer, title="floor")
    assert schema.validate(trace) == []
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 1]
    # guest + exit from a RUN, loop top from DONE; the Python ring adds a few
    assert 256 <= len(slices) <= 2 * 2 * 256


@pytest.mark.parametrize(("args", "message"), [
    (["--trace-events", "8"], "--trace-events must be between 16 and"),
    (["--trace-events", "0"], "--trace-events must be between 16 and"),
])
def test_bad_trace_options_are_one_line_before_the_guest_runs(tmp_path: Path, args: list[str],
                                                              message: str) -> None:
    res = kvmpy_run(build_guest("hello"), "--trace", str(tmp_path / "t.json"), *args)
    assert res.returncode == 2 and message in res.stderr and res.stderr.count("\n") == 1
    assert "hello" not in res.stdout and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("where", ["missing/t.json", "."])
def test_unwritable_trace_path_is_one_line(tmp_path: Path, where: str) -> None:
    res = kvmpy_run(build_guest("hello"), "--trace", str(tmp_path / where))
    assert res.returncode == 2 and "cannot write trace" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_coalesced_ipis_are_merged_flows_not_invented_interrupts(tmp_path: Path) -> None:
    """Bursts of 4 back-to-back IPIs of one vector to a halted vCPU: those that find the
    vector pending in IRR merge into it. The trace holds exactly the guest's received
    count as interrupts, and every other send as a flow merged into one of them."""
    out = tmp_path / "trace.json"
    res = kvmpy_run(build_guest("trace_ipi"), "--cpus", "2", "--append",
                    "n=5 timer=1 burst=4", "--trace", str(out))
    assert res.returncode == GUEST_OK, (res.stdout, res.stderr)
    m = re.search(r"^trace_ipi: cpu 1 vector 0x53 received (\d+) sent (\d+)$", res.stdout, re.M)
    assert m, res.stdout
    received, sent = int(m.group(1)), int(m.group(2))
    assert sent == 20
    trace = json.loads(out.read_text())
    assert schema.validate(trace) == []
    burst = [e["args"] for e in trace["traceEvents"]
             if e.get("cat") == "irq" and e["args"]["vector"] == 0x53]
    merged = sum(len(it["merged"]) for it in burst)
    assert len(burst) == received and received + merged == sent
    merged_flows = [e for e in trace["traceEvents"] if e.get("cat") == "irq.merged"]
    assert len(merged_flows) == 2 * merged  # a start and a finish each
    assert trace["otherData"]["unsourced_injections"] == 0
    assert trace["otherData"]["never_injected"] == 0


def test_traced_ipi_stress_on_4_vcpus_matches_the_guests_per_cpu_counts(tmp_path: Path
                                                                        ) -> None:
    """Random fixed, logical, self, broadcast and all-but-self IPIs on 4 vCPUs (the
    guest keeps one in flight per target and vector): per target, the trace's
    interrupts on the guest's vectors are the guest's own received counts."""
    out = tmp_path / "trace.json"
    res = kvmpy_run(build_guest("ipi_stress"), "--cpus", "4", "--append", "ipis=120 seed=5",
                    "--trace", str(out))
    assert res.returncode == GUEST_OK, (res.stdout, res.stderr)
    # by APIC ID (= kvmpy's vCPU index): the guest's CPU indexes are in arrival order
    guest = {int(a): int(n) for _, a, n in
             re.findall(r"^ipi_stress: cpu (\d+) apic (\d+) received (\d+)$", res.stdout,
                        re.M)}
    assert len(guest) == 4
    trace = json.loads(out.read_text())
    assert schema.validate(trace) == []
    per_target: dict[int, int] = defaultdict(int)
    for e in trace["traceEvents"]:
        if e.get("cat") == "irq" and 0x40 <= e["args"]["vector"] < 0x50:
            it = e["args"]
            assert it["t_send"] is not None and it["t_eoi"] is not None, it
            per_target[it["target"]] += 1
    assert dict(per_target) == guest
    assert trace["otherData"]["unsourced_injections"] == 0


def test_the_core_timer_threads_firings_are_traced() -> None:
    """Under --trace the native fastpath still takes IA32_TSC_DEADLINE writes, and the
    core's timer thread records each firing and its kick (TIMER_FIRE, then KICK) in the
    "timer thread" ring, as Python's TimerService does for the timers it arms."""
    out = io.BytesIO()
    cfg = MachineConfig(cpus=2, serial=out, cmdline="mode=x2apic")
    with Machine(cfg) as m:
        m.load(build_guest("apic_timer").read_bytes())
        tracer = probes.attach(m)
        result = m.run(timeout=120)
        ring = tracer.timer_ring
        assert ring.native is not None
        native = memoryview(ring.native).cast("q").tolist()[: 4 * ring.native_count]
    assert result.status == GUEST_OK, (result.message, out.getvalue()[-2000:])
    assert b"apic_timer: ok" in out.getvalue()
    recs = [tuple(native[i : i + 4]) for i in range(0, len(native), 4)]
    fires = [x for x in recs if x[1] == r.TIMER_FIRE]
    assert fires, "the core's timer thread recorded no firing: did --trace move the "\
                  "TSC-deadline writes back to Python?"
    for (t, kind, vcpu, deadline), nxt in zip(recs, recs[1:] + [None], strict=True):
        if kind != r.TIMER_FIRE:
            continue
        assert vcpu in (0, 1) and 0 < deadline <= t  # never before its deadline
        assert nxt is not None and nxt[1] == r.KICK and nxt[2] == vcpu
        assert nxt[3] in (r.KICK_NONE, r.KICK_SIGNAL, r.KICK_WAKE)
