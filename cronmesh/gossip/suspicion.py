"""Lifeguard's dynamic suspicion timeout, as pure functions of time in ms.

Theory of operation (Lifeguard, Dadgar et al. 2018, section IV.B "Dynamic
Suspicion Timeout"; SWIM, Das et al. 2002, section 4.2 "Suspicion"): when a
member is suspected, a timer starts at a *maximum* timeout. Every
independent confirmation (a suspect message from a member that has not
confirmed yet) shrinks it logarithmically towards a *minimum*; once ``k``
confirmations arrived the timer sits at the minimum. The minimum scales
with log10 of the cluster size so bigger clusters, which need more gossip
rounds to spread a refutation, wait longer.

The numbers follow memberlist (``suspicionTimeout`` in util.go and
``remainingSuspicionTime`` in suspicion.go): the size factor is floored at 1,
so clusters under ten members use ``suspicion_mult * probe_interval``; and
``k`` drops to 0 (use the minimum at once) when the cluster is too small to
deliver ``suspicion_mult - 2`` confirmations. Nothing here reads a clock:
a :class:`Suspicion` knows when it started and answers "when does it fire".
"""

from __future__ import annotations

import math

__all__ = [
    "Suspicion",
    "expected_confirmations",
    "remaining_suspicion_ms",
    "suspicion_timeout_ms",
]


def suspicion_timeout_ms(suspicion_mult: int, n: int, interval_ms: int) -> int:
    """Minimum suspicion timeout for a cluster of ``n`` members, in ms.

    ``suspicion_mult * max(1, log10(max(1, n))) * interval``, with the size
    factor truncated to three decimals as memberlist does.
    """
    node_scale = max(1.0, math.log10(max(1, n)))
    return suspicion_mult * int(node_scale * 1000) * interval_ms // 1000


def expected_confirmations(suspicion_mult: int, n: int) -> int:
    """Confirmations ``k`` a suspicion waits for before reaching the minimum.

    ``suspicion_mult - 2``; 0 when fewer than that many members besides us and
    the suspect exist (``n - 2 < k``), which means "use the minimum at once".
    """
    # memberlist's rule, not a cap at n - 2: with 3 members (lan) a single
    # confirmation would only shave the maximum, so the minimum is used.
    k = suspicion_mult - 2
    return 0 if n - 2 < k else max(k, 0)


def remaining_suspicion_ms(
    confirmations: int, k: int, elapsed_ms: int, min_ms: int, max_ms: int
) -> int:
    """Time left before a suspicion with ``confirmations`` of ``k`` fires, ms.

    The timeout falls from ``max_ms`` by the fraction
    ``log(c + 1) / log(k + 1)`` of the way to ``min_ms``, is floored to whole
    ms and never goes below ``min_ms``; ``elapsed_ms`` is then subtracted, so
    the result may be negative (already due).
    """
    if k < 1 or min_ms >= max_ms:
        return min_ms - elapsed_ms
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    raw = max_ms - frac * (max_ms - min_ms)
    timeout = max(math.floor(raw), min_ms)
    return timeout - elapsed_ms


class Suspicion:
    """The suspicion timer of one member, started at ``start_ms``.

    The member that raised the suspicion is recorded but does not count as a
    confirmation; each other distinct sender counts once, up to ``k``.
    """

    __slots__ = ("_confirmers", "confirmations", "k", "max_ms", "min_ms", "start_ms")

    def __init__(
        self, sender: str, k: int, min_ms: int, max_ms: int, start_ms: int
    ) -> None:
        self.k = k
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.start_ms = start_ms
        # Number of independent confirmations so far, 0..k.
        self.confirmations = 0
        self._confirmers = {sender}

    @property
    def deadline_ms(self) -> int:
        """Absolute time at which the suspect is declared dead."""
        remaining = remaining_suspicion_ms(
            self.confirmations, self.k, 0, self.min_ms, self.max_ms
        )
        return self.start_ms + remaining

    def confirm(self, sender: str) -> bool:
        """Count ``sender``'s confirmation; True when it was new and counted."""
        if self.confirmations >= self.k or sender in self._confirmers:
            return False
        self._confirmers.add(sender)
        self.confirmations += 1
        return True
