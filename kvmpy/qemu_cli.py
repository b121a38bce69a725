"""`kvmpy-qemu`: kvmpy behind QEMU's command line, for kvm-unit-tests' own runner.

    cd kvm-unit-tests && QEMU=kvmpy-qemu ./run_tests.sh -g apic

The runner probes `$QEMU --help` for "QEMU" (and parses its first line as "QEMU emulator
version X.Y.Z"), `$QEMU -device '?'` for "pc-testdev" / "pci-testdev", runs the command
with kernel `_NO_FILE_4Uhere_` and expects "could not open kernel file" back (anything
else is a premature failure: the test is skipped with that line), then runs

    kvmpy-qemu --no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard
      -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none
      -serial stdio -machine accel=kvm -kernel X.flat -smp N -cpu MODEL,+f,-f
      -initrd ENV -append ARGS

Each option maps onto `kvmpy run` (kvmpy/cli.py) and its MachineConfig; what kvmpy
does not implement is refused with one line and status 2, never ignored silently:

- `-kernel`, `-initrd`, `-append`, `-m` (MiB by default, or `size=`), `-smp N` /
  `cpus=N` (one package, N cores; other topology keys refused),
  `-cpu` (kvmpy/cpumodel.py; default qemu64, as QEMU's).
- `-machine`/`-M`: type `pc` only; `accel=kvm`; `pit=on|off`; `kernel-irqchip=off`
  (kvmpy's own APIC, the default) or `on` (`--irqchip kernel`). `-accel kvm`,
  `-enable-kvm`.
- `-device isa-debug-exit,iobase=0xf4,iosize=0x4` and `-device pc-testdev`: kvmpy's
  debug exit (at 0xf4 only) and pc-testdev (kvmpy/devices/pc_testdev.py) are always
  there, so these only check that the runner asks for what kvmpy has.
  pci-testdev is not implemented (kvmpy has no PCI bus): it is not listed by
  `-device ?`, so the runner does not pass it, and refused if passed.
- `-serial stdio|null|file:PATH|chardev:ID` (COM1 only), `-chardev
  stdio|null|file,id=ID[,path=PATH]`; socket and pipe chardevs, `-mon`, `-qmp` (QMP:
  migration and panic tests) are refused.
- Accepted because they change nothing in kvmpy: `-nodefaults` (kvmpy has no default
  devices beyond its fixed set), `-no-reboot` (kvmpy never reboots: a triple fault
  stops the VM with status 4), `-display none`, `-nographic`, `-no-user-config`,
  `-name NAME` (a label), `-global kvm-pit.lost_tick_policy=discard` (kvmpy's PIT
  never re-injects lost ticks).
- kvmpy's own: `-kvmpy-no-fastpath`, `-kvmpy-stat`, also read from the environment
  variable KVMPY_QEMU_OPTS (the runner splits $QEMU into words, so options cannot
  ride in it).

The exit status is `kvmpy run`'s: a guest write of V to port 0xf4 gives (V << 1) | 1,
QEMU's isa-debug-exit rule, which the runner decodes.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmpy import __version__
from kvmpy.errors import KvmpyError

if TYPE_CHECKING:
    from kvmpy.cpumodel import CpuModel

PROG = "kvmpy-qemu"
STATUS_USAGE = 2
MAX_SMP = 255  # kvmpy.machine.MAX_VCPUS
VERSION_LINE = (f"QEMU emulator version {__version__} ({PROG}: kvmpy {__version__} behind a "
                "QEMU-compatible command line; this is not QEMU)")
DEVICES = (
    'name "isa-debug-exit", bus ISA, desc "kvmpy: exit with (V << 1) | 1, iobase=0xf4 only"',
    'name "pc-testdev", bus ISA',
)

# Options that take a value, and flags; the rest is refused.
_WITH_VALUE = {"m", "smp", "cpu", "kernel", "initrd", "append", "device", "machine", "M",
               "accel", "global", "name", "chardev", "serial", "display"}
_FLAGS = {"nodefaults", "no-reboot", "enable-kvm", "nographic", "no-user-config",
          "kvmpy-no-fastpath", "kvmpy-stat"}
_HELP = {"?", "help"}


class UsageError(KvmpyError):
    """A command line kvmpy-qemu does not implement (one line, status 2)."""


@dataclass
class QemuArgs:
    """What the QEMU command line asked for, in kvmpy's terms."""

    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    memory: str = "128M"  # QEMU's default RAM size
    cpus: int = 1
    cpu: str = "qemu64"  # QEMU's default model
    pit: bool = True
    irqchip: str = "user"
    serial: str | None = None  # None: stdout
    fastpath: bool = True
    stat: bool = False
    chardevs: dict[str, str | None] = field(default_factory=dict)  # id -> path (None: stdout)


def _props(text: str) -> tuple[str, dict[str, str]]:
    """'name,k=v,k2=v2' -> ('name', {k: v}); a first item with '=' gives name ''."""
    parts = [p for p in text.split(",") if p]
    name = "" if not parts or "=" in parts[0] else parts.pop(0)
    props = {}
    for p in parts:
        key, sep, value = p.partition("=")
        props[key] = value if sep else "on"
    return name, props


def _onoff(option: str, key: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise UsageError(f"{option} {key}={value}: expected on or off")


def _device(q: QemuArgs, value: str) -> None:
    name, props = _props(value)
    if name == "pc-testdev" and not props:
        pass  # always present in kvmpy
    elif name == "isa-debug-exit":
        iobase = props.pop("iobase", None)
        iosize = props.pop("iosize", "0x4")
        try:
            ok = iobase is not None and int(iobase, 0) == 0xF4 and int(iosize, 0) in (1, 2, 4)
        except ValueError:
            ok = False
        if not ok or props:
            raise UsageError(f"-device {value}: kvmpy's debug-exit port is "
                             "isa-debug-exit,iobase=0xf4,iosize=0x4; nothing else is implemented")
    elif name == "pci-testdev":
        raise UsageError("-device pci-testdev: not implemented (kvmpy has no PCI bus)")
    else:
        raise UsageError(f"-device {value}: not implemented (kvmpy has: isa-debug-exit, "
                         "pc-testdev)")


def _machine(q: QemuArgs, value: str) -> None:
    name, props = _props(value)
    name = props.pop("type", name)
    if name and name != "pc":
        raise UsageError(f"-machine {name}: not implemented (kvmpy's machine is 'pc')")
    for key, v in props.items():
        if key == "accel":
            _accel(v)
        elif key == "pit":
            q.pit = _onoff("-machine", key, v)
        elif key == "kernel-irqchip" and v in ("on", "off"):
            q.irqchip = "kernel" if v == "on" else "user"
        else:
            raise UsageError(f"-machine {key}={v}: not implemented (kvmpy has accel=kvm, "
                             "pit=on|off, kernel-irqchip=on|off)")


def _accel(value: str) -> None:
    name = value.split(",", 1)[0]
    if name.split(":")[0] != "kvm":
        raise UsageError(f"accelerator {name!r} is not implemented (kvmpy runs on KVM only)")


def _smp(q: QemuArgs, value: str) -> None:
    name, props = _props(value)
    count = props.pop("cpus", name)
    if props.get("maxcpus") == count:
        props.pop("maxcpus")
    if props:
        raise UsageError(f"-smp {value}: only the CPU count is implemented (kvmpy gives "
                         "N cores in one package)")
    try:
        q.cpus = int(count)
    except ValueError:
        raise UsageError(f"-smp {value}: bad CPU count") from None
    if not 1 <= q.cpus <= MAX_SMP:
        raise UsageError(f"Invalid SMP CPUs {q.cpus}. The max CPUs supported by machine "
                         f"'pc' is {MAX_SMP}")


def _memory(q: QemuArgs, value: str) -> None:
    name, props = _props(value)
    size = props.pop("size", name)
    if props or not size:
        raise UsageError(f"-m {value}: only a size is implemented (e.g. -m 256 or -m 1G)")
    q.memory = size if size[-1:].isalpha() else f"{size}M"


def _chardev(q: QemuArgs, value: str) -> None:
    backend, props = _props(value)
    ident = props.pop("id", None)
    if ident is None:
        raise UsageError(f"-chardev {value}: an id= is required")
    if backend == "file" and "path" in props and len(props) == 1:
        q.chardevs[ident] = props["path"]
    elif backend == "stdio" and set(props) <= {"signal", "mux"}:
        q.chardevs[ident] = None
    elif backend == "null" and not props:
        q.chardevs[ident] = os.devnull
    else:
        raise UsageError(f"-chardev {backend}: not implemented (kvmpy has file, stdio and "
                         "null chardevs; no monitor, no sockets)")


def _serial(q: QemuArgs, value: str, seen: list[str]) -> None:
    seen.append(value)
    if len(seen) > 1:
        raise UsageError("a second -serial: kvmpy has one UART (COM1)")
    if value == "stdio":
        q.serial = None
    elif value in ("null", "none"):
        q.serial = os.devnull
    elif value.startswith("file:"):
        q.serial = value[5:]
    elif value.startswith("chardev:"):
        ident = value[8:]
        if ident not in q.chardevs:
            raise UsageError(f"-serial {value}: no -chardev with id={ident} (give it first)")
        q.serial = q.chardevs[ident]
    else:
        raise UsageError(f"-serial {value}: not implemented (kvmpy has stdio, null, "
                         "file:PATH, chardev:ID)")


def _global(value: str) -> None:
    if value != "kvm-pit.lost_tick_policy=discard":
        raise UsageError(f"-global {value}: not implemented (kvmpy accepts "
                         "kvm-pit.lost_tick_policy=discard, which its PIT does already)")


def parse(argv: Sequence[str]) -> QemuArgs | str:
    """The parsed command line, or the text to print for a help/query option."""
    q = QemuArgs()
    serials: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        raw = args[i]
        i += 1
        if not raw.startswith("-") or raw == "-":
            raise UsageError(f"{raw}: disk images are not implemented (use -kernel FILE)")
        opt = raw[2:] if raw.startswith("--") else raw[1:]
        if opt in ("h", "help"):
            return help_text()
        if opt == "version":
            return VERSION_LINE
        if opt in _FLAGS:
            if opt == "kvmpy-no-fastpath":
                q.fastpath = False
            elif opt == "kvmpy-stat":
                q.stat = True
            continue
        if opt not in _WITH_VALUE:
            raise UsageError(f"{raw}: option not implemented (see '{PROG} --help')")
        if i >= len(args):
            raise UsageError(f"{raw} requires an argument")
        value = args[i]
        i += 1
        if value in _HELP or value.endswith(",help"):
            answer = _query(opt, value)
            if answer is not None:
                return answer
        if opt == "kernel":
            q.kernel = value
        elif opt == "initrd":
            q.initrd = value
        elif opt == "append":
            q.append = value
        elif opt == "m":
            _memory(q, value)
        elif opt == "smp":
            _smp(q, value)
        elif opt == "cpu":
            from kvmpy.cpumodel import parse_cpu

            _check_cpu(parse_cpu(value))  # refuse a bad model before the kernel
            q.cpu = value
        elif opt == "device":
            _device(q, value)
        elif opt in ("machine", "M"):
            _machine(q, value)
        elif opt == "accel":
            _accel(value)
        elif opt == "global":
            _global(value)
        elif opt == "chardev":
            _chardev(q, value)
        elif opt == "serial":
            _serial(q, value, serials)
        elif opt == "display":
            if value != "none":
                raise UsageError(f"-display {value}: not implemented (kvmpy has no display)")
        # "name": a label only
    return q


def _check_cpu(model: CpuModel) -> None:
    """Refuse what this host's KVM cannot give the model (hv-passthrough) here, so that
    the runner's probe run sees it and skips the test with that line."""
    if not model.hv_passthrough:
        return
    from kvmpy.cpumodel import check_host
    from kvmpy.kvm import Kvm
    from kvmpy.kvm import ioctls as k

    try:
        kvm = Kvm.open()
    except KvmpyError:
        return  # no KVM at all: the run says so
    try:
        check_host(model, has_hyperv=kvm.check_extension(k.KVM_CAP_HYPERV) > 0)
    finally:
        kvm.close()


def _query(opt: str, value: str) -> str | None:
    """The answer to `-device ?`, `-cpu help`, `-machine help`, `-accel help`."""
    if opt == "device":
        return "Misc devices:\n" + "\n".join(DEVICES)
    if opt == "cpu":
        from kvmpy.cpumodel import describe_models

        return describe_models()
    if opt in ("machine", "M"):
        return "Supported machines are:\npc                   kvmpy PC (default; no PCI)"
    if opt == "accel":
        return "Accelerators supported in QEMU binary:\nkvm"
    return None


def help_text() -> str:
    doc = (__doc__ or "").split("\n\n", 1)[1]
    return f"{VERSION_LINE}\nusage: {PROG} [options]\n\n{doc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    args += shlex.split(os.environ.get("KVMPY_QEMU_OPTS", ""))
    try:
        parsed = parse(args)
        if isinstance(parsed, str):
            return _print(parsed)
        return _run(parsed)
    except KvmpyError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return STATUS_USAGE
    except KeyboardInterrupt:
        return 130


def _print(text: str) -> int:
    """Print a help/query answer; a reader that stops early (`| head -1`, as the
    runner's version probe) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(q: QemuArgs) -> int:
    from kvmpy.cli import build_parser, cmd_run
    from kvmpy.machine import MachineConfig

    if q.kernel is None:
        raise UsageError("no -kernel given (kvmpy boots a multiboot kernel; disks and "
                         "firmware are not implemented)")
    if not os.path.isfile(q.kernel):
        reason = "Is a directory" if os.path.isdir(q.kernel) else "No such file or directory"
        raise UsageError(f"could not open kernel file '{q.kernel}': {reason}")
    argv = ["run", f"--cpus={q.cpus}", f"--memory={q.memory}", f"--append={q.append}",
            f"--cpu={q.cpu}", f"--irqchip={q.irqchip}"]
    if q.initrd is not None:
        argv.append(f"--initrd={q.initrd}")
    if q.serial is not None:
        argv.append(f"--serial={q.serial}")
    if not q.fastpath:
        argv.append("--no-fastpath")
    if q.stat:
        argv.append("--stat")
    ns = build_parser().parse_args([*argv, "--", q.kernel])

    def configure(config: MachineConfig) -> None:
        config.pit = q.pit

    return cmd_run(ns, configure)


if __name__ == "__main__":
    sys.exit(main())
