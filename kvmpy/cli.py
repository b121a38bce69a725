"""The `kvmpy` command: `kvmpy run IMAGE ...` (QEMU-like options), `kvmpy info`.

Bad input (a missing file, a bad size, no /dev/kvm) gives one line on stderr and exit
status 2; the VM's own outcome is the exit status of `kvmpy run` (see machine.py).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from kvmpy import __version__
from kvmpy.errors import KvmpyError

if TYPE_CHECKING:
    from kvmpy.machine import Machine, MachineConfig
    from kvmpy.tracing.recorder import Tracer

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1G', '512K', or a plain number of MiB (as QEMU's -m)."""
    m = _SIZE.match(text)
    if not m:
        raise KvmpyError(f"bad memory size {text!r} (use e.g. 64M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_cpus(text: str) -> int:
    """'4' or QEMU's 'cpus=4[,...]'."""
    value = text
    for part in text.split(","):
        if part.startswith("cpus="):
            value = part[5:]
            break
    try:
        return int(value)
    except ValueError:
        raise KvmpyError(f"bad CPU count {text!r} (use e.g. --cpus 4)") from None


class _Parser(argparse.ArgumentParser):
    """One line for a bad command line, not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kvmpy: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from kvmpy.apic.timer import KVM_MIN_TIMER_PERIOD_NS
    from kvmpy.vcpu import HALT_POLL_NS_DEFAULT

    p = _Parser(prog="kvmpy", description="A hackable VMM in Python on Linux KVM.",
                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"kvmpy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from kvmpy.guests import guest_list_text

    run = sub.add_parser("run", help="boot a multiboot (or flat) guest image, or a bundled "
                         "guest by name", allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="bundled guests (built on first use and cached; "
                         "`kvmpy guests` shows example commands):\n" + guest_list_text())
    run.add_argument("image", metavar="IMAGE|GUEST",
                     help="multiboot ELF32 image (e.g. a kvm-unit-tests .flat), or the name "
                     "of a bundled guest (listed below)")
    run.add_argument("--cpus", "-smp", dest="cpus", default="1", metavar="N",
                     help="number of vCPUs (default 1)")
    run.add_argument("--memory", "-m", dest="memory", default="64M", metavar="SIZE",
                     help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--append", "-append", dest="append", default="", metavar="CMDLINE",
                     help="kernel command line")
    run.add_argument("--initrd", "-initrd", dest="initrd", metavar="FILE",
                     help="file passed as the first multiboot module")
    run.add_argument("--cpu", "-cpu", dest="cpu", default="host", metavar="MODEL[,+FEAT,-FEAT]",
                     help="CPU model: host (default), max or qemu64, with QEMU's feature "
                     "flags +/-x2apic, +/-tsc-deadline (see kvmpy/cpumodel.py)")
    run.add_argument("--flat", action="store_true",
                     help="IMAGE is a raw 32-bit binary, loaded and entered at 1 MiB")
    run.add_argument("--serial", dest="serial", metavar="FILE",
                     help="write the serial console to FILE instead of stdout")
    run.add_argument("--fastpath", dest="fastpath", choices=("native", "python", "off"),
                     default="native", help="native: the C fastpath before the GIL "
                     "(default); python: exits.handle_exit_irqoff under the GIL, where a "
                     "change is prototyped; off: every exit to the ordinary dispatch")
    run.add_argument("--no-fastpath", dest="fastpath", action="store_const", const="off",
                     help="the same as --fastpath off")
    run.add_argument("--halt-poll-ns", dest="halt_poll_ns", type=int, default=None,
                     metavar="NS", help="longest halt-polling window (KVM's halt_poll_ns; "
                     f"default {HALT_POLL_NS_DEFAULT}, 0 never polls)")
    run.add_argument("--min-timer-period-us", dest="min_timer_period_us", type=int,
                     default=None, metavar="US", help="shortest period of a periodic APIC "
                     "timer (KVM's min_timer_period_us; default "
                     f"{KVM_MIN_TIMER_PERIOD_NS // 1000}, 0 no clamp)")
    run.add_argument("--pin-vcpus", dest="pin_vcpus", choices=("auto", "on", "off"),
                     default="auto", help="pin vCPU i to host CPU i (auto: when each vCPU "
                     "gets its own CPU)")
    run.add_argument("--irqchip", choices=("user", "kernel"), default="user",
                     help="user: kvmpy's local APIC (default); kernel: KVM's in-kernel "
                     "irqchip, the reference")
    run.add_argument("--stat", action="store_true",
                     help="print exit statistics when the VM ends")
    run.add_argument("--plot", metavar="FILE.png",
                     help="draw handling-time histograms (fastpath vs slow path) to FILE.png")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="stop the VM after this many seconds")
    run.add_argument("--trace", metavar="FILE.json",
                     help="write a timeline of exits and interrupts (Chrome trace-event "
                     "JSON: open it in Perfetto UI or chrome://tracing)")
    run.add_argument("--trace-events", type=int, default=None, metavar="N",
                     help="with --trace: keep the last N events per thread (default "
                     "131072; memory is preallocated, 32 bytes an event)")

    sub.add_parser("info", help="show the KVM backend and capabilities kvmpy uses")
    sub.add_parser("guests", help="list the bundled guests `kvmpy run NAME` can boot")

    trace = sub.add_parser("trace", help="read a trace written by `kvmpy run --trace`",
                           allow_abbrev=False)
    trace_sub = trace.add_subparsers(dest="trace_command", required=True, parser_class=_Parser)
    summary = trace_sub.add_parser("summary", help="per-interrupt latency by hop (p50/p99) "
                                   "and where each vCPU's time went", allow_abbrev=False)
    summary.add_argument("file", metavar="FILE.json")
    summary.add_argument("--plot", metavar="FILE.png", help="draw the hop distributions")
    summary.add_argument("--json", action="store_true", help="print JSON, not tables")

    bench = sub.add_parser("bench", help="benchmarks: `ipi` (guest-measured IPI latency), "
                           "`floor` (ICR-write exits against a bare C KVM_RUN loop), "
                           "`vmexit` (kvm-unit-tests' vmexit.flat, compared), `ab` (your "
                           "working tree against a git ref)",
                           allow_abbrev=False)
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    ipi = bench_sub.add_parser("ipi", help="IPI round trip, one-way, halted receiver and "
                               "sender cost: kvmpy fastpath vs slow path vs in-kernel KVM",
                               allow_abbrev=False)
    ipi.add_argument("--n", type=int, default=300, help="samples per test per run")
    ipi.add_argument("--rounds", type=int, default=3,
                     help="alternate the configurations this many times")
    ipi.add_argument("--mode", choices=("x2apic", "xapic"), default="x2apic")
    ipi.add_argument("--configs", nargs="+",
                     choices=("kvmpy-fast", "kvmpy-python", "kvmpy-slow", "kernel"),
                     default=["kvmpy-fast", "kvmpy-python", "kvmpy-slow", "kernel"],
                     help="kvmpy-fast: --fastpath native; kvmpy-python: --fastpath python; "
                     "kvmpy-slow: --fastpath off; kernel: KVM's in-kernel APIC")
    ipi.add_argument("--scale", action="store_true",
                     help="broadcast and multicast cost per target for 2..32 vCPUs")
    ipi.add_argument("--cpus", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                     help="vCPU counts for --scale")
    ipi.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ipi.add_argument("--plot", metavar="FILE.png", help="draw latency histograms")
    ipi.add_argument("--breakdown", action="store_true",
                     help="cut the vmexit-shaped round trip into its hops (traced, with "
                     "perf's scheduler and KVM tracepoints where perf works)")
    ipi.add_argument("--no-perf", dest="perf", action="store_false",
                     help="--breakdown without perf (no in-kernel breakdown)")
    from kvmpy.bench.compare import add_compare_options, add_vmexit_parser

    add_compare_options(ipi, flag=True)
    add_vmexit_parser(bench_sub)
    from kvmpy.bench.ab import add_ab_parser

    add_ab_parser(bench_sub)
    floor = bench_sub.add_parser("floor", help="ICR-write exit cost: kvmpy vs a C floor",
                                 allow_abbrev=False)
    floor.add_argument("--n", type=int, default=20_000, help="ICR writes per run")
    floor.add_argument("--repeats", type=int, default=5, help="runs of each side")
    floor.add_argument("--json", action="store_true", help="print JSON, not a table")
    return p


def cmd_run(args: argparse.Namespace,
            configure: Callable[[MachineConfig], None] | None = None) -> int:
    """`kvmpy run`; `configure` may adjust the MachineConfig first (kvmpy-qemu does)."""
    from kvmpy.corebuild import warning
    from kvmpy.cpumodel import parse_cpu
    from kvmpy.guests import resolve_image
    from kvmpy.machine import STATUS_TERMINATED, Machine, MachineConfig

    stale = warning()
    if stale:
        print(stale, file=sys.stderr)
    if args.trace_events is not None and not args.trace:
        raise KvmpyError("--trace-events needs --trace FILE.json")
    image_path, bundled = resolve_image(args.image)
    image = _read_file(image_path, "image")
    if bundled:
        image_path = Path(args.image)  # name the guest, not its cached build, in messages
    initrd = _read_file(Path(args.initrd), "initrd") if args.initrd else None
    config = MachineConfig(
        cpus=parse_cpus(args.cpus), memory=parse_size(args.memory), cmdline=args.append,
        initrd=initrd, initrd_name=args.initrd or "", fastpath=args.fastpath,
        irqchip=args.irqchip, pin_vcpus=args.pin_vcpus, cpu=parse_cpu(args.cpu),
    )
    if args.halt_poll_ns is not None:
        config.halt_poll_ns = args.halt_poll_ns
    if args.min_timer_period_us is not None:
        config.min_timer_period_us = args.min_timer_period_us
    if configure is not None:
        configure(config)
    serial_file = None
    if args.serial:
        try:
            serial_file = open(args.serial, "wb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise KvmpyError(f"cannot open serial output {args.serial}: {e.strerror}") from None
        config.serial = serial_file
    try:
        with Machine(config) as machine:
            for warning in machine.cpuid.warnings:
                print(f"kvmpy: warning: {warning}", file=sys.stderr)
            machine.load(image, flat=args.flat, name=str(image_path))
            tracer = _attach_tracer(machine, args) if args.trace else None

            def on_term(signum: int, frame: object) -> None:
                machine.stop(STATUS_TERMINATED, "terminated (SIGTERM)")

            signal.signal(signal.SIGTERM, on_term)
            result = machine.run(timeout=args.timeout)
            sys.stdout.flush()
            if result.status != 0 and not (result.status & 1 and "debug-exit" in result.message):
                print(f"kvmpy: {result.message}", file=sys.stderr)
            if args.stat:
                from kvmpy.report import print_exit_table

                setting = machine.fastpath.name.lower()
                print(f"kvmpy: fastpath {setting}, halt polling up to "
                      f"{machine.halt_poll_max_ns} ns, vCPU threads {machine.pinning[1]}",
                      file=sys.stderr)
                print_exit_table(result.stats, file=sys.stderr)
            if args.plot:
                from kvmpy.plot import plot_exit_histograms

                plot_exit_histograms(result.stats, args.plot, title=image_path.name)
            if tracer is not None:
                _write_trace(tracer, args.trace, image_path.name)
            return result.status
    finally:
        if serial_file is not None:
            serial_file.close()


def _attach_tracer(machine: Machine, args: argparse.Namespace) -> Tracer:
    import os

    from kvmpy.tracing.probes import attach
    from kvmpy.tracing.recorder import DEFAULT_EVENTS, MAX_EVENTS, MIN_EVENTS

    events = DEFAULT_EVENTS if args.trace_events is None else args.trace_events
    if not MIN_EVENTS <= events <= MAX_EVENTS:
        raise KvmpyError(f"--trace-events must be between {MIN_EVENTS} and {MAX_EVENTS}, "
                         f"got {events}")
    target = Path(args.trace)
    parent = target.resolve().parent  # fail before the guest runs, not after
    if target.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise KvmpyError(f"cannot write trace {args.trace}: "
                         + ("is a directory" if target.is_dir() else
                            "no such directory" if not parent.is_dir() else
                            "permission denied"))
    return attach(machine, events)


def _write_trace(tracer: Tracer, path: str, title: str) -> None:
    from kvmpy.tracing.export import write

    try:
        other = write(tracer, path, title=title)
    except OSError as e:
        raise KvmpyError(f"cannot write trace {path}: {e.strerror}") from None
    dropped = other["events_dropped"]
    print(f"kvmpy: trace {path}: {other['events_recorded']} events"
          + (f" ({dropped} oldest overwritten)" if dropped else "")
          + f", {other['interrupts']} interrupts", file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    from kvmpy.tracing.summary import load, plot_summary, print_summary, summarize

    summary = summarize(load(Path(args.file)))
    if args.json:
        import json

        print(json.dumps(summary.to_json(), indent=1))
    else:
        print_summary(summary)
    if args.plot:
        plot_summary(summary, args.plot)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from kvmpy import _core
    from kvmpy.kvm import Kvm
    from kvmpy.kvm import ioctls as k
    from kvmpy.kvm.system import REQUIRED_CAPS

    kvm = Kvm.open()
    try:
        print(f"backend: {kvm.backend}")
        for cap in REQUIRED_CAPS:
            name = k.CAPABILITY_NAMES.get(cap, str(cap))
            print(f"{name}: {kvm.check_extension(cap)}")
        print(f"KVM_CAP_MAX_VCPUS: {kvm.check_extension(k.KVM_CAP_MAX_VCPUS)}")
        sync = kvm.check_extension(k.KVM_CAP_SYNC_REGS)
        how = ("kvm_run.s.regs (KVM_CAP_SYNC_REGS events)" if sync & k.KVM_SYNC_X86_EVENTS
               else "KVM_INTERRUPT (no KVM_CAP_SYNC_REGS events)")
        print(f"KVM_CAP_SYNC_REGS: {sync:#x}; interrupts injected by {how}")
        print(f"native exit core: {_core.__file__}")
        print("fastpath settings: native (default), python, off")
    finally:
        kvm.close()
    return 0


def cmd_guests(args: argparse.Namespace) -> int:
    """`kvmpy guests`: each bundled guest, what it does, and a command that runs it."""
    from kvmpy.guests import bundled_guests, describe, example_command

    names = bundled_guests()
    if not names:
        raise KvmpyError("no bundled guests: guest/ is not next to this kvmpy "
                         "(install from a clone: bash scripts/setup.sh)")
    for name in names:
        print(f"{name:<14} {describe(name).description}\n{'':<14} {example_command(name)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "ab":
        from kvmpy.bench.ab import cli_main as ab_main

        return ab_main(args)
    if args.bench == "vmexit" or getattr(args, "compare", False):
        from kvmpy.bench.compare import cli_main

        return cli_main(args)
    if args.bench == "floor":
        from kvmpy.bench.floor import main as floor_main

        return floor_main([f"--n={args.n}", f"--repeats={args.repeats}"]
                          + (["--json"] if args.json else []))
    import json

    from rich.progress import Progress

    from kvmpy.bench.ipi import bench_ipi, plot_report, print_report

    if args.n < 1 or args.rounds < 1:
        raise KvmpyError("--n and --rounds must be at least 1")
    if args.breakdown:
        return _cmd_breakdown(args)
    if args.scale and any(c < 2 or c > 64 for c in args.cpus):
        raise KvmpyError("--cpus for --scale must be between 2 and 64")
    runs = args.rounds * len(args.configs) * (len(args.cpus) if args.scale else 1)
    with Progress(transient=True, disable=args.json) as progress:
        task = progress.add_task("kvmpy bench ipi", total=runs)

        def step(what: str) -> None:
            progress.update(task, advance=1, description=what)

        result = bench_ipi(n=args.n, rounds=args.rounds, mode=args.mode,
                           configs=args.configs,
                           scale_cpus=args.cpus if args.scale else (), progress=step)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print_report(result)
    if args.plot:
        plot_report(result, args.plot)
    return 1 if result.failures else 0


def _cmd_breakdown(args: argparse.Namespace) -> int:
    import json

    from kvmpy.bench.breakdown import plot_breakdown, print_breakdown, run_breakdown

    if args.scale:
        raise KvmpyError("--breakdown is a two-vCPU test: it does not combine with --scale")
    if args.n > 4096:
        raise KvmpyError("--n for --breakdown must be at most 4096")
    result = run_breakdown(args.configs, n=args.n, rounds=args.rounds, use_perf=args.perf)
    if args.json:
        print(json.dumps({"backend": result.backend, "perf": result.perf, "configs": {
            name: {"round_trips": cb.round_trips, "failures": cb.failures,
                   "round_trips_ns": cb.cases,
                   "guest_round_trip_ns": cb.guest_rt_ns}
            for name, cb in result.configs.items()}}))
    else:
        print_breakdown(result)
    if args.plot:
        plot_breakdown(result, args.plot)
    failed = any(cb.failures or not cb.round_trips for cb in result.configs.values())
    return 1 if failed else 0


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KvmpyError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise KvmpyError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise KvmpyError(f"{what} {path}: {e.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "guests":
            return cmd_guests(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "trace":
            return cmd_trace(args)
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
