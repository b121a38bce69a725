"""The IPI stress run: random IPIs between all vCPUs, with exact counts checked.

`python -m kvmpy.stress --cpus 4 8 --ipis 1000000` runs the bundled `ipi_stress` guest
(guest/ipi_stress.c) with the fastpath on and off, and prints, per run, the ICR writes,
the interrupts delivered, lost and invented interrupts (both must be 0: the guest
counts every (target, vector) exactly, see its header), how many ICR writes completed
on the fastpath, and the time taken. Exit status 0 only if every run was exact.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from dataclasses import dataclass

from kvmpy.guestbuild import build_guest
from kvmpy.machine import Machine, MachineConfig

_FIELD = re.compile(r"(\w+)=(\d+)")


@dataclass(frozen=True)
class StressResult:
    cpus: int
    mode: str
    fastpath: bool | str
    ipis: int
    status: int
    message: str
    icr_writes: int
    deliveries: int
    lost: int
    invented: int
    per_cpu: tuple[int, ...]
    icr_fast: int
    icr_slow: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return (self.status == 1 and "ipi_stress: ok" in self.output
                and self.lost == 0 and self.invented == 0)


def run_stress(cpus: int, ipis: int, *, fastpath: bool | str = True, mode: str = "x2apic",
               seed: int = 1, hlt: bool = False, timeout: float = 600) -> StressResult:
    """One run of the ipi_stress guest; parses what it printed."""
    out = io.BytesIO()
    cmdline = f"ipis={ipis} seed={seed} mode={mode} cpus={cpus} hlt={int(hlt)}"
    config = MachineConfig(cpus=cpus, memory=64 << 20, cmdline=cmdline, serial=out,
                           fastpath=fastpath)
    t0 = time.monotonic()
    with Machine(config) as machine:
        machine.load(build_guest("ipi_stress").read_bytes(), name="ipi_stress")
        result = machine.run(timeout=timeout)
    seconds = time.monotonic() - t0
    text = out.getvalue().decode(errors="replace")
    fields: dict[str, int] = {}
    per_cpu: list[int] = []
    for line in text.splitlines():
        if line.startswith("ipi_stress: cpu ") and " received " in line:
            per_cpu.append(int(line.rsplit(" ", 1)[1]))
        elif line.startswith("ipi_stress:"):
            fields.update((k, int(v)) for k, v in _FIELD.findall(line))
    return StressResult(
        cpus=cpus, mode=mode, fastpath=fastpath, ipis=ipis, status=result.status,
        message=result.message, icr_writes=fields.get("icr_writes", 0),
        deliveries=fields.get("deliveries", 0), lost=fields.get("lost", -1),
        invented=fields.get("invented", -1), per_cpu=tuple(per_cpu),
        icr_fast=result.stats.icr_fast, icr_slow=result.stats.icr_slow,
        seconds=seconds, output=text,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmpy.stress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, nargs="+", default=[4, 8])
    p.add_argument("--ipis", type=int, default=1_000_000,
                   help="ICR writes per run, split across the vCPUs (default 10^6)")
    p.add_argument("--mode", choices=("x2apic", "xapic"), default="x2apic")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--paths", choices=("both", "all", "fast", "native", "python", "slow",
                                       "off"), default="both",
                   help="fastpath settings to run: both = native and off (fast = native, "
                   "slow = off), all = native, python and off")
    p.add_argument("--timeout", type=float, default=7200)
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    paths = {"both": ("native", "off"), "all": ("native", "python", "off"),
             "fast": ("native",), "native": ("native",), "python": ("python",),
             "slow": ("off",), "off": ("off",)}[args.paths]
    table = Table(title=f"ipi_stress ({args.mode}, seed {args.seed})")
    for col in ("vCPUs", "path", "ICR writes", "delivered", "lost", "invented",
                "ICR on fastpath", "ICR on slow path", "seconds", "result"):
        table.add_column(col, justify="right")
    all_ok = True
    for cpus in args.cpus:
        for fastpath in paths:
            r = run_stress(cpus, args.ipis, fastpath=fastpath, mode=args.mode,
                           seed=args.seed, timeout=args.timeout)
            all_ok &= r.ok
            table.add_row(str(cpus), fastpath, str(r.icr_writes),
                          str(r.deliveries), str(r.lost), str(r.invented), str(r.icr_fast),
                          str(r.icr_slow), f"{r.seconds:.1f}",
                          "ok" if r.ok else f"FAILED: {r.message}")
    Console(width=120).print(table)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
