"""`kvmpy bench vmexit`: parsing kvm-unit-tests' vmexit.flat output, the comparison built
from it, and (slow, only with KVMPY_KUT_DIR) a real run of the user's vmexit.flat.

The sample text below is written from vmexit.c's printf formats ("%s %d\\n" per test,
"  ipi %s %d\\n" for the on_cpu part, "%s (skipped)\\n"), with the setup lines its
libcflat prints before them and the serial port's CRLF; the numbers are made up.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.bench.compare import Comparison, RunOutcome, print_comparison, run_comparison
from kvmpy.bench.vmexit import outcome, parse_vmexit

SETUP = ("enabling apic\r\nenabling apic\r\nsmp: waiting for 1 APs\r\n"
         "setup: CPU 1 online\r\npaging enabled\r\ncr0 = 80010011\r\ncr3 = 1041000\r\n"
         "cr4 = 20\r\n")


def sample(ipi: int, ipi_halt: int) -> str:
    return SETUP + f"ipi {ipi}\r\n  ipi ipi {ipi - 40000}\r\nipi_halt {ipi_halt}\r\n"


def test_parse_takes_the_test_lines_only() -> None:
    text = sample(459180, 391615) + "self_ipi_sti_nop (skipped)\r\npci-mem (skipped)\r\n"
    parsed = parse_vmexit(text)
    assert parsed.cycles == {"ipi": 459180, "ipi_halt": 391615}
    assert parsed.skipped == ["self_ipi_sti_nop", "pci-mem"]
    assert parse_vmexit("cpuid 1234\nvmcall 99\n").cycles == {"cpuid": 1234, "vmcall": 99}


def test_outcome_of_a_good_run() -> None:
    out = outcome(sample(500000, 400000), 1, "guest wrote 0 to debug-exit", ["ipi", "ipi_halt"],
                  2_000_000_000)
    assert out.ok and out.message == ""
    assert out.values == {"ipi": [500000.0], "ipi_halt": [400000.0]}
    assert out.tsc_hz == 2_000_000_000


@pytest.mark.parametrize("text, status, problem", [
    (SETUP + "ipi (skipped)\r\nipi_halt (skipped)\r\n", 1, "ipi skipped by vmexit"),
    (SETUP + "ipi 500000\r\n", 1, "ipi_halt not reported"),
    (sample(500000, 400000), 0, "VM stopped: timeout"),
    (SETUP + "ipi -5\r\nipi_halt 3\r\n", 1, "ipi reported -5 cycles"),
])
def test_outcome_of_a_bad_run(text: str, status: int, problem: str) -> None:
    out = outcome(text, status, "VM stopped: timeout" if status == 0 else "", ["ipi", "ipi_halt"])
    assert not out.ok and problem in out.message


def test_comparison_and_report_from_recorded_outputs() -> None:
    # fast ~20% under slow, kernel ~2.5x under fast, with run-to-run wobble
    wobble = [1.00, 1.04, 0.97, 1.02, 0.99, 1.03]
    level = {"kvmpy-fast": 480000, "kvmpy-slow": 600000, "kernel": 190000}
    calls: dict[str, int] = {}

    def runner(cfg: str) -> RunOutcome:
        i = calls[cfg] = calls.get(cfg, -1) + 1
        w = wobble[i % len(wobble)]
        return outcome(sample(int(level[cfg] * w), int(level[cfg] * 0.9 * w)), 1, "",
                       ["ipi", "ipi_halt"], 2_000_000_000)

    c = Comparison("vmexit", "vmexit.flat ipi ipi_halt --cpus 2", "fake",
                   ["kvmpy-fast", "kvmpy-slow", "kernel"], 6, 2000, 0)
    run_comparison(runner, c)
    assert list(c.tests) == ["ipi", "ipi_halt"]
    ipi = c.tests["ipi"]
    assert ipi.run_medians["kernel"] == [float(int(190000 * w)) for w in wobble]
    assert ipi.summaries["kvmpy-fast"].spread == pytest.approx(1.04 / 0.97, rel=1e-4)
    fs, fk = ipi.ratios
    assert fs.ci and fs.ci.ratio == pytest.approx(0.8, rel=1e-4)
    assert fs.verdict.startswith("native fastpath faster by 20.0%, 95% CI [")
    assert fk.verdict.startswith("kvmpy native fastpath slower by 152.6%, 95% CI [")
    out = io.StringIO()
    print_comparison(c, file=out)
    assert "fastpath faster by 20.0%" in out.getvalue()
    assert "ipi_halt" in out.getvalue()


# ---------------------------------------------------------------- the real thing


@pytest.mark.kvm
@pytest.mark.slow
def test_real_vmexit_flat_comparison() -> None:
    value = os.environ.get("KVMPY_KUT_DIR")
    if not value:
        pytest.skip("KVMPY_KUT_DIR is not set (point it at a built kvm-unit-tests tree)")
    if not (Path(value) / "x86" / "vmexit.flat").is_file():
        pytest.skip(f"{value}/x86/vmexit.flat is not built")
    r = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "vmexit", "--kut-dir", value, "--runs", "2",
         "--resamples", "500", "--json"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    data = json.loads(r.stdout)
    assert data["kind"] == "vmexit" and data["failures"] == [] and data["tsc_hz"] > 0
    assert list(data["tests"]) == ["ipi", "ipi_halt"]
    for name, t in data["tests"].items():
        for cfg in ("kvmpy-fast", "kvmpy-python", "kvmpy-slow", "kernel"):
            medians = t["configs"][cfg]["run_medians"]
            assert len(medians) == 2 and all(m > 0 for m in medians), (name, cfg)
        assert set(t["ratios"]) == {"fast/slow", "fast/python", "python/slow", "fast/kernel"}
        for ratio in t["ratios"].values():
            assert ratio["low"] <= ratio["high"] and ratio["verdict"]
