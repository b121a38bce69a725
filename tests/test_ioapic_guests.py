"""The I/O APIC end to end: guest/ioapic_irq.c through `kvmpy run`, and kvm-unit-tests'
ioapic.flat when KVMPY_KUT_DIR names a built tree.

The guest prints what it counted next to what it expected and exits 0 only if they
agree; the test checks its exit status AND the printed counts against its own table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.guestbuild import build_guest

pytestmark = pytest.mark.kvm

GUEST_OK = (0 << 1) | 1
GUEST_FAILED = (1 << 1) | 1

# Per-CPU counts with 4 CPUs (guest/ioapic_irq.c header).
COUNTS = {
    "edge": [1, 1, 1, 1],
    "level": [1, 1, 1, 1],
    "retrig": [0, 5, 0, 0],
    "coalesce": [0, 1, 0, 0],
    "maskedge": [0, 0, 0, 0],
    "masklvl": [0, 1, 0, 0],
    "bcast": [1, 1, 1, 1],
    "logical": [0, 1, 0, 1],
    "directed": [0, 1, 0, 0],
}

# ioapic.flat subtests this host cannot pass under any VMM: kvm_pvm gives no
# KVM_EXIT_IRQ_WINDOW_OPEN after `sti; nop` (the window requested with IF=0 is only
# reported at the next other exit), so the two pending edges are taken far from the
# STI; QEMU+KVM's in-kernel irqchip fails it here too (README, ioapic section).
KUT_IOAPIC_HOST_FAILURES = {"ioapic simultaneous edge interrupts"}
KUT_IOAPIC_MIN_PASSES = 29  # of 30


def kvmpy_run(image: str | Path, *args: str, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", str(image), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.mark.parametrize("mode", ["xapic", "x2apic"])
def test_ioapic_guest_exact_counts(mode: str) -> None:
    r = kvmpy_run(build_guest("ioapic_irq"), "--cpus", "4", "--append", f"mode={mode}")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == GUEST_OK, (r.stdout, r.stderr)
    out = r.stdout
    assert f"ioapic_irq: mode {mode}, 4 cpus" in out
    assert "ioapic_irq: regs: ok" in out
    for name, want in COUNTS.items():
        m = re.search(rf"^ioapic_irq: {name}: got ([\d ]+) expected ([\d ]+)$", out, re.M)
        assert m, (name, out)
        assert [int(x) for x in m.group(1).split()] == want, (name, out)
        assert [int(x) for x in m.group(2).split()] == want, (name, out)
    m = re.search(r"^ioapic_irq: lowest: got ([\d ]+) total (\d+) expected total 4$", out, re.M)
    assert m and int(m.group(2)) == 4 == sum(int(x) for x in m.group(1).split()), out
    assert "directed: remote IRR 1 before, 0 after the EOI register" in out
    assert re.search(r"^ioapic_irq: illegal: esr (\w+) remote IRR 0$", out, re.M), out
    esr = int(re.search(r"illegal: esr (\w+)", out).group(1), 16)
    assert esr & 0x40, out  # receive illegal vector (SDM 10.5.3)
    m = re.search(r"^ioapic_irq: pit: got (\d+) expected at least 5$", out, re.M)
    assert m and int(m.group(1)) >= 5, out  # PIT channel 0 -> ISA IRQ 0 -> pin 2
    assert out.rstrip().endswith("ioapic_irq: ok"), out


def kut_flat(name: str) -> Path:
    value = os.environ.get("KVMPY_KUT_DIR")
    if not value:
        pytest.skip("KVMPY_KUT_DIR is not set (point it at a built kvm-unit-tests tree)")
    flat = Path(value) / "x86" / f"{name}.flat"
    if not flat.is_file():
        pytest.skip(f"{flat} is not built (run make in the kvm-unit-tests tree)")
    return flat


@pytest.mark.slow
def test_kvm_unit_tests_ioapic(tmp_path: Path) -> None:
    # unittests.cfg: [ioapic] smp = 4, -cpu qemu64,+x2apic. The runner passes its
    # environment as the initrd; pc-testdev exists now, so TEST_DEVICE=1.
    flat = kut_flat("ioapic")
    env = tmp_path / "env"
    env.write_text("TEST_DEVICE=1\nNR_CPUS=4\n")
    r = kvmpy_run(flat, "-smp", "4", "-initrd", str(env), timeout=300)
    out = r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    failed = set(re.findall(r"^FAIL: (.*?)\r?$", out, re.M))
    assert failed <= KUT_IOAPIC_HOST_FAILURES, out
    assert len(re.findall(r"^PASS: ", out, re.M)) >= KUT_IOAPIC_MIN_PASSES, out
    assert re.search(r"^SUMMARY: 30 tests", out, re.M), out
    assert r.returncode == (GUEST_FAILED if failed else GUEST_OK), (out[-2000:], r.stderr)


# ---------------------------------------------------------------- the wiring in Machine


def test_machine_wires_ioapic_lines_eoi_and_the_storm_timer() -> None:
    import time

    from kvmpy.apic.constants import REG_EOI, REG_SVR
    from kvmpy.apic.ioapic import IoApic
    from kvmpy.devices.pc_testdev import PcTestdev, PcTestdevIrq
    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(cpus=2)) as m:
        io = m.ioapic
        assert isinstance(io, IoApic)
        assert m.mmio_bus.find(0xFEC00000) == (io, 0)
        assert m.mmio_bus.find(0xFEC00FFF) == (io, 0xFFF)
        assert isinstance(m.pio_bus.find(0xE0)[0], PcTestdev)
        assert isinstance(m.pio_bus.find(0x2017)[0], PcTestdevIrq)
        apic = m.vcpus[1].apic
        apic.mmio_write(REG_SVR, 4, 0x1FF)
        io.storm_limit = 1
        m.mmio_bus.write(0xFEC00000, 4, 0x10 + 2 * 5 + 1)
        m.mmio_bus.write(0xFEC00010, 4, 1 << 24)  # destination APIC 1
        m.mmio_bus.write(0xFEC00000, 4, 0x10 + 2 * 5)
        m.mmio_bus.write(0xFEC00010, 4, 0x8055)  # level, vector 0x55, unmasked
        m.pio_bus.write(0x2005, 1, 1)
        assert apic.pending_vector() == 0x55 and io.remote_irr(5)
        apic.ack(0x55)
        apic.mmio_write(REG_EOI, 4, 0)  # EOI -> bus -> I/O APIC: storm limit 1, deferred
        assert io.deferred and apic.pending_vector() is None
        m.timers.start()
        deadline = time.monotonic() + 2
        while apic.pending_vector() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        m.timers.stop()
        assert apic.pending_vector() == 0x55 and not io.deferred
        m.serial.irq(True)  # COM1 drives GSI 4
        assert io.lines >> 4 & 1


def test_kernel_irqchip_machine_routes_lines_to_kvm() -> None:
    from kvmpy.machine import Machine, MachineConfig

    with Machine(MachineConfig(cpus=1, irqchip="kernel")) as m:
        assert m.ioapic is None
        assert m.mmio_bus.find(0xFEC00000) is None  # KVM's own I/O APIC answers there
        m.pio_bus.write(0x200E, 1, 1)  # KVM_IRQ_LINE: must not raise
        m.pio_bus.write(0x200E, 1, 0)
