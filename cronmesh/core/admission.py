"""Overload protection for the leader: how many fires may be in flight.

Every scheduled fire costs the leader's event loop a Raft proposal, its
apply, a gRPC hand-over and later the result's apply. Offered more than
the loop can do, the loop's turns grow until the Raft heartbeats leave
late, the followers elect someone else and the new leader inherits the same
load: at 600 fires/s on 2 cores leadership changed six times in 30 s and
results were committed at 7/s (docs/benchmarks.md, "Cluster").

So the leader watches its own loop: `LoopLag` measures how late a short
sleep wakes up. `Window` is an additive-increase, multiplicative-decrease
limit on fires in flight (from the fire to the hand-over), driven by that
lag: above `high` the limit shrinks by a factor, below `low` with the
limit reached it grows (not reached: it returns half the way to where it
started). The scheduler keeps fires over the limit waiting,
at most one per job; a job whose next instant comes due while its previous
one still waits skips the older one (counted, logged), much as a systemd
timer does not queue elapses behind a unit that is still starting. A
lagging loop thus sheds whole fires instead of everything getting late,
and the lag stays well under the shortest election timeout.

The policy (`Window`) is plain code driven by numbers, tested without a
loop; `LoopLag` is the asyncio part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LoopLag", "Window", "WindowSettings"]


@dataclass(frozen=True)
class WindowSettings:
    """Bounds and thresholds of the in-flight window (seconds, fires)."""

    initial: int = 512
    floor: int = 32  # never fewer in flight: small clusters never wait
    ceiling: int = 8192
    high: float = 0.25  # loop lag that shrinks the window (half of 0.5 s)
    low: float = 0.05  # loop lag under which a full window may grow
    decrease: float = 0.7
    increase: float = 1.25


class Window:
    """AIMD limit on fires in flight, adjusted once per lag sample."""

    def __init__(self, settings: WindowSettings | None = None) -> None:
        self.settings = settings or WindowSettings()
        self.limit = self.settings.initial
        self.in_flight = 0
        # Whether the limit was reached since the last adjustment: growing a
        # window nobody fills would only let a later burst through unchecked.
        self._full = False
        self.shrinks = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            self._full = True
            return False
        self.in_flight += 1
        if self.in_flight >= self.limit:
            self._full = True
        return True

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def adjust(self, lag: float) -> None:
        """Take one lag sample (the worst over the last period)."""
        s = self.settings
        if lag > s.high:
            smaller = max(s.floor, int(self.limit * s.decrease))
            if smaller < self.limit:
                self.shrinks += 1
            self.limit = smaller
        elif lag < s.low and self._full:
            self.limit = min(
                s.ceiling, max(self.limit + 1, int(self.limit * s.increase))
            )
        elif lag < s.low and self.limit < s.initial:
            # A quiet loop with room to spare: half the way back to the start
            # each period. A window shrunk by one stall (a long apply, a GC)
            # must not keep fires waiting, and shedding, for seconds after.
            self.limit = max(self.limit, (self.limit + s.initial) // 2)
        self._full = self.in_flight >= self.limit


class LoopLag:
    """Measures how late the event loop wakes a task from a short sleep.

    Every `period` seconds it hands the worst lateness seen in that period
    to each callback in `listeners`; `last` and `worst` keep it for metrics.
    """

    def __init__(
        self,
        *,
        interval: float = 0.02,
        period: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.period = period
        self.clock = clock
        self.listeners: list[Callable[[float], None]] = []
        self.last = 0.0  # worst lag of the last full period
        self.worst = 0.0  # worst lag since start

    async def run(self) -> None:
        start = self.clock()
        peak = 0.0
        while True:
            before = self.clock()
            await asyncio.sleep(self.interval)
            now = self.clock()
            peak = max(peak, now - before - self.interval)
            if now - start >= self.period:
                self.last = peak
                self.worst = max(self.worst, peak)
                for listener in self.listeners:
                    listener(peak)
                start, peak = now, 0.0
