"""Guests that report figures on the console for `kvmpy bench ab`: ipi_bench's
report=median (checked against the samples in guest RAM) and ipi_coalesce's counts."""

from __future__ import annotations

import io
import re

import pytest

from kvmpy.bench.ipi import run_guest
from kvmpy.guestbuild import build_guest
from kvmpy.machine import Machine, MachineConfig

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("n", [21, 20])
def test_ipi_bench_medians_match_the_samples_in_guest_memory(n: int) -> None:
    g = run_guest("kvmpy-fast", 2, f"n={n} cpus=2 report=median only=vmexit")
    assert g.status == 1, g.message
    printed = {t: int(v) for t, v in re.findall(r"ipi_bench: median (\w+) (\d+)", g.output)}
    assert set(printed) == {"vmexit_ipi", "vmexit_ipi_halt"} == set(g.samples)
    for test, samples in g.samples.items():
        v = sorted(samples)
        assert len(v) == n
        want = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) // 2
        assert printed[test] == want, test
    # the samples themselves are left in place (the host reads them after the run)
    assert any(s != sorted(s) for s in g.samples.values())


def run_coalesce(cmdline: str) -> tuple[int, str]:
    config = MachineConfig(cpus=2, memory=64 << 20, cmdline=cmdline, serial=io.BytesIO())
    with Machine(config) as machine:
        machine.load(build_guest("ipi_coalesce").read_bytes(), name="ipi_coalesce")
        result = machine.run(timeout=120)
        return result.status, config.serial.getvalue().decode()


def test_ipi_coalesce_irqoff_merges_every_burst_into_one_interrupt() -> None:
    status, out = run_coalesce("n=10 burst=3")
    assert status == 1, out
    assert "target=irqoff n=10 burst=3" in out
    assert "ipi_coalesce: sent 30 received 10 merged 20" in out
    assert re.search(r"ipi_coalesce: median burst_send [1-9]\d*\n", out)
    assert out.rstrip().endswith("ipi_coalesce: ok")


@pytest.mark.parametrize("target", ["poll", "halt"])
def test_ipi_coalesce_other_targets_receive_one_to_burst_per_burst(target: str) -> None:
    status, out = run_coalesce(f"n=10 burst=3 target={target}")
    assert status == 1, out
    sent, received = map(int, re.search(r"sent (\d+) received (\d+)", out).groups())
    assert sent == 30 and 10 <= received <= 30


def test_ipi_coalesce_refuses_a_bad_command_line() -> None:
    status, out = run_coalesce("burst=0")
    assert status == 3 and "need 1 <= n <= 4096 and 1 <= burst <= 64" in out
