"""The hostile-guest fuzz run: guest/fuzz.c on several vCPUs, many seeds, one table.

`python -m kvmpy.fuzz --seeds 1-200 --ops 2000 --cpus 2 4 --mode mixed --jobs 2` runs
the bundled `fuzz` guest once per (seed, vCPU count), each run in a forked child with a
watchdog, and prints: runs, operations fuzzed, #GPs the guests took, interrupts, exits
by reason, kvmpy's APIC and I/O APIC event counters, and the findings: host exceptions
(status 8, an uncaught exception on a kvmpy thread, a warning logged by kvmpy, an IPI
delivery failure, a thread or file descriptor left behind), hangs (timeouts and "every
vCPU halted"), guest crashes (triple fault, status 4; KVM internal error, status 6),
guest-detected failures (an oracle in the guest disagreed with the SDM) and lost or
invented counted IPIs. Exit status 1 on any host exception, hang, leak or lost/invented
IPI (`--strict`: on any finding at all), else 0. Each failing run is listed with the
command that repeats it.
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from kvmpy.guestbuild import build_guest
from kvmpy.kvm.ioctls import EXIT_REASON_NAMES
from kvmpy.machine import (
    STATUS_GUEST_CRASH,
    STATUS_HUNG,
    STATUS_TRIPLE_FAULT,
    STATUS_VMM_FAULT,
    Machine,
    MachineConfig,
)

MODES = ("xapic", "x2apic", "mixed")
_FIELD = re.compile(r"(\w+)=(\d+)")
GUEST_OK = 1  # the guest wrote 0 to the debug-exit port
WATCHDOG_GRACE_S = 30.0  # past the VM timeout, a child that has not answered is hung


@dataclass(frozen=True)
class FuzzResult:
    """One run of the fuzz guest: how the VM ended, what the guest counted, what kvmpy saw."""

    seed: int
    ops: int
    cpus: int
    mode: str
    status: int
    message: str
    initsipi: bool = False
    counters: dict[str, int] = field(default_factory=dict)  # the guest's key=value lines
    exits: dict[str, int] = field(default_factory=dict)  # exit reason name -> count
    icr_fast: int = 0
    icr_slow: int = 0
    delivery_failures: int = 0
    smi_dropped: int = 0
    unclaimed_pio: int = 0  # port reads + writes no device claimed
    unclaimed_mmio: int = 0
    apic_events: dict[str, int] = field(default_factory=dict)  # LocalApic.stats, all vCPUs
    ioapic_events: dict[str, int] = field(default_factory=dict)  # IoApic.stats
    host_errors: tuple[str, ...] = ()  # uncaught thread exceptions, kvmpy warnings
    threads_left: int = 0
    fds_grown: int = 0
    seconds: float = 0.0
    output: str = ""

    @property
    def hang(self) -> bool:
        return self.status == STATUS_HUNG or (
            self.status == STATUS_VMM_FAULT and self.message.startswith(("timed out",
                                                                         "runner:")))

    @property
    def host_exception(self) -> bool:
        return ((self.status == STATUS_VMM_FAULT and not self.hang) or bool(self.host_errors)
                or self.delivery_failures > 0)

    @property
    def leaked(self) -> bool:
        return self.threads_left > 0 or self.fds_grown > 0

    @property
    def guest_crash(self) -> bool:
        return self.status in (STATUS_TRIPLE_FAULT, STATUS_GUEST_CRASH)

    @property
    def lost(self) -> int:
        return self.counters.get("lost", 0) + self.counters.get("invented", 0)

    @property
    def guest_failure(self) -> bool:
        """The guest ran to its end but reported a failure (exit code != 0)."""
        return self.status & 1 == 1 and self.status != GUEST_OK

    @property
    def ok(self) -> bool:
        return (self.status == GUEST_OK and "fuzz: done" in self.output
                and not self.host_exception and not self.leaked and self.lost == 0)

    def repro(self) -> str:
        return (f"python -m kvmpy.fuzz --seeds {self.seed} --ops {self.ops} "
                f"--cpus {self.cpus} --mode {self.mode}" + (" --initsipi" if self.initsipi else ""))


class _Collect(logging.Handler):
    """Keeps the warnings and errors kvmpy logs during one run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"log {record.name}: {record.getMessage()}")


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def run_fuzz(seed: int, ops: int = 2000, cpus: int = 2, mode: str = "mixed",
             timeout: float = 120.0, *, fastpath: bool | str = True,
             initsipi: bool = False) -> FuzzResult:
    """One run of the fuzz guest (guest/fuzz.c) in this process. `initsipi`: the BSP also
    resets APs mid-run with INIT and restarts them with a SIPI."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    image = build_guest("fuzz").read_bytes()
    out = io.BytesIO()
    errors: list[str] = []
    collect = _Collect()
    logger = logging.getLogger("kvmpy")
    old_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        errors.append(f"uncaught {args.exc_type.__name__} on thread "
                      f"{args.thread.name if args.thread else '?'}: {args.exc_value}")
        old_hook(args)

    threads0, fds0 = threading.active_count(), _open_fds()
    cmdline = f"seed={seed} ops={ops} cpus={cpus} mode={mode} initsipi={int(initsipi)}"
    config = MachineConfig(cpus=cpus, memory=64 << 20, cmdline=cmdline, serial=out,
                           fastpath=fastpath)
    logger.addHandler(collect)
    threading.excepthook = hook
    t0 = time.monotonic()
    try:
        with Machine(config) as machine:
            machine.load(image, name="fuzz")
            result = machine.run(timeout=timeout)
            pio, mmio = machine.pio_bus, machine.mmio_bus
            unclaimed_pio = pio.unclaimed_reads + pio.unclaimed_writes
            unclaimed_mmio = mmio.unclaimed_reads + mmio.unclaimed_writes
            apic_events: Counter[str] = Counter()
            for vcpu in machine.vcpus:
                if vcpu.apic is not None:
                    apic_events.update(vcpu.apic.stats)
            ioapic_events = dict(machine.ioapic.stats) if machine.ioapic is not None else {}
    finally:
        threading.excepthook = old_hook
        logger.removeHandler(collect)
    seconds = time.monotonic() - t0
    text = out.getvalue().decode(errors="replace")
    counters: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("fuzz:"):
            counters.update((k, int(v)) for k, v in _FIELD.findall(line))
    stats = result.stats
    exits = {EXIT_REASON_NAMES.get(r, f"reason {r}"): n for r, n in enumerate(stats.count) if n}
    return FuzzResult(
        seed=seed, ops=ops, cpus=cpus, mode=mode, status=result.status,
        message=result.message, initsipi=initsipi, counters=counters, exits=exits,
        icr_fast=stats.icr_fast, icr_slow=stats.icr_slow, delivery_failures=stats.delivery_failures,
        smi_dropped=stats.smi_dropped, unclaimed_pio=unclaimed_pio,
        unclaimed_mmio=unclaimed_mmio, apic_events=dict(apic_events),
        ioapic_events=ioapic_events,
        host_errors=tuple(errors + collect.lines),
        threads_left=max(0, threading.active_count() - threads0),
        fds_grown=max(0, _open_fds() - fds0), seconds=seconds, output=text,
    )


# ------------------------------------------------------------------ many runs


@dataclass(frozen=True)
class Task:
    seed: int
    ops: int
    cpus: int
    mode: str
    timeout: float
    fastpath: bool | str
    initsipi: bool = False


def _child(task: Task, conn: multiprocessing.connection.Connection) -> None:
    try:
        result = run_fuzz(task.seed, task.ops, task.cpus, task.mode, task.timeout,
                          fastpath=task.fastpath, initsipi=task.initsipi)
    except BaseException as exc:  # noqa: BLE001 - reported as a host exception
        result = FuzzResult(task.seed, task.ops, task.cpus, task.mode, STATUS_VMM_FAULT,
                            f"runner: run_fuzz raised {type(exc).__name__}: {exc}",
                            task.initsipi, host_errors=(repr(exc),))
    conn.send(result)
    conn.close()


def _failed_task(task: Task, message: str) -> FuzzResult:
    return FuzzResult(task.seed, task.ops, task.cpus, task.mode, STATUS_VMM_FAULT, message,
                      task.initsipi)


def run_many(tasks: list[Task], jobs: int = 1,
             progress: bool = False) -> list[FuzzResult]:
    """Runs every task in its own forked child, `jobs` at a time; a child that does not
    answer within its timeout plus a grace period is killed and reported as a hang."""
    build_guest("fuzz")  # once, before forking
    ctx = multiprocessing.get_context("fork")
    pending = list(reversed(tasks))
    running: dict[object, tuple[Task, multiprocessing.Process, float]] = {}
    results: list[FuzzResult] = []
    while pending or running:
        while pending and len(running) < max(1, jobs):
            task = pending.pop()
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(task, child), daemon=True)
            proc.start()
            child.close()
            running[parent] = (task, proc, time.monotonic() + task.timeout + WATCHDOG_GRACE_S)
        ready = multiprocessing.connection.wait(list(running), timeout=1.0)
        for conn in ready:
            task, proc, _ = running.pop(conn)
            try:
                result = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                result = _failed_task(task, f"runner: child died with exit code "
                                            f"{proc.exitcode}")
            conn.close()  # type: ignore[union-attr]
            proc.join(10)
            results.append(result)
            if progress:
                _progress(result, len(results), len(tasks))
        now = time.monotonic()
        for conn, (task, proc, deadline) in list(running.items()):
            if now > deadline:
                proc.kill()
                proc.join(10)
                conn.close()  # type: ignore[union-attr]
                del running[conn]
                results.append(_failed_task(task, "runner: no answer within the timeout; "
                                                  "child killed"))
    results.sort(key=lambda r: (r.cpus, r.seed))
    return results


def _progress(r: FuzzResult, done: int, total: int) -> None:
    flag = "ok" if r.ok else f"FAIL status {r.status}: {r.message}"
    print(f"[{done}/{total}] seed {r.seed} cpus {r.cpus}: {r.seconds:.1f}s {flag}",
          file=sys.stderr, flush=True)


def parse_seeds(spec: str) -> list[int]:
    """'1-200', '5', '1,4,9-12' -> the seeds."""
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds


@dataclass
class Summary:
    """What the table shows, added up over runs."""

    runs: int = 0
    operations: int = 0
    gp: int = 0
    interrupts: int = 0
    nmi: int = 0
    tokens: int = 0
    resets: int = 0
    exits: Counter[str] = field(default_factory=Counter)
    icr_fast: int = 0
    icr_slow: int = 0
    unclaimed_pio: int = 0
    unclaimed_mmio: int = 0
    apic_events: Counter[str] = field(default_factory=Counter)
    ioapic_ops: int = 0
    ioapic_events: Counter[str] = field(default_factory=Counter)
    host_exceptions: int = 0
    hangs: int = 0
    crashes: int = 0
    guest_failures: int = 0
    lost: int = 0
    leaks: int = 0
    delivery_failures: int = 0
    seconds: float = 0.0
    failed: list[FuzzResult] = field(default_factory=list)

    @classmethod
    def of(cls, results: list[FuzzResult]) -> Summary:
        s = cls()
        for r in results:
            s.runs += 1
            s.operations += r.counters.get("ops", 0)
            s.gp += r.counters.get("gp", 0)
            s.interrupts += r.counters.get("interrupts", 0)
            s.nmi += r.counters.get("nmi", 0)
            s.tokens += r.counters.get("tokens_received", 0)
            s.resets += r.counters.get("resets", 0)
            s.exits.update(r.exits)
            s.icr_fast += r.icr_fast
            s.icr_slow += r.icr_slow
            s.unclaimed_pio += r.unclaimed_pio
            s.unclaimed_mmio += r.unclaimed_mmio
            s.apic_events.update(r.apic_events)
            s.ioapic_ops += r.counters.get("ioapic_ops", 0)
            s.ioapic_events.update(r.ioapic_events)
            s.host_exceptions += r.host_exception
            s.hangs += r.hang
            s.crashes += r.guest_crash
            s.guest_failures += r.guest_failure and r.lost == 0
            s.lost += r.lost
            s.leaks += r.leaked
            s.delivery_failures += r.delivery_failures
            s.seconds += r.seconds
            if not r.ok:
                s.failed.append(r)
        return s

    @property
    def must_fail(self) -> bool:
        return bool(self.host_exceptions or self.hangs or self.lost or self.leaks)


def print_report(s: Summary, *, seeds: str, ops: int, cpus: list[int], mode: str,
                 jobs: int, wall: float, initsipi: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    t = Table(title=f"kvmpy guest fuzzer (guest/fuzz.c): seeds {seeds}, {ops} ops per run, "
                    f"vCPUs {' '.join(map(str, cpus))}, mode {mode}"
                    + (", INIT/SIPI resets" if initsipi else ""))
    t.add_column("what")
    t.add_column("count", justify="right")
    rows = [
        ("runs (seeds x vCPU counts)", s.runs),
        ("ops per run", ops),
        ("operations fuzzed (total)", s.operations),
        ("#GPs taken by the guests", s.gp),
        ("interrupts handled by the guests", s.interrupts),
        ("NMIs handled", s.nmi),
        ("counted IPIs received (exact)", s.tokens),
        ("APs reset by INIT and restarted by SIPI", s.resets),
        ("ICR writes on the fastpath / slow path", f"{s.icr_fast} / {s.icr_slow}"),
        ("I/O APIC operations (window, entries, lines)", s.ioapic_ops),
        ("unclaimed port accesses", s.unclaimed_pio),
        ("unclaimed MMIO accesses", s.unclaimed_mmio),
        ("host exceptions (must be 0)", s.host_exceptions),
        ("hangs (must be 0)", s.hangs),
        ("lost or invented IPIs (must be 0)", s.lost),
        ("threads / fds left behind (must be 0)", s.leaks),
        ("IPI delivery failures (must be 0)", s.delivery_failures),
        ("guest crashes (triple fault, KVM error)", s.crashes),
        ("guest-detected failures (oracles)", s.guest_failures),
        ("VM seconds (sum) / wall seconds", f"{s.seconds:.0f} / {wall:.0f} (jobs {jobs})"),
    ]
    for what, n in rows:
        t.add_row(what, str(n))
    console.print(t)
    for title, label, counts in (
        ("exits by reason (all runs)", "exit reason", s.exits),
        ("APIC events (kvmpy's LocalApic counters, all runs)", "event", s.apic_events),
        ("I/O APIC events (kvmpy's IoApic counters, all runs)", "event", s.ioapic_events),
    ):
        table = Table(title=title)
        table.add_column(label)
        table.add_column("count", justify="right")
        for name, n in counts.most_common():
            table.add_row(name, str(n))
        console.print(table)
    for r in s.failed:
        console.print(f"FAILED seed {r.seed} cpus {r.cpus}: status {r.status}: {r.message}; "
                      f"repeat: {r.repro()}", markup=False)
        for line in r.host_errors[:5]:
            console.print(f"    {line}", markup=False)
        tail = [ln for ln in r.output.splitlines() if "fuzz:" in ln and "=" not in ln]
        for line in tail[-3:]:
            console.print(f"    guest: {line}", markup=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmpy.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1-20", help="e.g. 1-200 or 3,7,10-12 (default 1-20)")
    p.add_argument("--ops", type=int, default=2000, help="operations per run (all vCPUs)")
    p.add_argument("--cpus", type=int, nargs="+", default=[2, 4])
    p.add_argument("--mode", choices=MODES, default="mixed")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="per run, seconds")
    p.add_argument("--fastpath", choices=("native", "python", "off"), default="native")
    p.add_argument("--no-fastpath", action="store_const", dest="fastpath", const="off",
                   help="the same as --fastpath off")
    p.add_argument("--initsipi", action="store_true",
                   help="the BSP also resets APs with INIT and restarts them with SIPI")
    p.add_argument("--strict", action="store_true",
                   help="also exit 1 on guest crashes and guest-detected failures")
    p.add_argument("--progress", action="store_true", help="a line per run on stderr")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    tasks = [Task(seed, args.ops, cpus, args.mode, args.timeout, args.fastpath,
                  args.initsipi) for cpus in args.cpus for seed in seeds]
    t0 = time.monotonic()
    results = run_many(tasks, args.jobs, progress=args.progress)
    summary = Summary.of(results)
    print_report(summary, seeds=args.seeds, ops=args.ops, cpus=args.cpus, mode=args.mode,
                 jobs=args.jobs, wall=time.monotonic() - t0, initsipi=args.initsipi)
    if summary.must_fail:
        return 1
    if args.strict and (summary.crashes or summary.guest_failures):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
