"""Lifeguard's local health multiplier ("awareness").

Theory of operation (Lifeguard section IV.A "Local Health Aware Probe"): a
member that is itself slow or lossy misses acks and then falsely suspects
healthy peers. It keeps a saturating score in ``0 .. max_multiplier - 1``;
missed acks and missing nacks during a probe, and having to refute a
suspicion about itself, raise the score; a probe answered in time lowers it.
Probe interval and probe timeout are multiplied by ``score + 1``, so an
unhealthy member probes less eagerly and waits longer before suspecting.
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
