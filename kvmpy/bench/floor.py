"""The floor benchmark (issue 5): kvmpy's x2APIC ICR-write fastpath against a bare
KVM_RUN loop in C that handles nothing.

One tiny flat 32-bit guest switches its APIC to x2APIC mode (IA32_APIC_BASE, SDM
10.12.1), reads the TSC, writes ICR (MSR 0x830) `n` times with a fixed IPI of vector 0x40
to physical destination 0x7fff0000 (no vCPU has that ID, so nothing is delivered and
nobody is kicked), reads the TSC again, stores both readings in its image and writes 1
to port 0xf4. The same bytes run under

- `floor.c`, built here with gcc -O2: the VM kvmpy builds, and a KVM_RUN loop that only
  sets msr.error = 0 and re-enters (the floor: what any VMM pays per exit);
- kvmpy with the fastpath (`MachineConfig(fastpath=True)`) and without it.

Runs alternate C / fastpath / slow path, rotating the order every repeat, so drift on
a shared machine hits every column alike. The compared figure is the round trip per ICR
exit measured identically on every side: the guest's own TSC across its loop divided by
`n` (the emulated `dec`/`jnz` are in all three). Handling time (KVM_RUN return to the
next KVM_RUN) is exact per exit in C; for kvmpy it is the vCPU's `ExitStats` histogram
(log-linear, within ~12%), which starts after the exit is read from kvm_run and stops
when the fastpath returns, so it leaves out the loop top: the gap between the round
trips is the honest measure of kvmpy's whole share.
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from kvmpy.boot.flat import FLAT_LOAD_ADDRESS
from kvmpy.errors import KvmpyError
from kvmpy.kvm import ioctls as k
from kvmpy.kvm.system import detect_backend
from kvmpy.machine import Machine, MachineConfig

SOURCE = Path(__file__).with_name("floor.c")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
MEMORY = 4 << 20
MSR_APIC_BASE = 0x1B
MSR_X2APIC_ICR = 0x830
ICR_VALUE = (0x7FFF_0000 << 32) | 0x40  # fixed, physical, vector 0x40, no such APIC ID
RESULT_OFFSET = 0x80  # the guest stores TSC before/after its loop here, in its image
IMAGE_SIZE = 0x90
DEBUG_EXIT_STATUS = (1 << 1) | 1  # the guest writes 1 to port 0xf4
NON_ICR_EXITS = 3  # rdmsr 0x1b, wrmsr 0x1b, the port 0xf4 write
WARMUP_N = 200


class FloorError(KvmpyError):
    """The floor program failed to build or run, or a guest run ended unexpectedly."""


# ------------------------------------------------------------------ the guest


def guest_image(n: int) -> bytes:
    """The benchmark guest, 32-bit code loaded at FLAT_LOAD_ADDRESS (see module doc)."""
    if not 1 <= n <= 0xFFFF_FFFF:
        raise ValueError(f"n must be between 1 and 2**32 - 1, got {n}")
    result = FLAT_LOAD_ADDRESS + RESULT_OFFSET
    u32 = struct.Struct("<I").pack
    code = b"".join((
        b"\xb9" + u32(MSR_APIC_BASE),      # mov ecx, 0x1b
        b"\x0f\x32",                       # rdmsr
        b"\x0d" + u32((1 << 10) | (1 << 11)),  # or eax, EXTD | EN
        b"\x0f\x30",                       # wrmsr: x2APIC mode
        b"\xbe" + u32(n),                  # mov esi, n
        b"\x0f\x31",                       # rdtsc
        b"\xa3" + u32(result),             # mov [result], eax
        b"\x89\x15" + u32(result + 4),     # mov [result + 4], edx
        b"\xb9" + u32(MSR_X2APIC_ICR),     # mov ecx, 0x830
        b"\xb8" + u32(ICR_VALUE & 0xFFFF_FFFF),  # mov eax, ICR low
        b"\xba" + u32(ICR_VALUE >> 32),    # mov edx, ICR high (destination)
        b"\x0f\x30",                       # loop: wrmsr
        b"\x4e",                           # dec esi
        b"\x75\xfb",                       # jnz loop
        b"\x0f\x31",                       # rdtsc
        b"\xa3" + u32(result + 8),         # mov [result + 8], eax
        b"\x89\x15" + u32(result + 12),    # mov [result + 12], edx
        b"\xb0\x01",                       # mov al, 1
        b"\xe6\xf4",                       # out 0xf4, al
        b"\xf4",                           # hlt
        b"\xeb\xfd",                       # jmp hlt
    ))
    assert len(code) <= RESULT_OFFSET
    return code.ljust(IMAGE_SIZE, b"\0")


def _loop_ns(tsc_start: int, tsc_end: int, tsc_khz: int) -> int:
    """Nanoseconds between the guest's two TSC readings."""
    if tsc_end <= tsc_start or tsc_khz <= 0:
        raise FloorError(f"guest TSC readings make no sense: {tsc_start} -> {tsc_end}")
    return (tsc_end - tsc_start) * 1_000_000 // tsc_khz


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

    side: str  # "c", "fastpath" or "slowpath"
    n: int
    exits: int  # every exit the run took (n + NON_ICR_EXITS expected)
    icr_exits: int  # WRMSR 0x830 exits
    icr_fast: int  # of those, completed on kvmpy's fastpath (0 for C)
    loop_ns: int  # the guest's TSC across its ICR loop
    wall_ns: int  # host time around the whole run (C: its KVM_RUN loop; kvmpy: run())
    handle_p50_ns: int
    handle_p99_ns: int
    rt_p50_ns: int | None = None  # per-exit round trip percentiles (C only)
    rt_p99_ns: int | None = None

    @property
    def per_exit_ns(self) -> float:
        """Round trip per ICR exit, guest-measured: the compared figure."""
        return self.loop_ns / self.n


def run_c(binary: Path, n: int, *, memory: int = MEMORY) -> RunSample:
    """Run the C floor on the n-iteration guest and parse its JSON line."""
    with tempfile.NamedTemporaryFile(prefix="kvmpy-floor-", suffix=".bin") as f:
        f.write(guest_image(n))
        f.flush()
        res = subprocess.run(
            [str(binary), f.name, str(memory), hex(FLAT_LOAD_ADDRESS + RESULT_OFFSET)],
            capture_output=True, text=True, timeout=60 + n // 1000, check=False,
        )
    if res.returncode != 0:
        raise FloorError(f"C floor failed ({res.returncode}): {res.stderr.strip()}")
    d = json.loads(res.stdout)
    return RunSample(
        side="c", n=n, exits=d["exits"], icr_exits=d["icr_exits"], icr_fast=0,
        loop_ns=_loop_ns(d["guest_tsc_start"], d["guest_tsc_end"], d["tsc_khz"]),
        wall_ns=d["total_ns"], handle_p50_ns=d["handle_p50_ns"],
        handle_p99_ns=d["handle_p99_ns"], rt_p50_ns=d["rt_p50_ns"], rt_p99_ns=d["rt_p99_ns"],
    )


def run_kvmpy(n: int, *, fastpath: bool, memory: int = MEMORY) -> RunSample:
    """Run the n-iteration guest on a 1-vCPU kvmpy Machine (its defaults otherwise)."""
    config = MachineConfig(cpus=1, memory=memory, serial=io.BytesIO(), fastpath=fastpath)
    with Machine(config) as machine:
        machine.load(guest_image(n), flat=True)
        t0 = time.perf_counter_ns()
        result = machine.run(timeout=60 + n // 1000)
        wall = time.perf_counter_ns() - t0
        if result.status != DEBUG_EXIT_STATUS:
            raise FloorError(f"kvmpy run ended with status {result.status}: {result.message}")
        at = FLAT_LOAD_ADDRESS + RESULT_OFFSET
        tsc_start, tsc_end = machine.memory.read_u64(at), machine.memory.read_u64(at + 8)
        tsc_khz = machine.tsc_hz // 1000
    stats = result.stats
    wrmsr = k.KVM_EXIT_X86_WRMSR
    fast = stats.fast[wrmsr]
    hist = stats.fast_time[wrmsr] if fastpath else stats.slow_time[wrmsr]
    return RunSample(
        side="fastpath" if fastpath else "slowpath", n=n, exits=sum(stats.count),
        icr_exits=fast + stats.msr_accesses.get(("wr", MSR_X2APIC_ICR), 0), icr_fast=fast,
        loop_ns=_loop_ns(tsc_start, tsc_end, tsc_khz), wall_ns=wall,
        handle_p50_ns=hist.percentile(50), handle_p99_ns=hist.percentile(99),
    )


# ------------------------------------------------------------------ the benchmark


SIDES = ("c", "fastpath", "slowpath")


@dataclass(frozen=True)
class Column:
    """One side summarised over the repeats (medians, and the spread of the round trip)."""

    side: str
    exits: int
    icr_fast: int
    per_exit_p50_ns: float  # median over repeats of loop_ns / n
    per_exit_p99_ns: float  # 99th percentile over repeats (the worst, for few repeats)
    rt_p50_ns: float | None  # per-exit samples (C), median over repeats
    rt_p99_ns: float | None
    handle_p50_ns: float
    handle_p99_ns: float
    wall_per_exit_ns: float  # host wall time / exits, median over repeats


def _p99(values: list[float]) -> float:
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
        per_exit_p50_ns=med(r.per_exit_ns for r in runs),
        per_exit_p99_ns=_p99([r.per_exit_ns for r in runs]),
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

    def ratio(self, side: str = "fastpath") -> float:
        """Median over repeats of (side's round trip per exit / the C floor's), each
        pair taken from the same repeat."""
        pairs = zip(self.runs[side], self.runs["c"], strict=True)
        return statistics.median(s.per_exit_ns / c.per_exit_ns for s, c in pairs)

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "repeats": self.repeats,
            "backend": self.backend,
            "ratio_fastpath": self.ratio("fastpath"),
            "ratio_slowpath": self.ratio("slowpath"),
            "columns": {side: asdict(self.column(side)) for side in SIDES},
            "runs": {side: [asdict(r) for r in runs] for side, runs in self.runs.items()},
        }


def run_floor(n: int, repeats: int, *, memory: int = MEMORY) -> FloorResult:
    """Build the C floor, warm every side up once, then run the three sides `repeats`
    times each, alternating and rotating their order every repeat."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    binary = build_floor()
    runners = {
        "c": lambda m: run_c(binary, m, memory=memory),
        "fastpath": lambda m: run_kvmpy(m, fastpath=True, memory=memory),
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
    table = Table(title=f"ICR wrmsr floor: n={result.n}, repeats={result.repeats}, "
                        f"backend={result.backend} (times in us)")
    table.add_column("per ICR exit")
    for title in ("C floor", "kvmpy fastpath", "kvmpy slow path"):
        table.add_column(title, justify="right")
    rows = [
        ("exits per run", [str(c.exits) for c in cols]),
        ("ICR exits on the fastpath", [str(c.icr_fast) for c in cols]),
        ("round trip, guest TSC / n: p50 of repeats",
         [_us(c.per_exit_p50_ns) for c in cols]),
        ("round trip, guest TSC / n: p99 of repeats",
         [_us(c.per_exit_p99_ns) for c in cols]),
        ("round trip, per-exit samples p50", [_us(c.rt_p50_ns) for c in cols]),
        ("round trip, per-exit samples p99", [_us(c.rt_p99_ns) for c in cols]),
        ("handling (KVM_RUN return to entry) p50", [_us(c.handle_p50_ns) for c in cols]),
        ("handling p99", [_us(c.handle_p99_ns) for c in cols]),
        ("host wall time / exits", [_us(c.wall_per_exit_ns) for c in cols]),
        ("ratio to C floor (paired, median)",
         ["1.00", f"{result.ratio('fastpath'):.3f}", f"{result.ratio('slowpath'):.3f}"]),
    ]
    for label, values in rows:
        table.add_row(label, *values)
    console = Console(file=file, width=120)
    console.print(table)
    console.print("kvmpy handling is ExitStats' histogram (exit read to fastpath return; "
                  "log-linear buckets); C's is exact. Target: fastpath ratio <= 1.10.")


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
