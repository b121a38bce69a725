"""VM lifecycle under faults and signals: a clean stop, within a second, and no leaks."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmpy.guestbuild import build_guest
from kvmpy.machine import STATUS_VMM_FAULT, Machine, MachineConfig

pytestmark = pytest.mark.kvm

# A flat guest that spins forever: jmp $
SPIN = bytes.fromhex("ebfe")
# x2APIC on, SVR enabled, a masked periodic timer with a ~550 s period, then `sti; hlt`
# forever: every vCPU halted, with a timer armed (so the VM is not "hung").
HALT_WITH_TIMER = bytes.fromhex(
    "b91b0000000f320d000c00000f30b90f080000b8ff01000031d20f30b93e080000b80a0000000f30"
    "b932080000b8400003000f30b938080000b8ffffffff0f30fbf4ebfc"
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("guest", ["spin", "halted"])
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_vm_within_a_second(
    tmp_path: Path, guest: str, sig: signal.Signals, status: int
) -> None:
    image = tmp_path / "guest.bin"
    image.write_bytes(SPIN if guest == "spin" else HALT_WITH_TIMER)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmpy", "run", "--flat", str(image), "--cpus", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(1.5)  # let it boot and settle (spinning or halted)
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == status, err
    assert elapsed < 1.0, f"took {elapsed:.2f} s to stop"
    assert "Traceback" not in err


class ExplodingDevice:
    name = "exploding"

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("device bug")


def test_exception_in_a_device_ends_the_vm_cleanly() -> None:
    threads = threading.active_count()
    # out %al, $0x80 ; jmp $   on vCPU 0 (the other vCPU spins from the entry too)
    image = bytes.fromhex("e680ebfe")
    with Machine(MachineConfig(cpus=2, ap_start="entry", serial=io.BytesIO())) as m:
        m.pio_bus.register(0x80, 1, ExplodingDevice())
        m.load(image, flat=True)
        t0 = time.monotonic()
        result = m.run(timeout=30)
        elapsed = time.monotonic() - t0
    assert result.status == STATUS_VMM_FAULT
    assert "RuntimeError: device bug" in result.message
    assert "vCPU" in result.message and "in write" in result.message
    assert elapsed < 5
    assert threading.active_count() == threads


def test_a_hundred_vms_leak_no_thread_or_fd() -> None:
    hello = build_guest("hello").read_bytes()
    with Machine(MachineConfig(serial=io.BytesIO())) as m:  # warm up imports and caches
        m.load(hello)
        m.run(timeout=30)
    threads, fds = threading.active_count(), open_fds()
    for i in range(100):
        with Machine(MachineConfig(cpus=2, serial=io.BytesIO())) as m:
            m.load(hello)
            if i % 5 == 0:  # every fifth one boots and runs to its debug exit
                assert m.run(timeout=30).status == 3
    assert threading.active_count() == threads
    assert open_fds() == fds
