"""`kvmpy trace summary FILE.json`: where the time went, from a trace alone.

Per-interrupt latency by hop, from the ``irq`` instants the exporter writes (one per
injected interrupt, its args holding the time of each hop), as p50/p99 over the
interrupts that took the hop; and per vCPU, the time in each state (in the guest, exit
handling on the fastpath or the slow path, the loop top, halted, waiting for SIPI) and
the exits that cost the most, from the state slices; and the kicks, by how the kicker
found its target (the ``kick`` instants).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kvmpy.errors import KvmpyError

from .export import FORMAT, KICK_NAMES, PID

# (label, sources it applies to, from, to). Times are the Interrupt fields.
HOPS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("send -> inject", ("ipi", "self"), "t_send", "t_inject"),
    ("inject -> EOI", ("ipi", "self", "timer"), "t_inject", "t_eoi"),
    ("send -> EOI", ("ipi", "self"), "t_send", "t_eoi"),
    ("send -> kick (sender)", ("ipi",), "t_send", "t_kick"),
    ("kick -> target exit (signal)", ("ipi", "timer"), "t_kick", "t_kick_exit"),
    ("send -> wake (halted target)", ("ipi",), "t_send", "t_wake"),
    ("wake -> inject", ("ipi", "timer"), "t_wake", "t_inject"),
    ("inject -> entry", ("ipi", "self", "timer"), "t_inject", "t_entry"),
    ("entry -> handler's first exit", ("ipi", "self", "timer"), "t_entry", "t_first_exit"),
    ("timer deadline -> IRR", ("timer",), "t_deadline", "t_send"),
    ("timer thread fire -> IRR", ("timer",), "t_fire", "t_send"),
    ("timer IRR -> inject", ("timer",), "t_send", "t_inject"),
)
STATE_ORDER = ("guest", "exit.fast", "exit.slow", "loop", "blocked")
KICK_HOWS = tuple(KICK_NAMES.values())  # "request only", "signal", "wake", "self"


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Dist:
    """A distribution of durations (us)."""

    label: str
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    def row(self) -> dict[str, float | int | str]:
        v = sorted(self.values)
        return {"label": self.label, "n": len(v), "p50_us": percentile(v, 50),
                "p99_us": percentile(v, 99), "mean_us": statistics.fmean(v) if v else 0.0,
                "max_us": v[-1] if v else 0.0, "total_us": sum(v)}


@dataclass
class Summary:
    title: str
    other: dict[str, object]
    hops: list[Dist]
    states: dict[str, dict[str, float]]  # vCPU name -> state category -> total us
    exits: list[Dist]  # per exit name (with path), across vCPUs
    counts: dict[str, int]
    by_vector: dict[str, Dist]  # "vCPU 1 0x50" -> send -> EOI (or inject -> EOI)

    def to_json(self) -> dict[str, object]:
        return {"title": self.title, "counts": self.counts,
                "hops": [d.row() for d in self.hops],
                "states_us": self.states,
                "exits": [d.row() for d in self.exits],
                "by_vector": [d.row() for d in self.by_vector.values()],
                "clock": self.other.get("clock")}


def load(path: Path) -> dict[str, object]:
    """Read a trace; one clear error for a file that is missing or not a kvmpy trace."""
    try:
        with path.open() as f:
            trace = json.load(f)
    except FileNotFoundError:
        raise KvmpyError(f"trace {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KvmpyError(f"trace {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise KvmpyError(f"trace {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise KvmpyError(f"trace {path}: not a trace-event JSON object (no traceEvents)")
    other = trace.get("otherData")
    if not isinstance(other, dict) or other.get("format") != FORMAT:
        raise KvmpyError(f"trace {path}: not written by `kvmpy run --trace` "
                         f"(otherData.format is not {FORMAT!r})")
    return trace


def summarize(trace: dict[str, object]) -> Summary:
    other = trace["otherData"]
    assert isinstance(other, dict)
    events = trace["traceEvents"]
    assert isinstance(events, list)
    names: dict[int, str] = {}
    irqs: list[dict[str, object]] = []
    states: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    exits: dict[str, Dist] = {}
    vcpus = int(other.get("vcpus", 0))
    kicks: dict[str, int] = defaultdict(int)  # how -> count ("" when not recorded)
    for ev in events:
        ph = ev.get("ph")
        if ph == "M" and ev.get("name") == "thread_name":
            names[ev["tid"]] = ev["args"]["name"]
        elif ph == "i" and ev.get("cat") == "irq":
            irqs.append(ev["args"])
        elif ph == "i" and ev.get("cat") == "kick":
            kicks[str((ev.get("args") or {}).get("how", ""))] += 1
        elif ph == "X" and ev.get("pid") == PID and 1 <= ev.get("tid", 0) <= vcpus:
            cat = str(ev.get("cat", ""))
            key = "blocked" if cat == "blocked" else cat
            states[f"vCPU {ev['tid'] - 1}"][key] += float(ev["dur"])
            if cat.startswith("exit"):
                d = exits.setdefault(ev["name"], Dist(ev["name"]))
                d.values.append(float(ev["dur"]))
    hops = [Dist(label) for label, *_ in HOPS]
    by_vector: dict[str, Dist] = {}
    counts = {"interrupts": len(irqs), "complete": 0, "merged_ipis": 0}
    for it in irqs:
        source = str(it["source"])
        counts[f"source {source}"] = counts.get(f"source {source}", 0) + 1
        counts["merged_ipis"] += len(it.get("merged") or [])
        start = it.get("t_send")
        if it.get("t_eoi") is not None or it.get("nmi"):
            if start is not None:
                counts["complete"] += 1
        for dist, (_, sources, a, b) in zip(hops, HOPS, strict=True):
            ta, tb = it.get(a), it.get(b)
            if source in sources and ta is not None and tb is not None:
                dist.values.append((int(tb) - int(ta)) / 1000)
        end = it.get("t_eoi")
        if start is not None and end is not None:
            label = f"vCPU {it['target']} {it['vector']:#x} {source}: source -> EOI"
            by_vector.setdefault(label, Dist(label)).values.append(
                (int(end) - int(start)) / 1000)
    counts["kicks"] = sum(kicks.values())
    for how in KICK_HOWS:
        counts[f"kicks {how}"] = kicks.get(how, 0)
    for key in ("unsourced_injections", "truncated_injections", "never_injected",
                "rejected_ipis", "events_dropped"):
        counts[key] = int(other.get(key, 0))
    exit_rows = sorted(exits.values(), key=lambda d: -sum(d.values))
    return Summary(str(other.get("title", "")), other, [h for h in hops if h.n],
                   {k: dict(v) for k, v in sorted(states.items())}, exit_rows, counts,
                   dict(sorted(by_vector.items())))


def print_summary(s: Summary, file: TextIO | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=120)
    c = s.counts
    console.print(f"[bold]{s.title}[/bold]: {c['interrupts']} interrupts "
                  f"({c['complete']} with a complete flow), {c['merged_ipis']} IPIs merged "
                  f"into a pending one, {c['unsourced_injections']} injections with no "
                  f"recorded source, {c['never_injected']} sources never injected, "
                  f"{c['events_dropped']} events overwritten. Clock: {s.other.get('clock')}.")
    console.print(f"Kicks: {c['kicks']} ({c['kicks signal']} signals to vCPUs in the guest, "
                  f"{c['kicks wake']} wake-ups of halted vCPUs, {c['kicks request only']} to "
                  f"vCPUs outside the guest, {c['kicks self']} self)")
    t = Table(title="Per-interrupt latency by hop (us)")
    for col in ("hop", "n", "p50", "p99", "mean", "max"):
        t.add_column(col, justify="left" if col == "hop" else "right")
    for d in s.hops:
        r = d.row()
        t.add_row(d.label, str(r["n"]), *(f"{r[x]:.1f}" for x in
                                          ("p50_us", "p99_us", "mean_us", "max_us")))
    console.print(t)
    if s.by_vector:
        t = Table(title="Source -> EOI by target and vector (us)")
        for col in ("interrupt", "n", "p50", "p99"):
            t.add_column(col, justify="left" if col == "interrupt" else "right")
        for d in s.by_vector.values():
            r = d.row()
            t.add_row(d.label.split(":")[0], str(r["n"]), f"{r['p50_us']:.1f}",
                      f"{r['p99_us']:.1f}")
        console.print(t)
    t = Table(title="Where each vCPU's time went (ms, share of the traced span)")
    t.add_column("vCPU")
    for cat in STATE_ORDER:
        t.add_column(cat, justify="right")
    for vcpu, by_cat in s.states.items():
        total = sum(by_cat.values()) or 1.0
        t.add_row(vcpu, *(f"{by_cat.get(cat, 0) / 1000:.1f} ({by_cat.get(cat, 0) / total:.0%})"
                          for cat in STATE_ORDER))
    console.print(t)
    t = Table(title="Exit handling by exit and path, all vCPUs (top 12 by total time)")
    for col in ("exit", "n", "total ms", "p50 us", "p99 us"):
        t.add_column(col, justify="left" if col == "exit" else "right")
    for d in s.exits[:12]:
        r = d.row()
        t.add_row(d.label, str(r["n"]), f"{float(r['total_us']) / 1000:.2f}",
                  f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}")
    console.print(t)


def plot_summary(s: Summary, path: str | Path) -> Path:
    """A PNG: hop latency distributions (box plots, log scale) and per-vCPU time shares."""
    try:
        import matplotlib
    except ImportError:
        raise KvmpyError("--plot needs matplotlib (pip install 'kvmpy[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 3 + 0.45 * max(len(s.hops), 1)
                                                  + 0.5 * len(s.states)),
                                   gridspec_kw={"height_ratios": [max(len(s.hops), 1),
                                                                  max(len(s.states), 1)]})
    hops = list(reversed(s.hops))
    if hops:
        data = [[max(v, 0.01) for v in d.values] for d in hops]
        horizontal = {"orientation": "horizontal"} \
            if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10) \
            else {"vert": False}
        ax1.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2},
                    **horizontal)
        ax1.set_yticks(range(1, len(hops) + 1),
                       [f"{d.label} (n={d.n}, p50 {d.row()['p50_us']:.0f}, "
                        f"p99 {d.row()['p99_us']:.0f})" for d in hops], fontsize=8)
        ax1.set_xscale("log")
    ax1.set_xlabel("us (box: p25-p75, line: p50, whiskers: p1-p99)")
    ax1.set_title("Per-interrupt latency by hop")
    left = [0.0] * len(s.states)
    colors = {"guest": "tab:green", "exit.fast": "tab:blue", "exit.slow": "tab:red",
              "loop": "tab:orange", "blocked": "tab:gray"}
    vcpus = list(s.states)
    for cat in STATE_ORDER:
        widths = [s.states[v].get(cat, 0) / 1000 for v in vcpus]
        ax2.barh(vcpus, widths, left=left, color=colors[cat], label=cat)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax2.set_xlabel("ms")
    ax2.set_title("Where each vCPU's time went")
    ax2.legend(fontsize=8, ncol=len(STATE_ORDER), loc="upper center",
               bbox_to_anchor=(0.5, -0.3 - 0.1 / max(len(s.states), 1)))
    if s.title:
        fig.suptitle(s.title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
