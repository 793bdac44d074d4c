"""Transmit-limited broadcast queue for piggy-backed dissemination.

Theory of operation (SWIM section 4.1 "Infection-Style Dissemination";
memberlist's TransmitLimitedQueue): membership updates ride on packets we
send anyway (probes, acks) and on periodic gossip. Each queued update is
sent at most ``retransmit_mult * ceil(log10(n + 1))`` times, which is enough
for an epidemic to reach all ``n`` members with high probability. The
least-transmitted updates go first (newest first among equals), so fresh
news spreads fastest. Updates are keyed by the member they are about: a
newer update about a member replaces the older one still queued.
"""

from __future__ import annotations

import math

__all__ = ["BroadcastQueue", "retransmit_limit"]


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """Transmissions per update in a cluster of ``n`` members."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


class _Item:
    __slots__ = ("frame", "key", "order", "transmits")

    def __init__(self, key: str, frame: bytes, order: int) -> None:
        self.key = key
        self.frame = frame
        self.order = order  # insertion counter; higher is newer
        self.transmits = 0


class BroadcastQueue:
    """Framed messages waiting to be piggy-backed, one per member name."""

    __slots__ = ("_counter", "_items")

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def queue(self, key: str, frame: bytes) -> None:
        """Queue ``frame`` about member ``key``, replacing an older one."""
        self._counter += 1
        self._items[key] = _Item(key, frame, self._counter)

    def take(self, budget: int, limit: int, max_count: int) -> list[bytes]:
        """Pick frames that fit in ``budget`` bytes, fewest transmits first.

        Each picked frame counts one transmission and is dropped once it
        reached ``limit`` transmissions.
        """
        if not self._items or budget <= 0:
            return []
        picked: list[bytes] = []
        ordered = sorted(self._items.values(), key=lambda i: (i.transmits, -i.order))
        for item in ordered:
            size = len(item.frame)
            if size > budget:
                continue
            picked.append(item.frame)
            budget -= size
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
            if len(picked) >= max_count or budget < 8:
                break
        return picked
