"""The trace recorder, the join into interrupts, the export and the summary, without
KVM: rings on synthetic records, hooks on the pure APIC model (kvmpy.apic.testing)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kvmpy.apic import constants as c
from kvmpy.apic.testing import make_system, send, write_reg
from kvmpy.cli import main
from kvmpy.kvm import ioctls as k
from kvmpy.tracing import export, flows, schema, summary
from kvmpy.tracing import recorder as r

WRMSR, INTR, HLT = k.KVM_EXIT_X86_WRMSR, k.KVM_EXIT_INTR, k.KVM_EXIT_HLT

# ---------------------------------------------------------------- the ring


def test_ring_keeps_the_last_capacity_events_in_order_and_never_grows() -> None:
    ring = r.Ring("t", 16)
    slots = len(ring.buf)
    for i in range(100):
        ring.rec(r.SEND, i, -i)
    assert len(ring.buf) == slots == 16 * r.FIELDS
    recs = ring.records()
    assert [x[2] for x in recs] == list(range(84, 100))
    assert [x[3] for x in recs] == [-i for i in range(84, 100)]
    assert all(a[0] <= b[0] for a, b in zip(recs, recs[1:], strict=False))
    assert ring.count == 100 and ring.dropped == 84


def test_ring_before_it_wraps_and_exactly_full() -> None:
    ring = r.Ring("t", 16)
    for i in range(5):
        ring.rec(r.EOI, i, 0)
    assert [x[2] for x in ring.records()] == [0, 1, 2, 3, 4] and ring.dropped == 0
    for i in range(5, 16):
        ring.rec(r.EOI, i, 0)
    assert [x[2] for x in ring.records()] == list(range(16)) and ring.dropped == 0


def test_a_run_record_reads_back_as_enter_then_exit() -> None:
    ring = r.Ring("t", 16)
    t_enter = r.now_ns()
    ring.ran(t_enter, (WRMSR, 0x830, 0x40, 0))
    ring.rec(r.DONE, WRMSR, 1)
    (t0, k0, a0, b0), (t1, k1, a1, b1), done = ring.records()
    assert (t0, k0, a0, b0) == (t_enter, r.ENTER, 0, 0)
    assert (k1, a1, b1) == (r.EXIT, WRMSR, 0x830) and t_enter <= t1 <= done[0]
    ring.ran(t_enter, (k.KVM_EXIT_MMIO, 0xFEE00300, 4, 1))
    assert ring.records()[-1][1:] == (r.EXIT, k.KVM_EXIT_MMIO, 0xFEE00300)


@pytest.mark.parametrize("n", [0, 15, r.MAX_EVENTS + 1])
def test_ring_capacity_out_of_bounds_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match="between"):
        r.Ring("t", n)


def test_tracer_slots_are_fixed_at_creation() -> None:
    tracer = r.Tracer(3, 64)
    assert tracer.slots == (3 + 3) * 64 * r.FIELDS
    for ring in tracer.rings:
        for i in range(1000):
            ring.rec(r.ENTER, i, 0)
    assert tracer.slots == (3 + 3) * 64 * r.FIELDS
    assert tracer.summary()["dropped"] == 6 * (1000 - 64)


def test_ring_here_is_the_calling_threads_ring() -> None:
    tracer = r.Tracer(2, 64)
    assert tracer.ring_here() is tracer.main_ring
    seen: list[r.Ring] = []
    registered, done = threading.Event(), threading.Event()

    def vcpu_body() -> None:  # stays alive so that its thread id is not reused
        tracer.register_thread(threading.get_ident(), tracer.vcpu_rings[1])
        seen.append(tracer.ring_here())
        registered.set()
        done.wait(10)

    vcpu = threading.Thread(target=vcpu_body)
    vcpu.start()
    registered.wait(10)
    other: list[r.Ring] = []
    t = threading.Thread(target=lambda: other.append(tracer.ring_here()))
    t.start()
    t.join()
    done.set()
    vcpu.join()
    assert seen == [tracer.vcpu_rings[1]] and other == [tracer.other_ring]


# ---------------------------------------------------------------- hooks on the APIC model


def _traced_system(n: int = 2) -> tuple[r.Tracer, object]:
    sys_ = make_system(n, x2apic=True)
    tracer = r.Tracer(n, 256)
    sys_.bus.tracer = tracer
    for apic, ring in zip(sys_.apics, tracer.vcpu_rings, strict=True):
        apic.on_eoi = ring.eoi
        apic.on_timer_irq = ring.timer_irq
    # The test thread plays vCPU 0: its sends land in vCPU 0's ring.
    tracer.register_thread(threading.get_ident(), tracer.vcpu_rings[0])
    return tracer, sys_


def test_send_is_recorded_by_the_sender_with_target_vector_and_coalescing() -> None:
    tracer, s = _traced_system()
    send(s[0], c.DM_FIXED << 8 | 0x50, 1)
    send(s[0], c.DM_FIXED << 8 | 0x50, 1)  # IRR bit still set: merges
    recs = [x for x in tracer.vcpu_rings[0].records() if x[1] == r.SEND]
    assert [(x[2], x[3] & 0xFF, x[3] >> 12) for x in recs] == \
        [(1, 0x50, 0), (1, 0x50, r.SEND_COALESCED)]
    assert s[1].irr[0x50] == 1
    assert not tracer.vcpu_rings[1].records()  # nothing written into the target's ring


def test_send_to_a_disabled_apic_and_an_illegal_vector_are_flagged() -> None:
    tracer, s = _traced_system()
    write_reg(s[1], c.REG_SVR, 0xFF)  # software-disabled
    send(s[0], 0x60, 1)
    write_reg(s[1], c.REG_SVR, c.SVR_APIC_ENABLED | 0xFF)
    s[0].wrmsr(c.MSR_X2APIC_SELF_IPI, 0x20)
    flags = [x[3] >> 12 for x in tracer.vcpu_rings[0].records() if x[1] == r.SEND]
    assert flags == [r.SEND_REJECTED, 0]


def test_eoi_and_timer_hooks_record_the_vector_on_the_owner() -> None:
    tracer, s = _traced_system()
    send(s[0], 0x51, 1)
    s[1].ack(0x51)
    write_reg(s[1], c.REG_EOI, 0)
    write_reg(s[1], c.REG_LVT_TIMER, 0x52)
    write_reg(s[1], c.REG_TIMER_DIVIDE, 0xB)
    write_reg(s[1], c.REG_TIMER_INITIAL, 1000)
    deadline = s[1].timer_deadline_ns()
    s.clock.advance(2000)
    assert s[1].timer_expired(s.clock.ns())
    recs = [(x[1], x[2], x[3]) for x in tracer.vcpu_rings[1].records()]
    assert recs == [(r.EOI, 0x51, 0), (r.TIMER_IRQ, 0x52, deadline)]


def test_without_a_tracer_nothing_is_recorded() -> None:
    s = make_system(2, x2apic=True)
    assert s.bus.tracer is None and s[0].on_eoi is None
    send(s[0], 0x50, 1)
    assert s[1].irr[0x50] == 1


# ---------------------------------------------------------------- the join


def _rings(**named: list[tuple[int, int, int, int]]) -> dict[str, list[flows.Record]]:
    rings = {"vCPU 0": [], "vCPU 1": [], "timer thread": [], "main thread": [],
             "other threads": []}
    for name, recs in named.items():
        rings[name.replace("_", " ")] = sorted(recs)
    return rings


def _ipi_to_halted_vcpu1(t: int, vector: int = 0x50) -> tuple[list, list]:
    """Records of one IPI from vCPU 0 to a halted vCPU 1, starting at time t."""
    v0 = [(t, r.EXIT, WRMSR, 0x830), (t + 10, r.SEND, 1, vector),
          (t + 12, r.KICK, 1, r.KICK_WAKE), (t + 20, r.DONE, WRMSR, 1),
          (t + 21, r.ENTER, 0, 0)]
    v1 = [(t + 40, r.WOKE, 1, 0), (t + 45, r.UNBLOCK, 1, 0), (t + 50, r.INJECT, vector, 0),
          (t + 55, r.ENTER, 0, 0), (t + 90, r.EXIT, WRMSR, 0x80B), (t + 92, r.EOI, vector, 0),
          (t + 95, r.DONE, WRMSR, 0), (t + 96, r.ENTER, 0, 0), (t + 120, r.EXIT, HLT, 0),
          (t + 122, r.DONE, HLT, 0), (t + 123, r.BLOCK, 1, 0)]
    return v0, v1


def test_join_one_ipi_to_a_halted_target_has_every_hop() -> None:
    v0, v1 = _ipi_to_halted_vcpu1(1000)
    j = flows.join(_rings(vCPU_0=v0, vCPU_1=[(999, r.BLOCK, 1, 0), *v1]),
                   ["vCPU 0", "vCPU 1"])
    assert len(j.interrupts) == 1 and j.unsourced == 0 and not j.never_injected
    it = j.interrupts[0]
    assert (it.target, it.vector, it.source, it.sender) == (1, 0x50, "ipi", 0)
    assert (it.t_send, it.t_kick, it.kick_how, it.t_wake) == (1010, 1012, r.KICK_WAKE, 1040)
    assert (it.t_inject, it.t_entry, it.t_first_exit, it.t_eoi) == (1050, 1055, 1090, 1092)
    assert it.first_exit_reason == WRMSR and it.merged == []


def test_join_kicked_target_in_the_guest_gets_its_kick_exit() -> None:
    v0 = [(100, r.EXIT, WRMSR, 0x830), (110, r.SEND, 1, 0x51),
          (111, r.KICK, 1, r.KICK_SIGNAL), (130, r.DONE, WRMSR, 1)]
    v1 = [(50, r.ENTER, 0, 0), (400, r.EXIT, INTR, 0), (401, r.DONE, INTR, 1),
          (420, r.INJECT, 0x51, 0), (425, r.ENTER, 0, 0), (500, r.EXIT, WRMSR, 0x80B),
          (501, r.EOI, 0x51, 0)]
    it, = flows.join(_rings(vCPU_0=v0, vCPU_1=v1), ["vCPU 0", "vCPU 1"]).interrupts
    assert (it.t_kick, it.t_kick_exit, it.kick_exit_reason) == (111, 400, INTR)
    assert it.t_wake is None and it.t_eoi == 501


def test_join_two_sends_before_one_injection_merge_into_one_interrupt() -> None:
    v0 = [(100, r.SEND, 1, 0x50), (200, r.SEND, 1, 0x50 | r.SEND_COALESCED << 12)]
    v1 = [(300, r.INJECT, 0x50, 0), (400, r.EOI, 0x50, 0), (500, r.INJECT, 0x50, 0)]
    j = flows.join(_rings(vCPU_0=v0, vCPU_1=v1), ["vCPU 0", "vCPU 1"])
    first, second = j.interrupts
    assert first.t_send == 100 and first.merged == [(200, 0)] and first.t_eoi == 400
    assert second.source == "none" and second.t_eoi is None
    assert j.unsourced == 1 and j.truncated == 0


def test_join_reports_a_send_never_injected_and_skips_rejected_ones() -> None:
    v0 = [(100, r.SEND, 1, 0x50), (150, r.SEND, 1, 0x60 | r.SEND_REJECTED << 12)]
    j = flows.join(_rings(vCPU_0=v0), ["vCPU 0", "vCPU 1"])
    assert j.interrupts == [] and j.never_injected == [(100, 1, 0x50, 0)]
    assert j.rejected == 1


def test_join_timer_interrupt_with_the_timer_threads_firing() -> None:
    timer = [(1000, r.TIMER_FIRE, 0, 990), (1005, r.KICK, 0, r.KICK_SIGNAL)]
    v0 = [(10, r.ENTER, 0, 0), (1100, r.EXIT, INTR, 0), (1101, r.DONE, INTR, 1),
          (1110, r.TIMER_IRQ, 0x52, 990), (1120, r.INJECT, 0x52, 0), (1125, r.ENTER, 0, 0),
          (1200, r.EXIT, WRMSR, 0x80B), (1201, r.EOI, 0x52, 0)]
    it, = flows.join(_rings(vCPU_0=v0, timer_thread=timer), ["vCPU 0", "vCPU 1"]).interrupts
    assert (it.source, it.t_deadline, it.t_send, it.t_fire) == ("timer", 990, 1110, 1000)
    assert (it.t_kick, it.t_kick_exit, it.t_eoi) == (1005, 1100, 1201)


def test_join_nmi_is_send_to_kvm_nmi_with_no_eoi() -> None:
    v0 = [(100, r.SEND, 1, 2 | 4 << 8)]
    v1 = [(200, r.INJECT, 2, 1), (250, r.EOI, 2, 0)]  # an EOI of vector 2 is not the NMI's
    it, eoi_only = flows.join(_rings(vCPU_0=v0, vCPU_1=v1), ["vCPU 0", "vCPU 1"]), None
    (nmi,) = it.interrupts
    assert nmi.nmi and nmi.t_send == 100 and nmi.t_eoi is None and eoi_only is None


def test_join_ignores_what_lies_before_a_wrapped_rings_window() -> None:
    v0 = [(100, r.SEND, 1, 0x50), (600, r.SEND, 1, 0x50)]
    v1 = [(300, r.INJECT, 0x50, 0), (700, r.INJECT, 0x50, 0)]
    j = flows.join(_rings(vCPU_0=v0, vCPU_1=v1), ["vCPU 0", "vCPU 1"], window_ns=500)
    (it,) = j.interrupts
    assert it.t_send == 600 and it.t_inject == 700 and j.truncated == 0


# ---------------------------------------------------------------- export and schema


def _synthetic_tracer() -> r.Tracer:
    tracer = r.Tracer(2, 256)
    v0, v1 = _ipi_to_halted_vcpu1(10_000)
    v0b, v1b = _ipi_to_halted_vcpu1(20_000, 0x51)
    _fill(tracer.vcpu_rings[0], [(9_000, r.ENTER, 0, 0), *v0, *v0b, (29_000, r.EXIT, HLT, 0)])
    _fill(tracer.vcpu_rings[1], [(9_500, r.BLOCK, 1, 0), *v1, *v1b])
    tracer.started_ns = 9_000
    tracer.meta.update({"tsc_hz": 1_000_000_000,
                        "tsc_map": [{"vcpu": 0, "ref_ns": 9_000, "tsc": 5_000}]})
    tracer.console.append((25_000, "guest says tsc=6000"))
    return tracer


def _fill(ring: r.Ring, recs: list[tuple[int, int, int, int]]) -> None:
    """Write records with chosen times straight into a ring's slots."""
    for t, kind, a, b in sorted(recs):
        j = (ring.count % ring.capacity) * r.FIELDS
        ring.buf[j : j + 4] = [t, kind, a, b]
        ring.count += 1
    ring._j = (ring.count % ring.capacity) * r.FIELDS


def test_export_validates_against_the_trace_event_schema(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    other = export.write(_synthetic_tracer(), path, title="synthetic")
    trace = json.loads(path.read_text())
    assert schema.validate(trace) == []
    assert other["interrupts"] == 2 and trace["otherData"]["format"] == export.FORMAT
    ph = [e["ph"] for e in trace["traceEvents"]]
    assert ph.count("s") == ph.count("f") == 2 and ph.count("t") == 4  # wake, inject
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"vCPU 0", "vCPU 1", "timer thread", "serial console"} <= names
    exits = {e["name"] for e in trace["traceEvents"] if e.get("cat", "").startswith("exit")}
    assert "X86_WRMSR 0x830 ICR (fast)" in exits and "X86_WRMSR 0x80b EOI (slow)" in exits
    line, = [e for e in trace["traceEvents"] if e.get("cat") == "console"]
    assert line["args"]["guest_tsc"] == 6000
    assert line["args"]["guest_tsc_at_us"] == pytest.approx(1.0)  # 1000 TSC ticks at 1 GHz


def test_schema_rejects_what_a_viewer_would_choke_on() -> None:
    good = {"traceEvents": [{"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5}]}
    assert schema.validate(good) == []
    bad_cases = [
        {"traceEvents": [{"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0}]},  # no dur
        {"traceEvents": [{"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": "0", "dur": 1}]},
        {"traceEvents": [{"name": "a", "ph": "Q", "pid": 1, "tid": 1, "ts": 0}]},
        {"traceEvents": [{"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1,
                          "colour": "red"}]},
        {"traceEvents": []},  # fine...
    ]
    for case in bad_cases[:-1]:
        assert schema.validate(case), case
    assert schema.validate(bad_cases[-1]) == []
    # Semantics: a flow with no enclosing slice, and partially overlapping slices.
    lost = {"traceEvents": [
        {"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5},
        {"name": "f", "cat": "c", "ph": "s", "id": 1, "pid": 1, "tid": 1, "ts": 1},
        {"name": "f", "cat": "c", "ph": "f", "bp": "e", "id": 1, "pid": 1, "tid": 2, "ts": 2}]}
    assert any("in no slice" in p for p in schema.validate(lost))
    overlap = {"traceEvents": [
        {"name": "a", "ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5},
        {"name": "b", "ph": "X", "pid": 1, "tid": 1, "ts": 3, "dur": 5}]}
    assert any("overlap" in p for p in schema.validate(overlap))


# ---------------------------------------------------------------- summary and CLI


def test_summary_hops_are_the_differences_of_the_recorded_times(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    export.write(_synthetic_tracer(), path, title="synthetic")
    s = summary.summarize(summary.load(path))
    hops = {d.label: d for d in s.hops}
    # Times from _ipi_to_halted_vcpu1, ns -> us: send +10, wake +40, inject +50, EOI +92.
    assert hops["send -> inject"].values == [0.04, 0.04]
    assert hops["inject -> EOI"].values == [0.042, 0.042]
    assert hops["send -> wake (halted target)"].values == [0.03, 0.03]
    assert s.counts["interrupts"] == 2 and s.counts["complete"] == 2
    assert s.counts["kicks"] == 2 and s.counts["kicks wake"] == 2  # one per IPI, halted
    assert s.counts["kicks signal"] == s.counts["kicks request only"] == 0
    assert set(s.states) == {"vCPU 0", "vCPU 1"} and s.states["vCPU 1"]["blocked"] > 0


def test_percentile_is_nearest_rank() -> None:
    v = [float(i) for i in range(1, 101)]
    assert summary.percentile(v, 50) == 50 and summary.percentile(v, 99) == 99
    assert summary.percentile([], 50) == 0 and summary.percentile([7.0], 99) == 7


def test_cli_trace_summary_table_json_and_plot(tmp_path: Path, capsys) -> None:
    path = tmp_path / "t.json"
    export.write(_synthetic_tracer(), path, title="synthetic")
    assert main(["trace", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "send -> inject" in out and "Where each vCPU's time went" in out
    assert "Kicks: 2 (0 signals to vCPUs in the guest, 2 wake-ups of halted vCPUs" in out
    assert main(["trace", "summary", str(path), "--json", "--plot",
                 str(tmp_path / "s.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {h["label"] for h in data["hops"]} >= {"send -> inject", "inject -> EOI"}
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"), ("{", "not JSON"), ("[]", "no traceEvents"),
    ('{"traceEvents": []}', "not written by"),
])
def test_cli_trace_summary_bad_input_is_one_line(tmp_path: Path, capsys, content: str | None,
                                                 message: str) -> None:
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    assert main(["trace", "summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_trace_events_without_trace_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "x.elf"), "--trace-events", "64"]) == 2
    assert "--trace-events needs --trace" in capsys.readouterr().err
