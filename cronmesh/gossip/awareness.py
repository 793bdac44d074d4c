"""Lifeguard's local health multiplier ("awareness").

Theory of operation (Lifeguard section IV.A "Local Health Aware Probe"): a
member that is itself slow or lossy misses acks and then falsely suspects
healthy peers. It keeps a saturating score in ``0 .. max_multiplier - 1``;
missed acks and missing nacks during a probe, and having to refute a
suspicion about itself, raise the score; a probe answered at all lowers it.
As in memberlist, the time a probe may stay unanswered before the target is
suspected is multiplied by ``score + 1`` (which also delays the next probe),
so an unhealthy member waits longer before suspecting; answered probes keep
the plain interval and the direct-ack timeout is never stretched.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """Saturating health score; 0 is healthy."""

    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._max = max_multiplier
        # Current score, 0 .. max_multiplier - 1.
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        """Add ``delta`` to the score and clamp it into its bounds."""
        self.score = min(max(self.score + delta, 0), self._max - 1)

    def scale(self, timeout_ms: int) -> int:
        """Stretch ``timeout_ms`` by the current multiplier (``score + 1``)."""
        return timeout_ms * (self.score + 1)
