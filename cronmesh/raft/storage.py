"""Storage the Raft core depends on, as small Protocols, plus in-memory versions.

The core only *reads* these stores (at construction, and the log while it
runs).  The driver writes them from each ``Ready`` with ``persist_ready``,
before sending that Ready's messages: that ordering is what makes a vote or
an acknowledgement survive a crash (thesis §3.8, §10.2.1).  Whatever was not
written before a crash never happened, as far as Raft is concerned.

The in-memory stores are the "disk" of the simulator: a simulated crash throws
the RaftNode away and keeps these objects.
"""

from __future__ import annotations

from typing import Protocol

from cronmesh.errors import InvariantViolation
from cronmesh.raft.ready import Ready
from cronmesh.raft.types import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Snapshot,
    encode_config_entry,
)

__all__ = [
    "LogStore",
    "MemoryLogStore",
    "MemoryStableStore",
    "StableStore",
    "bootstrap",
    "persist_ready",
]


class LogStore(Protocol):
    """The replicated log: a contiguous run of entries [first_index, last_index].

    Durability: every mutating method MUST be durable when it returns (or the
    driver MUST sync before sending the Ready's messages).  A store MUST NOT
    reorder, merge or drop entries on its own, and MUST NOT expose a partially
    applied ``append`` after a crash (all of it, or nothing).
    """

    def first_index(self) -> int:
        """Index of the first entry held; snapshot index + 1 after compaction."""
        ...

    def last_index(self) -> int:
        """Index of the last entry held; ``first_index() - 1`` when empty."""
        ...

    def term(self, index: int) -> int:
        """Term of the entry at ``index``; MUST be within [first, last]."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi), cut once ``max_bytes`` is exceeded, but at least one.

        ``lo`` and ``hi - 1`` MUST be within [first, last].
        """
        ...

    def append(self, entries: list[Entry], truncate_from: int | None = None) -> None:
        """Drop every entry >= ``truncate_from`` (if given), then append ``entries``.

        Both happen atomically.  ``entries`` MUST be consecutive and start at
        the new ``last_index() + 1``.
        """
        ...

    def compact(self, prefix: int) -> None:
        """Drop every entry <= ``prefix``.

        If ``prefix >= last_index()`` the log becomes empty and
        ``first_index()`` becomes ``prefix + 1``.  MUST NOT be called with a
        prefix above the applied index of the state machine.
        """
        ...


class StableStore(Protocol):
    """Term, vote, commit index, and the newest snapshot (with its configuration).

    Durability: ``save_hard_state`` and ``save_snapshot`` MUST be durable
    before the Ready's messages are sent.  A server MUST NOT forget a vote it
    cast or a term it adopted (§3.8); it MUST keep the snapshot until a newer
    one has been saved, since the log prefix it replaces is gone.
    """

    def hard_state(self) -> HardState:
        """The last saved hard state, or ``HardState()`` on a fresh server."""
        ...

    def save_hard_state(self, state: HardState) -> None:
        """Replace the hard state."""
        ...

    def snapshot(self) -> Snapshot | None:
        """The newest saved snapshot (its meta carries the configuration)."""
        ...

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the snapshot; MUST be durable before the log is compacted."""
        ...


class MemoryLogStore:
    """A LogStore in a Python list; what the simulator treats as disk."""

    def __init__(self) -> None:
        self._first = 1
        self._entries: list[Entry] = []

    def first_index(self) -> int:
        return self._first

    def last_index(self) -> int:
        return self._first + len(self._entries) - 1

    def term(self, index: int) -> int:
        return self._at(index).term

    def _at(self, index: int) -> Entry:
        if not self._first <= index <= self.last_index():
            raise InvariantViolation(
                f"raft: log index {index} outside [{self._first}, {self.last_index()}]"
            )
        return self._entries[index - self._first]

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        if lo >= hi:
            return []
        self._at(lo), self._at(hi - 1)
        out: list[Entry] = []
        size = 0
        for entry in self._entries[lo - self._first : hi - self._first]:
            size += entry.size()
            if out and size > max_bytes:
                break
            out.append(entry)
        return out

    def append(self, entries: list[Entry], truncate_from: int | None = None) -> None:
        if truncate_from is not None and truncate_from <= self.last_index():
            if truncate_from < self._first:
                raise InvariantViolation(
                    f"raft: truncate at {truncate_from} below first {self._first}"
                )
            del self._entries[truncate_from - self._first :]
        for entry in entries:
            if entry.index != self.last_index() + 1:
                raise InvariantViolation(
                    f"raft: append of index {entry.index} after {self.last_index()}"
                )
            self._entries.append(entry)

    def compact(self, prefix: int) -> None:
        if prefix < self._first:
            return
        if prefix >= self.last_index():
            self._entries = []
        else:
            del self._entries[: prefix - self._first + 1]
        self._first = prefix + 1


class MemoryStableStore:
    """A StableStore in memory."""

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._snapshot: Snapshot | None = None

    def hard_state(self) -> HardState:
        return self._hard_state

    def save_hard_state(self, state: HardState) -> None:
        self._hard_state = state

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot


def bootstrap(log: LogStore, stable: StableStore, voters: set[str]) -> None:
    """Write the initial configuration of a brand-new cluster.

    Every founding server runs this once with the same ``voters``: it writes a
    CONFIG entry at index 1, term 1 (as hashicorp/raft does).  Servers that
    join later start from empty stores instead and wait for a leader.

    Raises:
        InvariantViolation: the stores are not empty.
    """
    # A cluster that lost its quorum for good is repaired offline instead,
    # by raft.recovery.force_configuration (`cronmesh raft recover`).
    if log.last_index() != 0 or stable.hard_state() != HardState():
        raise InvariantViolation("raft: bootstrap on a server that has state")
    data = encode_config_entry(Membership(frozenset(voters)), None)
    log.append([Entry(1, 1, EntryKind.CONFIG, data)])
    stable.save_hard_state(HardState(term=1))


def persist_ready(ready: Ready, log: LogStore, stable: StableStore) -> None:
    """Write the durable parts of ``ready`` in the order the contract demands.

    A store with transactions SHOULD do all of it in one (one fsync per
    batch); the order then only matters for readers inside the transaction.
    """
    if ready.snapshot is not None:
        index = ready.snapshot.meta.index
        stable.save_snapshot(ready.snapshot)
        log.append([], truncate_from=max(index + 1, log.first_index()))
        log.compact(index)
    if ready.compacted is not None:
        stable.save_snapshot(ready.compacted)
        log.compact(ready.compacted.meta.index)
    if ready.entries or ready.truncate_from is not None:
        log.append(list(ready.entries), truncate_from=ready.truncate_from)
    if ready.hard_state is not None:
        stable.save_hard_state(ready.hard_state)
