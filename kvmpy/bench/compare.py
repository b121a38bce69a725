"""Many alternated runs of kvmpy-fast (native fastpath), kvmpy-python, kvmpy-slow and kernel,
and their statistical verdict.

`kvmpy bench ipi --compare` runs the bundled ipi_bench guest, `kvmpy bench vmexit` runs
kvm-unit-tests' vmexit.flat (kvmpy/bench/vmexit.py); both go through `run_comparison`:

- `--runs N` rounds; each round runs every configuration once, in an order rotated by
  one each round (round 0: fast slow kernel, round 1: slow kernel fast, ...), so neither
  drift on a shared machine nor a position in the round favours one configuration.
- Each run gives samples per test (ipi_bench: n TSC deltas; vmexit: one average); the
  run's value is their median. Tests are whatever the guest reports, in its order.
- Per configuration: the median of its run medians, their min and max, and the spread
  max/min. Ratios fast/slow and fast/kernel of those medians with a bootstrap 95% CI
  over runs and a verdict (kvmpy.bench.stats).

Everything is in TSC cycles (both guests measure with rdtsc); us are cycles / KVM's TSC
frequency. A failed run is reported and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from kvmpy.bench.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    MIN_RELIABLE_RUNS,
    ConfigSummary,
    RatioCI,
    bootstrap_ratio,
    median,
    verdict,
)

CONFIGS = ("kvmpy-fast", "kvmpy-python", "kvmpy-slow", "kernel")
# (label, A, B, subject of the verdict): A/B in time, lower is faster.
PAIRS = (
    ("fast/slow", "kvmpy-fast", "kvmpy-slow", "native fastpath"),
    ("fast/python", "kvmpy-fast", "kvmpy-python", "native fastpath"),
    ("python/slow", "kvmpy-python", "kvmpy-slow", "Python fastpath"),
    ("fast/kernel", "kvmpy-fast", "kernel", "kvmpy native fastpath"),
)
DEFAULT_RUNS = 10


@dataclass
class RunOutcome:
    """One VM run: samples (cycles) per test, and whether the run counts."""

    values: dict[str, list[float]]
    ok: bool
    message: str = ""
    tsc_hz: int = 0


Runner = Callable[[str], RunOutcome]


@dataclass
class Ratio:
    label: str
    a: str
    b: str
    ci: RatioCI | None  # None: fewer than 2 runs on a side
    verdict: str


@dataclass
class TestResult:
    run_medians: dict[str, list[float]] = field(default_factory=dict)  # config -> per run
    summaries: dict[str, ConfigSummary] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)


@dataclass
class Comparison:
    kind: str  # "ipi" or "vmexit"
    source: str  # what ran, e.g. "ipi_bench n=300 mode=x2apic cpus=2"
    backend: str
    configs: list[str]
    runs: int
    resamples: int
    seed: int
    tsc_hz: int = 0
    order: list[str] = field(default_factory=list)  # the configuration of each run, in order
    failures: list[str] = field(default_factory=list)
    tests: dict[str, TestResult] = field(default_factory=dict)
    # (label, A, B, subject) ratios to report; `kvmpy bench ab` compares work/base.
    pairs: Sequence[tuple[str, str, str, str]] = PAIRS
    unit: str = "cycles"  # what the figures are; us are shown only for cycles with tsc_hz

    def us(self, cycles: float) -> float | None:
        return cycles * 1e6 / self.tsc_hz if self.tsc_hz and self.unit == "cycles" else None

    def analyse(self) -> None:
        """Summaries and ratios from the run medians collected so far."""
        for test in self.tests.values():
            test.summaries = {c: ConfigSummary.of(test.run_medians[c])
                              for c in self.configs if test.run_medians.get(c)}
            test.ratios = []
            for label, a, b, subject in self.pairs:
                ra, rb = test.run_medians.get(a, []), test.run_medians.get(b, [])
                if not ra or not rb:
                    continue
                if len(ra) < 2 or len(rb) < 2:
                    test.ratios.append(Ratio(label, a, b, None,
                                             f"too few runs for an interval ({len(ra)} "
                                             f"and {len(rb)})"))
                    continue
                ci = bootstrap_ratio(ra, rb, resamples=self.resamples, seed=self.seed)
                text = verdict(ci, subject)
                if min(len(ra), len(rb)) < MIN_RELIABLE_RUNS:
                    text += f" (under {MIN_RELIABLE_RUNS} runs a side: not reliable)"
                test.ratios.append(Ratio(label, a, b, ci, text))

    def to_json(self) -> dict[str, object]:
        tests: dict[str, object] = {}
        for name, t in self.tests.items():
            configs = {}
            for cfg, s in t.summaries.items():
                configs[cfg] = {"run_medians": t.run_medians[cfg], **asdict(s),
                                "median_us": self.us(s.median)}
            ratios = {}
            for r in t.ratios:
                ratios[r.label] = {"a": r.a, "b": r.b, "verdict": r.verdict,
                                   **({"ratio": r.ci.ratio, "low": r.ci.low,
                                       "high": r.ci.high, "significant": r.ci.significant}
                                      if r.ci else {"ratio": None})}
            tests[name] = {"configs": configs, "ratios": ratios}
        return {
            "kind": self.kind, "source": self.source, "backend": self.backend,
            "unit": self.unit, "tsc_hz": self.tsc_hz, "configs": self.configs,
            "runs": self.runs, "order": self.order, "confidence": 0.95,
            "resamples": self.resamples, "seed": self.seed, "failures": self.failures,
            "tests": tests,
        }


def rotated(configs: Sequence[str], round_index: int) -> list[str]:
    """The order of round `round_index`: `configs` rotated left by that many places."""
    k = round_index % len(configs)
    return list(configs[k:]) + list(configs[:k])


def run_comparison(runner: Runner, comparison: Comparison,
                   progress: Callable[[str], None] | None = None) -> Comparison:
    """Run `comparison.runs` rotated rounds of `comparison.configs` through `runner`."""
    for r in range(comparison.runs):
        for cfg in rotated(comparison.configs, r):
            if progress:
                progress(f"run {r + 1}/{comparison.runs} {cfg}")
            out = runner(cfg)
            comparison.order.append(cfg)
            if out.tsc_hz:
                comparison.tsc_hz = out.tsc_hz
            if not out.ok:
                comparison.failures.append(f"run {r + 1} {cfg}: {out.message}")
                continue
            for test, values in out.values.items():
                if values:
                    t = comparison.tests.setdefault(test, TestResult())
                    t.run_medians.setdefault(cfg, []).append(median(values))
    comparison.analyse()
    return comparison


# ---------------------------------------------------------------------- report


def _short(cycles: float) -> str:
    if cycles >= 1e6:
        return f"{cycles / 1e6:.2f}M"
    if cycles >= 1e4:
        return f"{cycles / 1e3:.0f}k"
    return f"{cycles:.0f}"


def print_comparison(c: Comparison, file: object = None) -> None:
    """Per-config medians with range and spread, then the ratios with CI and verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=160)  # type: ignore[arg-type]
    mhz = f", TSC {c.tsc_hz / 1e6:.0f} MHz" if c.tsc_hz else ""
    unit = c.unit + (" (us)" if c.us(1.0) is not None else "")
    t1 = Table(title=f"{c.source}: {c.runs} alternated runs ({c.backend}{mhz}); "
               f"median of run medians, {unit}, run range and spread max/min")
    t1.add_column("test")
    for cfg in c.configs:
        t1.add_column(cfg, justify="right")
    for name, t in c.tests.items():
        cells = []
        for cfg in c.configs:
            s = t.summaries.get(cfg)
            if s is None:
                cells.append("-")
                continue
            us = c.us(s.median)
            cells.append(f"{s.median:,.0f}" + (f" ({us:.1f} us)" if us is not None else "")
                         + f"\n{_short(s.min)}-{_short(s.max)}, spread {s.spread:.2f}x, "
                         f"{s.runs} runs")
        t1.add_row(name, *cells)
    console.print(t1)
    t2 = Table(title=f"ratios of medians (time, < 1 is faster), 95% bootstrap CI over runs "
               f"({c.resamples} resamples, seed {c.seed})")
    for col in ("test", "ratio", "A/B", "95% CI", "verdict"):
        t2.add_column(col, justify="left" if col in ("test", "verdict") else "right")
    for name, t in c.tests.items():
        for r in t.ratios:
            ci = r.ci
            t2.add_row(name, r.label, f"{ci.ratio:.3f}" if ci else "-",
                       f"[{ci.low:.3f}, {ci.high:.3f}]" if ci else "-", r.verdict)
    console.print(t2)
    for f in c.failures:
        console.print(f"[red]failed:[/red] {f}")


# ---------------------------------------------------------------------- command line


def add_compare_options(p: argparse.ArgumentParser, *, flag: bool) -> None:
    """--runs, --seed, --resamples (and, with `flag`, --compare itself)."""
    if flag:
        p.add_argument("--compare", action="store_true",
                       help="many alternated runs (--runs, not --rounds); medians, bootstrap "
                       "CIs of fast/slow and fast/kernel, and a verdict")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                   help=f"alternated rounds for the comparison (default {DEFAULT_RUNS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})")


def add_vmexit_parser(bench_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = bench_sub.add_parser(
        "vmexit", allow_abbrev=False,
        help="kvm-unit-tests' vmexit.flat (ipi, ipi_halt) under kvmpy's native fastpath, "
        "--fastpath python, --no-fastpath and the in-kernel APIC, alternated, with bootstrap "
        "CIs")
    p.add_argument("--kut-dir", metavar="DIR", default=os.environ.get("KVMPY_KUT_DIR"),
                   help="a built kvm-unit-tests tree (default: $KVMPY_KUT_DIR)")
    p.add_argument("--tests", nargs="+", default=["ipi", "ipi_halt"], metavar="NAME",
                   help="vmexit tests to run (its command line; default: ipi ipi_halt)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--with-ipi-bench", dest="with_ipi_bench", type=int, metavar="N",
                   default=0, help="also run the bundled ipi_bench's vmexit_ipi and "
                   "vmexit_ipi_halt (N samples each) in the same rounds, side by side")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_compare_options(p, flag=False)


def cli_main(args: argparse.Namespace) -> int:
    """`kvmpy bench ipi --compare` and `kvmpy bench vmexit`."""
    import json

    from rich.progress import Progress

    from kvmpy.errors import KvmpyError
    from kvmpy.kvm import detect_backend

    if args.runs < 2:
        raise KvmpyError("--runs must be at least 2 (a confidence interval needs runs)")
    if args.resamples < 100:
        raise KvmpyError("--resamples must be at least 100")
    configs = [c for c in CONFIGS if c in args.configs]  # fixed order, no duplicates
    if args.bench == "vmexit":
        from kvmpy.bench.vmexit import vmexit_flat, vmexit_runner

        flat = vmexit_flat(args.kut_dir)
        runner = vmexit_runner(flat, args.tests)
        source = f"{flat.name} {' '.join(args.tests)} --cpus 2"
        if args.with_ipi_bench:
            if not 1 <= args.with_ipi_bench <= 4096:
                raise KvmpyError("--with-ipi-bench takes 1 to 4096 samples")
            runner = combined_runner([
                (flat.name, runner),
                ("ipi_bench", ipi_runner(args.with_ipi_bench, "x2apic", only="vmexit"))])
            source += f", and ipi_bench only=vmexit n={args.with_ipi_bench}"
    else:
        if args.scale or args.plot:
            raise KvmpyError("--compare does not combine with --scale or --plot")
        if args.n < 1:
            raise KvmpyError("--n must be at least 1")
        runner = ipi_runner(args.n, args.mode)
        source = f"ipi_bench n={args.n} mode={args.mode} cpus=2"
    comparison = Comparison(args.bench, source, detect_backend(), configs, args.runs,
                            args.resamples, args.seed)
    with Progress(transient=True, disable=args.json) as progress:
        task = progress.add_task(source, total=args.runs * len(configs))

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)

        run_comparison(runner, comparison, progress=step)
    if args.json:
        print(json.dumps(comparison.to_json(), indent=1))
    else:
        print_comparison(comparison)
    return 1 if comparison.failures or not comparison.tests else 0


def ipi_runner(n: int, mode: str, only: str = "") -> Runner:
    """One run of the bundled ipi_bench guest on 2 vCPUs (kvmpy.bench.ipi.run_guest)."""
    from kvmpy.bench.ipi import run_guest

    cmdline = f"n={n} mode={mode} cpus=2" + (f" only={only}" if only else "")

    def run(cfg: str) -> RunOutcome:
        g = run_guest(cfg, 2, cmdline)
        ok = g.status == 1 and "ipi_bench: done" in g.output
        values = {t: [float(v) for v in vs] for t, vs in g.samples.items()}
        return RunOutcome(values, ok, g.message, g.tsc_hz)

    return run


def combined_runner(parts: Sequence[tuple[str, Runner]]) -> Runner:
    """Several guests per configuration and round, one after the other; each test is
    named "<guest> <test>" so they stand side by side in one comparison."""

    def run(cfg: str) -> RunOutcome:
        values: dict[str, list[float]] = {}
        ok = True
        why = []
        tsc_hz = 0
        for prefix, runner in parts:
            out = runner(cfg)
            tsc_hz = out.tsc_hz or tsc_hz
            if not out.ok:
                ok = False
                why.append(f"{prefix}: {out.message}")
            values.update({f"{prefix} {t}": v for t, v in out.values.items()})
        return RunOutcome(values, ok, "; ".join(why), tsc_hz)

    return run
