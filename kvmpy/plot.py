"""Latency histograms of kvmpy's exit handling time, fastpath vs slow path (matplotlib).

One panel per exit reason that has samples; each panel overlays the fastpath and the
slow-path histograms on a log time axis, from the log-linear buckets in trace.py.
"""

from __future__ import annotations

from pathlib import Path

from kvmpy.kvm.ioctls import EXIT_REASON_NAMES
from kvmpy.trace import MAX_REASON, NBUCKETS, ExitStats, Histogram, bucket_floor


def _series(h: Histogram) -> tuple[list[float], list[float], list[int]]:
    """(left edges us, widths us, counts) of the non-empty buckets."""
    lefts, widths, counts = [], [], []
    for i, n in enumerate(h.buckets):
        if n:
            lo = bucket_floor(i)
            hi = bucket_floor(i + 1) if i + 1 < NBUCKETS else lo * 2
            lefts.append(lo / 1000)
            widths.append(max(hi - lo, 1) / 1000)
            counts.append(n)
    return lefts, widths, counts


def plot_exit_histograms(stats: ExitStats, path: str | Path, title: str = "") -> Path:
    """Write a PNG of handling-time histograms per exit reason; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reasons = [r for r in range(MAX_REASON) if stats.count[r]]
    reasons.sort(key=lambda r: -stats.count[r])
    reasons = reasons[:6]
    fig, axes = plt.subplots(len(reasons) or 1, 1, figsize=(8, 2.4 * max(len(reasons), 1)),
                             squeeze=False)
    for ax, r in zip(axes[:, 0], reasons, strict=False):
        for hist, label, color in ((stats.fast_time[r], "fastpath", "tab:green"),
                                   (stats.slow_time[r], "slow path", "tab:red")):
            if hist.count:
                lefts, widths, counts = _series(hist)
                ax.bar(lefts, counts, width=widths, align="edge", alpha=0.6, color=color,
                       label=f"{label} (n={hist.count}, p50={hist.percentile(50)/1000:.1f} us,"
                       f" p99={hist.percentile(99)/1000:.1f} us)")
        ax.set_xscale("log")
        ax.set_title(EXIT_REASON_NAMES.get(r, str(r)), fontsize=10)
        ax.set_xlabel("kvmpy handling time per exit (us)")
        ax.set_ylabel("exits")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
