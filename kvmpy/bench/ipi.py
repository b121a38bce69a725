"""`kvmpy bench ipi`: guest-measured IPI latencies, kvmpy fastpath vs slow path vs KVM.

Runs the bundled `ipi_bench` guest (guest/ipi_bench.c) under three configurations in
one invocation, alternating them `--rounds` times so drift on a shared machine hits all
three alike:

    kvmpy-fast   kvmpy's userspace APIC, the native fastpath (--fastpath native, the C core)
    kvmpy-python the same build with --fastpath python (handle_exit_irqoff under the GIL)
    kvmpy-slow   the same build with --no-fastpath (ordinary exit dispatch)
    kernel       KVM's in-kernel irqchip (its own x2APIC and fastpath): the reference

The guest stores TSC deltas in its memory; they are read from guest RAM after the VM
ends and converted to ns with KVM's TSC frequency (KVM_GET_TSC_KHZ). Beside the guest
figures the report gives kvmpy's own handling time of ICR-write exits per path and the
sender's cost of a signal kick, from the exit statistics of the same runs.
"""

from __future__ import annotations

import io
import re
import statistics
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from kvmpy.guestbuild import build_guest
from kvmpy.kvm import detect_backend
from kvmpy.machine import Machine, MachineConfig
from kvmpy.trace import ExitStats, Histogram

CONFIGS = ("kvmpy-fast", "kvmpy-python", "kvmpy-slow", "kernel")
# The --fastpath setting of each kvmpy configuration (the in-kernel APIC has none).
FASTPATH_OF = {"kvmpy-fast": "native", "kvmpy-python": "python", "kvmpy-slow": "off",
               "kernel": "off"}
TWO_CPU_TESTS = ("rt", "oneway", "rt_halt", "oneway_halt", "send", "send_kick",
                 "vmexit_ipi", "vmexit_ipi_halt")
SCALE_TESTS = ("bcast", "mcast")
_TEST_LINE = re.compile(r"ipi_bench: test (\w+) n=(\d+) addr=0x([0-9a-f]+)")


def config_for(name: str, cpus: int, cmdline: str) -> MachineConfig:
    return MachineConfig(
        cpus=cpus, memory=64 << 20, cmdline=cmdline, serial=io.BytesIO(),
        fastpath=FASTPATH_OF[name], irqchip="kernel" if name == "kernel" else "user",
    )


@dataclass
class GuestRun:
    """Samples (TSC cycles) per test from one VM run, and the run's exit statistics."""

    samples: dict[str, list[int]]
    stats: ExitStats
    tsc_hz: int
    status: int
    message: str
    output: str


def run_guest(name: str, cpus: int, cmdline: str, timeout: float = 600) -> GuestRun:
    config = config_for(name, cpus, cmdline)
    with Machine(config) as machine:
        machine.load(build_guest("ipi_bench").read_bytes(), name="ipi_bench")
        result = machine.run(timeout=timeout)
        output = config.serial.getvalue().decode(errors="replace")  # type: ignore[union-attr]
        samples: dict[str, list[int]] = {}
        for test, n, addr in _TEST_LINE.findall(output):
            count = int(n)
            raw = machine.memory.read(int(addr, 16), 4 * count)
            samples[test] = list(struct.unpack(f"<{count}I", raw))
        return GuestRun(samples, result.stats, machine.tsc_hz, result.status,
                        result.message, output)


@dataclass(frozen=True)
class Summary:
    """Percentiles of one sample set, in TSC cycles and ns."""

    n: int
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        v = sorted(values)
        if not v:
            return cls(0, 0, 0, 0, 0, 0)

        def pct(p: float) -> float:
            return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]

        return cls(len(v), v[0], pct(50), pct(90), pct(99), v[-1])

    def scaled(self, factor: float) -> Summary:
        return Summary(self.n, self.min * factor, self.p50 * factor, self.p90 * factor,
                       self.p99 * factor, self.max * factor)


def _hist_summary(h: Histogram) -> dict[str, float]:
    return {"n": h.count, "p50_ns": h.percentile(50), "p99_ns": h.percentile(99),
            "mean_ns": (h.total / h.count) if h.count else 0.0}


@dataclass
class BenchResult:
    backend: str
    tsc_hz: int
    cpus: int
    mode: str
    rounds: int
    cycles: dict[str, dict[str, Summary]] = field(default_factory=dict)  # test -> config
    handling: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    raw: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # test -> cfg -> us

    def ns(self, test: str, config: str) -> Summary:
        return self.cycles[test][config].scaled(1e9 / self.tsc_hz)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "backend": self.backend, "tsc_hz": self.tsc_hz, "cpus": self.cpus,
            "mode": self.mode, "rounds": self.rounds, "failures": self.failures,
            "handling": self.handling, "tests": {},
        }
        for test, per in self.cycles.items():
            out["tests"][test] = {  # type: ignore[index]
                cfg: {"cycles": asdict(s), "ns": asdict(self.ns(test, cfg))}
                for cfg, s in per.items()
            }
        return out


def bench_ipi(*, n: int = 300, rounds: int = 3, mode: str = "x2apic",
              configs: Iterable[str] = CONFIGS, scale_cpus: Iterable[int] = (),
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run the two-CPU tests (or, with `scale_cpus`, the scaling tests for each count)."""
    configs = list(configs)
    result = BenchResult(detect_backend(), 0, 2, mode, rounds)
    plans: list[tuple[int, str]] = []
    if scale_cpus:
        plans = [(c, f"n={n} mode={mode} scale=1 cpus={c}") for c in scale_cpus]
    else:
        plans = [(2, f"n={n} mode={mode} cpus=2")]
    pooled: dict[tuple[str, str], list[int]] = {}
    stats: dict[str, ExitStats] = {c: ExitStats() for c in configs}
    for _ in range(rounds):
        for cpus, cmdline in plans:
            for cfg in configs:
                if progress:
                    progress(f"{cfg} cpus={cpus}")
                run = run_guest(cfg, cpus, cmdline)
                result.tsc_hz = run.tsc_hz
                if run.status != 1 or "ipi_bench: done" not in run.output:
                    result.failures.append(f"{cfg} cpus={cpus}: {run.message}")
                    continue
                stats[cfg].merge(run.stats)
                for test, values in run.samples.items():
                    key = f"{test}@{cpus}" if scale_cpus else test
                    pooled.setdefault((key, cfg), []).extend(values)
    order = {name: i for i, name in enumerate(CONFIGS)}
    for (test, cfg), values in sorted(pooled.items(), key=lambda kv: order[kv[0][1]]):
        result.cycles.setdefault(test, {})[cfg] = Summary.of(values)
        us = 1e6 / result.tsc_hz
        result.raw.setdefault(test, {})[cfg] = [v * us for v in values]
    for cfg, s in stats.items():
        if cfg == "kernel":
            continue
        result.handling[cfg] = {
            "icr_fast": _hist_summary(s.icr_fast_time),
            "icr_slow": _hist_summary(s.icr_slow_time),
            "kick": _hist_summary(s.kick_time),
            "wake": _hist_summary(s.wake_time),
        }
    return result


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# ---------------------------------------------------------------------- report


def print_report(result: BenchResult, file: object = None) -> None:
    """The three-way table (guest-measured, ns and cycles) and kvmpy's handling time."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=150)  # type: ignore[arg-type]
    mhz = result.tsc_hz / 1e6
    title = (f"IPI latency, guest TSC ({result.backend}, TSC {mhz:.0f} MHz, "
             f"{result.mode}, {result.rounds} rounds)")
    table = Table(title=title)
    table.add_column("test")
    configs = [c for c in CONFIGS if any(c in per for per in result.cycles.values())]
    for cfg in configs:
        table.add_column(f"{cfg}\np50 / p99 us", justify="right")
    table.add_column("fast/slow\np50", justify="right")
    table.add_column("fast/kernel\np50", justify="right")
    table.add_column(f"{configs[0] if configs else ''}\nmin p90 max us\n(cycles p50)",
                     justify="right")
    for test, per in result.cycles.items():
        cells = []
        for cfg in configs:
            if cfg in per:
                s = result.ns(test, cfg)
                cells.append(f"{s.p50 / 1000:.1f} / {s.p99 / 1000:.1f}")
            else:
                cells.append("-")
        fast = per.get("kvmpy-fast")
        slow = per.get("kvmpy-slow")
        kern = per.get("kernel")
        first = result.ns(test, configs[0]) if configs and configs[0] in per else None
        detail = (f"{first.min / 1000:.1f} {first.p90 / 1000:.1f} {first.max / 1000:.1f}\n"
                  f"({per[configs[0]].p50:.0f})") if first else "-"
        table.add_row(test, *cells,
                      ratio(fast.p50, slow.p50) if fast and slow else "-",
                      ratio(fast.p50, kern.p50) if fast and kern else "-", detail)
    console.print(table)
    if result.handling:
        t2 = Table(title="kvmpy's own handling time of ICR-write exits (KVM_RUN return to "
                   "the next entry), and the sender's signal kick")
        for col in ("config", "path", "exits", "p50 us", "p99 us", "mean us"):
            t2.add_column(col, justify="right")
        for cfg, parts in result.handling.items():
            for part, h in parts.items():
                if h["n"]:
                    t2.add_row(cfg, part, str(int(h["n"])), f"{h['p50_ns'] / 1000:.2f}",
                               f"{h['p99_ns'] / 1000:.2f}", f"{h['mean_ns'] / 1000:.2f}")
        console.print(t2)
    for f in result.failures:
        console.print(f"[red]failed:[/red] {f}")


def plot_report(result: BenchResult, path: str) -> None:
    """Histograms of the guest-measured latencies per test, one color per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [t for t in result.raw if result.raw[t]]
    fig, axes = plt.subplots(len(tests) or 1, 1, figsize=(9, 2.3 * max(1, len(tests))),
                             squeeze=False)
    colors = {"kvmpy-fast": "tab:green", "kvmpy-python": "tab:orange", "kvmpy-slow": "tab:red",
              "kernel": "tab:blue"}
    for ax, test in zip(axes[:, 0], tests, strict=False):
        per = result.raw[test]
        values = [v for vs in per.values() for v in vs if v > 0]
        if not values:
            continue
        lo, hi = min(values), max(values)
        import numpy as np

        bins = np.logspace(np.log10(max(lo, 1)), np.log10(max(hi, lo * 1.01, 2)), 60)
        for cfg, vs in per.items():
            s = Summary.of(vs)
            ax.hist([v for v in vs if v > 0], bins=bins, alpha=0.55,
                    color=colors.get(cfg), label=f"{cfg} p50 {s.p50:.1f} us p99 {s.p99:.1f} us")
        ax.set_xscale("log")
        ax.set_title(test, fontsize=10)
        ax.set_xlabel("guest-measured latency (us)")
        ax.legend(fontsize=8)
    fig.suptitle(f"kvmpy bench ipi ({result.backend}, {result.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
