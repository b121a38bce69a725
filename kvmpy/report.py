"""Human-readable reports: the exit statistics table (like `perf kvm stat report`,
with a fastpath column)."""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.table import Table

from kvmpy.trace import ExitStats, exit_report


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}"


def exit_table(stats: ExitStats) -> Table:
    table = Table(title="VM exits (kvmpy handling time: KVM_RUN return to next entry)")
    for col in ("exit reason", "count", "fastpath", "total ms", "p50 us", "p99 us",
                "fast p50 us", "slow p50 us"):
        table.add_column(col, justify="left" if col == "exit reason" else "right")
    for row in exit_report(stats):
        table.add_row(
            row.reason, str(row.count), str(row.fast), f"{row.total_ns / 1e6:.2f}",
            _us(row.p50_ns), _us(row.p99_ns),
            _us(row.fast_p50_ns) if row.fast else "-",
            _us(row.slow_p50_ns) if row.count > row.fast else "-",
        )
    return table


def print_exit_table(stats: ExitStats, file: TextIO | None = None) -> None:
    console = Console(file=file, width=110)
    console.print(exit_table(stats))
    console.print(f"ICR writes: {stats.icr_fast} on the fastpath, {stats.icr_slow} on the "
                  f"slow path; delivery failures: {stats.delivery_failures}")
    if stats.kick_time.count or stats.wake_time.count:
        console.print(f"Kicks sent: {stats.kick_time.count} signals to vCPUs in the guest, "
                      f"{stats.wake_time.count} wake-ups of halted vCPUs")
    injected = stats.inject_sync + stats.inject_ioctl
    if injected:
        console.print(f"Interrupts injected: {injected}, {stats.inject_sync} by KVM_RUN itself "
                      f"(kvm_run.s.regs), {stats.inject_ioctl} by KVM_INTERRUPT")
    if stats.timer_clamped:
        console.print(f"APIC timer: {stats.timer_clamped} periodic count-downs clamped to "
                      "the minimum period (KVM's min_timer_period_us)")
    halts = stats.halt_poll_success + stats.halt_slept
    if halts:
        console.print(f"Halts: {halts}, {stats.halt_poll_success} ended while polling "
                      f"({100 * stats.halt_poll_success / halts:.0f}%), "
                      f"{stats.halt_slept} slept")
