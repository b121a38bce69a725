"""`kvmpy bench ipi --breakdown`: where one vmexit-style IPI round trip goes.

The `ipi_bench` guest runs kvm-unit-tests vmexit's `ipi` / `ipi_halt` shape (`only=vmexit`):
CPU 0 writes the ICR and spins on a flag; CPU 1 sits in `hlt`, takes the interrupt, runs
the handler (which sets the flag), EOIs and halts again. Each round trip is cut into
consecutive hops on one clock (CLOCK_MONOTONIC), so the hops of a round trip add up to
it exactly:

kvmpy (userspace APIC), from the trace rings of kvmpy.tracing, and, where `perf` can
record the scheduler's tracepoints, split further by the kernel's own timestamps
(`perf record -k monotonic`, the same clock):

    icr exit        sender: KVM_RUN returned with the ICR write -> the kick (decode,
                    route, IRR set)
    wake: futex     the kick -> sched:sched_wakeup of the target thread
    wake: scheduler sched_wakeup -> sched:sched_switch onto the target's CPU
    wake: to Python sched_switch -> the target's wait() returned (syscall return, GIL)
                    (without perf these three are one hop, "wake")
    unblock         target: wait() returned -> KVM_INTERRUPT (leave the halt, loop top)
    inject+entry    KVM_INTERRUPT -> KVM_RUN (the ioctl and the entry bookkeeping)
    guest handler   KVM_RUN -> the EOI exit: delivery and the handler, in the guest
                    (ipi_done is set one instruction before the EOI write)
    sender resumes  the target's EOI exit -> the sender's next ICR exit: the sender
                    sees ipi_done, finishes the iteration and writes the ICR again

and off the critical path, overlapped with "sender resumes": the EOI exit's handling,
the guest's IRET+HLT, and the HLT exit until the target sleeps.

KVM's in-kernel irqchip (`--irqchip kernel`), from perf alone (kvm:kvm_apic_ipi,
kvm:kvm_apic_accept_irq, sched:sched_wakeup, sched:sched_switch, kvm:kvm_vcpu_wakeup,
kvm:kvm_eoi): icr -> accept, accept -> wakeup, scheduler, halt exit, guest handler,
sender resumes. A wake-up that KVM's halt polling caught has no scheduler hops.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvmpy.bench.ipi import config_for
from kvmpy.guestbuild import build_guest
from kvmpy.kvm import detect_backend
from kvmpy.kvm import ioctls as k
from kvmpy.machine import Machine
from kvmpy.tracing import recorder as tr
from kvmpy.tracing.probes import attach

VEC_CALL = 0x54  # guest/ipi_bench.c
MSR_ICR = 0x830
MSR_EOI = 0x80B
SENDER, TARGET = 0, 1

KVMPY_HOPS = ("icr exit", "wake: futex", "wake: scheduler", "wake: to Python", "wake",
              "unblock", "target busy", "inject+entry", "guest handler", "sender resumes")
KVMPY_OFF_PATH = ("eoi exit", "guest iret+hlt", "hlt exit to sleep", "sender exit rest")
KERNEL_HOPS = ("icr -> accept", "accept -> wakeup", "wake: scheduler", "halt exit",
               "guest handler", "sender resumes")
HOP_HELP = {
    "icr exit": "sender's ICR exit: decode, route, IRR (kvmpy)",
    "wake: futex": "kick -> sched_wakeup (futex wake syscall)",
    "wake: scheduler": "sched_wakeup -> sched_switch (target on its CPU)",
    "wake: to Python": "sched_switch -> wait() returns (syscall return, GIL)",
    "wake": "kick -> wait() returns (no perf: not split)",
    "unblock": "leave the halt, loop top -> KVM_INTERRUPT",
    "target busy": "awake target: kick -> KVM_INTERRUPT (HLT exit or signal first)",
    "inject+entry": "KVM_INTERRUPT ioctl -> KVM_RUN",
    "guest handler": "guest: delivery + handler until the EOI exit",
    "sender resumes": "sender sees ipi_done -> next ICR",
    "icr -> accept": "kvm_apic_ipi -> kvm_apic_accept_irq",
    "accept -> wakeup": "accept -> sched_wakeup (kvm_vcpu_kick)",
    "halt exit": "on CPU -> kvm_vcpu_wakeup (leave kvm_vcpu_halt)",
    "eoi exit": "EOI exit handling (off the critical path)",
    "guest iret+hlt": "guest IRET and HLT (off the critical path)",
    "hlt exit to sleep": "HLT exit until asleep (off the critical path)",
    "sender exit rest": "sender: kick -> KVM_RUN (off the critical path)",
}
PERF_EVENTS = ("sched:sched_wakeup", "sched:sched_switch", "kvm:kvm_apic_ipi",
               "kvm:kvm_apic_accept_irq", "kvm:kvm_vcpu_wakeup", "kvm:kvm_eoi")


# ---------------------------------------------------------------------- perf


@dataclass(frozen=True)
class PerfEvent:
    tid: int
    t: int  # ns, CLOCK_MONOTONIC
    name: str
    args: str


_PERF_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\.(\d{9}):\s+(\S+):\s?(.*)$")


def parse_perf_script(text: str) -> list[PerfEvent]:
    """Lines of `perf script --ns -F tid,time,event,trace`."""
    out = []
    for line in text.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            t = int(m.group(2)) * 1_000_000_000 + int(m.group(3))
            out.append(PerfEvent(int(m.group(1)), t, m.group(4), m.group(5)))
    return out


def perf_available() -> str | None:
    """None if `perf record` of the scheduler and KVM tracepoints works here, else why."""
    if shutil.which("perf") is None:
        return "perf not found (Debian: linux-perf)"
    try:
        r = subprocess.run(["perf", "record", "-q", "-k", "monotonic", "-e",
                            "sched:sched_wakeup", "-o", "/dev/null", "--", "true"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"perf did not run: {exc}"
    if r.returncode != 0:
        return "perf cannot record tracepoints: " + r.stderr.decode(errors="replace") \
            .strip().splitlines()[-1:][0] if r.stderr.strip() else "perf record failed"
    return None


class PerfRecording:
    """`perf record -a -k monotonic` of PERF_EVENTS for the duration of a `with`."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="kvmpy-perf-")
        self.path = os.path.join(self._dir.name, "perf.data")
        self._proc: subprocess.Popen[bytes] | None = None
        self.events: list[PerfEvent] = []

    def __enter__(self) -> PerfRecording:
        events = ",".join(PERF_EVENTS)
        self._proc = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-k", "monotonic", "-e", events, "-o", self.path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # perf opens its events before the guest starts
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        assert proc is not None
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        r = subprocess.run(["perf", "script", "-i", self.path, "--ns",
                            "-F", "tid,time,event,trace"], capture_output=True, timeout=120)
        self.events = parse_perf_script(r.stdout.decode(errors="replace"))
        self._dir.cleanup()


# ---------------------------------------------------------------------- cutting


Rec = tuple[int, int, int, int]  # (t, kind, a, b) from a trace ring


def _first(recs: list[Rec], i: int, pred) -> int:
    """Index of the first record at or after i satisfying pred, or -1."""
    n = len(recs)
    while i < n:
        if pred(recs[i]):
            return i
        i += 1
    return -1


def _is_icr_exit(r: Rec) -> bool:
    return r[1] == tr.EXIT and r[2] == k.KVM_EXIT_X86_WRMSR and r[3] == MSR_ICR


def kvmpy_round_trips(sender: list[Rec], target: list[Rec],
                      perf: list[PerfEvent] | None = None,
                      target_tid: int = 0) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """Cut the rings into round trips. Returns (round trips to a halted target, round
    trips to a target still awake when the IPI came: in its HLT exit, or in the guest
    on its way to HLT, kicked by a signal). Incomplete ones at the ring's ends are
    dropped."""
    wakes: list[int] = []
    switches: list[int] = []
    if perf is not None:
        key = f"pid={target_tid} "
        wakes = [e.t for e in perf if e.name == "sched:sched_wakeup" and key in e.args]
        switches = [e.t for e in perf if e.name == "sched:sched_switch"
                    and f"next_pid={target_tid} " in e.args + " "]
    icr = [i for i, r in enumerate(sender) if _is_icr_exit(r)]
    asleep: list[dict[str, int]] = []
    awake: list[dict[str, int]] = []
    ti = 0
    for a, b in zip(icr, icr[1:], strict=False):
        t_icr, t_next = sender[a][0], sender[b][0]
        kick = _first(sender, a, lambda r: r[1] in (tr.KICK, tr.ENTER))
        if kick < 0 or sender[kick][1] != tr.KICK or sender[kick][2] != TARGET:
            continue
        t_kick, how = sender[kick][0], sender[kick][3]
        s_enter = _first(sender, kick, lambda r: r[1] == tr.ENTER)
        ti = _first(target, ti, lambda r, t=t_kick: r[0] >= t)
        if ti < 0:
            break
        inject = _first(target, ti, lambda r: r[1] == tr.INJECT and r[2] == VEC_CALL)
        enter = _first(target, inject, lambda r: r[1] == tr.ENTER) if inject >= 0 else -1
        # the EOI exit (an empty exit on a late kick may come first: it counts as guest)
        eoi_exit = _first(target, enter, lambda r: r[1] == tr.EXIT and (
            r[2] != k.KVM_EXIT_INTR)) if enter >= 0 else -1
        if eoi_exit < 0 or target[eoi_exit][3] != MSR_EOI or target[eoi_exit][0] > t_next:
            continue
        t_inject, t_enter, t_eoi = target[inject][0], target[enter][0], target[eoi_exit][0]
        hops = {"icr exit": t_kick - t_icr}
        if how == tr.KICK_WAKE:
            woke = _first(target, ti, lambda r: r[1] == tr.WOKE)
            if woke < 0 or woke > inject:
                continue
            t_woke = target[woke][0]
            w = _between(wakes, t_kick, t_woke)
            s = _between(switches, w, t_woke) if w is not None else None
            if w is not None and s is not None:
                hops.update({"wake: futex": w - t_kick, "wake: scheduler": s - w,
                             "wake: to Python": t_woke - s})
            else:
                hops["wake"] = t_woke - t_kick
            hops["unblock"] = t_inject - t_woke
        else:
            hops["target busy"] = t_inject - t_kick
        hops.update({"inject+entry": t_enter - t_inject, "guest handler": t_eoi - t_enter,
                     "sender resumes": t_next - t_eoi})
        eoi_enter = _first(target, eoi_exit, lambda r: r[1] == tr.ENTER)
        if eoi_enter >= 0:
            hops["eoi exit"] = target[eoi_enter][0] - t_eoi
            hlt_exit = _first(target, eoi_enter, lambda r: r[1] == tr.EXIT)
            if hlt_exit >= 0 and target[hlt_exit][2] == k.KVM_EXIT_HLT:
                hops["guest iret+hlt"] = target[hlt_exit][0] - target[eoi_enter][0]
                block = _first(target, hlt_exit, lambda r: r[1] in (tr.BLOCK, tr.ENTER))
                if block >= 0 and target[block][1] == tr.BLOCK:
                    hops["hlt exit to sleep"] = target[block][0] - target[hlt_exit][0]
        if s_enter >= 0:
            hops["sender exit rest"] = sender[s_enter][0] - t_kick
        hops["round trip"] = t_next - t_icr
        (asleep if how == tr.KICK_WAKE else awake).append(hops)
    return asleep, awake


def _between(times: list[int], lo: int, hi: int) -> int | None:
    """The first time in `times` within [lo, hi], or None."""
    for t in times:
        if lo <= t <= hi:
            return t
        if t > hi:
            break
    return None


def kernel_round_trips(perf: list[PerfEvent], sender_tid: int,
                       target_tid: int) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """Round trips of the in-kernel irqchip from KVM's and the scheduler's tracepoints.
    Returns (round trips where the target slept, round trips KVM's halt polling caught:
    no scheduler hops in them)."""
    vec = f"vec {VEC_CALL} "
    ev = [e for e in perf if e.tid in (sender_tid, target_tid) or e.name == "sched:sched_switch"]
    ipis = [i for i, e in enumerate(ev) if e.name == "kvm:kvm_apic_ipi" and e.tid == sender_tid
            and vec in e.args + " "]
    slept: list[dict[str, int]] = []
    polled: list[dict[str, int]] = []
    for a, b in zip(ipis, ipis[1:], strict=False):
        t_ipi, t_next = ev[a].t, ev[b].t
        seg = ev[a:b]
        acc = next((e.t for e in seg if e.name == "kvm:kvm_apic_accept_irq"), None)
        wake = next((e.t for e in seg if e.name == "sched:sched_wakeup"
                     and f"pid={target_tid} " in e.args), None)
        sw = next((e.t for e in seg if e.name == "sched:sched_switch"
                   and f"next_pid={target_tid} " in e.args + " "), None)
        vw = next((e.t for e in seg if e.name == "kvm:kvm_vcpu_wakeup"
                   and e.tid == target_tid), None)
        eoi = next((e.t for e in seg if e.name == "kvm:kvm_eoi" and e.tid == target_tid
                    and f"vector {VEC_CALL}" in e.args), None)
        if acc is None or vw is None or eoi is None or not t_ipi <= acc <= vw <= eoi:
            continue
        hops = {"icr -> accept": acc - t_ipi}
        slept_here = wake is not None and sw is not None and acc <= wake <= sw <= vw
        if slept_here:
            hops.update({"accept -> wakeup": wake - acc, "wake: scheduler": sw - wake,
                         "halt exit": vw - sw})
        else:
            hops["halt exit"] = vw - acc
        hops.update({"guest handler": eoi - vw, "sender resumes": t_next - eoi,
                     "round trip": t_next - t_ipi})
        (slept if slept_here else polled).append(hops)
    return slept, polled


# ---------------------------------------------------------------------- running


# The classes of round trips, by what the target was doing when the IPI came.
HALTED = "halted target"  # kvmpy: asleep on its wake token
AWAKE = "awake target"  # kvmpy: still in its HLT exit, or in the guest on its way to HLT
SLEPT = "halted target"  # kernel: asleep in kvm_vcpu_halt
POLLED = "caught by halt polling"  # kernel: KVM's halt polling saw the IPI


@dataclass
class ConfigBreakdown:
    """Round trips of one configuration by class, pooled over its runs (ns per hop)."""

    config: str
    cases: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    guest_rt_ns: list[float] = field(default_factory=list)  # the guest's own samples
    failures: list[str] = field(default_factory=list)

    def add(self, case: str, trips: Iterable[dict[str, int]]) -> None:
        self.cases.setdefault(case, []).extend(trips)

    @property
    def round_trips(self) -> int:
        return sum(len(t) for t in self.cases.values())

    def hops(self, case: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for trip in self.cases.get(case, []):
            for hop, ns in trip.items():
                out.setdefault(hop, []).append(ns)
        return out

    def order(self, hops: dict[str, list[int]]) -> list[str]:
        names = KERNEL_HOPS if self.config == "kernel" else KVMPY_HOPS + KVMPY_OFF_PATH
        return [h for h in names if h in hops]


@dataclass
class BreakdownResult:
    backend: str
    perf: str  # "" when perf recorded, else why not
    configs: dict[str, ConfigBreakdown] = field(default_factory=dict)


def run_breakdown(configs: Iterable[str] = ("kvmpy-fast", "kvmpy-slow", "kernel"), *,
                  n: int = 200, rounds: int = 1, use_perf: bool = True,
                  progress=None) -> BreakdownResult:
    """Run the vmexit-shaped tests traced, `rounds` times per configuration, alternated."""
    why = perf_available() if use_perf else "perf not used (--no-perf)"
    result = BreakdownResult(detect_backend(), why or "")
    for cfg in configs:
        result.configs[cfg] = ConfigBreakdown(cfg)
    image = build_guest("ipi_bench").read_bytes()
    for _ in range(rounds):
        for cfg, out in result.configs.items():
            if progress:
                progress(cfg)
            if cfg == "kernel" and why:
                out.failures.append(f"the in-kernel breakdown needs perf: {why}")
                continue
            _run_one(cfg, n, image, why is None, out)
    return result


def _run_one(cfg: str, n: int, image: bytes, perf: bool, out: ConfigBreakdown) -> None:
    config = config_for(cfg, 2, f"n={n} mode=x2apic cpus=2 only=vmexit")
    config.serial = io.BytesIO()
    with Machine(config) as machine:
        machine.load(image, name="ipi_bench")
        tracer = attach(machine, events=max(4096, 40 * n)) if cfg != "kernel" else None
        rec = PerfRecording() if perf else None
        if rec is not None:
            rec.__enter__()
        try:
            result = machine.run(timeout=600)
        finally:
            if rec is not None:
                rec.__exit__(None, None, None)
        text = config.serial.getvalue().decode(errors="replace")
        if result.status != 1 or "ipi_bench: done" not in text:
            out.failures.append(f"{cfg}: {result.message}")
            return
        m = re.search(r"test vmexit_ipi_halt n=(\d+) addr=0x([0-9a-f]+)", text)
        if m:
            import struct

            count = int(m.group(1))
            raw = machine.memory.read(int(m.group(2), 16), 4 * count)
            scale = 1e9 / machine.tsc_hz
            out.guest_rt_ns.extend(v * scale for v in struct.unpack(f"<{count}I", raw))
        tids = [v.thread.native_id if v.thread is not None else 0 for v in machine.vcpus]
        events = rec.events if rec is not None else None
        if cfg == "kernel":
            slept, polled = kernel_round_trips(events or [], tids[SENDER], tids[TARGET])
            out.add(SLEPT, slept)
            out.add(POLLED, polled)
        else:
            assert tracer is not None
            asleep, awake = kvmpy_round_trips(
                tracer.vcpu_rings[SENDER].records(), tracer.vcpu_rings[TARGET].records(),
                events, tids[TARGET])
            out.add(HALTED, asleep)
            out.add(AWAKE, awake)


# ---------------------------------------------------------------------- report


def _pct(values: list[int], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))] if v else 0.0


def print_breakdown(result: BreakdownResult, file: object = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=150)  # type: ignore[arg-type]
    for cb in result.configs.values():
        for f in cb.failures:
            console.print(f"[red]{f}[/red]")
        total = cb.round_trips
        for case, trips in cb.cases.items():
            if not trips:
                continue
            hops = cb.hops(case)
            rt = hops["round trip"]
            mean_rt = statistics.fmean(rt)
            table = Table(title=f"{cb.config}, round trips to a {case.split()[0]} vCPU"
                          if case != POLLED else f"{cb.config}, round trips {case}",
                          caption=f"{len(trips)} of {total} round trips ({result.backend})")
            for col, j in (("hop", "left"), ("what", "left"), ("p50 us", "right"),
                           ("p99 us", "right"), ("mean us", "right"),
                           ("share of mean", "right")):
                table.add_column(col, justify=j)
            for hop in cb.order(hops):
                vals = hops[hop]
                mean = statistics.fmean(vals)
                off = hop in KVMPY_OFF_PATH
                table.add_row(hop, HOP_HELP.get(hop, ""), f"{_pct(vals, 50) / 1e3:.1f}",
                              f"{_pct(vals, 99) / 1e3:.1f}", f"{mean / 1e3:.1f}",
                              "(overlapped)" if off else f"{100 * mean / mean_rt:.0f}%")
            table.add_row("round trip", "host clock, ICR to the next ICR",
                          f"{_pct(rt, 50) / 1e3:.1f}", f"{_pct(rt, 99) / 1e3:.1f}",
                          f"{mean_rt / 1e3:.1f}", "100%")
            console.print(table)
        if cb.guest_rt_ns:
            g = cb.guest_rt_ns
            console.print(f"  {cb.config}: the guest's own vmexit_ipi_halt round trip "
                          f"(TSC): p50 {statistics.median(g) / 1e3:.1f} us, p99 "
                          f"{_pct(g, 99) / 1e3:.1f} us, mean {statistics.fmean(g) / 1e3:.1f} us")
    if result.perf:
        console.print(f"perf: {result.perf}")


def plot_breakdown(result: BreakdownResult, path: str) -> None:
    """One stacked bar per configuration and class of round trip: the mean of each
    critical-path hop (the means add up to the mean round trip; the table gives p50
    and p99)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(cb, case, cb.hops(case)) for cb in result.configs.values()
            for case, trips in cb.cases.items() if trips]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.6 * max(1, len(rows))))
    cmap = plt.get_cmap("tab20")
    names = list(dict.fromkeys(h for cb, _, hops in rows for h in cb.order(hops)
                               if h not in KVMPY_OFF_PATH and h != "round trip"))
    colors = {h: cmap(i % 20) for i, h in enumerate(names)}
    for y, (cb, _case, hops) in enumerate(rows):
        left = 0.0
        for hop in cb.order(hops):
            if hop in KVMPY_OFF_PATH or hop == "round trip":
                continue
            w = sum(hops[hop]) / len(hops["round trip"]) / 1e3
            ax.barh(y, w, left=left, color=colors[hop], edgecolor="white")
            if w > 8:
                ax.text(left + w / 2, y, f"{w:.0f}", ha="center", va="center", fontsize=7)
            left += w
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[h]) for h in names]
    ax.legend(handles, names, fontsize=7, ncol=5, loc="upper center",
              bbox_to_anchor=(0.5, -0.35))
    ax.set_yticks(range(len(rows)),
                  [f"{cb.config}\n{case} ({len(cb.cases[case])})" for cb, case, _ in rows],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean time per round trip (us), critical path")
    ax.set_title(f"vmexit-shaped IPI round trip, hop by hop ({result.backend})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
