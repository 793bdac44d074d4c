"""Timing and sizing knobs of the SWIM core, with memberlist's three profiles.

Theory of operation: every duration is an integer number of milliseconds,
because the core never reads a clock; the driver passes monotonic
milliseconds to ``tick``. The ``lan``/``wan``/``local`` numbers are the ones
hashicorp/memberlist ships (``DefaultLANConfig`` and friends); the reconnect
and tombstone timeouts are serf's (Dkron's ``serf-reconnect-timeout``).
``validate`` checks every rule up front so the core can trust its config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cronmesh.errors import ValidationError

__all__ = ["PROFILES", "GossipConfig", "profile"]

_HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Protocol parameters; build one with :func:`profile` and ``replace``."""

    # Time between failure-detection probes (SWIM protocol period), ms, > 0.
    probe_interval_ms: int = 1_000
    # Wait for a direct ack before indirect probing, ms, < probe interval.
    probe_timeout_ms: int = 500
    # Number of members asked to ping indirectly (SWIM k), >= 0.
    indirect_checks: int = 3
    # Ask the driver for a TCP ping when the UDP probe misses its ack.
    tcp_fallback_ping: bool = True
    # Suspicion timeout scale (Lifeguard "alpha"), >= 1.
    suspicion_mult: int = 4
    # Max suspicion timeout as a multiple of the minimum (Lifeguard "beta").
    suspicion_max_timeout_mult: int = 6
    # Broadcast transmit limit scale: mult * ceil(log10(n + 1)), >= 1.
    retransmit_mult: int = 4
    # Upper bound of the local health multiplier (Lifeguard LHM), >= 1.
    awareness_max_multiplier: int = 8
    # Time between gossip rounds, ms, > 0.
    gossip_interval_ms: int = 200
    # Members contacted per gossip round, >= 1.
    gossip_nodes: int = 3
    # Keep gossiping to a dead member for this long after it died, ms.
    gossip_to_the_dead_ms: int = 30_000
    # Time between full-state push-pull exchanges, ms; 0 disables them.
    push_pull_interval_ms: int = 30_000
    # Time the driver gives a TCP exchange before reporting failure, ms.
    tcp_timeout_ms: int = 10_000
    # Time between attempts to reach a failed member (serf), ms, > 0.
    reconnect_interval_ms: int = 30_000
    # Failed members are reaped after this long (serf-reconnect-timeout), ms.
    reconnect_timeout_ms: int = 24 * _HOUR_MS
    # Members that left are reaped after this long (serf tombstone), ms.
    tombstone_timeout_ms: int = 24 * _HOUR_MS
    # Time between reap checks, ms, > 0.
    reap_interval_ms: int = 15_000
    # Largest UDP datagram the core builds, bytes, 256..65507.
    udp_budget: int = 1_400

    def validate(self) -> GossipConfig:
        """Check every rule; return ``self`` so calls can be chained.

        Raises:
            ValidationError: naming the first field that breaks a rule.
        """
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValidationError(f"{field.name} must be >= 0", field.name)
        positive = (
            "probe_interval_ms",
            "probe_timeout_ms",
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "retransmit_mult",
            "awareness_max_multiplier",
            "gossip_interval_ms",
            "gossip_nodes",
            "reconnect_interval_ms",
            "reap_interval_ms",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be >= 1", name)
        if self.probe_timeout_ms >= self.probe_interval_ms:
            raise ValidationError(
                "probe_timeout_ms must be below probe_interval_ms", "probe_timeout_ms"
            )
        if not 256 <= self.udp_budget <= 65_507:
            raise ValidationError("udp_budget must be in 256..65507", "udp_budget")
        return self


PROFILES: dict[str, GossipConfig] = {
    "lan": GossipConfig(),
    "wan": GossipConfig(
        probe_interval_ms=5_000,
        probe_timeout_ms=3_000,
        suspicion_mult=6,
        gossip_interval_ms=500,
        gossip_nodes=4,
        gossip_to_the_dead_ms=60_000,
        push_pull_interval_ms=60_000,
        tcp_timeout_ms=30_000,
    ),
    "local": GossipConfig(
        probe_interval_ms=1_000,
        probe_timeout_ms=200,
        indirect_checks=1,
        suspicion_mult=3,
        retransmit_mult=2,
        gossip_interval_ms=100,
        gossip_to_the_dead_ms=15_000,
        push_pull_interval_ms=15_000,
        tcp_timeout_ms=1_000,
    ),
}


def profile(name: str) -> GossipConfig:
    """Return the named timing profile (``lan``, ``wan`` or ``local``).

    Raises:
        ValidationError: for an unknown profile name.
    """
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValidationError(
            f"unknown gossip profile {name!r} (known: {known})", "profile"
        ) from None
