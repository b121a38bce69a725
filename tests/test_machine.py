"""The Machine API: vCPU threads, lifecycle, status, no leaked threads or fds."""

from __future__ import annotations

import io
import os
import threading

import pytest

from kvmpy.guestbuild import build_guest
from kvmpy.machine import STATUS_HUNG, Machine, MachineConfig
from kvmpy.vcpu import Vcpu

pytestmark = pytest.mark.kvm


def run_guest(name: str, **config: object) -> tuple[int, str, str]:
    out = io.BytesIO()
    cfg = MachineConfig(serial=out, **config)  # type: ignore[arg-type]
    with Machine(cfg) as m:
        m.load(build_guest(name).read_bytes())
        result = m.run(timeout=60)
    return result.status, result.message, out.getvalue().decode(errors="replace")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_four_vcpus_from_the_entry_point_each_see_their_apic_id() -> None:
    status, message, out = run_guest("smp_hello", cpus=4, ap_start="entry", cmdline="cpus=4")
    assert status == 3, (message, out)
    for i in range(4):
        assert f"apic id {i}\n" in out
    assert "smp_hello: all 4 cpus" in out


def test_aps_wait_for_sipi_by_default() -> None:
    # The APs never get INIT-SIPI from this guest, so only the BSP arrives.
    status, message, out = run_guest("smp_hello", cpus=2, cmdline="cpus=2")
    assert "cpu 0 apic id 0" in out
    assert "apic id 1" not in out
    assert status == 5  # "only 1 of 2 arrived" -> exit(2)


def test_no_threads_or_fds_left_after_runs() -> None:
    run_guest("hello", cpus=2)  # warm up caches (guest build, imports)
    threads, fds = threading.active_count(), open_fds()
    for _ in range(5):
        status, _, _ = run_guest("hello", cpus=2)
        assert status == 3
    assert threading.active_count() == threads
    assert open_fds() == fds


def test_all_vcpus_halted_forever_ends_the_vm() -> None:
    # smp_hello's BSP exits; make it wait for a CPU that never comes and have the
    # APs halt with interrupts off: here the BSP itself ends in cli;hlt via triple_fault?
    # Simplest hung guest: a flat binary `cli; hlt`.
    out = io.BytesIO()
    with Machine(MachineConfig(serial=out)) as m:
        m.load(bytes.fromhex("faf4"), flat=True)
        result = m.run(timeout=30)
    assert result.status == STATUS_HUNG
    assert "halted" in result.message


def test_exit_reason_lives_only_on_the_exit_path() -> None:
    """Seed rule 1: no vCPU-wide exit_reason that other code could read."""
    with Machine(MachineConfig(serial=io.BytesIO())) as m:
        m.load(build_guest("hello").read_bytes())
        m.run(timeout=60)
        vcpu = m.vcpus[0]
        names = set(vars(vcpu)) | set(dir(Vcpu))
        assert not [n for n in names if "exit_reason" in n or n in ("exit", "last_exit")]


@pytest.mark.parametrize(("pin", "load", "pinned"), [
    ("auto", 0.0, True),   # 2 vCPUs fit 2 host CPUs on a quiet host
    ("auto", 1.5, False),  # the same on a busy host: a pinned thread could not escape
    ("on", 9.0, True),
    ("off", 0.0, False),
])
def test_auto_pinning_follows_the_host_load(monkeypatch, pin: str, load: float,
                                            pinned: bool) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with Machine(MachineConfig(cpus=2, serial=io.BytesIO(), pin_vcpus=pin)) as m:
        cpus, why = m.pinning
        assert (cpus == [0, 1]) is pinned and (cpus == []) is not pinned
        assert ("not pinned" in why) is not pinned and (pin in why or "auto" in why)
        if pin == "auto" and not pinned:
            assert "load 1.5" in why
