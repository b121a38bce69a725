"""Chrome trace-event JSON (the format Perfetto UI and chrome://tracing open), written
once, after the VM has stopped, from the rings of a Tracer.

Layout: one process (the VM); one thread track per vCPU with its states as complete
("X") slices, back to back: ``guest`` (KVM_RUN), the exit's handling named by reason
and what it touched, with ``(fast)`` or ``(slow)`` (category ``exit.fast`` /
``exit.slow``), ``loop top`` (injection and the re-check before the next entry),
``halted`` and ``wait for SIPI``; instants for sends, kicks, injections, EOIs, timer
IRQs and wake-ups. Tracks for the timer thread (each firing, to its kick), the main
thread (the kick signal's Python handler) and the serial console (each line; a guest
TSC printed as ``tsc=VALUE`` is shown with the trace time it maps to). Kick signals are
async slices from the sender's pthread_kill to the exit it caused on the target. Each
interrupt is a flow (ph s/t/f): source -> target's kick exit or wake-up -> injection
-> EOI, with an ``irq`` instant at the injection whose args hold every hop's time;
merged IPIs are flows that end on the injection they merged into.

Timestamps (``ts``, ``dur``) are microseconds since the trace's zero (its first
record), with ns precision; ``otherData`` says which clock and how guest TSC maps.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator
from pathlib import Path

from kvmpy.kvm import ioctls as k

from . import recorder as r
from .flows import Interrupt, Join, Record, exit_name, join

FORMAT = "kvmpy-trace/1"
PID = 1
TID_TIMER = 1000
TID_MAIN = 1001
TID_OTHER = 1002
TID_CONSOLE = 1003
PATH_NAMES = {1: "fast", 0: "slow", 2: "handled early"}
KICK_NAMES = {r.KICK_NONE: "request only", r.KICK_SIGNAL: "signal",
              r.KICK_WAKE: "wake", r.KICK_SELF: "self"}
DM_NAMES = {0: "fixed", 1: "lowest", 2: "SMI", 4: "NMI", 5: "INIT", 6: "SIPI"}
_TSC_RE = re.compile(r"\btsc=(0x[0-9a-fA-F]+|\d+)\b")


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


class _Writer:
    def __init__(self, zero: int) -> None:
        self.zero = zero
        self.events: list[dict[str, object]] = []

    def ts(self, t: int) -> float:
        return _us(t - self.zero)

    def add(self, ev: dict[str, object]) -> None:
        self.events.append(ev)

    def meta(self, name: str, tid: int, value: object) -> None:
        self.add({"name": name, "ph": "M", "pid": PID, "tid": tid, "args": {
            "name" if name.endswith("_name") else "sort_index": value}})

    def slice(self, tid: int, name: str, cat: str, t0: int, t1: int,
              args: dict[str, object] | None = None) -> None:
        ev: dict[str, object] = {"name": name, "cat": cat, "ph": "X", "pid": PID,
                                 "tid": tid, "ts": self.ts(t0), "dur": _us(max(t1 - t0, 0))}
        if args:
            ev["args"] = args
        self.add(ev)

    def instant(self, tid: int, name: str, cat: str, t: int,
                args: dict[str, object] | None = None) -> None:
        ev: dict[str, object] = {"name": name, "cat": cat, "ph": "i", "s": "t", "pid": PID,
                                 "tid": tid, "ts": self.ts(t)}
        if args:
            ev["args"] = args
        self.add(ev)

    def flow(self, ph: str, fid: int, name: str, cat: str, tid: int, t: int) -> None:
        ev: dict[str, object] = {"name": name, "cat": cat, "ph": ph, "id": fid, "pid": PID,
                                 "tid": tid, "ts": self.ts(t)}
        if ph != "s":
            ev["bp"] = "e"
        self.add(ev)


def vcpu_slices(recs: list[Record], end: int
                ) -> Iterator[tuple[str, str, int, int, dict[str, object]]]:
    """(name, category, start, end, args) of one vCPU's state slices, back to back."""
    cur: tuple[str, str, int, dict[str, object]] | None = None
    for t, kind, a, b in recs:
        nxt: tuple[str, str, dict[str, object]] | None = None
        if kind == r.ENTER:
            nxt = ("guest", "guest", {})
        elif kind == r.EXIT:
            nxt = (exit_name(a, b), "exit", {"reason": k.EXIT_REASON_NAMES.get(a, a),
                                             "detail": hex(b)})
        elif kind == r.DONE:
            if cur is not None and cur[1] == "exit":
                path = PATH_NAMES.get(b, str(b))
                cur = (f"{cur[0]} ({path})", f"exit.{'fast' if b == 1 else 'slow'}",
                       cur[2], {**cur[3], "path": path})
            nxt = ("loop top", "loop", {})
        elif kind == r.BLOCK:
            nxt = ("wait for SIPI" if a == 2 else "halted", "blocked", {})
        elif kind == r.UNBLOCK:
            nxt = ("loop top", "loop", {})
        if nxt is None:
            continue
        if cur is not None:
            yield cur[0], cur[1], cur[2], t, cur[3]
        cur = (nxt[0], nxt[1], t, nxt[2])
    if cur is not None:
        yield cur[0], cur[1], cur[2], max(end, cur[2]), cur[3]


def _inside(t: int, spans: list[tuple[int, int]]) -> int:
    """``t`` nudged 1 ns into the span that starts exactly at it (flow binding picks the
    slice that encloses the point; a point on a boundary is ambiguous)."""
    i = bisect.bisect_right(spans, (t, 1 << 62)) - 1
    if 0 <= i < len(spans) and spans[i][0] == t and spans[i][1] > t:
        return t + 1
    return t


def build(tracer: r.Tracer, *, title: str = "kvmpy") -> dict[str, object]:
    """The whole trace as a JSON-ready dict."""
    rings = {ring.name: ring.records() for ring in tracer.rings}
    all_times = [recs[0][0] for recs in rings.values() if recs]
    ends = [recs[-1][0] for recs in rings.values() if recs]
    zero = min(all_times + [tracer.started_ns])
    end = max(ends + [zero])
    window = max((recs[0][0] for ring, recs in zip(tracer.rings, rings.values(),
                                                   strict=True) if ring.dropped and recs),
                 default=0)
    vcpu_names = [ring.name for ring in tracer.vcpu_rings]
    result = join(rings, vcpu_names, window)
    w = _Writer(zero)
    w.add({"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
           "args": {"name": f"{title} ({len(vcpu_names)} vCPUs)"}})
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, ring in enumerate(tracer.vcpu_rings):
        tid = i + 1
        w.meta("thread_name", tid, ring.name)
        w.meta("thread_sort_index", tid, i)
        sp = spans.setdefault(tid, [])
        for name, cat, t0, t1, args in vcpu_slices(rings[ring.name], end):
            w.slice(tid, name, cat, t0, t1, args or None)
            sp.append((t0, t1))
        for t, kind, a, b in rings[ring.name]:
            _vcpu_instant(w, tid, t, kind, a, b)
    for tid, name, sort in ((TID_TIMER, "timer thread", 900), (TID_MAIN, "main thread", 901),
                            (TID_OTHER, "other threads", 902),
                            (TID_CONSOLE, "serial console", 903)):
        w.meta("thread_name", tid, name)
        w.meta("thread_sort_index", tid, sort)
    _timer_track(w, rings["timer thread"], spans.setdefault(TID_TIMER, []))
    for t, kind, a, _b in rings["main thread"]:
        if kind == r.SIGNAL:
            w.instant(TID_MAIN, "kick signal handler", "signal", t, {"signum": a})
        elif kind == r.KICK:
            w.instant(TID_MAIN, f"kick vCPU {a}", "kick", t)
    for t, kind, a, b in rings["other threads"]:
        _vcpu_instant(w, TID_OTHER, t, kind, a, b)
    _kick_signals(w, tracer, rings)
    _console(w, tracer)
    _flows(w, result, spans)
    w.events.sort(key=lambda e: (e["ph"] != "M", e.get("ts", 0)))
    meta = tracer.meta
    return {
        "traceEvents": w.events,
        "displayTimeUnit": "ns",
        "otherData": {
            "format": FORMAT,
            "title": title,
            "clock": str(meta.get("clock", r.CLOCK_NAME)),
            "zero_ns": zero,
            "window_start_us": _us(window - zero) if window else 0.0,
            "vcpus": len(vcpu_names),
            "fastpath": bool(meta.get("fastpath", True)),
            "irqchip": str(meta.get("irqchip", "user")),
            "events_per_ring": tracer.events,
            "events_recorded": sum(ring.total for ring in tracer.rings),
            "events_dropped": sum(ring.dropped for ring in tracer.rings),
            "tsc_hz": int(meta.get("tsc_hz", 0) or 0),
            "tsc_map": json.dumps(meta.get("tsc_map", [])),
            "interrupts": len(result.interrupts),
            "unsourced_injections": result.unsourced,
            "truncated_injections": result.truncated,
            "never_injected": len(result.never_injected),
            "rejected_ipis": result.rejected,
            "console_lines": tracer.console_lines,
        },
    }


def _vcpu_instant(w: _Writer, tid: int, t: int, kind: int, a: int, b: int) -> None:
    if kind == r.SEND:
        vector, dm, flags = b & 0xFF, (b >> 8) & 7, b >> 12
        what = DM_NAMES.get(dm, f"dm {dm}")
        args: dict[str, object] = {"target": a, "vector": vector, "delivery": what}
        if flags & r.SEND_COALESCED:
            args["coalesced"] = True
        if flags & r.SEND_REJECTED:
            args["rejected"] = True
        if flags & r.SEND_ILLEGAL:
            args["illegal_vector"] = True
        label = f"send {what} {vector:#x}" if dm <= 1 else f"send {what}"
        w.instant(tid, f"{label} -> vCPU {a}", "send", t, args)
    elif kind == r.KICK:
        w.instant(tid, f"kick vCPU {a} ({KICK_NAMES.get(b, b)})", "kick", t,
                  {"target": a, "how": KICK_NAMES.get(b, b)})
    elif kind == r.INJECT:
        w.instant(tid, "inject NMI" if b else f"inject {a:#x}", "inject", t, {"vector": a})
    elif kind == r.EOI:
        w.instant(tid, f"EOI {a:#x}", "eoi", t, {"vector": a})
    elif kind == r.TIMER_IRQ:
        w.instant(tid, f"timer IRQ {a:#x}", "timer", t,
                  {"vector": a, "late_us": _us(t - b) if b else None})
    elif kind == r.WOKE:
        w.instant(tid, "woken" if a else "wait timed out", "wake", t)


def _timer_track(w: _Writer, recs: list[Record], spans: list[tuple[int, int]]) -> None:
    """Each firing as a slice from the firing to the end of its kick record."""
    for n, (t, kind, a, b) in enumerate(recs):
        if kind != r.TIMER_FIRE:
            continue
        t1 = t + 1
        if n + 1 < len(recs) and recs[n + 1][1] == r.KICK:
            t1 = max(recs[n + 1][0], t + 1)
        w.slice(TID_TIMER, f"timer fires for vCPU {a}", "timer", t, t1,
                {"deadline_late_us": _us(t - b)})
        spans.append((t, t1))


def _kick_signals(w: _Writer, tracer: r.Tracer, rings: dict[str, list[Record]]) -> None:
    """Async slices: a signal kick from the sender's pthread_kill to the target's exit."""
    exits = []
    for ring in tracer.vcpu_rings:
        recs = [x for x in rings[ring.name] if x[1] == r.EXIT]
        exits.append(([x[0] for x in recs], recs))
    n = 0
    for ring in tracer.rings:
        tid = ring.index + 1 if ring.index >= 0 else {"timer thread": TID_TIMER,
                                                       "main thread": TID_MAIN}.get(
                                                           ring.name, TID_OTHER)
        for t, kind, a, b in rings[ring.name]:
            if kind != r.KICK or b != r.KICK_SIGNAL or a >= len(exits):
                continue
            times, recs = exits[a]
            i = bisect.bisect_left(times, t)
            if i >= len(recs):
                continue
            n += 1
            name = f"kick signal -> vCPU {a}"
            ex = recs[i]
            for ph, at, tt in (("b", t, tid), ("e", ex[0], a + 1)):
                w.add({"name": name, "cat": "kick", "ph": ph, "id": n, "pid": PID,
                       "tid": tt, "ts": w.ts(at),
                       **({"args": {"exit": k.EXIT_REASON_NAMES.get(ex[2], ex[2])}}
                          if ph == "e" else {})})


def tsc_to_ns(tracer_meta: dict[str, object], tsc: int, vcpu: int = 0) -> int | None:
    """The trace-clock time at which vCPU ``vcpu``'s TSC read ``tsc`` (kvmpy's own
    extrapolation: one KVM_GET_MSRS reading, then KVM_GET_TSC_KHZ)."""
    tsc_map = tracer_meta.get("tsc_map")
    hz = int(tracer_meta.get("tsc_hz", 0) or 0)
    if isinstance(tsc_map, str):
        tsc_map = json.loads(tsc_map)
    for entry in tsc_map or []:
        if entry["vcpu"] == vcpu and hz:
            return entry["ref_ns"] + (tsc - entry["tsc"]) * 1_000_000_000 // hz
    return None


def _console(w: _Writer, tracer: r.Tracer) -> None:
    for t, text in tracer.console:
        args: dict[str, object] = {"text": text}
        m = _TSC_RE.search(text)
        if m:
            tsc = int(m.group(1), 0)
            at = tsc_to_ns(tracer.meta, tsc)
            args["guest_tsc"] = tsc
            if at is not None:
                args["guest_tsc_at_us"] = w.ts(at)
                args["printed_after_tsc_us"] = _us(t - at)
        w.instant(TID_CONSOLE, text[:80] or "(empty line)", "console", t, args)


def _flows(w: _Writer, result: Join, spans: dict[int, list[tuple[int, int]]]) -> None:
    """One flow per interrupt, one more per IPI merged into it, and an ``irq`` instant."""
    fid = 0
    for it in result.interrupts:
        tgt = it.target + 1
        name = f"irq {it.vector:#x}" if not it.nmi else "NMI"
        cat = f"irq.{it.source}"
        points: list[tuple[int, int]] = []
        if it.source == "timer":
            if it.t_fire is not None:
                points.append((TID_TIMER, it.t_fire))
            points.append((tgt, it.t_send or it.t_inject))
        elif it.t_send is not None and it.sender >= 0:
            points.append((it.sender + 1, it.t_send))
        if it.t_kick_exit is not None:
            points.append((tgt, it.t_kick_exit))
        if it.t_wake is not None:
            points.append((tgt, it.t_wake))
        points.append((tgt, it.t_inject))
        if it.t_eoi is not None:
            points.append((tgt, it.t_eoi))
        w.instant(tgt, f"{name} from {_source_label(it)}", "irq", it.t_inject,
                  it.to_args(w.zero))
        if len(points) >= 2:
            fid += 1
            for n, (tid, t) in enumerate(points):
                ph = "s" if n == 0 else "f" if n == len(points) - 1 else "t"
                w.flow(ph, fid, name, cat, tid, _inside(t, spans.get(tid, [])))
        for t_m, sender in it.merged:
            if sender < 0:
                continue
            fid += 1
            w.flow("s", fid, f"{name} (merged)", "irq.merged", sender + 1,
                   _inside(t_m, spans.get(sender + 1, [])))
            w.flow("f", fid, f"{name} (merged)", "irq.merged", tgt, it.t_inject)
    for t, sender, target, t_start in result.sipi_flows:
        if sender < 0:
            continue
        fid += 1
        w.flow("s", fid, "SIPI", "sipi", sender + 1, _inside(t, spans.get(sender + 1, [])))
        w.flow("f", fid, "SIPI", "sipi", target + 1, t_start)


def _source_label(it: Interrupt) -> str:
    if it.source == "timer":
        return "APIC timer"
    if it.source == "none":
        return "no recorded source"
    return f"vCPU {it.sender}" + (" (self)" if it.source == "self" else "")


def write(tracer: r.Tracer, path: str | Path, *, title: str = "kvmpy") -> dict[str, object]:
    """Write the trace to ``path``; returns its ``otherData``."""
    trace = build(tracer, title=title)
    out = Path(path)
    with out.open("w") as f:
        f.write('{"displayTimeUnit": "ns", "otherData": ')
        json.dump(trace["otherData"], f)
        f.write(', "traceEvents": [\n')
        events = trace["traceEvents"]
        assert isinstance(events, list)
        for n, ev in enumerate(events):
            f.write(json.dumps(ev, separators=(",", ":")))
            f.write(",\n" if n + 1 < len(events) else "\n")
        f.write("]}\n")
    other = trace["otherData"]
    assert isinstance(other, dict)
    return other
