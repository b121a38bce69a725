"""`kvmpy bench ipi`: structure and sanity of a small three-way run (no speed asserted)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvmpy.bench.ipi import (
    CONFIGS,
    SCALE_TESTS,
    TWO_CPU_TESTS,
    bench_ipi,
    plot_report,
    print_report,
)
from kvmpy.cli import main

pytestmark = pytest.mark.kvm


def test_three_way_run_has_every_test_for_every_config(tmp_path: Path) -> None:
    steps: list[str] = []
    result = bench_ipi(n=20, rounds=1, progress=steps.append)
    assert result.failures == []
    assert len(steps) == len(CONFIGS)
    assert result.tsc_hz > 0 and result.backend
    assert list(result.cycles) == list(TWO_CPU_TESTS)
    for test, per in result.cycles.items():
        assert set(per) == set(CONFIGS), test
        for cfg, s in per.items():
            assert s.n == 20, (test, cfg)
            assert 0 < s.min <= s.p50 <= s.p90 <= s.p99 <= s.max, (test, cfg)
    # kvmpy's own handling times come from the same runs: the fastpath config handled
    # every ICR write on the fastpath and the slow one on the slow path.
    assert result.handling["kvmpy-fast"]["icr_fast"]["n"] > 0
    # The native fastpath hands INIT and SIPI (SMP bring-up: one INIT, two SIPIs) to
    # Python; every fixed IPI stays on it.
    assert result.handling["kvmpy-fast"]["icr_slow"]["n"] <= 3
    assert result.handling["kvmpy-slow"]["icr_fast"]["n"] == 0
    assert result.handling["kvmpy-slow"]["icr_slow"]["n"] > 0
    data = json.loads(json.dumps(result.to_json()))
    assert set(data["tests"]["rt"]) == set(CONFIGS)
    out = io.StringIO()
    print_report(result, file=out)
    assert "kvmpy-fast" in out.getvalue() and "fast/slow" in out.getvalue()
    png = tmp_path / "bench.png"
    plot_report(result, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_run_reports_per_target_costs() -> None:
    result = bench_ipi(n=10, rounds=1, configs=["kvmpy-fast"], scale_cpus=[2, 3])
    assert result.failures == []
    assert set(result.cycles) == {f"{t}@{c}" for t in SCALE_TESTS for c in (2, 3)}


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ipi", "--n", "10", "--rounds", "1", "--configs", "kernel",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] and set(data["tests"]) == set(TWO_CPU_TESTS)
