"""Exit statistics: per exit reason, count, fastpath completions and kvmpy's handling time.

Handling time is kvmpy's own share of an exit: from KVM_RUN returning to the next
KVM_RUN entry, recorded per reason and per path (fastpath / slow path) into log-linear
histograms (8 sub-buckets per power of two, so percentiles are within ~12%). Each vCPU
thread owns its `ExitStats`; nothing is shared, so recording takes no lock and
allocates nothing (list item increments on preallocated lists).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmpy.kvm.ioctls import EXIT_REASON_NAMES

MAX_REASON = 64
SUB_BITS = 3
SUB = 1 << SUB_BITS
NBUCKETS = 64 * SUB
MAX_MSR_KEYS = 256


def bucket_of(ns: int) -> int:
    """Log-linear bucket index of a duration in ns."""
    bl = ns.bit_length()
    if bl <= SUB_BITS:
        return ns
    return ((bl - SUB_BITS) << SUB_BITS) | ((ns >> (bl - SUB_BITS - 1)) & (SUB - 1))


def bucket_floor(index: int) -> int:
    """The smallest duration that falls into bucket `index`."""
    if index < SUB:
        return index
    shift = (index >> SUB_BITS) + SUB_BITS - 1 - SUB_BITS
    return (SUB | (index & (SUB - 1))) << shift


class Histogram:
    """A log-linear histogram of durations (ns)."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * NBUCKETS
        self.count = 0
        self.total = 0

    def add(self, ns: int) -> None:
        self.buckets[bucket_of(ns)] += 1
        self.count += 1
        self.total += ns

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.buckets):
            if n:
                self.buckets[i] += n
        self.count += other.count
        self.total += other.total

    def percentile(self, p: float) -> int:
        """The middle of the bucket holding the p-th percentile (0 if empty): within
        about 6% of the true value."""
        if not self.count:
            return 0
        rank = max(1, round(self.count * p / 100.0))
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return (bucket_floor(i) + bucket_floor(i + 1)) // 2
        return bucket_floor(NBUCKETS - 1)


class ExitStats:
    """One vCPU's exit statistics. `fast[r]` counts exits of reason r completed on the
    fastpath (REENTER_GUEST, never reaching the slow dispatch)."""

    def __init__(self, record_time: bool = True) -> None:
        self.record_time = record_time
        self.count = [0] * MAX_REASON
        self.fast = [0] * MAX_REASON
        self.fast_time = [Histogram() for _ in range(MAX_REASON)]
        self.slow_time = [Histogram() for _ in range(MAX_REASON)]
        # Slow-path MSR accesses by index (reads as ("rd", index)). The guest picks the
        # index, so the table is bounded: past MAX_MSR_KEYS distinct ones, "other".
        self.msr_accesses: dict[tuple[str, int] | str, int] = {}
        self.delivery_failures = 0
        # ICR writes (x2APIC ICR and SELF_IPI MSRs, xAPIC ICR-low MMIO) completed on the
        # fastpath, and ICR writes that reached the slow path (with the fastpath on:
        # only the ones it refused, which the slow path answers with #GP).
        self.icr_fast = 0
        self.icr_slow = 0
        self.icr_fast_time = Histogram()  # handling time of ICR-write exits, per path
        self.icr_slow_time = Histogram()
        # A sender's pthread_kill of this (in-guest) vCPU, and its wake-up of this
        # (blocked) vCPU. A kick that exit handling posts is sent at the sender's next
        # entry, so it is timed here and not in the exit's handling time.
        self.kick_time = Histogram()
        self.wake_time = Histogram()
        self.smi_dropped = 0
        self.invalid_opcodes = 0  # emulation failures on no instruction: #UD injected
        # Halts: how many ended inside the polling window (no sleep), how many slept.
        self.halt_poll_success = 0
        self.halt_slept = 0
        # Interrupts queued for the next entry: by KVM_RUN itself (kvm_run.s.regs, the
        # native core's kvm_queue_interrupt) or by a KVM_INTERRUPT ioctl.
        self.inject_sync = 0
        self.inject_ioctl = 0
        # Periodic APIC timer periods clamped to the minimum (KVM's min_timer_period_us).
        self.timer_clamped = 0

    def count_msr(self, op: str, index: int) -> None:
        table = self.msr_accesses
        key: tuple[str, int] | str = (op, index)
        if key not in table and len(table) >= MAX_MSR_KEYS:
            key = "other"
        table[key] = table.get(key, 0) + 1

    def merge(self, other: ExitStats) -> None:
        for r in range(MAX_REASON):
            self.count[r] += other.count[r]
            self.fast[r] += other.fast[r]
            self.fast_time[r].merge(other.fast_time[r])
            self.slow_time[r].merge(other.slow_time[r])
        for k, v in other.msr_accesses.items():
            if k not in self.msr_accesses and len(self.msr_accesses) >= MAX_MSR_KEYS:
                k = "other"
            self.msr_accesses[k] = self.msr_accesses.get(k, 0) + v
        self.delivery_failures += other.delivery_failures
        self.icr_fast += other.icr_fast
        self.icr_slow += other.icr_slow
        self.icr_fast_time.merge(other.icr_fast_time)
        self.icr_slow_time.merge(other.icr_slow_time)
        self.kick_time.merge(other.kick_time)
        self.wake_time.merge(other.wake_time)
        self.smi_dropped += other.smi_dropped
        self.invalid_opcodes += other.invalid_opcodes
        self.halt_poll_success += other.halt_poll_success
        self.halt_slept += other.halt_slept
        self.inject_sync += other.inject_sync
        self.inject_ioctl += other.inject_ioctl
        self.timer_clamped += other.timer_clamped


@dataclass(frozen=True)
class ExitRow:
    """One line of an exit report."""

    reason: str
    count: int
    fast: int
    total_ns: int
    p50_ns: int
    p99_ns: int
    fast_p50_ns: int
    slow_p50_ns: int


def exit_report(stats: ExitStats) -> list[ExitRow]:
    """Rows per exit reason, most frequent first."""
    rows = []
    for r in range(MAX_REASON):
        if not stats.count[r]:
            continue
        both = Histogram()
        both.merge(stats.fast_time[r])
        both.merge(stats.slow_time[r])
        rows.append(
            ExitRow(
                reason=EXIT_REASON_NAMES.get(r, f"reason {r}"),
                count=stats.count[r],
                fast=stats.fast[r],
                total_ns=both.total,
                p50_ns=both.percentile(50),
                p99_ns=both.percentile(99),
                fast_p50_ns=stats.fast_time[r].percentile(50),
                slow_p50_ns=stats.slow_time[r].percentile(50),
            )
        )
    rows.sort(key=lambda row: -row.count)
    return rows
