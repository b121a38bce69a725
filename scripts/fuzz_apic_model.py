#!/usr/bin/env python3
"""Long run of the APIC model property machine (tests/test_apic_properties.py).

Runs ``ApicMachine`` -- 2-4 local APICs driven by a hostile guest, checked after every
step against an SDM shadow and ``kvmpy.apic.invariants.check_invariants`` -- for
``--cases`` random cases of up to ``--steps`` steps each, split over ``--jobs``
processes (each with its own random hypothesis seed; no example database). Prints cases,
steps, invariant checks, expected #GPs, unexpected exceptions and lost/invented
interrupts, and exits 1 on any failure (hypothesis prints the shrunk failing sequence).

    python scripts/fuzz_apic_model.py --cases 2000 --steps 100 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_machine():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import test_apic_properties

    return test_apic_properties.ApicMachine


def run_cases(cases: int, steps: int) -> tuple[Counter[str], str | None]:
    """Run ``cases`` cases in this process; return the totals and a failure, if any."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    machine = _load_machine()
    machine.TOTALS.clear()
    error = None
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=cases,
                stateful_step_count=steps,
                database=None,
                deadline=None,
                derandomize=False,
                suppress_health_check=list(HealthCheck),
            ),
        )
    except Exception:  # noqa: BLE001 - any failure is reported, counted and exits 1
        error = traceback.format_exc()
    return Counter(machine.TOTALS), error


def _worker(args: tuple[int, int]) -> tuple[Counter[str], str | None]:
    return run_cases(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=500, help="random cases in total")
    parser.add_argument("--steps", type=int, default=100, help="max steps per case")
    parser.add_argument("--jobs", type=int, default=1, help="processes (at most 2 here)")
    args = parser.parse_args(argv)
    jobs = max(1, min(args.jobs, args.cases))
    shares = [args.cases // jobs + (1 if k < args.cases % jobs else 0) for k in range(jobs)]
    start = time.monotonic()
    if jobs == 1:
        results = [run_cases(shares[0], args.steps)]
    else:
        with multiprocessing.Pool(jobs) as pool:
            results = pool.map(_worker, [(n, args.steps) for n in shares])
    elapsed = time.monotonic() - start

    totals: Counter[str] = Counter()
    errors = []
    for counts, error in results:
        totals.update(counts)
        if error:
            errors.append(error)
    for error in errors:
        print(error, file=sys.stderr)
    exceptions = len(errors)
    lost, invented = totals["lost"], totals["invented"]
    print(f"apic model fuzz: {jobs} process(es), {elapsed:.0f} s")
    print(f"cases run:          {totals['cases']}")
    print(f"steps run:          {totals['steps']}")
    print(f"invariants checked: {totals['invariant_checks']} (APIC-steps, each the full set)")
    print(f"expected #GPs:      {totals['gp']}")
    print(f"IPIs sent:          {totals['ipis']} (lowest-priority {totals['lowest_priority']})")
    print(f"interrupts acked:   {totals['acked']}; timer expiries {totals['timer_expired']}")
    print(f"exceptions:         {exceptions}")
    print(f"lost interrupts:    {lost}")
    print(f"invented interrupts: {invented}")
    per_rule = sorted((k[5:], v) for k, v in totals.items() if k.startswith("step_"))
    print("steps by rule:      " + ", ".join(f"{k} {v}" for k, v in per_rule))
    failed = exceptions or lost or invented
    print("RESULT: FAIL" if failed else "RESULT: PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
