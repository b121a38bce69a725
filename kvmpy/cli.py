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
    from kvmpy.machine import MachineConfig

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
    p = _Parser(prog="kvmpy", description="A hackable VMM in Python on Linux KVM.",
                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"kvmpy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="boot a multiboot (or flat) guest image",
                         allow_abbrev=False)
    run.add_argument("image", help="multiboot ELF32 image (e.g. a kvm-unit-tests .flat)")
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
    run.add_argument("--no-fastpath", dest="fastpath", action="store_false",
                     help="send every ICR write through the ordinary exit dispatch")
    run.add_argument("--irqchip", choices=("user", "kernel"), default="user",
                     help="user: kvmpy's local APIC (default); kernel: KVM's in-kernel "
                     "irqchip, the reference")
    run.add_argument("--stat", action="store_true",
                     help="print exit statistics when the VM ends")
    run.add_argument("--plot", metavar="FILE.png",
                     help="draw handling-time histograms (fastpath vs slow path) to FILE.png")
    run.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="stop the VM after this many seconds")

    sub.add_parser("info", help="show the KVM backend and capabilities kvmpy uses")

    bench = sub.add_parser("bench", help="benchmarks: `ipi` (guest-measured IPI latency), "
                           "`floor` (ICR-write exits against a bare C KVM_RUN loop)",
                           allow_abbrev=False)
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    ipi = bench_sub.add_parser("ipi", help="IPI round trip, one-way, halted receiver and "
                               "sender cost: kvmpy fastpath vs slow path vs in-kernel KVM",
                               allow_abbrev=False)
    ipi.add_argument("--n", type=int, default=300, help="samples per test per run")
    ipi.add_argument("--rounds", type=int, default=3,
                     help="alternate the configurations this many times")
    ipi.add_argument("--mode", choices=("x2apic", "xapic"), default="x2apic")
    ipi.add_argument("--configs", nargs="+", choices=("kvmpy-fast", "kvmpy-slow", "kernel"),
                     default=["kvmpy-fast", "kvmpy-slow", "kernel"])
    ipi.add_argument("--scale", action="store_true",
                     help="broadcast and multicast cost per target for 2..32 vCPUs")
    ipi.add_argument("--cpus", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                     help="vCPU counts for --scale")
    ipi.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ipi.add_argument("--plot", metavar="FILE.png", help="draw latency histograms")
    floor = bench_sub.add_parser("floor", help="ICR-write exit cost: kvmpy vs a C floor",
                                 allow_abbrev=False)
    floor.add_argument("--n", type=int, default=20_000, help="ICR writes per run")
    floor.add_argument("--repeats", type=int, default=5, help="runs of each side")
    floor.add_argument("--json", action="store_true", help="print JSON, not a table")
    return p


def cmd_run(args: argparse.Namespace,
            configure: Callable[[MachineConfig], None] | None = None) -> int:
    """`kvmpy run`; `configure` may adjust the MachineConfig first (kvmpy-qemu does)."""
    from kvmpy.cpumodel import parse_cpu
    from kvmpy.machine import STATUS_TERMINATED, Machine, MachineConfig

    image_path = Path(args.image)
    image = _read_file(image_path, "image")
    initrd = _read_file(Path(args.initrd), "initrd") if args.initrd else None
    config = MachineConfig(
        cpus=parse_cpus(args.cpus), memory=parse_size(args.memory), cmdline=args.append,
        initrd=initrd, initrd_name=args.initrd or "", fastpath=args.fastpath,
        irqchip=args.irqchip, cpu=parse_cpu(args.cpu),
    )
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
            machine.load(image, flat=args.flat, name=str(image_path))

            def on_term(signum: int, frame: object) -> None:
                machine.stop(STATUS_TERMINATED, "terminated (SIGTERM)")

            signal.signal(signal.SIGTERM, on_term)
            result = machine.run(timeout=args.timeout)
            sys.stdout.flush()
            if result.status != 0 and not (result.status & 1 and "debug-exit" in result.message):
                print(f"kvmpy: {result.message}", file=sys.stderr)
            if args.stat:
                from kvmpy.report import print_exit_table

                print_exit_table(result.stats, file=sys.stderr)
            if args.plot:
                from kvmpy.plot import plot_exit_histograms

                plot_exit_histograms(result.stats, args.plot, title=image_path.name)
            return result.status
    finally:
        if serial_file is not None:
            serial_file.close()


def cmd_info(args: argparse.Namespace) -> int:
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
    finally:
        kvm.close()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "floor":
        from kvmpy.bench.floor import main as floor_main

        return floor_main([f"--n={args.n}", f"--repeats={args.repeats}"]
                          + (["--json"] if args.json else []))
    import json

    from rich.progress import Progress

    from kvmpy.bench.ipi import bench_ipi, plot_report, print_report

    if args.n < 1 or args.rounds < 1:
        raise KvmpyError("--n and --rounds must be at least 1")
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
        if args.command == "bench":
            return cmd_bench(args)
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
