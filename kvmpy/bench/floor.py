"""The floor benchmark (issue 5): kvmpy's x2APIC ICR-write fastpath against a bare
KVM_RUN loop in C that handles nothing.

One tiny flat 32-bit guest switches its APIC to x2APIC mode (IA32_APIC_BASE, SDM
10.12.1), then writes ICR (MSR 0x830) `n` times with a fixed IPI of vector 0x40 to
physical destination 0x7fff0000 (no vCPU has that ID, so nothing is delivered and nobody
is kicked), storing its TSC before every CHUNK writes and at the end, and writes 1 to
port 0xf4. The same bytes run under

- `floor.c`, built here with gcc -O2: the VM kvmpy builds, and a KVM_RUN loop that only
  sets msr.error = 0 and re-enters (the floor: what any VMM pays per exit);
- kvmpy with the fastpath (`MachineConfig(fastpath=True)`) and without it;
- a bare Python loop (ctypes KVM_RUN on a kvmpy Machine's vCPU, on its own thread as
  kvmpy's are) that handles nothing either: the floor for any Python VMM, so the gap
  between the columns splits into what Python costs and what kvmpy's loop costs.

Runs alternate the sides, rotating the order every repeat, so drift on a shared machine
hits every column alike. The compared figure is the round trip per ICR exit, measured
identically on every side by the guest's own TSC: per chunk, its time / CHUNK, and the
median over the chunks (a host preemption spoils one chunk, not the run; the emulated
`dec`/`jnz` and the few per-chunk instructions are in every side alike). Handling time
(KVM_RUN return to the next KVM_RUN) is exact per exit in the bare loops; for kvmpy it
is the vCPU's `ExitStats` histogram, which starts after the exit is read from kvm_run
and stops when the fastpath returns, so it leaves out the loop top: the gap between the
round trips is the honest measure of kvmpy's whole share.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TextIO

from kvmpy.errors import KvmpyError
from kvmpy.kvm import ioctls as k
from kvmpy.kvm import run as kr
from kvmpy.kvm.system import VcpuFd, detect_backend
from kvmpy.machine import Machine, MachineConfig
from kvmpy.memory import GuestMemory

SOURCE = Path(__file__).with_name("floor.c")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
MEMORY = 4 << 20
MSR_APIC_BASE = 0x1B
APIC_BASE_VALUE = 0xFEE0_0900  # what the bare loops answer to the guest's rdmsr 0x1b
MSR_X2APIC_ICR = 0x830
ICR_VALUE = (0x7FFF_0000 << 32) | 0x40  # fixed, physical, vector 0x40, no such APIC ID
CHUNK = 200  # ICR writes between two TSC readings of the guest
TSC_GPA = 0x20_0000  # where the guest stores its TSC readings (2 MiB, above the image)
MAX_N = ((MEMORY - TSC_GPA) // 8 - 1) * CHUNK
DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_STATUS = (1 << 1) | 1  # the guest writes 1 to port 0xf4
NON_ICR_EXITS = 3  # rdmsr 0x1b, wrmsr 0x1b, the port 0xf4 write
WARMUP_N = 200


class FloorError(KvmpyError):
    """The floor program failed to build or run, or a guest run ended unexpectedly."""


# ------------------------------------------------------------------ the guest


def chunk_size(n: int) -> int:
    """ICR writes between two of the guest's TSC readings: CHUNK, or n if smaller."""
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be between 1 and {MAX_N}, got {n}")
    chunk = min(CHUNK, n)
    if n % chunk:
        raise ValueError(f"n must be a multiple of {CHUNK} (or at most {CHUNK}), got {n}")
    return chunk


def guest_image(n: int) -> bytes:
    """The benchmark guest, 32-bit code for 1 MiB (`Machine.load(flat=True)`). It
    stores n / chunk_size(n) + 1 TSC readings, one per chunk and one at the end, as u64s
    from TSC_GPA."""
    chunk = chunk_size(n)
    u32 = struct.Struct("<I").pack
    head = b"".join((
        b"\xb9" + u32(MSR_APIC_BASE),      # mov ecx, 0x1b
        b"\x0f\x32",                       # rdmsr
        b"\x0d" + u32((1 << 10) | (1 << 11)),  # or eax, EXTD | EN
        b"\x0f\x30",                       # wrmsr: x2APIC mode
        b"\xbf" + u32(TSC_GPA),            # mov edi, TSC_GPA
        b"\xbb" + u32(n // chunk),         # mov ebx, chunks
        b"\xb9" + u32(MSR_X2APIC_ICR),     # mov ecx, 0x830
    ))
    stamp = b"".join((
        b"\x0f\x31",                       # rdtsc
        b"\x89\x07",                       # mov [edi], eax
        b"\x89\x57\x04",                   # mov [edi + 4], edx
        b"\x83\xc7\x08",                   # add edi, 8
    ))
    chunk_loop = b"".join((
        stamp,                             # outer:
        b"\xb8" + u32(ICR_VALUE & 0xFFFF_FFFF),  # mov eax, ICR low
        b"\xba" + u32(ICR_VALUE >> 32),    # mov edx, ICR high (destination)
        b"\xbe" + u32(chunk),              # mov esi, chunk
        b"\x0f\x30",                       # inner: wrmsr
        b"\x4e",                           # dec esi
        b"\x75\xfb",                       # jnz inner
        b"\x4b",                           # dec ebx
    ))
    back = -(len(chunk_loop) + 2)
    tail = b"".join((
        b"\x75" + struct.pack("<b", back),  # jnz outer
        stamp,
        b"\xb0\x01",                       # mov al, 1
        b"\xe6" + bytes([DEBUG_EXIT_PORT]),  # out 0xf4, al
        b"\xf4",                           # hlt
        b"\xeb\xfd",                       # jmp hlt
    ))
    return head + chunk_loop + tail


def tsc_count(n: int) -> int:
    """How many TSC readings the n-iteration guest stores."""
    return n // chunk_size(n) + 1


def _per_exit_ns(tsc: list[int], n: int, tsc_khz: int) -> list[float]:
    """Round trip per ICR exit in each chunk, from the guest's TSC readings (ns)."""
    chunk = chunk_size(n)
    if len(tsc) != tsc_count(n) or tsc_khz <= 0 or any(b <= a for a, b in pairwise(tsc)):
        raise FloorError(f"guest TSC readings make no sense: {tsc[:4]}...")
    return [(b - a) * 1e6 / tsc_khz / chunk for a, b in pairwise(tsc)]


def _read_tsc(memory: GuestMemory, n: int) -> list[int]:
    return [memory.read_u64(TSC_GPA + 8 * i) for i in range(tsc_count(n))]


# ------------------------------------------------------------------ the C floor


def cache_dir() -> Path:
    """Where the floor binary is cached: $KVMPY_BENCH_BUILD_DIR, else ~/.cache/kvmpy."""
    env = os.environ.get("KVMPY_BENCH_BUILD_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvmpy"


def build_floor(out_dir: Path | None = None) -> Path:
    """The floor binary, built with gcc -O2 unless one from the same source, flags and
    compiler is cached (written to a temporary name and renamed into place)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FloorError("gcc not found: install gcc to build the C floor")
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(CFLAGS).encode(),
                                     "".join(version).encode()])).hexdigest()[:16]
    out = Path(out_dir) if out_dir else cache_dir()
    binary = out / f"floor-{key}"
    if binary.is_file():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".floor-", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        res = subprocess.run([gcc, *CFLAGS, "-o", str(tmp), str(SOURCE)],
                             capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise FloorError(f"building {SOURCE.name} failed: {res.stderr.strip()[:500]}")
        tmp.chmod(0o755)
        os.replace(tmp, binary)
    finally:
        tmp.unlink(missing_ok=True)
    return binary


# ------------------------------------------------------------------ one run of each side


@dataclass(frozen=True)
class RunSample:
    """One run of the guest on one side. Times in ns; `None` where a side cannot tell."""

    side: str  # one of SIDES
    n: int
    exits: int  # every exit the run took (n + NON_ICR_EXITS expected)
    icr_exits: int  # WRMSR 0x830 exits
    icr_fast: int  # of those, completed on kvmpy's fastpath (0 for the bare loops)
    chunks_ns: tuple[float, ...]  # round trip per exit in each chunk (guest TSC)
    wall_ns: int  # host time around the whole run (C: its KVM_RUN loop; kvmpy: run())
    handle_p50_ns: int
    handle_p99_ns: int
    rt_p50_ns: int | None = None  # per-exit round trip percentiles (bare loops only)
    rt_p99_ns: int | None = None
    # The C floor, after its loop: a vCPU ioctl other than KVM_RUN (KVM_GET_VCPU_EVENTS:
    # vcpu_load/vcpu_put, what a KVM_INTERRUPT per injection would cost) and a VM ioctl.
    vcpu_ioctl_p50_ns: int | None = None
    vm_ioctl_p50_ns: int | None = None

    @property
    def per_exit_ns(self) -> float:
        """Round trip per ICR exit over the whole loop (guest TSC / n): the mean."""
        return statistics.fmean(self.chunks_ns)

    @property
    def chunk_p50_ns(self) -> float:
        """Median over the chunks of the round trip per exit: the compared figure (a
        host preemption spoils one chunk, not the whole run)."""
        return statistics.median(self.chunks_ns)

    @property
    def chunk_p99_ns(self) -> float:
        return _p99(list(self.chunks_ns))


def run_c(binary: Path, n: int, *, memory: int = MEMORY) -> RunSample:
    """Run the C floor on the n-iteration guest and parse its JSON line."""
    with tempfile.NamedTemporaryFile(prefix="kvmpy-floor-", suffix=".bin") as f:
        f.write(guest_image(n))
        f.flush()
        res = subprocess.run(
            [str(binary), f.name, str(memory), hex(TSC_GPA), str(tsc_count(n))],
            capture_output=True, text=True, timeout=60 + n // 1000, check=False,
        )
    if res.returncode != 0:
        raise FloorError(f"C floor failed ({res.returncode}): {res.stderr.strip()}")
    d = json.loads(res.stdout)
    return RunSample(
        side="c", n=n, exits=d["exits"], icr_exits=d["icr_exits"], icr_fast=0,
        chunks_ns=tuple(_per_exit_ns(d["guest_tsc"], n, d["tsc_khz"])),
        wall_ns=d["total_ns"], handle_p50_ns=d["handle_p50_ns"],
        handle_p99_ns=d["handle_p99_ns"], rt_p50_ns=d["rt_p50_ns"], rt_p99_ns=d["rt_p99_ns"],
        vcpu_ioctl_p50_ns=d["vcpu_ioctl_p50_ns"], vm_ioctl_p50_ns=d["vm_ioctl_p50_ns"],
    )


def run_kvmpy(n: int, *, fastpath: bool | str, memory: int = MEMORY,
              record_time: bool = True, traced: bool = False) -> RunSample:
    """Run the n-iteration guest on a 1-vCPU kvmpy Machine (its defaults otherwise).
    With `record_time=False` the exit statistics keep counts only: the difference to
    the timed run is what recording handling times costs. With `traced`, the run is
    traced as `kvmpy run --trace` does (default ring size; nothing is exported)."""
    # No PIT: the BIOS state kvmpy sets up leaves its IRQ 0 unmasked on the 8259, which
    # the BSP takes (LINT0 ExtINT), so it would add exits the bare loops never see.
    config = MachineConfig(cpus=1, memory=memory, serial=io.BytesIO(), fastpath=fastpath,
                           record_time=record_time, pit=False)
    with Machine(config) as machine:
        machine.load(guest_image(n), flat=True)
        if traced:
            from kvmpy.tracing.probes import attach

            attach(machine)
        t0 = time.perf_counter_ns()
        result = machine.run(timeout=60 + n // 1000)
        wall = time.perf_counter_ns() - t0
        if result.status != DEBUG_EXIT_STATUS:
            raise FloorError(f"kvmpy run ended with status {result.status}: {result.message}")
        tsc = _read_tsc(machine.memory, n)
        tsc_khz = machine.tsc_hz // 1000
    stats = result.stats
    wrmsr = k.KVM_EXIT_X86_WRMSR
    fast = stats.fast[wrmsr]
    on = fastpath not in (False, "off")
    hist = stats.fast_time[wrmsr] if on else stats.slow_time[wrmsr]
    base = {"python": "fastpath-python"}.get(str(fastpath), "fastpath" if on else "slowpath")
    return RunSample(
        side=base + ("" if record_time else "-untimed")
        + ("-traced" if traced else ""),
        n=n, exits=sum(stats.count),
        icr_exits=fast + stats.msr_accesses.get(("wr", MSR_X2APIC_ICR), 0), icr_fast=fast,
        chunks_ns=tuple(_per_exit_ns(tsc, n, tsc_khz)), wall_ns=wall,
        handle_p50_ns=hist.percentile(50), handle_p99_ns=hist.percentile(99),
    )


def run_python_bare(n: int, *, memory: int = MEMORY) -> RunSample:
    """The bare Python floor: floor.c's loop, in Python, on a kvmpy Machine's vCPU fd
    (its VM, memory, CPUID and boot state), on a thread of its own like kvmpy's vCPUs.
    Only the two timestamps per exit are extra work, as in floor.c."""
    config = MachineConfig(cpus=1, memory=memory, serial=io.BytesIO())
    with Machine(config) as machine:
        machine.load(guest_image(n), flat=True)
        loop = BareLoop(machine.vcpus[0].fd)
        thread = threading.Thread(target=loop.run, name="kvmpy-bench-bare")
        t0 = time.perf_counter_ns()
        thread.start()
        thread.join(60 + n // 1000)
        wall = time.perf_counter_ns() - t0
        if thread.is_alive() or loop.error:
            raise FloorError(f"bare Python loop failed: {loop.error or 'timed out'}")
        tsc = _read_tsc(machine.memory, n)
        tsc_khz = machine.tsc_hz // 1000
    rt, hd = sorted(loop.round_trips), sorted(loop.handling)
    return RunSample(
        side="python", n=n, exits=loop.exits, icr_exits=loop.icr_exits, icr_fast=0,
        chunks_ns=tuple(_per_exit_ns(tsc, n, tsc_khz)), wall_ns=wall,
        handle_p50_ns=_rank(hd, 50), handle_p99_ns=_rank(hd, 99),
        rt_p50_ns=_rank(rt, 50), rt_p99_ns=_rank(rt, 99),
    )


class BareLoop:
    """floor.c's KVM_RUN loop in Python: MSR exits get msr.error = 0 (rdmsr 0x1b reads
    APIC_BASE_VALUE), the port 0xf4 write ends it, anything else is an error. Per ICR
    exit it keeps the round trip and the handling time, as floor.c does."""

    def __init__(self, fd: VcpuFd) -> None:
        self.fd = fd
        self.exits = 0
        self.icr_exits = 0
        self.round_trips: list[int] = []
        self.handling: list[int] = []
        self.error = ""

    def run(self) -> None:
        try:
            self._loop()
        except OSError as exc:
            self.error = str(exc)

    def _loop(self) -> None:
        view = self.fd.view
        u8, u16, u32, u64 = view.u8, view.u16, view.u32, view.u64
        run = self.fd.run
        clock = time.monotonic_ns  # CLOCK_MONOTONIC, as floor.c
        rt_append, hd_append = self.round_trips.append, self.handling.append
        exits = icr = 0
        prev_icr = False
        prev_call = t_ret = 0
        while True:
            t_call = clock()
            if prev_icr:
                rt_append(t_call - prev_call)
                hd_append(t_call - t_ret)
            prev_call = t_call
            prev_icr = False
            if run() < 0:
                continue
            t_ret = clock()
            exits += 1
            reason = u32[kr.EXIT_REASON]
            if reason == k.KVM_EXIT_X86_WRMSR:
                u8[kr.MSR_ERROR] = 0
                if u32[kr.MSR_INDEX] == MSR_X2APIC_ICR:
                    icr += 1
                    prev_icr = True
            elif reason == k.KVM_EXIT_X86_RDMSR:
                u8[kr.MSR_ERROR] = 0
                u64[kr.MSR_DATA] = APIC_BASE_VALUE if u32[kr.MSR_INDEX] == MSR_APIC_BASE else 0
            elif reason == k.KVM_EXIT_IO and u16[kr.IO_PORT] == DEBUG_EXIT_PORT:
                break
            else:
                self.error = f"unexpected exit reason {reason}"
                break
        self.exits, self.icr_exits = exits, icr


def _rank(ordered: list[int], p: float) -> int:
    """trace.Histogram.percentile's rank rule on exact, sorted samples."""
    if not ordered:
        return 0
    return ordered[min(len(ordered), max(1, round(len(ordered) * p / 100))) - 1]


# ------------------------------------------------------------------ the benchmark


SIDES = ("c", "python", "fastpath", "fastpath-untimed", "fastpath-python", "fastpath-traced",
         "slowpath")
TITLES = {"c": "C floor", "python": "bare Python", "fastpath": "kvmpy native",
          "fastpath-untimed": "native, no timing", "fastpath-python": "kvmpy python",
          "fastpath-traced": "native, traced", "slowpath": "kvmpy off"}


@dataclass(frozen=True)
class Column:
    """One side summarised over the repeats: each figure is the median over repeats."""

    side: str
    exits: int
    icr_fast: int  # the fewest of any repeat
    chunk_p50_ns: float  # round trip per exit (guest TSC), p50 over the chunks
    chunk_p99_ns: float  # and p99
    mean_ns: float  # round trip per exit over the whole loop (guest TSC / n)
    rt_p50_ns: float | None  # per-exit samples (the bare loops)
    rt_p99_ns: float | None
    handle_p50_ns: float
    handle_p99_ns: float
    wall_per_exit_ns: float  # host wall time / exits, median over repeats


def _p99(values: list[float]) -> float:
    """The 99th percentile, with trace.Histogram.percentile's rank rule."""
    ordered = sorted(values)
    return ordered[max(0, round(len(ordered) * 0.99) - 1)]


def _column(side: str, runs: list[RunSample]) -> Column:
    med = statistics.median
    rt50 = [r.rt_p50_ns for r in runs if r.rt_p50_ns is not None]
    rt99 = [r.rt_p99_ns for r in runs if r.rt_p99_ns is not None]
    return Column(
        side=side,
        exits=runs[0].exits,
        icr_fast=min(r.icr_fast for r in runs),
        chunk_p50_ns=med(r.chunk_p50_ns for r in runs),
        chunk_p99_ns=med(r.chunk_p99_ns for r in runs),
        mean_ns=med(r.per_exit_ns for r in runs),
        rt_p50_ns=med(rt50) if rt50 else None,
        rt_p99_ns=med(rt99) if rt99 else None,
        handle_p50_ns=med(r.handle_p50_ns for r in runs),
        handle_p99_ns=med(r.handle_p99_ns for r in runs),
        wall_per_exit_ns=med(r.wall_ns / r.exits for r in runs),
    )


@dataclass
class FloorResult:
    """Every run of one benchmark, and its summary."""

    n: int
    repeats: int
    backend: str
    runs: dict[str, list[RunSample]] = field(default_factory=dict)

    def column(self, side: str) -> Column:
        return _column(side, self.runs[side])

    def ratio(self, side: str = "fastpath", *, mean: bool = False) -> float:
        """Median over repeats of (side's round trip per exit / the C floor's), each
        pair from the same repeat; by default of the chunks' p50, with `mean` of the
        whole loop's mean (which a host preemption can spoil)."""
        pairs = zip(self.runs[side], self.runs["c"], strict=True)
        if mean:
            return statistics.median(s.per_exit_ns / c.per_exit_ns for s, c in pairs)
        return statistics.median(s.chunk_p50_ns / c.chunk_p50_ns for s, c in pairs)

    def paired(self, side: str, base: str) -> float:
        """Median over repeats of side / base chunk p50, each pair from one repeat."""
        pairs = zip(self.runs[side], self.runs[base], strict=True)
        return statistics.median(s.chunk_p50_ns / b.chunk_p50_ns for s, b in pairs)

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "repeats": self.repeats,
            "backend": self.backend,
            "chunk": chunk_size(self.n),
            "ratio": {side: self.ratio(side) for side in SIDES},
            "ratio_of_means": {side: self.ratio(side, mean=True) for side in SIDES},
            "columns": {side: asdict(self.column(side)) for side in SIDES},
            "runs": {side: [asdict(r) for r in runs] for side, runs in self.runs.items()},
        }


def run_floor(n: int, repeats: int, *, memory: int = MEMORY) -> FloorResult:
    """Build the C floor, warm every side up once, then run the sides `repeats`
    times each, alternating and rotating their order every repeat."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    binary = build_floor()
    runners = {
        "c": lambda m: run_c(binary, m, memory=memory),
        "python": lambda m: run_python_bare(m, memory=memory),
        "fastpath": lambda m: run_kvmpy(m, fastpath=True, memory=memory),
        "fastpath-untimed": lambda m: run_kvmpy(m, fastpath=True, memory=memory,
                                                record_time=False),
        "fastpath-python": lambda m: run_kvmpy(m, fastpath="python", memory=memory),
        "fastpath-traced": lambda m: run_kvmpy(m, fastpath=True, memory=memory, traced=True),
        "slowpath": lambda m: run_kvmpy(m, fastpath=False, memory=memory),
    }
    for side in SIDES:
        runners[side](min(n, WARMUP_N))
    result = FloorResult(n=n, repeats=repeats, backend=detect_backend(),
                         runs={side: [] for side in SIDES})
    for i in range(repeats):
        for j in range(len(SIDES)):
            side = SIDES[(i + j) % len(SIDES)]
            result.runs[side].append(runners[side](n))
    return result


# ------------------------------------------------------------------ the report


def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def print_table(result: FloorResult, file: TextIO | None = None) -> None:
    """The summary as a rich table, the backend and the ratios."""
    from rich.console import Console
    from rich.table import Table

    cols = [result.column(side) for side in SIDES]
    chunk = chunk_size(result.n)
    table = Table(title=f"ICR wrmsr floor: n={result.n}, repeats={result.repeats}, "
                        f"backend={result.backend} (times in us)")
    table.add_column("per ICR exit")
    for title in (TITLES[side] for side in SIDES):
        table.add_column(title, justify="right")
    rows = [
        ("exits per run", [str(c.exits) for c in cols]),
        ("ICR exits on the fastpath", [str(c.icr_fast) for c in cols]),
        (f"round trip, guest TSC per {chunk}-exit chunk: p50",
         [_us(c.chunk_p50_ns) for c in cols]),
        (f"round trip, guest TSC per {chunk}-exit chunk: p99",
         [_us(c.chunk_p99_ns) for c in cols]),
        ("round trip, guest TSC / n (mean)", [_us(c.mean_ns) for c in cols]),
        ("round trip, host per-exit samples p50", [_us(c.rt_p50_ns) for c in cols]),
        ("round trip, host per-exit samples p99", [_us(c.rt_p99_ns) for c in cols]),
        ("handling (KVM_RUN return to entry) p50", [_us(c.handle_p50_ns) for c in cols]),
        ("handling p99", [_us(c.handle_p99_ns) for c in cols]),
        ("host wall time / exits", [_us(c.wall_per_exit_ns) for c in cols]),
        ("ratio to C floor (chunk p50, paired)",
         [f"{result.ratio(side):.3f}" for side in SIDES]),
        ("ratio to C floor (mean, paired)",
         [f"{result.ratio(side, mean=True):.3f}" for side in SIDES]),
    ]
    for label, values in rows:
        table.add_row(label, *values)
    console = Console(file=file, width=150)
    console.print(table)
    fast, slow = result.column("fastpath"), result.column("slowpath")
    timed, untimed = result.column("fastpath"), result.column("fastpath-untimed")
    console.print("Figures are medians over the repeats. kvmpy's handling is its ExitStats "
                  "histogram (exit read to fastpath return, log-linear buckets); the bare "
                  "loops' is exact. Target: fastpath ratio <= 1.10.")
    if slow.handle_p50_ns:
        console.print(f"fastpath / slow path handling p50: "
                      f"{fast.handle_p50_ns / slow.handle_p50_ns:.2f} (target <= 0.25)")
    if untimed.chunk_p50_ns:
        console.print(f"cost of recording handling times: round trip p50 "
                      f"{_us(timed.chunk_p50_ns)} us timed vs {_us(untimed.chunk_p50_ns)} us "
                      f"untimed ({timed.chunk_p50_ns / untimed.chunk_p50_ns - 1:+.1%})")
    c_runs = result.runs["c"]
    if c_runs and c_runs[0].vcpu_ioctl_p50_ns is not None:
        vcpu_ioctl = statistics.median(r.vcpu_ioctl_p50_ns or 0 for r in c_runs)
        vm_ioctl = statistics.median(r.vm_ioctl_p50_ns or 0 for r in c_runs)
        console.print(f"a vCPU ioctl other than KVM_RUN (KVM_GET_VCPU_EVENTS) p50 "
                      f"{_us(vcpu_ioctl)} us, a VM ioctl {_us(vm_ioctl)} us: what one "
                      f"KVM_INTERRUPT per injection would add (kvmpy queues interrupts in "
                      f"kvm_run.s.regs, docs/native-core.md)")
    traced = result.column("fastpath-traced")
    if timed.chunk_p50_ns:
        console.print(f"cost of tracing (kvmpy run --trace): round trip p50 "
                      f"{_us(traced.chunk_p50_ns)} us traced vs {_us(timed.chunk_p50_ns)} us "
                      f"({traced.chunk_p50_ns / timed.chunk_p50_ns - 1:+.1%}; paired ratio "
                      f"{result.paired('fastpath-traced', 'fastpath'):.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpy.bench.floor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="ICR writes per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args(argv)
    try:
        result = run_floor(args.n, args.repeats)
    except (KvmpyError, ValueError, OSError) as exc:
        print(f"kvmpy: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
