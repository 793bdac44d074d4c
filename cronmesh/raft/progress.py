"""What a leader knows about one follower's log (etcd's tracker, thesis §3.5).

A follower is in one of three replication states:

* PROBE: the leader does not know where the logs match; it sends one
  AppendEntries and waits for the answer (or the next heartbeat) before
  sending another.
* REPLICATE: the logs match up to ``match``; the leader streams entries
  optimistically, up to ``max_inflight`` unanswered messages (pipelining,
  thesis §10.2.2).
* SNAPSHOT: the follower needs entries the leader compacted; the leader
  sends the snapshot one chunk at a time.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Progress", "ProgressState"]


class ProgressState(enum.Enum):
    """Replication state of one follower, as seen by the leader."""

    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass(slots=True)
class Progress:
    """Leader-side bookkeeping for one peer (or for the leader itself)."""

    next: int  # next index to send (>= match + 1)
    match: int = 0  # highest index known to be stored on the peer
    state: ProgressState = ProgressState.PROBE
    paused: bool = False  # PROBE: one message is outstanding
    inflight: deque[int] = field(default_factory=deque)  # last index per message
    recent_active: bool = False  # heard from since the last check-quorum round
    acked_seq: int = 0  # highest read-round ``seq`` the peer answered
    snap_index: int = 0  # SNAPSHOT: index of the snapshot being sent
    snap_offset: int = 0  # SNAPSHOT: bytes the peer has acknowledged

    def become_probe(self, next_index: int) -> None:
        self.state = ProgressState.PROBE
        self.next = max(next_index, self.match + 1)
        self.paused = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def become_snapshot(self, snap_index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snap_index = snap_index
        self.snap_offset = 0
        self.inflight.clear()

    def is_paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.paused
        if self.state is ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True

    def ack(self, index: int) -> bool:
        """Record that the peer stores everything up to ``index``; True if new."""
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        if index <= self.match:
            return False
        self.match = index
        self.next = max(self.next, index + 1)
        return True
