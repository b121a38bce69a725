"""Counters that threads other than the owner may bump without a lock."""

from __future__ import annotations

import itertools


class AtomicCounter:
    """An event counter safe to increment from any thread.

    ``inc()`` is a single C-level ``next()`` on ``itertools.count``, which runs under
    the GIL without releasing it, so concurrent increments are never lost (a
    ``Counter[k] += 1`` is a read-modify-write and could be).
    """

    __slots__ = ("_it", "inc")

    def __init__(self) -> None:
        self._it = itertools.count()
        self.inc = self._it.__next__

    @property
    def value(self) -> int:
        """Number of increments so far (``count(N)`` repr holds the next value)."""
        return int(repr(self._it)[6:-1])
