"""`kvmpy bench vmexit`: kvm-unit-tests' x86/vmexit.flat, the seed's own benchmark.

Runs the user's build of vmexit.flat (kvm-unit-tests is never part of kvmpy) as its
runner would: `--cpus 2`, the environment `TEST_DEVICE=0 NR_CPUS=2` as the first
multiboot module, and the wanted tests as the command line (vmexit.c's main() runs
the tests named in argv, all of them when none is named). For each test vmexit.c's
do_test() doubles the iteration count until the loop takes 2^30 TSC cycles, then prints

    "%s %d\\n"            name, cycles per iteration   (the figure compared here)
    "  ipi %s %d\\n"      for ipi: the part spent in on_cpu() (not compared)
    "%s (skipped)\\n"     when the test's precondition fails (e.g. ipi on one CPU)

so one run gives one figure per test; the comparison takes many runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmpy.bench.compare import Runner, RunOutcome
from kvmpy.errors import KvmpyError

ENV = b"TEST_DEVICE=0\nNR_CPUS=2\n"
CPUS = 2
TIMEOUT = 600.0  # seconds per run; a run normally takes a few
_RESULT = re.compile(r"^([A-Za-z_][\w.-]*) (-?\d+)\r?$", re.M)
_SKIPPED = re.compile(r"^([A-Za-z_][\w.-]*) \(skipped\)\r?$", re.M)


@dataclass
class VmexitOutput:
    """What one vmexit.flat run printed: cycles per test, and the skipped tests."""

    cycles: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def parse_vmexit(text: str) -> VmexitOutput:
    """The "<name> <cycles>" and "<name> (skipped)" lines of vmexit.flat's output."""
    out = VmexitOutput()
    for name, value in _RESULT.findall(text):
        out.cycles[name] = int(value)
    out.skipped = _SKIPPED.findall(text)
    return out


def vmexit_flat(kut_dir: str | None) -> Path:
    """DIR/x86/vmexit.flat, or one clear error."""
    if not kut_dir:
        raise KvmpyError("bench vmexit needs --kut-dir DIR (a built kvm-unit-tests tree) "
                         "or KVMPY_KUT_DIR")
    flat = Path(kut_dir) / "x86" / "vmexit.flat"
    if not flat.is_file():
        raise KvmpyError(f"{flat}: no such file (build kvm-unit-tests there: "
                         "./configure && make)")
    return flat


def outcome(output: str, status: int, message: str, tests: list[str],
            tsc_hz: int = 0) -> RunOutcome:
    """A run counts when vmexit exited 0 (status 1) and printed every wanted test."""
    parsed = parse_vmexit(output)
    values = {t: [float(parsed.cycles[t])] for t in tests if parsed.cycles.get(t, 0) > 0}
    problems = []
    if status != 1:
        problems.append(message or f"exit status {status}")
    for t in tests:
        if t in parsed.skipped:
            problems.append(f"{t} skipped by vmexit")
        elif t not in parsed.cycles:
            problems.append(f"{t} not reported")
        elif parsed.cycles[t] <= 0:
            problems.append(f"{t} reported {parsed.cycles[t]} cycles")
    return RunOutcome(values, not problems, "; ".join(problems), tsc_hz)


def vmexit_runner(flat: Path, tests: list[str], timeout: float = TIMEOUT) -> Runner:
    """One in-process run of vmexit.flat per call, under the named configuration."""
    from kvmpy.bench.ipi import config_for
    from kvmpy.machine import Machine

    image = flat.read_bytes()
    for t in tests:
        if not re.fullmatch(r"[\w.-]+", t):
            raise KvmpyError(f"bad vmexit test name {t!r}")

    def run(cfg: str) -> RunOutcome:
        config = config_for(cfg, CPUS, " ".join(tests))
        config.initrd = ENV
        config.initrd_name = "env"
        with Machine(config) as machine:
            machine.load(image, name=str(flat))
            result = machine.run(timeout=timeout)
            text = config.serial.getvalue().decode(errors="replace")  # type: ignore[union-attr]
            return outcome(text, result.status, result.message, tests, machine.tsc_hz)

    return run
