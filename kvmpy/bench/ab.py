"""`kvmpy bench ab --base REF`: your working tree against any git ref, in one run.

    kvmpy bench ab --base main --kut-dir ~/kvm-unit-tests [--tests ipi ipi_halt]
    kvmpy bench ab --base main --ipi-bench 300 [--tests vmexit_ipi vmexit_ipi_halt]
    kvmpy bench ab --base main --guest ipi_coalesce --figure 'burst_send (\\d+)'

The base is checked out and installed in its own venv (kvmpy/bench/checkout.py); the
working tree, uncommitted changes included, runs from the checkout. Both run the same
guest image (built once, from the working tree's guest/) through `kvmpy run` in a
subprocess, in `--runs` rounds whose order is rotated each round (base work, work base,
...), and each run's console is searched for the figures:

- `--kut-dir DIR`: kvm-unit-tests' x86/vmexit.flat on 2 vCPUs, one "NAME CYCLES" line
  per test (kvmpy/bench/vmexit.py parses it);
- `--ipi-bench N`: the bundled ipi_bench on 2 vCPUs with `report=median`, one
  "ipi_bench: median NAME CYCLES" line per test;
- `--guest IMAGE|NAME --figure REGEX`: any guest; every match of REGEX in one run's
  console is a sample of that run (the number is the group `value` or the first group;
  a group `name` names the test, else the pattern's text before its first group).

The statistics are `kvmpy bench vmexit`'s (kvmpy/bench/compare.py, stats.py): each
run's median per test, the median of run medians per side, work/base with a bootstrap
95% CI over runs, and the verdict "the change is faster by X%, 95% CI [a%, b%]" or "no
significant difference". A bad ref, a base that does not build, a guest that prints no
figure: one line, exit status 2; failed runs later on are listed, exit status 1.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmpy.bench.checkout import BaseBuild, Side, repo_root, working_tree
from kvmpy.bench.compare import Comparison, RunOutcome, add_compare_options, run_comparison
from kvmpy.bench.stats import median
from kvmpy.errors import KvmpyError

SIDES = ("base", "work")
PAIRS = (("work/base", "work", "base", "the change is"),)
TIMEOUT = 600.0  # seconds per run
# kvmpy's own exit statuses are even and nonzero (cli/machine.py); a guest's are odd.
_KVMPY_FAILURES = {2: "bad command line", 4: "triple fault", 6: "guest crash",
                   8: "internal error in kvmpy", 10: "every vCPU halted for good",
                   130: "SIGINT", 143: "SIGTERM"}

Parser = Callable[[str, int, str], RunOutcome]  # (console, exit status, stderr) -> outcome


@dataclass
class Benchmark:
    """What both sides run, and how a run's console becomes figures."""

    label: str
    image: Path
    cpus: int
    append: str
    parse: Parser
    wanted: str  # what a run must print, for the "no figure" error
    unit: str = "cycles"
    initrd: bytes | None = None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(nothing)"


def _status_problem(status: int, stderr: str) -> str:
    if status in _KVMPY_FAILURES or status < 0:
        what = _KVMPY_FAILURES.get(status, f"signal {-status}")
        return f"exit status {status} ({what}): {_last_line(stderr)}"
    return ""


def figure_name(pattern: str) -> str:
    """A test name for a pattern with no group 'name': its literal text before the first
    group ('burst_send (\\d+)' -> 'burst_send'), else the pattern itself."""
    head = re.sub(r"\\.", " ", pattern.split("(", 1)[0])
    words = re.findall(r"[\w.-]+", head)
    return " ".join(words) or pattern


def figure_parser(patterns: list[str]) -> Parser:
    """Samples per test from every match of each pattern (see the module docstring)."""
    compiled = []
    for p in patterns:
        try:
            rx = re.compile(p, re.MULTILINE)
        except re.error as e:
            raise KvmpyError(f"--figure {p!r} is not a regular expression: {e}") from None
        if "value" not in rx.groupindex and rx.groups == 0:
            raise KvmpyError(f"--figure {p!r} needs a group around the number, e.g. "
                             "'cycles=(\\d+)'")
        compiled.append(rx)

    def parse(console: str, status: int, stderr: str) -> RunOutcome:
        values: dict[str, list[float]] = {}
        problems = []
        for rx in compiled:
            matched = False
            for m in rx.finditer(console):
                matched = True
                text = m.group("value") if "value" in rx.groupindex else m.group(1)
                name = m.group("name") if "name" in rx.groupindex else figure_name(rx.pattern)
                try:
                    values.setdefault(name, []).append(float(text))
                except (TypeError, ValueError):
                    problems.append(f"'{rx.pattern}' matched {text!r}, not a number")
                    break
            if not matched:
                problems.append(f"no line matches '{rx.pattern}'")
        bad = _status_problem(status, stderr)
        if bad:
            problems.insert(0, bad)
        return RunOutcome(values, not problems, "; ".join(problems))

    return parse


def vmexit_benchmark(kut_dir: str, tests: list[str]) -> Benchmark:
    """kvm-unit-tests' vmexit.flat as `kvmpy bench vmexit` runs it."""
    from kvmpy.bench.vmexit import CPUS, ENV, outcome, vmexit_flat

    flat = vmexit_flat(kut_dir)
    for t in tests:
        if not re.fullmatch(r"[\w.-]+", t):
            raise KvmpyError(f"bad vmexit test name {t!r}")

    def parse(console: str, status: int, stderr: str) -> RunOutcome:
        return outcome(console, status, _last_line(stderr), tests)

    return Benchmark(f"{flat.name} {' '.join(tests)}", flat, CPUS, " ".join(tests), parse,
                     f"a '<test> <cycles>' line for each of {', '.join(tests)}", initrd=ENV)


def ipi_bench_benchmark(n: int, tests: list[str] | None, mode: str,
                        guests: Path | None = None) -> Benchmark:
    """The bundled ipi_bench with report=median: one figure per test and run."""
    from kvmpy.bench.ipi import TWO_CPU_TESTS
    from kvmpy.guestbuild import build_guest

    if not 1 <= n <= 4096:
        raise KvmpyError("--ipi-bench takes 1 to 4096 samples")
    unknown = sorted(set(tests or ()) - set(TWO_CPU_TESTS))
    if unknown:
        raise KvmpyError(f"ipi_bench has no test {unknown[0]!r} (it has: "
                         f"{', '.join(TWO_CPU_TESTS)})")
    only_vmexit = bool(tests) and set(tests) <= {"vmexit_ipi", "vmexit_ipi_halt"}
    append = f"n={n} mode={mode} cpus=2 report=median" + (" only=vmexit" if only_vmexit else "")
    figures = figure_parser([r"^ipi_bench: median (?P<name>\w+) (?P<value>\d+)\r?$"])

    def parse(console: str, status: int, stderr: str) -> RunOutcome:
        out = figures(console, status, stderr)
        if tests:
            out.values = {t: v for t, v in out.values.items() if t in tests}
            missing = [t for t in tests if t not in out.values]
            if missing:
                out.ok = False
                out.message = "; ".join(filter(None, [out.message, f"{missing[0]} not "
                                                      "reported"]))
        if status != 1 or "ipi_bench: done" not in console:
            out.ok = False
            out.message = out.message or f"exit status {status}: {_last_line(console)}"
        return out

    return Benchmark(f"ipi_bench {append}", build_guest("ipi_bench", source_dir=guests), 2,
                     append, parse,
                     "'ipi_bench: median <test> <cycles>' lines")


def guest_benchmark(guest: str, figures: list[str], cpus: int | None, append: str,
                    unit: str, guests: Path | None = None) -> Benchmark:
    """Any image (or bundled guest, built from `guests`) and the figures the user names."""
    from kvmpy.guests import describe, resolve_image

    image, bundled = resolve_image(guest, guests)
    if not image.is_file():
        raise KvmpyError(f"image {guest}: not a file")
    if cpus is None:
        cpus = describe(guest).cpus if bundled else 1
    label = (guest if bundled else image.name) + (f" {append}" if append else "")
    return Benchmark(label, image, cpus, append, figure_parser(figures),
                     " and ".join(f"a line matching '{f}'" for f in figures), unit)


# ---------------------------------------------------------------------- running


def side_runner(bench: Benchmark, sides: dict[str, Side], tmp: Path, run_args: list[str],
                timeout: float) -> Callable[[str], RunOutcome]:
    """One `kvmpy run` subprocess per call, under the named side; the first run of each
    side that prints no figure at all stops the comparison with one clear error."""
    initrd = None
    if bench.initrd is not None:
        initrd = tmp / "initrd"
        initrd.write_bytes(bench.initrd)
    base_cmd = ["-P", "-m", "kvmpy", "run", str(bench.image), "--cpus", str(bench.cpus),
                "--timeout", str(timeout)]
    if bench.append:
        base_cmd += ["--append", bench.append]
    if initrd is not None:
        base_cmd += ["--initrd", str(initrd)]
    base_cmd += run_args
    proven: set[str] = set()

    def run(name: str) -> RunOutcome:
        side = sides[name]
        try:
            r = subprocess.run([side.python, *base_cmd], capture_output=True, text=True,
                               errors="replace", env=side.env, cwd=tmp, timeout=timeout + 60)
            status, console, stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired:
            status, console, stderr = -9, "", f"no exit after {timeout + 60:.0f} s"
        out = bench.parse(console, status, stderr)
        if name not in proven:
            if not any(out.values.values()):
                who = "the working tree" if name == "work" else f"the base ({side.describe})"
                raise KvmpyError(
                    f"{bench.label} printed no figure under {who}: wanted "
                    f"{bench.wanted}; " + (out.message or f"its last line: "
                                            f"{_last_line(console)}"))
            proven.add(name)
        return out

    return run


def host_tsc_hz() -> int:
    """KVM's guest TSC frequency (KVM_GET_TSC_KHZ of a scratch vCPU), or 0 without KVM."""
    from kvmpy.kvm import Kvm

    try:
        kvm = Kvm.open()
    except KvmpyError:
        return 0
    try:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz() * 1000
            finally:
                vcpu.close()
        finally:
            vm.close()
    except OSError:
        return 0
    finally:
        kvm.close()


# ---------------------------------------------------------------------- command line


def add_ab_parser(bench_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = bench_sub.add_parser(
        "ab", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="your working tree (uncommitted changes included) against a git ref: "
        "alternated runs, bootstrap CIs, a verdict",
        epilog="examples:\n"
        "  kvmpy bench ab --base main --ipi-bench 200 --tests vmexit_ipi vmexit_ipi_halt\n"
        "  kvmpy bench ab --base main --kut-dir ~/kvm-unit-tests --tests ipi ipi_halt\n"
        "  kvmpy bench ab --base HEAD~3 --guest ipi_coalesce --figure 'burst_send (\\d+)'")
    p.add_argument("--base", required=True, metavar="REF",
                   help="the git ref to compare against (branch, tag, commit)")
    what = p.add_argument_group("benchmark (exactly one)")
    what.add_argument("--kut-dir", metavar="DIR",
                      help="a built kvm-unit-tests tree: run its x86/vmexit.flat")
    what.add_argument("--ipi-bench", type=int, metavar="N",
                      help="the bundled ipi_bench guest, N samples per test")
    what.add_argument("--guest", metavar="IMAGE|GUEST",
                      help="any multiboot image or bundled guest; name its figures with "
                      "--figure")
    p.add_argument("--figure", action="append", metavar="REGEX", default=[],
                   help="with --guest: a figure in its console, e.g. 'cycles=(\\d+)' "
                   "(repeatable; a group 'name' names the test)")
    p.add_argument("--unit", default="", help="with --guest: the figures' unit (cycles "
                   "are also shown in us)")
    p.add_argument("--tests", nargs="+", metavar="NAME",
                   help="vmexit.flat tests to run (default: ipi ipi_halt), or ipi_bench "
                   "tests to compare (default: all)")
    p.add_argument("--cpus", type=int, help="with --guest: vCPUs (default: the guest's, or 1)")
    p.add_argument("--append", default="", help="with --guest: its command line")
    p.add_argument("--mode", choices=("x2apic", "xapic"), default="x2apic",
                   help="with --ipi-bench: the APIC mode")
    p.add_argument("--run-args", default="", metavar="ARGS",
                   help="extra `kvmpy run` options for both sides, e.g. '--pin-vcpus off'")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help=f"seconds per run (default {TIMEOUT:.0f})")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw each side's run medians")
    add_compare_options(p, flag=False)


def choose_benchmark(args: argparse.Namespace, guests: Path | None = None) -> Benchmark:
    """The benchmark the options name; bundled guests are built from `guests`."""
    chosen = [n for n in ("kut_dir", "ipi_bench", "guest") if getattr(args, n) is not None]
    if len(chosen) != 1:
        raise KvmpyError("bench ab needs exactly one benchmark: --kut-dir DIR, --ipi-bench N "
                         "or --guest IMAGE --figure REGEX")
    if args.guest is None and (args.figure or args.unit or args.append or args.cpus):
        raise KvmpyError("--figure, --unit, --append and --cpus go with --guest")
    if args.kut_dir is not None:
        return vmexit_benchmark(args.kut_dir, args.tests or ["ipi", "ipi_halt"])
    if args.ipi_bench is not None:
        return ipi_bench_benchmark(args.ipi_bench, args.tests, args.mode, guests)
    if not args.figure:
        raise KvmpyError("--guest needs --figure REGEX: which number in its console to compare")
    if args.tests:
        raise KvmpyError("--tests goes with --kut-dir or --ipi-bench (name --guest's "
                         "figures with a group 'name' in --figure)")
    if args.cpus is not None and not 1 <= args.cpus <= 64:
        raise KvmpyError("--cpus must be between 1 and 64")
    return guest_benchmark(args.guest, args.figure, args.cpus, args.append,
                           args.unit or "units", guests)


def cli_main(args: argparse.Namespace) -> int:
    """`kvmpy bench ab`."""
    import json
    import signal

    from rich.console import Console
    from rich.progress import Progress

    from kvmpy.kvm import detect_backend

    if args.runs < 2:
        raise KvmpyError("--runs must be at least 2 (a confidence interval needs runs)")
    if args.resamples < 100:
        raise KvmpyError("--resamples must be at least 100")
    if args.timeout <= 0:
        raise KvmpyError("--timeout must be positive")
    try:
        run_args = shlex.split(args.run_args)
    except ValueError as e:
        raise KvmpyError(f"--run-args: {e}") from None
    root = repo_root(Path.cwd())
    bench = choose_benchmark(args, root / "guest")  # one image for both sides

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the worktree's removal

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        with tempfile.TemporaryDirectory(prefix="kvmpy-bench-ab-") as tmp_name:
            tmp = Path(tmp_name)
            build = BaseBuild(root, args.base, tmp)  # a bad ref fails here, before any run
            work = working_tree(root, tmp)
            sides = {"work": work}
            run = side_runner(bench, sides, tmp, run_args, args.timeout)
            run("work")  # a check run (not counted): fails fast on a guest with no figure
            with build as base:
                sides["base"] = base
                comparison = Comparison("ab", bench.label, detect_backend(), list(SIDES),
                                        args.runs, args.resamples, args.seed, pairs=PAIRS,
                                        unit=bench.unit)
                if bench.unit == "cycles":
                    comparison.tsc_hz = host_tsc_hz()
                with Progress(console=Console(stderr=True), transient=True,
                              disable=args.json) as progress:
                    task = progress.add_task(bench.label, total=args.runs * len(SIDES))

                    def step(what: str) -> None:
                        progress.update(task, advance=1, description=what)

                    run_comparison(run, comparison, progress=step)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if args.json:
        data = comparison.to_json()
        data["base"] = {"describe": base.describe, **base.info}
        data["work"] = {"describe": work.describe, **work.info}
        data["run_args"] = run_args
        print(json.dumps(data, indent=1))
    else:
        from kvmpy.bench.compare import print_comparison

        print(f"base: {base.describe}\nwork: {work.describe}")
        print_comparison(comparison)
    if args.plot:
        plot_ab(comparison, args.plot)
    return 1 if comparison.failures or not comparison.tests else 0


def plot_ab(c: Comparison, path: str) -> None:
    """Each test's run medians per side in run order, with each side's median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tests = list(c.tests)
    fig, axes = plt.subplots(max(1, len(tests)), 1, figsize=(9, 2.6 * max(1, len(tests))),
                             squeeze=False)
    colors = {"base": "tab:blue", "work": "tab:orange"}
    for ax, name in zip(axes[:, 0], tests, strict=False):
        t = c.tests[name]
        for side in SIDES:
            values = t.run_medians.get(side, [])
            if not values:
                continue
            ax.plot(range(1, len(values) + 1), values, "o-", color=colors[side], alpha=0.8,
                    label=f"{side}: median {median(values):,.0f}")
            ax.axhline(median(values), color=colors[side], linestyle=":", linewidth=1)
        verdict = t.ratios[0].verdict if t.ratios else ""
        ax.set_title(f"{name}: {verdict}", fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(c.unit)
        ax.legend(fontsize=8)
    fig.suptitle(f"kvmpy bench ab: {c.source}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
