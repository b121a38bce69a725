"""kvmpy.bench.compare: alternation, run medians, ratios and report, with a fake runner;
then `kvmpy bench ipi --compare` end to end on a tiny run (structure only, no speed)."""

from __future__ import annotations

import io
import json
import random

import pytest

from kvmpy.bench.compare import (
    CONFIGS,
    Comparison,
    RunOutcome,
    print_comparison,
    rotated,
    run_comparison,
)
from kvmpy.cli import main

# True per-config medians of the fake guest, in cycles: the fastpath is 20% faster than
# the slow path and twice the in-kernel APIC on "vmexit_ipi"; "same" is identical.
TRUE = {"vmexit_ipi": {"kvmpy-fast": 800.0, "kvmpy-slow": 1000.0, "kernel": 400.0},
        "same": {"kvmpy-fast": 500.0, "kvmpy-slow": 500.0, "kernel": 500.0}}


class FakeGuest:
    """Per run: 31 samples per test around that run's level (lognormal run-to-run)."""

    def __init__(self, seed: int = 5, fail_on: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, cfg: str) -> RunOutcome:
        self.calls.append(cfg)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            return RunOutcome({"vmexit_ipi": [1.0]}, False, "guest hung", 2_000_000_000)
        values = {}
        for test, per in TRUE.items():
            level = per[cfg] * self.rng.lognormvariate(0, 0.05)
            values[test] = [level * (1 + 0.01 * (i - 15)) for i in range(31)]
        return RunOutcome(values, True, "", 2_000_000_000)


# The three configurations these tests alternate (CONFIGS adds kvmpy-python).
THREE = ["kvmpy-fast", "kvmpy-slow", "kernel"]


def comparison(configs: list[str] | None = None, runs: int = 12) -> Comparison:
    return Comparison("ipi", "fake guest", "fake", configs or THREE, runs, 2000, 1)


def test_rotated_rounds() -> None:
    assert rotated(THREE, 0) == THREE
    assert rotated(THREE, 1) == ["kvmpy-slow", "kernel", "kvmpy-fast"]
    assert rotated(THREE, 5) == ["kernel", "kvmpy-fast", "kvmpy-slow"]
    assert rotated(CONFIGS, 1) == ["kvmpy-python", "kvmpy-slow", "kernel", "kvmpy-fast"]


def test_runs_alternate_and_each_run_gives_one_median_per_test_and_config() -> None:
    guest = FakeGuest()
    steps: list[str] = []
    c = run_comparison(guest, comparison(runs=4), progress=steps.append)
    assert guest.calls == c.order == [
        "kvmpy-fast", "kvmpy-slow", "kernel", "kvmpy-slow", "kernel", "kvmpy-fast",
        "kernel", "kvmpy-fast", "kvmpy-slow", "kvmpy-fast", "kvmpy-slow", "kernel"]
    assert steps[0] == "run 1/4 kvmpy-fast" and len(steps) == 12
    assert list(c.tests) == ["vmexit_ipi", "same"]  # whatever the guest reports, its order
    for test in c.tests.values():
        assert all(len(test.run_medians[cfg]) == 4 for cfg in THREE)
    assert c.tsc_hz == 2_000_000_000 and c.us(2000) == 1.0


def test_known_differences_get_the_right_verdicts() -> None:
    c = run_comparison(FakeGuest(), comparison())
    t = c.tests["vmexit_ipi"]
    assert t.summaries["kvmpy-slow"].median == pytest.approx(1000, rel=0.06)
    assert 1 <= t.summaries["kernel"].spread < 1.3
    fs, fk = t.ratios
    assert (fs.label, fs.a, fs.b) == ("fast/slow", "kvmpy-fast", "kvmpy-slow")
    assert fs.ci and fs.ci.low <= 0.8 <= fs.ci.high and fs.ci.high < 1
    assert fs.verdict.startswith("native fastpath faster by ")
    assert fk.ci and fk.ci.low <= 2.0 <= fk.ci.high
    assert fk.verdict.startswith("kvmpy native fastpath slower by ")
    same = c.tests["same"].ratios
    assert all(r.verdict.startswith("no significant difference") for r in same)
    assert "not reliable" not in fs.verdict


def test_failed_runs_are_reported_and_left_out() -> None:
    c = run_comparison(FakeGuest(fail_on=2), comparison(runs=3))
    assert c.failures == ["run 1 kvmpy-slow: guest hung"]
    runs = c.tests["vmexit_ipi"].run_medians
    assert (len(runs["kvmpy-fast"]), len(runs["kvmpy-slow"]), len(runs["kernel"])) == (3, 2, 3)
    assert all("not reliable" in r.verdict for r in c.tests["vmexit_ipi"].ratios)


def test_too_few_runs_and_missing_configs() -> None:
    c = run_comparison(FakeGuest(fail_on=1), comparison(["kvmpy-fast", "kvmpy-slow"], runs=2))
    (r,) = c.tests["vmexit_ipi"].ratios  # no kernel: no fast/kernel ratio
    assert r.ci is None and r.verdict == "too few runs for an interval (1 and 2)"


def test_json_and_report_carry_every_figure() -> None:
    c = run_comparison(FakeGuest(), comparison(runs=6))
    data = json.loads(json.dumps(c.to_json()))
    assert data["order"] == c.order and data["failures"] == []
    cell = data["tests"]["vmexit_ipi"]["configs"]["kernel"]
    assert cell["run_medians"] == c.tests["vmexit_ipi"].run_medians["kernel"]
    assert cell["median_us"] == pytest.approx(cell["median"] / 2000)
    ratio = data["tests"]["vmexit_ipi"]["ratios"]["fast/slow"]
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"] and ratio["significant"] is True
    out = io.StringIO()
    print_comparison(c, file=out)
    text = out.getvalue()
    assert "vmexit_ipi" in text and "fast/kernel" in text and "spread" in text
    assert c.tests["vmexit_ipi"].ratios[0].verdict in text
    assert "no significant difference" in text


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, message", [
    (["bench", "ipi", "--compare", "--runs", "1"], "--runs must be at least 2"),
    (["bench", "ipi", "--compare", "--scale"], "does not combine with --scale"),
    (["bench", "ipi", "--compare", "--plot", "x.png"], "does not combine with --scale or --plot"),
    (["bench", "ipi", "--compare", "--resamples", "10"], "--resamples must be at least"),
    (["bench", "vmexit"], "needs --kut-dir"),
    (["bench", "vmexit", "--kut-dir", "/nonexistent"], "vmexit.flat: no such file"),
])
def test_bad_command_lines_give_one_line_and_status_2(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMPY_KUT_DIR", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.kvm
def test_ipi_compare_json_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ipi", "--compare", "--runs", "2", "--n", "5", "--configs",
                 "kvmpy-fast", "kernel", "--resamples", "200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "ipi" and data["failures"] == [] and data["tsc_hz"] > 0
    assert data["order"] == ["kvmpy-fast", "kernel", "kernel", "kvmpy-fast"]
    assert data["tests"], data
    for name, t in data["tests"].items():
        for cfg in ("kvmpy-fast", "kernel"):
            medians = t["configs"][cfg]["run_medians"]
            assert len(medians) == 2 and all(m > 0 for m in medians), (name, cfg)
        assert list(t["ratios"]) == ["fast/kernel"], name
        assert t["ratios"]["fast/kernel"]["ratio"] > 0


def test_combined_runner_names_each_guests_tests_and_fails_if_one_fails():
    from kvmpy.bench.compare import RunOutcome, combined_runner

    calls = []

    def guest(name: str, ok: bool):
        def run(cfg: str) -> RunOutcome:
            calls.append((name, cfg))
            return RunOutcome({"ipi": [1.0, 2.0]}, ok, "" if ok else "boom", 2_000_000_000)
        return run

    run = combined_runner([("vmexit.flat", guest("a", True)), ("ipi_bench", guest("b", True))])
    out = run("kvmpy-fast")
    assert out.ok and set(out.values) == {"vmexit.flat ipi", "ipi_bench ipi"}
    assert calls == [("a", "kvmpy-fast"), ("b", "kvmpy-fast")]
    bad = combined_runner([("x", guest("a", True)), ("y", guest("b", False))])("kernel")
    assert not bad.ok and bad.message == "y: boom"
