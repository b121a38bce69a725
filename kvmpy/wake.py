"""The wake-up primitive of a sleeping vCPU thread."""

from __future__ import annotations

import threading


class WakeToken:
    """A binary semaphore on one `_thread.lock`: `set()` leaves a token, `wait()` takes
    it (or times out), `clear()` drops a stale one. It replaces `threading.Event`, whose
    Condition costs the waker a lock, a notify and a futex wake per waiter (measured
    here: Event wake-up p50 15-23 us and 9-14 us on the waker, this 5-8 us and 2-3 us).
    Tokens do not accumulate: setting a set token is a no-op, as for an Event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held = no token

    def set(self) -> None:
        """Leave a token (any thread)."""
        try:
            self._lock.release()
        except RuntimeError:
            pass  # a token is already there

    def clear(self) -> None:
        """Drop a token left earlier (the owner, before it re-checks and sleeps)."""
        self._lock.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a token is left (taking it) or `timeout` seconds pass."""
        return self._lock.acquire(True, -1 if timeout is None else timeout)

    def is_set(self) -> bool:
        if self._lock.acquire(False):
            self._lock.release()
            return True
        return False
