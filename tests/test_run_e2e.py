"""End to end: `kvmpy run` boots the bundled multiboot guests on /dev/kvm.

Each test runs the CLI in a subprocess, as a user would, and checks the serial output,
the exit status and stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.guestbuild import build_guest
from kvmpy.kvm import detect_backend

pytestmark = pytest.mark.kvm
TIMEOUT = 120


def kvmpy(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


def test_hello_prints_and_exits_with_debug_exit_status() -> None:
    r = kvmpy("run", str(build_guest("hello")), "--append", "console=ttyS0 quiet")
    assert "hello from kvmpy" in r.stdout
    assert "console=ttyS0 quiet" in r.stdout
    assert r.returncode == 3, r.stderr  # wrote 1 to 0xf4: (1 << 1) | 1
    assert r.stderr == ""


def test_qemu_style_options() -> None:
    r = kvmpy("run", str(build_guest("hello")), "-smp", "2", "-m", "32", "-append", "x=1")
    assert r.returncode == 3, r.stderr
    assert "x=1" in r.stdout


@pytest.mark.parametrize("code", [0, 5, 0x7F])
def test_exit_code_from_cmdline(code: int) -> None:
    r = kvmpy("run", str(build_guest("exitcode")), "--append", f"code={code}")
    assert r.returncode == (code << 1) | 1, (r.stdout, r.stderr)


def test_serial_to_file(tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    r = kvmpy("run", str(build_guest("hello")), "--serial", str(out))
    assert r.returncode == 3
    assert "hello from kvmpy" in out.read_text()
    assert "hello from kvmpy" not in r.stdout


def test_triple_fault_is_a_clean_shutdown_with_diagnostic() -> None:
    r = kvmpy("run", str(build_guest("triple_fault")))
    assert r.returncode == 4
    line = one_line(r.stderr)
    assert "vCPU 0" in line and "triple fault" in line
    assert "RIP=0x" in line and "ud2" in line


def test_unmapped_mmio_reads_all_ones_and_ignores_writes() -> None:
    r = kvmpy("run", str(build_guest("mmio_touch")))
    assert r.returncode == 3, r.stderr
    assert "read 0xd0000000 = ffffffff" in r.stdout
    assert "read back ffffffff" in r.stdout


def test_unknown_msr_gets_gp() -> None:
    r = kvmpy("run", str(build_guest("gp_msr")))
    assert "wrmsr deadbeef -> vector 13" in r.stdout
    assert "rdmsr deadbeef -> vector 13" in r.stdout
    assert r.returncode == (13 << 1) | 1


def test_multiboot_info_and_initrd_module(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.write_bytes(b"TEST_DEVICE=0\nNR_CPUS=1\n")
    image = build_guest("mbinfo")
    r = kvmpy("run", str(image), "-m", "128M", "--append", "a b c", "--initrd", str(env))
    assert r.returncode == 3, r.stderr
    out = r.stdout
    assert "mem_lower=640" in out
    assert f"mem_upper={128 * 1024 - 1024}" in out
    assert "mmap base=100000 length=7f00000 type=1" in out
    assert f"cmdline={image} a b c" in out  # QEMU's "<kernel> <append>" (argv[0] first)
    assert "mods_count=1" in out
    assert f"cmdline={env}" in out  # the module's command line: the file name
    assert "data=TEST_DEVICE=0\\x0aNR_CPUS=1\\x0a" in out


def test_guest_internal_error_names_the_instruction(tmp_path: Path) -> None:
    # popcnt %eax,%eax: kvm_pvm's emulator lacks it (DESIGN.md), so KVM gives up with
    # KVM_EXIT_INTERNAL_ERROR. On hardware KVM it runs, then `cli; hlt` hangs the guest.
    image = tmp_path / "popcnt.bin"
    image.write_bytes(bytes.fromhex("f30fb8c0") + bytes.fromhex("faf4"))
    r = kvmpy("run", "--flat", str(image), timeout=60)
    line = one_line(r.stderr)
    if detect_backend() == "kvm_pvm":
        assert r.returncode == 6
        assert "vCPU 0: KVM internal error: instruction emulation failed" in line
        assert "RIP=0x100000" in line and "popcnt eax, eax" in line
    else:
        assert r.returncode == 10 and "halted" in line


# ---------------------------------------------------------------- user errors


def test_missing_image() -> None:
    r = kvmpy("run", "/nonexistent/image.elf")
    assert r.returncode == 2
    assert one_line(r.stderr) == "kvmpy: image /nonexistent/image.elf: no such file"


def test_not_a_multiboot_image(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("just some text\n")
    r = kvmpy("run", str(bogus))
    assert r.returncode == 2
    assert "not a multiboot image" in one_line(r.stderr)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-m", "10X"], "bad memory size"),
        (["-m", "1M"], "MiB of guest memory"),
        (["--cpus", "0"], "--cpus must be between"),
        (["--cpus", "many"], "bad CPU count"),
        (["--bogus"], "unrecognized arguments"),
        (["--initrd", "/nonexistent/env"], "initrd /nonexistent/env: no such file"),
    ],
)
def test_bad_arguments_give_one_line(args: list[str], needle: str) -> None:
    r = kvmpy("run", str(build_guest("hello")), *args)
    assert r.returncode == 2
    assert needle in one_line(r.stderr)


def test_missing_kvm_device_is_one_clear_error() -> None:
    from kvmpy.errors import KvmUnavailable
    from kvmpy.machine import Machine, MachineConfig

    with pytest.raises(KvmUnavailable, match="/nonexistent/kvm does not exist"):
        Machine(MachineConfig(kvm_path="/nonexistent/kvm"))


def test_no_instruction_at_rip_raises_invalid_opcode() -> None:
    # guest/invalid_opcode.c: 0f 38 f0 c0 is no instruction. On kvm_pvm KVM's emulator
    # gives up on it (KVM_EXIT_INTERNAL_ERROR) and kvmpy injects #UD; on hardware the
    # CPU raises it. Either way the guest sees vector 6 at that instruction.
    r = kvmpy("run", str(build_guest("invalid_opcode")))
    assert "invalid_opcode: vector 6 at the instruction" in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 1 and r.stderr == ""
