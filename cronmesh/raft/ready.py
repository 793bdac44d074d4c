"""The batch a RaftNode hands to its driver after each step, and what it means.

Contract (etcd's Ready/Advance, thesis §10.2.1 for the ordering):

1. ``ready = node.ready()`` collects everything the inputs fed since the last
   ``advance`` produced.  No input may be given until ``advance``.
2. Persist, in this order and before sending anything (``persist_ready`` in
   ``storage`` does exactly this):
   ``snapshot`` (save it, then drop the whole log up to and after it),
   ``compacted`` (save it, then compact the log prefix), ``entries`` (after
   dropping the log suffix from ``truncate_from``), then ``hard_state``.
3. Send ``messages`` (any order; the network may lose or reorder them).
   One exception (thesis §10.2.1): a leader may send its AppendEntries
   before persisting, when the batch changes no term or vote, because it
   counts its own copy toward the commit only after ``advance``.
4. Restore the state machine from ``snapshot`` if set, then apply
   ``committed_entries`` in order, then serve ``read_states``.
5. ``node.advance(ready)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cronmesh.raft.messages import Message
from cronmesh.raft.types import Entry, HardState, Snapshot

__all__ = ["ReadState", "Ready", "Role", "SoftState"]


class Role(enum.Enum):
    """A server's role (thesis §3.3, pre-candidate §9.6)."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"  # polling for a pre-vote; term unchanged
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile role information, reported when it changes."""

    role: Role
    leader: str | None  # current leader as far as this node knows
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read that may now be served from the local state machine."""

    ctx: bytes  # the request id passed to ``read_index``
    index: int  # commit index the read was confirmed at (already applied)


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver; see the module docstring for order."""

    # Send after persisting.  Each names its receiver in ``to``.
    messages: tuple[Message, ...] = ()
    # Append to the log, after dropping every entry >= ``truncate_from``.
    entries: tuple[Entry, ...] = ()
    # First index of a log suffix that must be dropped, or None.
    truncate_from: int | None = None
    # Persist when not None (term, vote, commit changed).
    hard_state: HardState | None = None
    # Apply to the state machine, in order, after persisting.
    committed_entries: tuple[Entry, ...] = ()
    # Received from the leader: save, reset the log after it, restore the state.
    snapshot: Snapshot | None = None
    # Made by ``compact()``: save, drop log entries <= its index.
    compacted: Snapshot | None = None
    # Reads that may be served now (after applying ``committed_entries``).
    read_states: tuple[ReadState, ...] = ()
    # Read contexts that could not be confirmed; the client should retry.
    failed_reads: tuple[bytes, ...] = ()
    # New role/leader/term, when any of them changed.
    soft_state: SoftState | None = None

    def must_sync(self) -> bool:
        """Whether something in this batch must be made durable (fsync)."""
        return bool(
            self.entries
            or self.hard_state is not None
            or self.snapshot is not None
            or self.compacted is not None
            or self.truncate_from is not None
        )
