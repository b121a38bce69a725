"""`kvmpy-qemu` (kvmpy/qemu_cli.py): the command line kvm-unit-tests' runner builds
(scripts/arch-run.bash, x86/run, scripts/runtime.bash), its probes, and refusals.
Pure parsing first, then runs under KVM through the same entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy import qemu_cli
from kvmpy.cpumodel import parse_cpu
from kvmpy.errors import KvmpyError
from kvmpy.qemu_cli import QemuArgs, parse

# x86/run's command for the x2apic test of x86/unittests.cfg, word for word.
RUNNER = ("--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard -device pc-testdev "
          "-device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio "
          "-machine accel=kvm -kernel x86/apic.flat -smp 2 -cpu qemu64,+x2apic,+tsc-deadline "
          "-initrd /tmp/tmp.env").split()


def test_the_runners_command_line() -> None:
    q = parse(RUNNER)
    assert isinstance(q, QemuArgs)
    assert (q.kernel, q.initrd, q.cpus, q.cpu) == ("x86/apic.flat", "/tmp/tmp.env", 2,
                                                   "qemu64,+x2apic,+tsc-deadline")
    assert q.pit and q.serial is None and q.fastpath and q.irqchip == "user"
    assert q.memory == "128M"  # QEMU's default


def test_qemu_defaults_without_options() -> None:
    q = parse(["-kernel", "k"])
    assert isinstance(q, QemuArgs)
    assert q.cpu == "qemu64" and parse_cpu(q.cpu).tsc_deadline is False
    assert q.cpus == 1


@pytest.mark.parametrize(("argv", "attr", "value"), [
    (["-machine", "pit=off"], "pit", False),  # vmexit_ipi
    (["-M", "pc,pit=on"], "pit", True),
    (["-machine", "kernel-irqchip=on"], "irqchip", "kernel"),
    (["-m", "256"], "memory", "256M"),
    (["-m", "size=1G"], "memory", "1G"),
    (["-smp", "cpus=4,maxcpus=4"], "cpus", 4),
    (["--smp", "3"], "cpus", 3),  # QEMU accepts -- for every option
    (["-append", "ipi"], "append", "ipi"),
    (["-serial", "null"], "serial", os.devnull),
    (["-serial", "file:/tmp/out"], "serial", "/tmp/out"),
    (["-chardev", "file,id=log,path=/tmp/log", "-serial", "chardev:log"], "serial", "/tmp/log"),
    (["-name", "x2apic"], "kernel", "k"),
    (["-accel", "kvm"], "kernel", "k"),
    (["-enable-kvm", "-no-user-config", "-nographic"], "kernel", "k"),
    (["-kvmpy-no-fastpath"], "fastpath", False),
])
def test_options_map_onto_the_machine_config(argv: list[str], attr: str, value: object) -> None:
    q = parse(["-kernel", "k", *argv])
    assert isinstance(q, QemuArgs)
    assert getattr(q, attr) == value


@pytest.mark.parametrize(("argv", "words"), [
    (["-device", "pci-testdev"], "pci-testdev: not implemented (kvmpy has no PCI bus)"),
    (["-device", "isa-debug-exit"], "iobase=0xf4"),  # QEMU's default port is 0x501
    (["-device", "isa-debug-exit,iobase=0x501"], "iobase=0xf4"),
    (["-device", "edu"], "-device edu: not implemented"),
    (["-device", "testdev,chardev=testlog"], "not implemented"),
    (["-cpu", "max,+frobnicate"], "-cpu feature 'frobnicate' is not implemented"),
    (["-cpu", "Haswell"], "CPU model 'Haswell' is not implemented"),
    (["-cpu", "host,hv-relaxed"], "Hyper-V enlightenments are not implemented"),
    (["-machine", "q35"], "-machine q35: not implemented"),
    (["-machine", "accel=tcg"], "accelerator 'tcg' is not implemented"),
    (["-machine", "kernel-irqchip=split"], "kernel-irqchip=split: not implemented"),
    (["-accel", "hvf"], "accelerator 'hvf'"),
    (["-smp", "2,sockets=2"], "only the CPU count"),
    (["-smp", "300"], "Invalid SMP CPUs 300. The max CPUs supported by machine 'pc' is 255"),
    (["-m", "1G,slots=2,maxmem=4G"], "only a size"),
    (["-global", "kvm-pit.lost_tick_policy=delay"], "-global kvm-pit.lost_tick_policy=delay"),
    (["-chardev", "socket,id=mon,path=/tmp/s"], "-chardev socket: not implemented"),
    (["-mon", "chardev=mon,mode=control"], "-mon: option not implemented"),
    (["-S"], "-S: option not implemented"),
    (["-incoming", "unix:/tmp/x"], "-incoming: option not implemented"),
    (["-display", "gtk"], "-display gtk: not implemented"),
    (["-serial", "stdio", "-serial", "stdio"], "one UART"),
    (["-serial", "chardev:nope"], "no -chardev with id=nope"),
    (["disk.img"], "disk images are not implemented"),
    (["-kernel"], "-kernel requires an argument"),
])
def test_what_is_not_implemented_is_refused_in_one_line(argv: list[str], words: str) -> None:
    with pytest.raises(KvmpyError) as info:  # UsageError, or the CPU model's
        parse(["-kernel", "k", *argv])
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmpy.qemu_cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_probes_answer_as_the_runner_expects() -> None:
    helped = run_cli("--help")
    assert helped.returncode == 0 and "QEMU" in helped.stdout
    first = helped.stdout.splitlines()[0].replace(".", " ").split()
    assert first[:3] == ["QEMU", "emulator", "version"] and first[3].isdigit()
    assert run_cli("-version").stdout.startswith("QEMU emulator version ")
    devices = run_cli("-device", "?")
    assert devices.returncode == 0
    assert '"pc-testdev"' in devices.stdout and '"isa-debug-exit"' in devices.stdout
    assert "pci-testdev" not in devices.stdout  # so the runner does not pass it
    assert "qemu64" in run_cli("-cpu", "help").stdout
    assert "kvm" in run_cli("-accel", "help").stdout


def test_missing_kernel_gives_the_line_the_premature_failure_probe_wants() -> None:
    r = run_cli(*[a if a != "x86/apic.flat" else "_NO_FILE_4Uhere_" for a in RUNNER])
    assert r.returncode == 2
    assert r.stderr == ("kvmpy-qemu: could not open kernel file '_NO_FILE_4Uhere_': "
                        "No such file or directory\n")


def test_an_unimplemented_option_is_reported_before_the_kernel() -> None:
    # The runner's probe then skips the test with this line, as it does for QEMU.
    for cpu, words in (("max,+frobnicate", "frobnicate"), ("host,hv_passthrough", "hv-")):
        r = run_cli("-kernel", "_NO_FILE_4Uhere_", "-cpu", cpu)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr and "could not open kernel" not in r.stderr


def test_the_cpu_options_the_runner_passes_are_accepted() -> None:
    # x86/unittests.cfg: msr, msr64, syscall, pcid-*, umip, access, la57, ept-mbec
    for cpu in ("max,vendor=GenuineIntel", "qemu64,vendor=GenuineIntel",
                "Opteron_G1,vendor=AuthenticAMD", "qemu64,+pcid,+invpcid",
                "qemu64,-pcid,+invpcid", "qemu64,+umip", "max,host-phys-bits",
                "Skylake-Server,host-phys-bits,+vmx,+vmx-mbec",
                "IvyBridge,phys-bits=36,host-phys-bits=off", "host,migratable=no"):
        r = run_cli("-kernel", "_NO_FILE_4Uhere_", "-cpu", cpu)
        assert r.returncode == 2 and "could not open kernel file" in r.stderr, (cpu, r.stderr)


def test_help_output_survives_a_closed_pipe() -> None:
    r = subprocess.run(f"{sys.executable} -m kvmpy.qemu_cli -h | head -1", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("QEMU emulator version") and r.stderr == ""


def test_kvmpy_qemu_is_a_console_script() -> None:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'kvmpy-qemu = "kvmpy.qemu_cli:main"' in text
    assert qemu_cli.main is not None


# ---------------------------------------------------------------- under KVM


def runner_argv(kernel: Path, *extra: str) -> list[str]:
    argv = [a for a in RUNNER if a not in ("-initrd", "/tmp/tmp.env")]
    argv[argv.index("x86/apic.flat")] = str(kernel)
    return [*argv, *extra]


@pytest.mark.kvm
def test_runner_command_line_runs_a_guest_and_keeps_the_debug_exit_status() -> None:
    from kvmpy.guestbuild import build_guest

    r = run_cli(*runner_argv(build_guest("hello"), "-append", "a b"))
    assert r.returncode == 3, (r.stdout, r.stderr)  # the guest wrote 1: (1 << 1) | 1
    assert "hello from kvmpy" in r.stdout and "cmdline:" in r.stdout and "a b" in r.stdout
    # the runner takes any other stderr line than a warning for a QEMU failure
    # (scripts/vmm.bash qemu_fixup_return_code); qemu64 on KVM may warn, as QEMU does
    assert all("warning" in line for line in r.stderr.splitlines()), r.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("cpu", ["qemu64,-x2apic,+tsc-deadline", "qemu64,+x2apic"])
def test_cpu_option_reaches_the_guest(cpu: str) -> None:
    from kvmpy.guestbuild import build_guest

    model = parse_cpu(cpu)
    argv = runner_argv(build_guest("cpu_model"))
    argv[argv.index("qemu64,+x2apic,+tsc-deadline")] = cpu
    r = run_cli(*argv)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"cpuid x2apic {int(model.x2apic)} tsc-deadline {int(model.tsc_deadline)}" in r.stdout
    assert f"gp set-extd: vector {0 if model.x2apic else 13}" in r.stdout


@pytest.mark.kvm
def test_machine_pit_off_removes_the_pit() -> None:
    from kvmpy.machine import Machine, MachineConfig

    for pit in (True, False):
        with Machine(MachineConfig(pit=pit)) as m:
            claimed = {port for port in (0x40, 0x43, 0x61) if m.pio_bus.find(port)}
            assert claimed == ({0x40, 0x43, 0x61} if pit else set())
            assert (m.pit_irq0 is not None) == pit  # no IRQ 0 ticks without a PIT
