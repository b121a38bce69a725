"""docs/hacking.md, run: its commands, on a small scale, print what the tutorial says.

Everything runs in a scratch repository holding this tree as branch `main`
(conftest.snapshot_repo), with the example patches applied as the tutorial does; `kvmpy X`
is run as `python -m kvmpy X` from that repository, so its code is the code under test.
Only what is deterministic is checked: the guest's own counts, the kicks the trace counts,
that the patches apply, build and pass the tests the tutorial names, and that `bench ab`
gives a verdict. Never a speed: that is what `bench ab` is for, not a timed test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot_repo

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "hacking.md").read_text()
PY_PATCH = "examples/skip-kick-if-pending.patch"
C_PATCH = "examples/skip-kick-if-pending-native.patch"
PY_FILES = {"kvmpy/apic/bus.py", "kvmpy/apic/lapic.py", "tests/test_apic_properties.py",
            "tests/test_apic_routing.py"}

# The tutorial's commands, as it prints them.
BUILD = "python setup.py build_ext --inplace"
RUN_PY = "kvmpy run ipi_coalesce --cpus 2 --fastpath python --stat"
TRACE_BEFORE = "kvmpy run ipi_coalesce --cpus 2 --fastpath python --trace before.json"
SUMMARY_BEFORE = "kvmpy trace summary before.json"
APPLY_PY = f"git apply {PY_PATCH}"
TESTS_PY = ("python -m pytest -q -m \"not slow\" tests/test_apic_routing.py "
            "tests/test_apic_properties.py tests/test_fastpath.py tests/test_ipi_stress.py")
TRACE_AFTER = "kvmpy run ipi_coalesce --cpus 2 --fastpath python --trace after.json"
SUMMARY_AFTER = "kvmpy trace summary after.json"
AB = "kvmpy bench ab --base main --guest ipi_coalesce --figure 'burst_send (\\d+)' --unit cycles"
AB_PY = f"{AB} --append n=500 --run-args '--fastpath python'"
APPLY_C = f"git apply {C_PATCH}"
TESTS_C = ("python -m pytest -q -m \"not slow\" tests/test_kick_model.py "
           "tests/test_native_differential.py tests/test_apic_guests.py tests/test_ipi_stress.py")
RUN_C = "kvmpy run ipi_coalesce --cpus 2 --stat"
AB_C = f"{AB} --append n=500"
AB_SEED = "kvmpy bench ab --base main --ipi-bench 200 --tests vmexit_ipi vmexit_ipi_halt"
COMMANDS = (BUILD, RUN_PY, TRACE_BEFORE, SUMMARY_BEFORE, APPLY_PY, TESTS_PY, TRACE_AFTER,
            SUMMARY_AFTER, AB_PY, APPLY_C, TESTS_C, RUN_C, AB_C, AB_SEED)

GUEST_LINES = ("ipi_coalesce: cpus=2 mode=x2apic target=irqoff n=50 burst=4",
               "ipi_coalesce: sent 200 received 50 merged 150", "ipi_coalesce: ok")
MERGED = ("ipi_coalesce: 50 interrupts (50 with a complete flow), 150 IPIs merged into a "
          "pending one")
# Kicks with the skip: one per burst (50), plus CPU 1's INIT and two SIPIs, plus the VM's
# stop (Core_stop kicks every vCPU, once at the guest's exit and once when the threads
# end; only CPU 1 can be in the guest then).
MAX_SIGNALS_AFTER = 50 + 3 + 2
VERDICT = re.compile(r"the change is (faster|slower) by [\d.]+%, 95% CI|no significant "
                     r"difference \(95% CI")

pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("gcc") is None,
                                reason="needs git and gcc")


def sh(repo: Path, command: str, *extra: str,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A tutorial command in `repo`: `kvmpy ...` as `python -m kvmpy ...`."""
    argv = shlex.split(command) + list(extra)
    if argv[0] == "kvmpy":
        argv = [sys.executable, "-m", "kvmpy", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env=env)


def ok(r: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert r.returncode == code, (r.args, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def signals(stderr: str) -> int:
    """`--stat`'s count of kick signals sent."""
    m = re.search(r"^Kicks sent: (\d+) signals to vCPUs in the guest, \d+ wake-ups of halted "
                  r"vCPUs$", stderr, re.M)
    assert m, stderr
    return int(m.group(1))


def guest_run(repo: Path, command: str) -> subprocess.CompletedProcess[str]:
    """The guest's run: exit status 1 (its exit code 0) and the counts the tutorial shows."""
    r = sh(repo, command)
    out = ok(r, 1)
    for line in GUEST_LINES:
        assert line in out and line in DOC, line
    assert re.search(r"^ipi_coalesce: median burst_send \d+$", out, re.M)
    return r


def trace_kicks(repo: Path, run: str, summary: str) -> int:
    """Trace a run, summarize it: the interrupts merged as the tutorial says, and the
    trace's count of kicks (every kick call, however it found its target)."""
    ok(sh(repo, run), 1)
    out = ok(sh(repo, summary))
    assert MERGED in out and MERGED in DOC
    m = re.search(r"^Kicks: (\d+) \(\d+ signals to vCPUs in the guest, \d+ wake-ups of halted "
                  r"vCPUs, \d+ to vCPUs outside the guest, \d+ self\)$", out, re.M)
    assert m, out
    return int(m.group(1))


def verdicts(stdout: str, tests: set[str]) -> dict[str, object]:
    """`bench ab --json`: one work/base verdict per test, with its interval."""
    data = json.loads(stdout)
    assert set(data["tests"]) == tests
    for name in tests:
        ratio = data["tests"][name]["ratios"]["work/base"]
        assert {"ratio", "low", "high", "significant", "verdict"} <= set(ratio), ratio
        assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
        assert VERDICT.match(ratio["verdict"]), ratio["verdict"]
    assert data["base"]["describe"].startswith("main = ")
    return data


def test_the_tutorial_shows_its_commands() -> None:
    for command in COMMANDS:
        assert command in DOC, command
    assert "[native-core.md](native-core.md" in DOC
    assert 200 <= len(DOC.splitlines()) <= 260


def test_the_patches_apply_build_and_their_tests_pass(tmp_path: Path) -> None:
    """Both patches apply to this tree, the C builds, and the tests they add pass (the
    direct tests of the rule on both sides, and the kick model's new checks and quotes)."""
    repo = snapshot_repo(tmp_path / "repo")
    ok(sh(repo, APPLY_PY))
    ok(sh(repo, APPLY_C))
    ok(sh(repo, BUILD))
    out = ok(sh(repo, "python -m pytest -q -p no:cacheprovider tests/test_apic_routing.py "
                      "tests/test_kick_model.py -k", "merges or one_atomic or quote or order"))
    assert re.search(r"^\d+ passed", out.splitlines()[-1]), out


@pytest.mark.kvm
def test_the_tutorial_end_to_end_on_a_small_scale(tmp_path: Path) -> None:
    repo = snapshot_repo(tmp_path / "repo")
    ok(sh(repo, BUILD))  # the core is not tracked: scripts/setup.sh builds it in a clone

    # 4. the guest and its kicks, before the change
    signals(guest_run(repo, RUN_PY).stderr)  # about 200, as the IPIs find CPU 1
    assert trace_kicks(repo, TRACE_BEFORE, SUMMARY_BEFORE) == 203 and "Kicks: 203 (" in DOC

    # 5. the prototype: one kick per burst, the same counts
    ok(sh(repo, APPLY_PY))
    assert signals(guest_run(repo, RUN_PY).stderr) <= MAX_SIGNALS_AFTER
    assert "Kicks sent: 52 signals" in DOC

    # 7. the trace, then bench ab against main: 2 rounds of 10 bursts
    assert trace_kicks(repo, TRACE_AFTER, SUMMARY_AFTER) == 53 and "Kicks: 53 (" in DOC
    r = sh(repo, AB_PY, "--runs", "2", "--append", "n=10", "--resamples", "500", "--json")
    data = verdicts(ok(r), {"burst_send"})
    assert data["run_args"] == ["--fastpath", "python"] and data["source"] == "ipi_coalesce n=10"
    assert set(data["work"]["changed_files"]) == PY_FILES | {"before.json", "after.json"}
    assert "+ uncommitted changes in 6 files" in DOC

    # 8. the port: the default native fastpath now skips the kick too
    ok(sh(repo, APPLY_C))
    ok(sh(repo, BUILD))
    r = guest_run(repo, RUN_C)
    line = "ICR writes: 200 on the fastpath, 3 on the slow path; delivery failures: 0"
    assert line in r.stderr and line in DOC
    assert signals(r.stderr) <= MAX_SIGNALS_AFTER
    native = tmp_path / "native.json"  # the core's own ring records the kicks
    assert trace_kicks(repo, f"kvmpy run ipi_coalesce --cpus 2 --trace {native}",
                       f"kvmpy trace summary {native}") == 53


@pytest.mark.slow
@pytest.mark.kvm
def test_the_tutorial_at_full_scale(tmp_path: Path) -> None:
    """The tests the tutorial names, with each patch, and its three bench ab runs at
    full size: each gives a verdict (which one is the machine's business)."""
    repo = snapshot_repo(tmp_path / "repo")
    ok(sh(repo, BUILD))
    ok(sh(repo, APPLY_PY))
    ok(sh(repo, TESTS_PY, "-p", "no:cacheprovider", timeout=900))
    verdicts(ok(sh(repo, AB_PY, "--json", timeout=900)), {"burst_send"})
    ok(sh(repo, APPLY_C))
    ok(sh(repo, BUILD))
    ok(sh(repo, TESTS_C, "-p", "no:cacheprovider", timeout=900))
    verdicts(ok(sh(repo, AB_C, "--json", timeout=900)), {"burst_send"})
    verdicts(ok(sh(repo, AB_SEED, "--json", timeout=900)), {"vmexit_ipi", "vmexit_ipi_halt"})
